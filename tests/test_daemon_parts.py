"""The registry of running parts (app/parts.py), alone and inside a real ``Daemon``.

A part registers its stop the moment it starts; shutdown stops the parts last-started first,
each bounded, one failing or hanging part never keeping the others running, and a second part
under a name already running is refused instead of hiding the first. In the daemon this is
what lets a newcomer add a part (a second button, here) without touching the shutdown.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pttd.app.parts import DuplicatePartError, Parts
from pttd.errors import PttdError
from tests.daemon_proc import E2E_KEY, inprocess_config, speech_wav

PARTS_LOG = "pttd.app.parts"


def _until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def _stop_order(caplog) -> list[str]:
    """The parts' names in the order the registry logged them stopped."""
    return [
        r.args[0] for r in caplog.records if r.name == PARTS_LOG and r.msg.startswith("stopped ")
    ]


# --- the registry alone ---------------------------------------------------------------------------


def test_parts_stop_last_started_first():
    parts, calls = Parts(), []
    for name in ("capture", "controller", "button"):
        parts.register(name, lambda name=name: calls.append(name))
    assert parts.names == ["capture", "controller", "button"]
    assert parts.stop_all() == ["button", "controller", "capture"]
    assert calls == ["button", "controller", "capture"]
    assert parts.names == []
    assert parts.stop_all() == [] and len(calls) == 3  # a second stop stops nothing again


def test_a_name_already_running_is_refused_and_the_first_part_kept():
    parts, calls = Parts(), []
    parts.register("button", lambda: calls.append("first"))
    with pytest.raises(DuplicatePartError, match="'button'") as raised:
        parts.register("button", lambda: calls.append("second"))
    assert isinstance(raised.value, PttdError) and isinstance(raised.value, ValueError)
    assert parts.names == ["button"]
    parts.stop_all()
    assert calls == ["first"]


def test_a_failing_part_is_logged_and_the_others_still_stop(caplog):
    parts, calls = Parts(), []

    def broken():
        raise OSError("pin already released")

    parts.register("leds", lambda: calls.append("leds"))
    parts.register("broken", broken)
    parts.register("button", lambda: calls.append("button"))
    with caplog.at_level(logging.ERROR, logger=PARTS_LOG):
        assert parts.stop_all() == ["button", "broken", "leds"]
    assert calls == ["button", "leds"]
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failed] == ["stopping broken failed"]
    assert "pin already released" in (failed[0].exc_text or "")


def test_a_hanging_part_is_given_its_bound_and_then_passed_over(caplog):
    parts, calls, release = Parts(), [], threading.Event()
    parts.register("capture", lambda: calls.append("capture"))
    parts.register("stuck", release.wait, timeout_s=0.2)
    parts.register("button", lambda: calls.append("button"))
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=PARTS_LOG):
            assert parts.stop_all() == ["button", "stuck", "capture"]
        took = time.monotonic() - started
    finally:
        release.set()
    assert 0.2 <= took < 1.5
    assert calls == ["button", "capture"]
    assert any("stopping stuck took over 0.2 s" in r.getMessage() for r in caplog.records)
    assert _until(lambda: not any(t.name == "pttd-stop-stuck" for t in threading.enumerate()))


# --- inside a real Daemon: WAV mic, mock GPIO, the fake v3 server ---------------------------------


def test_a_second_button_added_after_start_is_stopped_first(inprocess_daemon, caplog):
    """A newcomer's second button: one ``register`` call, and shutdown stops it before the
    parts it relies on (the controller it posts to is still running then)."""
    from pttd.core.controller import Command
    from pttd.frontends.control.client import request
    from pttd.frontends.control.protocol import ControlError
    from pttd.frontends.peripherals import ButtonInput

    caplog.set_level(logging.DEBUG, logger=PARTS_LOG)
    daemon, _ = inprocess_daemon("second button")
    ctl = daemon.controller
    second = ButtonInput(
        pin=5,
        pull_up=True,
        bounce_ms=0,
        on_press=lambda: ctl.post(Command("press", "button")),
        on_release=lambda: ctl.post(Command("release", "button")),
        pin_factory=daemon.pin_factory,
    )
    seen_at_stop = []

    def stop_second() -> None:
        seen_at_stop.append(request(daemon.cfg.control.socket, "status")["ok"])
        second.close()

    daemon.parts.register("second-button", stop_second)
    with pytest.raises(DuplicatePartError):
        daemon.parts.register("button", second.close)  # would hide the first button at stop
    started = daemon.parts.names
    assert started[-1] == "second-button" and started.count("button") == 1

    assert _until(lambda: ctl.command("status")["audio_ms"] >= 1800, 15)
    second.pin.drive_low()  # pressed (pull-up: active low)
    assert _until(lambda: ctl.command("status")["audio_ms"] >= 3800, 15)
    second.pin.drive_high()
    assert _until(lambda: ctl.last_final is not None, 15)
    assert ctl.last_final["text"] == "second button"

    daemon.shutdown()
    assert seen_at_stop == [True]  # the control socket and the controller still ran
    order = _stop_order(caplog)
    assert order == list(reversed(started))
    assert order.index("button") < order.index("controller") < order.index("control")
    assert order.index("controller") < order.index("capture") and order[-1] == "outputs"
    assert daemon.parts.names == []
    with pytest.raises(ControlError):
        request(daemon.cfg.control.socket, "status")


def test_a_part_registered_before_start_is_stopped_after_the_others(fake_v3, tmp_path, caplog):
    """Registered between build() and start(): everything start() added stops before it."""
    from pttd.app.daemon import Daemon
    from pttd.frontends.control.client import request
    from pttd.frontends.control.protocol import ControlError

    caplog.set_level(logging.DEBUG, logger=PARTS_LOG)
    srv = fake_v3(script=["early"], api_keys={E2E_KEY})
    speech_wav(tmp_path / "mic.wav")
    cfg = inprocess_config(
        url=srv.url, key=E2E_KEY, wav=tmp_path / "mic.wav", socket=tmp_path / "ctl.sock"
    )
    daemon = Daemon(cfg)
    seen_at_stop = []

    def stop_early() -> None:
        try:
            request(cfg.control.socket, "status")
            seen_at_stop.append("answered")
        except ControlError:
            seen_at_stop.append("gone")

    try:
        daemon.build()
        daemon.parts.register("early", stop_early)
        daemon.start()
        assert request(cfg.control.socket, "status")["ok"]
        started = daemon.parts.names
    finally:
        daemon.shutdown()
    assert started[:2] == ["outputs", "early"]
    assert seen_at_stop == ["gone"]
    assert _stop_order(caplog) == list(reversed(started))


def test_a_start_up_failure_stops_what_had_started(fake_v3, tmp_path, caplog):
    """The control socket's path is taken by a live daemon: StartupError (exit 2), and the parts
    started before it (capture, LEDs, watchdog, outputs) are stopped all the same."""
    from pttd.app.daemon import Daemon, run
    from pttd.errors import StartupError

    caplog.set_level(logging.DEBUG, logger=PARTS_LOG)
    srv = fake_v3(api_keys={E2E_KEY})
    speech_wav(tmp_path / "mic.wav")
    cfg = inprocess_config(
        url=srv.url, key=E2E_KEY, wav=tmp_path / "mic.wav", socket=tmp_path / "ctl.sock"
    )
    first = Daemon(cfg)
    try:
        first.build()
        first.start()
        caplog.clear()
        with pytest.raises(StartupError, match="in use"):
            run(cfg, install_signals=False)
        assert _stop_order(caplog) == ["watchdog", "leds", "capture", "outputs"]
    finally:
        first.shutdown()
