"""The fault matrix: ``pttd run`` against the fake server with one fault injected per test.

Each case asserts: finals delivered == scripted turns, no duplicates, no traceback, and the
daemon still serves the next press. The script is one line ("hello world") so a replayed turn
on a new session reads the same as the original would have.
"""
from __future__ import annotations

import time

import pytest

from tests.fakes.faults import Faults
from tests.daemon_proc import E2E_KEY

# two speech bursts: 2-4 s and 6-8 s of the mic's clock
LAYOUT = ((2000, False), (2000, True), (2000, False), (2000, True), (8000, False))
HELLO = "Hello world."


def cycle(d, press_ms, release_ms):
    d.wait_audio_ms(press_ms)
    assert d.command("press")["ok"]
    d.wait_audio_ms(release_ms)
    assert d.command("release")["ok"]


def finals(d):
    return [e for e in d.all_events if e["event"] == "final"]


def expect_two_turns(d, first_timeout=25.0):
    """Press 1 under the fault, press 2 without: one final each, nothing twice."""
    cycle(d, 1500, 4200)
    d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 1, timeout=first_timeout)
    cycle(d, 5500, 8200)
    d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 2, timeout=20)
    code, took = d.stop()
    got = finals(d)
    assert [(f["press_id"], f["text"]) for f in got] == [(1, HELLO), (2, HELLO)]
    assert code == 0 and took < 5.0
    assert not any("Traceback" in line for line in d.stderr_lines), "".join(d.stderr_lines)
    return got


def start(fake_v3, daemon_factory, faults=None, extra="", layout=LAYOUT, **server):
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY}, **server)
    if faults is not None:
        srv.queue_faults(*faults)
    d, _ = daemon_factory(srv, extra=extra, layout=layout)
    return srv, d


def test_drop_mid_turn_is_replayed_on_a_new_session(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(drop_after_frames=20)])
    expect_two_turns(d)
    assert srv.connection_attempts == 3
    # the replay re-sent the press's audio from its start on the second session
    first, second = srv.connections[0], srv.connections[1]
    assert first.aborted and len(second.audio_frames()) >= len(first.audio_frames())


def test_drop_during_finalizing(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(drop_on_force_endpoint=True)])
    expect_two_turns(d)
    assert srv.connection_attempts == 3


def test_no_termination(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(no_termination="ignore")])
    expect_two_turns(d)


def test_begin_delayed_five_seconds(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(begin_delay_s=5)])
    got = expect_two_turns(d)
    assert srv.connection_attempts == 2 and got[0]["latency_ms"] > 1000
    # a 5.5 s backlog was caught up within the server's real-time rule: no 3007, no error at all
    assert not [e for e in d.all_events if e["event"] == "error"]
    frames = srv.connections[0].audio_frames()
    # 50 ms frames; the press's last takes the remainder (50-100 ms) so the turn ends exactly
    assert {len(f.data) for f in frames[:-1]} == {1600} and 1600 <= len(frames[-1].data) < 3200
    sent_s = [(i + 1) * 0.05 - (f.t - frames[0].t) for i, f in enumerate(frames)]
    assert max(sent_s) <= 2.0 + 0.05 + 0.2  # never more than MAX_LEAD_S ahead of real time


def test_close_before_begin_is_retried(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory,
                   [Faults(close_before_begin=(3005, "Session Cancelled: An error occurred"))])
    expect_two_turns(d)
    errors = [e for e in d.all_events if e["event"] == "error"]
    assert errors and errors[0]["code"] == 3005 and errors[0]["retry_in_s"] is not None


def test_1008_no_retry_storm_and_error_state(fake_v3, daemon_factory):
    srv = fake_v3(script=["hello world"], api_keys={"the-right-key"})
    d, _ = daemon_factory(srv, layout=LAYOUT)
    cycle(d, 1500, 4200)
    err = d.wait_event(lambda e: e["event"] == "error")
    assert err["code"] == 1008 and err["retry_in_s"] is None
    d.wait_event(lambda e: e["event"] == "state" and e["state"] == "error")
    assert d.command("status")["state"] == "error"
    time.sleep(3)  # a retry storm would show up as more connection attempts in this window
    assert srv.connection_attempts == 1
    cycle(d, 5500, 8200)  # an explicit press earns exactly one more try
    d.wait_event(lambda e: e["event"] == "error" and e is not err, timeout=10)
    assert srv.connection_attempts == 2
    assert d.stop()[0] == 0 and not finals(d)
    assert E2E_KEY not in "".join(d.stderr_lines) + str(d.all_events)


