"""``pttd run``: wires config → capture → controller → outputs, and stops it all cleanly.

Start order follows the interface contract (docs/contract.md): capture first (a WAV source
starts playing), then the control socket, and READY=1 only once the mic has delivered audio.
No session is opened until the first press. Every part is registered in ``parts`` the moment
it starts; shutdown stops them in reverse order (parts.py), each bounded, all within 5 s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pttd.app.parts import Parts
from pttd.app.service import Notifier, StopRequest, Watchdog, install_stop_signals, status_text
from pttd.app.sessions import SessionFactory
from pttd.app.sinks import OutputSinks, build_sinks
from pttd.config import Config
from pttd.config_files import require_api_key
from pttd.core.controller import Command, Controller, Settings
from pttd.errors import startup_error
from pttd.events import State
from pttd.outputs.fanout import Outputs, Sink

if TYPE_CHECKING:
    from pttd.audio.alsa import AlsaSource
    from pttd.audio.capture import WavSource
    from pttd.audio.ring import RingBuffer
    from pttd.frontends.control.server import ControlServer
    from pttd.frontends.peripherals import ButtonInput, LedThread

#: the controller's own stop waits up to 3 s for the last final, and joins its thread after
CONTROLLER_STOP_S = 4.0
#: the outputs deliver what is queued (2 s), then close each sink (kiosk, MQTT: ~2.5 s each)
OUTPUTS_STOP_S = 8.0


class Daemon:
    """The assembled parts: ``build()``, ``start()``, ``run()`` until ``request_stop()``,
    then ``shutdown()``."""

    # made by build()
    ring: RingBuffer
    sinks: OutputSinks
    outputs: Outputs
    source: WavSource | AlsaSource
    sessions: SessionFactory
    controller: Controller
    # started by start()
    pin_factory: object
    button: ButtonInput
    control: ControlServer
    watchdog: Watchdog

    def __init__(
        self, cfg: Config, extra_sinks: list[Sink] | None = None, url_override: str | None = None
    ):
        self.cfg = cfg
        self.extra_sinks = list(extra_sinks or [])
        self.url_override = url_override
        self.parts = Parts()
        self.notifier = Notifier()
        self.leds: LedThread | None = None
        self._stop = StopRequest()
        self._shut_down = False

    def request_stop(self, *_args) -> None:
        """Signal-safe and callable from any thread: a flag and one byte on a pipe that
        ``run()`` sleeps on (``StopRequest``; a SIGTERM's C-level handler writes there too)."""
        self._stop.request()

    # --- assembly ------------------------------------------------------------------------------

    def build(self) -> None:
        """Make the parts from the config (only the outputs' workers run yet); StartupError or
        ConfigError for what the user must fix."""
        from pttd.audio.convert import AudioError
        from pttd.audio.record import make_source
        from pttd.audio.ring import RingBuffer
        from pttd.core.spool import SpoolError, open_spool

        cfg, a = self.cfg, self.cfg.audio
        if self.url_override is None and not cfg.is_local:
            require_api_key(cfg)
        self.ring = RingBuffer(a.ring_seconds * a.sample_rate, a.sample_rate)
        self.sinks = build_sinks(cfg, self.extra_sinks, self._command, self._waiting)
        self.outputs = Outputs(self.sinks.all)
        self.parts.register("outputs", self.outputs.close, timeout_s=OUTPUTS_STOP_S)
        with startup_error(AudioError):
            self.source = make_source(cfg, self.ring, on_status=self._on_source_status)
        with startup_error(SpoolError):
            spool = open_spool(cfg.spool)  # presses waiting for the network survive restarts
        self.sessions = SessionFactory(cfg, self.url_override or cfg.stt.url)
        self.controller = Controller(
            ring=self.ring,
            settings=controller_settings(cfg),
            session_factory=self.sessions,
            emit=self.outputs.emit,
            emit_confirmed=self.outputs.emit,
            on_state=self._on_state,
            spool=spool,
        )

    # --- callbacks: each only hands over (to the controller's queue, the LED thread) -------------

    def _command(self, name: str, source: str) -> dict:
        """A kiosk or MQTT command: bound before the controller exists, called once it runs."""
        return self.controller.command(name, source)

    def _waiting(self) -> dict:
        return self.controller.waiting

    def _button_pressed(self) -> None:
        self.controller.post(Command("press", "button"))

    def _button_released(self) -> None:
        self.controller.post(Command("release", "button"))

    def _on_source_status(self, kind: str, message: str) -> None:
        self.controller.on_source_status(kind, message)

    def _on_state(self, state: State, detail: str) -> None:
        self.notifier.status(status_text(state, detail))
        if self.leds is not None:
            self.leds.show(state)  # only hands the state to the LED thread

    # --- starting: each part registers its stop as soon as it runs --------------------------------

    def start(self) -> None:
        """Start every part, each registered as it runs; StartupError for what the user must fix.

        They stop in the reverse order. What gives the controller commands (the kiosk's and
        MQTT's commands, the button) starts after it, so it stops first: no new turn begins
        while the controller finishes the last one. Capture and the control socket start
        before it, so they stop after it: the turn has its audio and its final reaches the
        subscribers. The outputs, made by build(), stop last (journald, kiosk pages, MQTT).
        """
        self._start_offline_engine()
        self.source.start()
        self.parts.register("capture", self.source.stop)
        self._start_leds()
        self.watchdog = Watchdog(self.notifier, progress=self._capture_progress).start()
        self.parts.register("watchdog", self.watchdog.stop)
        self._start_control_socket()
        # LEDs first: the controller's state changes reach them from here on, and their first
        # draw cannot overwrite a newer one. Commands sent before now wait in its queue.
        self.controller.start()
        self.parts.register("controller", self.controller.stop, timeout_s=CONTROLLER_STOP_S)
        self._start_kiosk_commands()
        self._start_mqtt_commands()
        self._start_button()

    def _start_offline_engine(self) -> None:
        """``url = "local"``, or ``fallback = "local"``: the offline engine, in-process."""
        from pttd.app.offline import start_offline_engine

        cfg = self.cfg
        what = 'stt.url = "local"' if cfg.is_local else 'stt.fallback = "local"'
        if cfg.is_local and self.url_override is None:
            engine = start_offline_engine(cfg, what)
            self.sessions.url = engine.url
        elif cfg.stt.fallback == "local":
            engine = start_offline_engine(cfg, what)
            self.sessions.fallback_url = engine.url
        else:
            return
        self.parts.register("engine", engine.stop)

    def _capture_progress(self) -> int:
        return self.source.progress

    def _start_leds(self) -> None:
        from pttd.frontends.peripherals import (
            LedThread,
            PeripheralError,
            StatusLeds,
            make_pin_factory,
        )

        leds = self.cfg.leds
        with startup_error(PeripheralError, ValueError, prefix="GPIO: "):
            self.pin_factory = make_pin_factory(self.cfg.gpio.pin_factory)
            self.leds = LedThread(
                StatusLeds(
                    kind=leds.kind,
                    pins=list(leds.pins),
                    active_high=leds.active_high,
                    patterns=dict(leds.patterns),
                    pin_factory=self.pin_factory,
                )
            )
        self.leds.start()
        self.parts.register("leds", self.leds.close)
        self.leds.show(self.controller.state)

    def _start_control_socket(self) -> None:
        from pttd.frontends.control.protocol import ControlError
        from pttd.frontends.control.server import ControlServer

        self.control = ControlServer(self.cfg.control.socket, self.controller.command)
        with startup_error(ControlError):
            self.control.start()
        self.parts.register("control", self.control.stop)
        self.sinks.control.target = self.control.publish

    def _start_kiosk_commands(self) -> None:
        """The kiosk server is a sink: it closes with the outputs (the last final still reaches
        the pages). Its part here only stops its commands, early, like the button."""
        kiosk = self.sinks.kiosk
        if kiosk is None:
            return
        from pttd.frontends.kiosk_http import KioskError

        with startup_error(KioskError):
            kiosk.start()
        self.parts.register("kiosk", kiosk.stop_commands)

    def _start_mqtt_commands(self) -> None:
        """Connects in the background. Like the kiosk, the connection closes with the outputs
        (after the last final and the retained "offline" state); its part only stops its
        commands."""
        mqtt = self.sinks.mqtt
        if mqtt is None:
            return
        mqtt.start()
        self.parts.register("mqtt", mqtt.stop_commands)

    def _start_button(self) -> None:
        """Its callbacks only post to the controller's queue (on gpiozero's thread)."""
        from pttd.frontends.peripherals import ButtonInput, PeripheralError

        b = self.cfg.button
        with startup_error(PeripheralError, ValueError, prefix="GPIO: "):
            self.button = ButtonInput(
                pin=b.pin,
                pull_up=b.pull_up,
                bounce_ms=b.bounce_ms,
                on_press=self._button_pressed,
                on_release=self._button_released,
                pin_factory=self.pin_factory,
            )
        self.parts.register("button", self.button.close)

    # --- running and stopping ------------------------------------------------------------------

    def run(self) -> int:
        """Block until stopped; returns the exit code.

        Polls only until READY=1, then sleeps without a timeout: nothing else needs the main
        thread (the watchdog has its own thread). It sleeps in ``poll()`` on the stop pipe, into
        which SIGTERM/SIGINT write themselves whichever thread the kernel gave them to (a queue
        or lock wait here would miss those: see ``StopRequest``).
        """
        ready = False
        with self._stop.watching_signals():
            while True:
                # READY once the mic delivers audio; a mic that is missing at start still gets
                # the unit "active" (STATUS=offline: ...) so it stays up and retries instead of
                # looping
                if not ready and self._capture_began():
                    ready = True
                    state = self.controller.state
                    self.notifier.ready(status_text(state, self.controller.state_detail))
                if self._stop.wait(None if ready else 0.05):
                    return 0

    def _capture_began(self) -> bool:
        """The mic delivered audio, or is known to be missing (it then retries, offline)."""
        source = self.source
        return source.first_audio.is_set() or getattr(source, "state", "") == "offline"

    def shutdown(self) -> None:
        """Stop every running part, last started first (``start`` says why); idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        self.notifier.stopping()
        self.parts.stop_all()
        self.notifier.close()
        self._stop.close()  # run() has returned: no signal writes to it any more


def controller_settings(cfg: Config) -> Settings:
    """The controller's settings from the config: timings, session budget and fallback."""
    a, stt = cfg.audio, cfg.stt
    return Settings(
        sample_rate=a.sample_rate,
        chunk_ms=a.chunk_ms,
        preroll_ms=a.preroll_ms,
        postroll_ms=a.postroll_ms,
        postroll=a.postroll,
        postroll_silence_ms=a.postroll_silence_ms,
        keep_warm_s=stt.keep_warm_s,
        sessions_per_minute=stt.sessions_per_minute,
        session_budget=not cfg.is_local,
        button_mode=cfg.button.mode,
        fallback=stt.fallback == "local" and not cfg.is_local,
        fallback_retry_s=stt.fallback_retry_s,
    )


def run(
    cfg: Config,
    *,
    url_override: str | None = None,
    install_signals: bool = True,
    extra_sinks: list[Sink] | None = None,
) -> int:
    """Assemble, start, run until SIGTERM/SIGINT, stop. Raises StartupError/ConfigError."""
    daemon = Daemon(cfg, extra_sinks=extra_sinks, url_override=url_override)
    restore = install_stop_signals(daemon.request_stop) if install_signals else None
    try:
        daemon.build()
        daemon.start()
        return daemon.run()
    finally:
        daemon.shutdown()
        if restore is not None:
            restore()
