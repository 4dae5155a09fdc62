"""``pttd run``: wires config → capture → controller → outputs, and stops it all cleanly.

Start order follows the contract: capture first (a WAV source starts playing), then the
control socket, and READY=1 only once the mic has delivered audio. No session is opened until
the first press. Stop order is the reverse, each part joined with a timeout, all within 5 s.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pttd.app.service import StopRequest
from pttd.config import Config, require_api_key
from pttd.core.controller import Command, Controller, Settings
from pttd.errors import StartupError
from pttd.events import State
from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.session import Session

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0


@dataclass
class Daemon:
    """The assembled parts; ``run()`` blocks until ``request_stop()``."""

    cfg: Config
    extra_sinks: list = field(default_factory=list)
    url_override: str | None = None
    _stop: StopRequest = field(default_factory=StopRequest)
    _parts: list = field(default_factory=list)

    def request_stop(self, *_args) -> None:
        """Signal-safe and callable from any thread: a flag and one byte on a pipe that
        ``run()`` sleeps on (``StopRequest``; a SIGTERM's C-level handler writes there too)."""
        self._stop.request()

    # --- assembly ------------------------------------------------------------------------------

    def build(self) -> None:
        from pttd.app.service import Notifier
        from pttd.audio.capture import AudioError, RingBuffer
        from pttd.outputs.fanout import JournalSink, Outputs, StdoutSink, journal_stream_matches

        cfg = self.cfg
        if self.url_override is None and not cfg.is_local:
            require_api_key(cfg)
        a = cfg.audio
        self.ring = RingBuffer(a.ring_seconds * a.sample_rate, a.sample_rate)
        self.notifier = Notifier()
        stdout = cfg.output.stdout
        if stdout == "text" and cfg.output.journal and journal_stream_matches(sys.stdout):
            stdout = "none"  # under systemd stdout is the journal: don't record each final twice
        sinks = [StdoutSink(stdout)] + list(self.extra_sinks)
        if cfg.output.journal:
            sinks.append(JournalSink(cfg.stt.speech_model))
        self.control_sink = _LateSink()
        sinks.append(self.control_sink)
        sinks += self._kiosk_and_hook_sinks()
        sinks += self._typing_and_mqtt_sinks()
        self.outputs = Outputs(sinks)
        try:
            self.source = self._make_source()
        except AudioError as exc:
            raise StartupError(str(exc)) from None
        from pttd.core.spool import SpoolError, open_spool

        try:
            spool = open_spool(cfg.spool)  # presses waiting for the network survive restarts
        except SpoolError as exc:
            raise StartupError(str(exc)) from None
        self.controller = Controller(
            ring=self.ring,
            settings=self._settings(),
            session_factory=self._new_session,
            emit=self.outputs.emit,
            emit_confirmed=self.outputs.emit,
            on_state=self._on_state,
            spool=spool,
        )

    def _settings(self) -> Settings:
        a = self.cfg.audio
        return Settings(
            sample_rate=a.sample_rate,
            chunk_ms=a.chunk_ms,
            preroll_ms=a.preroll_ms,
            postroll_ms=a.postroll_ms,
            keep_warm_s=self.cfg.stt.keep_warm_s,
            sessions_per_minute=self.cfg.stt.sessions_per_minute,
            session_budget=not self.cfg.is_local,
            button_mode=self.cfg.button.mode,
            fallback=self.cfg.stt.fallback == "local" and not self.cfg.is_local,
            fallback_retry_s=self.cfg.stt.fallback_retry_s,
        )

    def _make_source(self):
        from pttd.audio.record import make_source

        return make_source(self.cfg, self.ring, on_status=self._on_source_status)

    def _new_session(self, on_event: Callable, engine: str = "cloud") -> Session:
        stt = self.cfg.stt
        base = self.local_url if engine == "local" else (self.url_override or stt.url)
        u3 = protocol.is_u3(stt.speech_model)
        # U3 Pro models always format and the migration guide says not to send format_turns
        url = protocol.build_url(
            base,
            stt.speech_model,
            self.cfg.audio.sample_rate,
            None if u3 else stt.format_turns,
            stt.params,
        )
        if engine == "local" or not stt.token_url:
            return Session(
                url,
                stt.api_key,
                on_event=on_event,
                sample_rate=self.cfg.audio.sample_rate,
                format_turns=stt.format_turns and not u3,
            )
        # fleet mode: the session fetches its one-use token on its own thread (never here)
        tokens = getattr(self, "_tokens", None)
        if tokens is None:
            from pttd.stt.assemblyai.tokens import TokenSource

            tokens = self._tokens = TokenSource(stt.token_url, stt.token_auth_file)
        return Session(
            tokens.provider(url),
            stt.api_key,
            on_event=on_event,
            sample_rate=self.cfg.audio.sample_rate,
            format_turns=stt.format_turns and not u3,
            credential_id=tokens.credential_id,
        )

    def _on_source_status(self, kind: str, message: str) -> None:
        controller = getattr(self, "controller", None)
        if controller is not None:
            controller.on_source_status(kind, message)

    def _on_state(self, state: State, detail: str) -> None:
        from pttd.app.service import status_text

        self.notifier.status(status_text(state, detail))
        leds = getattr(self, "leds", None)
        if leds is not None:
            leds.show(state)  # only hands the state to the LED thread

    # --- running -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything in contract order; StartupError for what the user must fix."""
        from pttd.app.service import Watchdog
        from pttd.frontends.control import ControlError, ControlServer
        from pttd.frontends.peripherals import (
            ButtonInput,
            LedThread,
            PeripheralError,
            StatusLeds,
            make_pin_factory,
        )

        cfg = self.cfg
        if cfg.is_local and self.url_override is None:
            self.url_override = self._start_local_engine()
        elif cfg.stt.fallback == "local":
            self.local_url = self._start_local_engine()
        self.source.start()
        self._parts.append(("capture", self.source.stop))
        try:
            factory = make_pin_factory(cfg.gpio.pin_factory)
            self.leds = LedThread(
                StatusLeds(
                    kind=cfg.leds.kind,
                    pins=list(cfg.leds.pins),
                    active_high=cfg.leds.active_high,
                    patterns=dict(cfg.leds.patterns),
                    pin_factory=factory,
                )
            )
            self.leds.start()
            self._parts.append(("leds", self.leds.close))
            self.leds.show(self.controller.state)
            self.button = ButtonInput(
                pin=cfg.button.pin,
                pull_up=cfg.button.pull_up,
                bounce_ms=cfg.button.bounce_ms,
                on_press=lambda: self.controller.post(Command("press", "button")),
                on_release=lambda: self.controller.post(Command("release", "button")),
                pin_factory=factory,
            )
            self._parts.append(("button", self.button.close))
        except (PeripheralError, ValueError) as exc:
            raise StartupError(f"GPIO: {exc}") from None
        # Only now: its state changes reach the LED thread from here on, and the first draw
        # above cannot overwrite a newer one. Button presses before this wait in its queue.
        self.controller.start()
        self._parts.append(("controller", self.controller.stop))
        self.control = ControlServer(cfg.control.socket, self.controller.command)
        try:
            self.control.start()
        except ControlError as exc:
            raise StartupError(str(exc)) from None
        self._parts.append(("control", self.control.stop))
        self.control_sink.target = self.control.publish
        if self.kiosk is not None:
            self._start_kiosk()
        if self.mqtt is not None:
            self._start_mqtt()
        self.watchdog = Watchdog(self.notifier, progress=lambda: self.source.progress)
        self.watchdog.start()
        self._parts.append(("watchdog", self.watchdog.stop))

    # --- kiosk endpoint and hook command: both are output sinks ------------------------------------

    def _kiosk_and_hook_sinks(self) -> list:
        """The hook runs per final; the kiosk mirrors every event (it also takes commands)."""
        import shutil

        out, k = self.cfg.output, self.cfg.kiosk
        sinks: list = []
        if out.hook:
            from pttd.outputs.hook import HookSink

            if shutil.which(out.hook[0]) is None:
                raise StartupError(f"output.hook: {out.hook[0]} is not an executable program")
            sinks.append(HookSink(out.hook, out.hook_timeout_s, out.hook_retries))
        self.kiosk = None
        if k.listen:
            from pttd.frontends.kiosk import (
                KioskError,
                KioskServer,
            )  # asyncio + websockets: only when used

            try:
                self.kiosk = KioskServer(
                    k.listen,
                    lambda cmd: self.controller.command(cmd, "kiosk"),
                    token=k.token,
                    allowed_origins=k.allowed_origins,
                    status=lambda: self.controller.waiting,
                )
            except KioskError as exc:
                raise StartupError(str(exc)) from None
            sinks.append(self.kiosk)
        return sinks

    def _start_kiosk(self) -> None:
        """Its server closes with the outputs (so the last final reaches the page); the "kiosk"
        part only stops its commands, early, like the button."""
        from pttd.frontends.kiosk import KioskError

        try:
            self.kiosk.start()
        except KioskError as exc:
            raise StartupError(str(exc)) from None
        self._parts.append(("kiosk", self.kiosk.stop_commands))

    # --- typing and MQTT (issue 10): both are output sinks ------------------------------------------

    def _typing_and_mqtt_sinks(self) -> list:
        """Built here so a missing library, /dev/uinput or password file stops start-up (exit 2)."""
        out, sinks = self.cfg.output, []
        self.mqtt = None
        if self.cfg.mqtt.url:
            from pttd.frontends.mqtt import MqttBridge, MqttError

            try:
                self.mqtt = MqttBridge.from_config(
                    self.cfg.mqtt, on_command=lambda cmd: self.controller.command(cmd, "mqtt")
                )
            except MqttError as exc:
                raise StartupError(str(exc)) from None
            sinks.append(self.mqtt)
        if out.type:
            from pttd.outputs.keyboard import TypingError, TypingSink

            try:
                sinks.append(
                    TypingSink.open(
                        out.type_layout,
                        trailing=out.type_trailing,
                        partials=out.type_partials,
                        delay_ms=out.type_delay_ms,
                    )
                )
            except TypingError as exc:
                raise StartupError(str(exc)) from None
        return sinks

    def _start_mqtt(self) -> None:
        """Connects in the background. Like the kiosk, the connection closes with the outputs
        (after the last final and the retained "offline" state); the "mqtt" part only stops
        its commands, early, like the button."""
        self.mqtt.start()
        self._parts.append(("mqtt", self.mqtt.stop_commands))

    local_url: str | None = None

    def _start_local_engine(self) -> str:
        """``url = "local"``: the offline engine in-process, on an ephemeral loopback port."""
        require_pocketsphinx('stt.url = "local"' if self.cfg.is_local else 'stt.fallback = "local"')
        from pttd.local.engine import LocalEngine

        engine = LocalEngine(phrases=list(self.cfg.local.phrases))
        engine.start()
        self._parts.append(("engine", engine.stop))
        return engine.url

    def run(self) -> int:
        """Block until stopped; returns the exit code.

        Polls only until READY=1, then sleeps without a timeout: nothing else needs the main
        thread (the watchdog has its own thread). It sleeps in ``poll()`` on the stop pipe, into
        which SIGTERM/SIGINT write themselves whichever thread the kernel gave them to (a queue
        or lock wait here missed those: issue 22).
        """
        ready = False
        with self._stop.watching_signals():
            while True:
                # READY once the mic delivers audio; a mic that is missing at start still gets
                # the unit "active" (STATUS=offline: ...) so it stays up and retries instead of
                # looping
                if not ready and (
                    self.source.first_audio.is_set()
                    or getattr(self.source, "state", "") == "offline"
                ):
                    ready = True
                    self.notifier.ready(self._status_now())
                if self._stop.wait(None if ready else 0.05):
                    return 0

    def _status_now(self) -> str:
        from pttd.app.service import status_text

        return status_text(self.controller.state, self.controller.state_detail)

    # Stop order: no new presses (button, kiosk commands), then let the controller finish the turn
    # (its final still reaches subscribers, journald and kiosk pages: the kiosk server itself
    # closes in outputs.close()), then the rest; capture last so the turn has its audio.
    # "mqtt" stops only MQTT commands; its connection (like the typing keyboard) closes in
    # outputs.close(), after the sink's worker has delivered the last final.
    _STOP_ORDER = (
        "button",
        "kiosk",
        "mqtt",
        "controller",
        "control",
        "watchdog",
        "leds",
        "capture",
        "engine",
    )

    def shutdown(self) -> None:
        """Stop in a fixed order; every part is joined with a timeout (5 s in all)."""
        self.notifier.stopping()
        parts = dict(self._parts)
        for name in self._STOP_ORDER:
            stop = parts.pop(name, None)
            if stop is None:
                continue
            started = time.monotonic()
            try:
                stop()
            except Exception:
                log.exception("stopping %s failed", name)
            log.debug("stopped %s in %.0f ms", name, (time.monotonic() - started) * 1000)
        self._parts.clear()
        self.outputs.close()
        self.notifier.close()
        self._stop.close()  # run() has returned: no signal writes to it any more


def require_pocketsphinx(what: str) -> None:
    """StartupError (exit 2, one line) when the offline engine's pocketsphinx is not installed.

    It is the ``[local]`` extra, not a default dependency (README: "The offline engine is an
    extra", with the measurements), and ``local_engine`` only imports it when a decoder loads:
    without this check the first session would fail deep inside the engine instead."""
    try:
        import pocketsphinx  # noqa: F401  (the engine loads it right after this anyway)
    except ImportError as exc:
        raise StartupError(
            f"{what} needs the offline engine, which is not installed "
            f"({exc}): pip install 'pttd[local]'"
        ) from None


class _LateSink:
    """Forwards events to the control socket once it exists (it starts after capture).

    Inline: ``ControlServer.publish`` only queues for the subscribers and wakes its thread."""

    inline = True
    target: Callable[[dict], None] | None = None

    def emit(self, event: dict) -> None:
        if self.target is not None:
            self.target(event)

    def close(self) -> None:
        self.target = None


def run(
    cfg: Config,
    *,
    url_override: str | None = None,
    install_signals: bool = True,
    extra_sinks: list | None = None,
) -> int:
    """Assemble, start, run until SIGTERM/SIGINT, stop. Raises StartupError/ConfigError."""
    from pttd.app.service import install_stop_signals

    daemon = Daemon(cfg, extra_sinks=extra_sinks or [], url_override=url_override)
    daemon.build()
    restore = install_stop_signals(daemon.request_stop) if install_signals else None
    try:
        try:
            daemon.start()
        except BaseException:
            daemon.shutdown()
            raise
        code = daemon.run()
        daemon.shutdown()
        return code
    finally:
        if restore is not None:
            restore()
