"""``pttd check``: one PASS/FAIL line per part, each failure with the fix to try.

Config, mic (live level meter), GPIO (LEDs cycle through the states; a button press is asked
for on a terminal), and the server (Begin, then Terminate: the key is accepted). Exit 0 only
when nothing failed. It opens a session, the one place besides a press that does.
"""

from __future__ import annotations

import sys
import time

from pttd.config import Config

BUTTON_WAIT_S = 10.0


class Report:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.failed = 0

    def line(self, status: str, part: str, text: str, fix: str = "") -> None:
        if status == "FAIL":
            self.failed += 1
        self.out.write(f"{status:4} {part:8} {text}\n")
        if fix:
            self.out.write(f"{'':14}fix: {fix}\n")
        self.out.flush()


def run_check(
    cfg: Config, *, mic_seconds: float = 3.0, interactive: bool | None = None, out=None
) -> int:
    report = Report(out)
    report.line("PASS", "config", cfg.path or "(defaults)")
    check_mic(cfg, report, mic_seconds)
    check_gpio(cfg, report, sys.stdin.isatty() if interactive is None else interactive)
    check_server(cfg, report)
    return 0 if report.failed == 0 else 1


def check_mic(cfg: Config, report: Report, seconds: float) -> None:
    from pttd.audio.capture import AudioError, RingBuffer, measure_levels
    from pttd.audio.record import make_source

    a = cfg.audio
    ring = RingBuffer(a.ring_seconds * a.sample_rate, a.sample_rate)
    what = a.wav if a.source == "wav" else a.device
    try:
        source = make_source(cfg, ring)
        levels = measure_levels(
            source,
            seconds=seconds,
            interval=0.5,
            on_update=lambda r: report.out.write(f"{'':14}{r.line()}\n"),
        )
    except AudioError as exc:
        report.line(
            "FAIL",
            "mic",
            f"{what}: {exc}",
            "check audio.device (`arecord -L`), the dtoverlay and the wiring (hardware/wiring.md)",
        )
        return
    if levels.frames == 0:
        report.line("FAIL", "mic", f"{what}: no audio", "check audio.device and the wiring")
        return
    summary = f"{what}: {levels.line()}"
    if any("all zeros" in w for w in levels.warnings):
        report.line("FAIL", "mic", summary, "; ".join(levels.warnings))
    elif levels.warnings:
        report.line("WARN", "mic", summary, "; ".join(levels.warnings))
    else:
        report.line("PASS", "mic", summary)


def check_gpio(cfg: Config, report: Report, interactive: bool) -> None:
    import threading

    from pttd.events import State
    from pttd.frontends.peripherals import (
        ButtonInput,
        PeripheralError,
        StatusLeds,
        make_pin_factory,
    )

    pressed = threading.Event()
    try:
        factory = make_pin_factory(cfg.gpio.pin_factory)
        leds = StatusLeds(
            kind=cfg.leds.kind,
            pins=list(cfg.leds.pins),
            active_high=cfg.leds.active_high,
            patterns=dict(cfg.leds.patterns),
            pin_factory=factory,
        )
        button = ButtonInput(
            pin=cfg.button.pin,
            pull_up=cfg.button.pull_up,
            bounce_ms=cfg.button.bounce_ms,
            on_press=pressed.set,
            on_release=lambda: None,
            pin_factory=factory,
        )
    except (PeripheralError, ValueError) as exc:
        report.line(
            "FAIL",
            "gpio",
            str(exc),
            "is the pin free and the user in group gpio? set [gpio] pin_factory",
        )
        return
    try:
        for state in State:
            leds.show(state)
            time.sleep(0.3 if interactive else 0.0)  # so a person can see each state
        leds.show(State.IDLE)
        report.line(
            "PASS", "leds", f"{cfg.leds.kind} on {cfg.leds.pins} cycled through every state"
        )
        if cfg.gpio.pin_factory == "mock":
            report.line("PASS", "button", f"GPIO{cfg.button.pin} (mock pins: nothing to press)")
        elif not interactive:
            report.line(
                "SKIP", "button", f"GPIO{cfg.button.pin}: not a terminal, no press asked for"
            )
        else:
            report.out.write(
                f"{'':14}press the button on GPIO{cfg.button.pin} "
                f"within {BUTTON_WAIT_S:.0f} s ...\n"
            )
            report.out.flush()
            if pressed.wait(BUTTON_WAIT_S):
                report.line("PASS", "button", f"GPIO{cfg.button.pin} press seen")
            else:
                report.line(
                    "FAIL",
                    "button",
                    f"no press seen on GPIO{cfg.button.pin}",
                    "button between the pin and GND with pull_up = true "
                    "(or to 3V3 with pull_up = false)",
                )
    finally:
        button.close()
        leds.close()