def test_3009_backs_off_at_least_five_seconds(fake_v3, daemon_factory):
    late_burst = ((2000, False), (2000, True), (8000, False), (2000, True), (8000, False))
    srv, d = start(fake_v3, daemon_factory, [Faults(close_before_begin=(
        3009, "Unauthorized Connection: Too many concurrent sessions"))], layout=late_burst)
    cycle(d, 1500, 4200)
    err = d.wait_event(lambda e: e["event"] == "error")
    assert err["code"] == 3009 and err["retry_in_s"] >= 3.75
    d.wait_event(lambda e: e["event"] == "final", timeout=20)
    attempts = srv.connections
    assert attempts[1].started - attempts[0].started >= 3.75
    cycle(d, 11500, 14200)
    d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 2, timeout=20)
    assert d.stop()[0] == 0
    assert [f["press_id"] for f in finals(d)] == [1, 2]


def test_3008_expiry_mid_turn_is_replayed(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, expires_in_s=2)
    cycle(d, 1500, 4200)
    d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 1, timeout=20)
    assert [e["code"] for e in d.all_events if e["event"] == "error"] == [3008], d.all_events
    assert srv.connection_attempts == 2
    assert d.stop()[0] == 0
    assert [(f["press_id"], f["text"]) for f in finals(d)] == [(1, HELLO)]


def test_3008_expiry_of_an_idle_warm_session(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, extra="keep_warm_s = 30", expires_in_s=4)
    # expires within keep_warm + margin: pttd does not keep it warm, so no 3008 while idle
    expect_two_turns(d)
    assert not [e for e in d.all_events if e["event"] == "error"]
    assert srv.connection_attempts == 2


def test_warm_session_is_reused(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, extra="keep_warm_s = 30", expires_in_s=3600)
    expect_two_turns(d)
    assert srv.connection_attempts == 1
    kinds = [r.data.get("type") for r in srv.connections[0].received if r.kind != "binary"]
    assert kinds == ["ForceEndpoint", "ForceEndpoint", "Terminate"]


def test_slow_server(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(turn_delay_s=2)])
    got = expect_two_turns(d)
    assert got[0]["latency_ms"] >= 1500


def test_unknown_message_types_and_fields(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, faults=None)
    srv.set_default_faults(Faults(unknown_messages=True))
    expect_two_turns(d)


def test_error_without_close_frame(fake_v3, daemon_factory):
    srv, d = start(fake_v3, daemon_factory, [Faults(error_without_close=20)])
    expect_two_turns(d)
    assert srv.connection_attempts == 3


def test_network_down_twenty_seconds_three_presses_queued(fake_v3, daemon_factory, tmp_path):
    """The server is unreachable for 20 s; three presses are captured, then delivered in order."""
    from tests.fakes.fake_v3 import FakeV3Server

    srv = FakeV3Server(script=["hello world"], api_keys={E2E_KEY})
    srv.start()
    port = srv.port
    layout = ((1000, False),) + ((1500, True), (1500, False)) * 3 + (
        (21000, False), (1500, True), (10000, False))
    # a 10 s ring: the first presses would be overwritten during the outage without the queue
    d, _ = daemon_factory(srv, layout=layout, audio_extra="ring_seconds = 10")
    srv.stop()  # the network goes down
    down_at = time.monotonic()
    try:
        for k in range(3):
            cycle(d, 800 + k * 3000, 2700 + k * 3000)
        d.wait_event(lambda e: e["event"] == "state" and e["state"] == "offline", timeout=10)
        assert d.command("status")["state"] == "offline"
        remaining = 20 - (time.monotonic() - down_at)
        time.sleep(max(0.0, remaining))  # the outage lasts 20 s: that is the scenario
        assert not finals(d)
        back = FakeV3Server(script=["hello world"], api_keys={E2E_KEY}, port=port)
        back.start()
        try:
            for k in (1, 2, 3):
                d.wait_event(lambda e, k=k: e["event"] == "final" and e["press_id"] == k, timeout=30)
            got = finals(d)
            assert [f["press_id"] for f in got] == [1, 2, 3]
            assert all(f["text"] == HELLO and f.get("late") is True for f in got)
            cycle(d, 30500, 32800)  # and it still serves a new press, not late
            d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 4, timeout=20)
            assert "late" not in finals(d)[-1]
            assert d.stop()[0] == 0
        finally:
            back.stop()
    finally:
        d.kill()
