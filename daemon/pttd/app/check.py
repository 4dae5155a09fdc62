"""``pttd check``: one PASS/FAIL line per part, each failure with the fix to try.

Config, mic (live level meter), GPIO (LEDs cycle through the states; a button press is asked
for on a terminal), and the server (Begin, then Terminate: the key is accepted). Exit 0 only
when nothing failed. It opens a session, the one place besides a press that does.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pttd.config import Config
from pttd.errors import ConfigError, StartupError
from pttd.events import State

if TYPE_CHECKING:
    from pttd.frontends.peripherals import ButtonInput, StatusLeds

BUTTON_WAIT_S = 10.0


class Report:
    """Aligned PASS/WARN/SKIP/FAIL lines, each failure with its fix; counts the failures."""

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
    """Every check in turn (a failure does not stop the next); 0 only when none failed."""
    report = Report(out)
    report.line("PASS", "config", cfg.path or "(defaults)")
    check_mic(cfg, report, mic_seconds)
    check_gpio(cfg, report, sys.stdin.isatty() if interactive is None else interactive)
    check_server(cfg, report)
    return 0 if report.failed == 0 else 1


def check_mic(cfg: Config, report: Report, seconds: float) -> None:
    from pttd.audio.convert import AudioError, LevelReport
    from pttd.audio.levels import measure_levels
    from pttd.audio.record import make_source
    from pttd.audio.ring import RingBuffer

    def show(reading: LevelReport) -> None:
        report.out.write(f"{'':14}{reading.line()}\n")

    a = cfg.audio
    ring = RingBuffer(a.ring_seconds * a.sample_rate, a.sample_rate)
    what = a.wav if a.source == "wav" else a.device
    try:
        source = make_source(cfg, ring)
        levels = measure_levels(source, seconds=seconds, interval=0.5, on_update=show)
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
    """The LEDs cycle through every state; on a terminal, a press of the button is asked for."""
    from pttd.frontends.peripherals import PeripheralError

    pressed = threading.Event()
    try:
        leds, button = _open_gpio(cfg, on_press=pressed.set)
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
        _check_button(cfg, report, interactive, pressed)
    finally:
        button.close()
        leds.close()


def _open_gpio(cfg: Config, on_press: Callable[[], None]) -> tuple[StatusLeds, ButtonInput]:
    """The LEDs and the button on the configured pins, as the daemon opens them."""
    from pttd.frontends.peripherals import ButtonInput, StatusLeds, make_pin_factory

    factory = make_pin_factory(cfg.gpio.pin_factory)
    leds = StatusLeds(
        kind=cfg.leds.kind,
        pins=list(cfg.leds.pins),
        active_high=cfg.leds.active_high,
        patterns=dict(cfg.leds.patterns),
        pin_factory=factory,
    )
    try:
        button = ButtonInput(
            pin=cfg.button.pin,
            pull_up=cfg.button.pull_up,
            bounce_ms=cfg.button.bounce_ms,
            on_press=on_press,
            on_release=lambda: None,
            pin_factory=factory,
        )
    except BaseException:
        leds.close()
        raise
    return leds, button


def _check_button(cfg: Config, report: Report, interactive: bool, pressed: threading.Event) -> None:
    pin = cfg.button.pin
    if cfg.gpio.pin_factory == "mock":
        report.line("PASS", "button", f"GPIO{pin} (mock pins: nothing to press)")
        return
    if not interactive:
        report.line("SKIP", "button", f"GPIO{pin}: not a terminal, no press asked for")
        return
    report.out.write(f"{'':14}press the button on GPIO{pin} within {BUTTON_WAIT_S:.0f} s ...\n")
    report.out.flush()
    if pressed.wait(BUTTON_WAIT_S):
        report.line("PASS", "button", f"GPIO{pin} press seen")
        return
    report.line(
        "FAIL",
        "button",
        f"no press seen on GPIO{pin}",
        "button between the pin and GND with pull_up = true (or to 3V3 with pull_up = false)",
    )


def check_server(cfg: Config, report: Report) -> None:
    """A session opens (Begin) and ends (Terminate): the key, or the fleet's token, works."""
    from pttd.app.offline import start_offline_engine

    if not cfg.is_local:
        if _key_present(cfg, report):
            _open_session(cfg, cfg.stt.url, report)
        return
    try:
        engine = start_offline_engine(cfg, 'url = "local"')
    except StartupError as exc:
        report.line(
            "FAIL", "server", f"offline engine unavailable: {exc}", "pip install 'pttd[local]'"
        )
        return
    try:
        _open_session(cfg, engine.url, report)
    finally:
        engine.stop()


def _key_present(cfg: Config, report: Report) -> bool:
    from pttd.config_files import require_api_key

    try:
        require_api_key(cfg)
    except ConfigError as exc:
        report.line("FAIL", "key", str(exc), "put the key in /etc/pttd/api-key")
        return False
    return True


def _open_session(cfg: Config, url: str, report: Report) -> None:
    """Connect as a press would (fleet mode: a token from the broker), then terminate."""
    from pttd.app.sessions import SessionFactory
    from pttd.stt.base import ConnectError

    session = SessionFactory(cfg, url, prefetch_tokens=False)(on_event=lambda s, e: None)
    started = time.monotonic()
    try:
        begin = session.connect()
    except ConnectError as exc:
        fix = _connect_fix(cfg, exc.closed.policy.kind)
        report.line("FAIL", "server", f"{cfg.stt.url}: {exc}", fix)
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


def _connect_fix(cfg: Config, kind: str) -> str:
    """The fix to try for a refused connection, by the close policy's kind."""
    if kind == "auth" and cfg.stt.token_url:
        return "check stt.token_auth_file against the broker's devices file"
    fixes = {
        "auth": "check the key in /etc/pttd/api-key and the account balance",
        "config": "check stt.url, stt.speech_model and stt.params",
        "rate_limited": "wait a minute; too many sessions were opened",
        "transport": "check the network, DNS and the clock (TLS needs the time)",
    }
    return fixes.get(kind, "see journalctl -u pttd")