def check_server(cfg: Config, report: Report) -> None:
    from pttd.config import ConfigError, require_api_key
    from pttd.stt.assemblyai import protocol
    from pttd.stt.assemblyai.session import ConnectError, Session

    engine = None
    url = cfg.stt.url
    if cfg.is_local:
        from pttd.app.daemon import StartupError, require_pocketsphinx
        from pttd.local.engine import LocalEngine

        try:
            require_pocketsphinx('url = "local"')  # local_engine imports it only when it decodes
        except StartupError as exc:
            report.line(
                "FAIL", "server", f"offline engine unavailable: {exc}", "pip install 'pttd[local]'"
            )
            return
        engine = LocalEngine(phrases=list(cfg.local.phrases))
        engine.start()
        url = engine.url
    else:
        try:
            require_api_key(cfg)
        except ConfigError as exc:
            report.line("FAIL", "key", str(exc), "put the key in /etc/pttd/api-key")
            return
    try:
        full = protocol.build_url(
            url,
            cfg.stt.speech_model,
            cfg.audio.sample_rate,
            None if protocol.is_u3(cfg.stt.speech_model) else cfg.stt.format_turns,
            cfg.stt.params,
        )
        if cfg.stt.token_url and engine is None:  # fleet mode: a token from the broker
            from pttd.stt.assemblyai.tokens import TokenSource

            tokens = TokenSource(cfg.stt.token_url, cfg.stt.token_auth_file, prefetch=False)
            session = Session(
                tokens.provider(full),
                cfg.stt.api_key,
                on_event=lambda s, e: None,
                sample_rate=cfg.audio.sample_rate,
                credential_id=tokens.credential_id,
            )
        else:
            session = Session(
                full, cfg.stt.api_key, on_event=lambda s, e: None, sample_rate=cfg.audio.sample_rate
            )
        started = time.monotonic()
        try:
            begin = session.connect()
        except ConnectError as exc:
            fix = {
                "auth": (
                    "check stt.token_auth_file against the broker's devices file"
                    if cfg.stt.token_url
                    else "check the key in /etc/pttd/api-key and the account balance"
                ),
                "config": "check stt.url, stt.speech_model and stt.params",
                "rate_limited": "wait a minute; too many sessions were opened",
                "transport": "check the network, DNS and the clock (TLS needs the time)",
            }
            report.line(
                "FAIL",
                "server",
                f"{cfg.stt.url}: {exc}",
                fix.get(exc.closed.policy.kind, "see journalctl -u pttd"),
            )
            return
        took = (time.monotonic() - started) * 1000
        model = begin.configuration.model if begin.configuration else cfg.stt.speech_model
        term = session.terminate(timeout=5)
        report.line(
            "PASS",
            "server",
            f"{cfg.stt.url}: key accepted, session {begin.id} "
            f"({model}) opened in {took:.0f} ms"
            f"{', terminated' if term else ', closed (no Termination)'}",
        )
    finally:
        if engine is not None:
            engine.stop()
