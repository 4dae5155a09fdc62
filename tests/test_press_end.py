"""A press ends (Terminate, idle state, LEDs) only once the outputs' threads have its last final.

Ending it at once woke several threads just when the final's output thread needed the
interpreter. These run ``pttd run``'s wiring in-process (real Session, fake v3 server, mock
GPIO) with one extra output that holds each final until the test lets it go.
"""
from __future__ import annotations

import threading
import time

import pytest

from pttd.core import finals
from pttd.events import State
from tests.alsa_fifo import wait_until


class HeldFinals:
    """A threaded output (not ``inline``) that holds each final until ``gate`` is set."""

    def __init__(self):
        self.gate = threading.Event()
        self.holding = threading.Event()
        self.finals: list[dict] = []
        self.kinds: list[str] = []
        self.held_at = 0.0

    def emit(self, event: dict) -> None:
        self.kinds.append(event["event"])
        if event["event"] == "final":
            self.held_at = time.monotonic()
            self.holding.set()
            self.gate.wait(20)
            self.finals.append(event)

    def close(self) -> None:
        self.gate.set()


def wait_for(predicate, timeout: float) -> bool:
    return wait_until(predicate, timeout, interval=0.005)


@pytest.fixture
def daemon_with(inprocess_daemon):
    """``make(output)``: a started in-process daemon with ``output`` as an extra sink."""
    outputs = []

    def make(output):
        outputs.append(output)
        return inprocess_daemon("the end of a press", extra_sinks=[output])

    yield make
    for output in outputs:
        output.gate.set()  # let a held final go before the daemon shuts down, so that is quick


def press_and_release(daemon) -> None:
    status = daemon.controller.command
    assert wait_for(lambda: status("status")["audio_ms"] >= 500, 15)
    assert status("press")["ok"]
    start = status("status")["audio_ms"]
    assert wait_for(lambda: status("status")["audio_ms"] >= start + 3000, 15)
    assert status("release")["ok"]


def final_in_hand(daemon_with, monkeypatch, bound_s: float):
    """A press released, its last final now held by the extra output (``FINAL_OUT_WAIT_S`` is
    ``bound_s``): (the output, the controller, the server)."""
    monkeypatch.setattr(finals, "FINAL_OUT_WAIT_S", bound_s)
    held = HeldFinals()
    daemon, srv = daemon_with(held)
    press_and_release(daemon)
    assert held.holding.wait(15)
    return held, daemon.controller, srv


def terminated(srv) -> bool:
    sessions = srv.sessions
    return bool(sessions) and any(isinstance(m, dict) and m.get("type") == "Terminate"
                                  for m in sessions[0].text_messages())


def test_the_press_ends_once_its_last_final_is_out(daemon_with, monkeypatch):
    held, ctl, srv = final_in_hand(daemon_with, monkeypatch, 30.0)
    assert ctl.last_final["text"] == "the end of a press"
    # ... and not out yet: the press goes on (finalizing, no Terminate) for as long as it holds
    assert not wait_for(lambda: ctl.state is not State.FINALIZING or terminated(srv), 0.5)
    held.gate.set()
    assert wait_for(lambda: ctl.state is State.IDLE and terminated(srv), 5)
    assert [f["text"] for f in held.finals] == ["the end of a press"]


def test_a_final_that_never_gets_out_ends_the_press_after_a_bound(daemon_with, monkeypatch):
    held, ctl, srv = final_in_hand(daemon_with, monkeypatch, 0.3)  # held until the end: wedged
    assert wait_for(lambda: ctl.state is State.IDLE and terminated(srv), 5)
    assert time.monotonic() - held.held_at >= 0.2  # not before the bound (0.3 s from the hand-over)
    assert held.finals == [] and held.holding.is_set()
    held.gate.set()


def test_a_session_lost_while_its_last_final_goes_out_ends_the_press(daemon_with, monkeypatch):
    """The final is delivered: a session that fails now (before Terminate) is not replayed."""
    held, ctl, srv = final_in_hand(daemon_with, monkeypatch, 30.0)
    srv.stop()                                  # the server goes away (close 1001): retryable
    assert wait_for(lambda: ctl.state is State.IDLE, 5)
    held.gate.set()
    assert wait_for(lambda: held.finals, 5)
    assert not wait_for(lambda: "error" in held.kinds, 0.5)  # no retry, nothing reported
    assert len(srv.connections) == 1
    assert [f["text"] for f in held.finals] == ["the end of a press"]
