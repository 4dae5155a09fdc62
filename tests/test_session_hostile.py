"""A real Session against a server that sends whatever Hypothesis draws, mid-turn.

The invariant: whatever arrives (absurd numbers, wrong types, nesting deeper than the parser's
stack, unknown messages, Errors with nonsense codes), the session reports exactly one
``SessionClosed``, its threads end, and no exception escapes a thread. Real websocket-client,
real sockets, the fake v3 server core sending the frames as given (``Faults.raw_after_frames``).
"""
from __future__ import annotations

import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.close_policy import CANNOT_OPEN
from pttd.stt.assemblyai.session import SessionClosed
from pttd.stt.base import FinalTurn
from tests.fakes.faults import Faults
from tests.test_session import KEY, Recorder, frames, open_session, quiet, speech

ABSURD = [1e400, -1e400, -1, 2 ** 70, 1.5, "7", None, True, [], {}]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)


def _turn(turn_order, words, end_of_turn) -> dict:
    return {"type": "Turn", "turn_order": turn_order, "end_of_turn": end_of_turn,
            "transcript": "hostile", "turn_is_formatted": True, "end_of_turn_confidence": 0.9,
            "words": words}


hostile = st.one_of(
    st.builds(lambda o, w, e: json.dumps(_turn(o, w, e)), st.sampled_from(ABSURD + [0, 5]),
              st.lists(st.fixed_dictionaries({"text": st.text(max_size=4),
                                              "start": st.sampled_from(ABSURD + [0]),
                                              "end": st.sampled_from(ABSURD + [2 ** 40])}),
                       max_size=2) | json_values,
              st.booleans()),
    st.builds(lambda c: json.dumps({"type": "Error", "error_code": c, "error": "x"}),
              st.sampled_from(ABSURD)),
    st.builds(lambda t, body: json.dumps({"type": t, **body}),
              st.sampled_from(["Begin", "Termination", "SpeechStarted", "Warning", "Heartbeat",
                               "SpeakerRevision", "LLMGatewayResponse", "Future"]),
              st.dictionaries(st.sampled_from(["id", "expires_at", "timestamp", "revisions",
                                               "turn_order", "warning_code"]),
                              st.sampled_from(ABSURD) | json_values, max_size=3)),
    st.builds(json.dumps, json_values),
    st.sampled_from(["[" * 200_000 + "]" * 200_000, "{", "", "nul", '"\\ud800"',
                     json.dumps({"type": 1e400}).replace("Infinity", "1e400")]),
)


@pytest.fixture(scope="module")
def server():
    from tests.fakes.fake_v3 import FakeV3Server

    srv = FakeV3Server(script=["hello world"], api_keys={KEY}).start()
    yield srv
    srv.stop()


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(texts=st.lists(hostile, min_size=1, max_size=4), after=st.integers(1, 6))
def test_any_server_text_ends_in_exactly_one_close_report(server, texts, after):
    server.set_default_faults(Faults(raw_after_frames=(after, tuple(texts))))
    escaped: list[BaseException] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: escaped.append(args.exc_value)
    rec = Recorder()
    session = open_session(server, rec, error_close_grace_s=0.3)
    try:
        session.connect(timeout=5)
        for i, frame in enumerate(frames(speech(400), quiet(100))):
            if not session.send_audio_now(frame):
                break
            if i == after + 1:
                session.force_endpoint_now()
        session.force_endpoint_now()
        session.terminate_async(timeout=1.0)  # Termination, or the bound: either way it closes
        events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=10)
        session.close(2)
    finally:
        threading.excepthook = old_hook
        session.close(0)
    closes = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closes) == 1
    assert rec.q.empty() or not any(isinstance(e, SessionClosed) for e in list(rec.q.queue))
    assert not escaped, escaped
    assert not session._receiver.is_alive() and not session._sender.is_alive()
    finals = [e.turn.turn_order for e in events if isinstance(e, FinalTurn)]
    assert len(finals) == len(set(finals)), "one final per turn_order"


def test_an_error_that_echoes_the_key_is_scrubbed_everywhere(server, caplog):
    """The server's Error text can carry what it was given (``Invalid credential <key>``):
    neither the log, nor the close report, nor the pending error may hold the key."""
    text = json.dumps({"type": "Error", "error_code": 3005, "error": f"Invalid credential {KEY}"})
    server.set_default_faults(Faults(raw_after_frames=(2, (text,))))
    rec = Recorder()
    session = open_session(server, rec, error_close_grace_s=0.3)
    caplog.set_level("DEBUG")
    try:
        session.connect(timeout=5)
        for frame in frames(speech(300)):
            if not session.send_audio_now(frame):
                break
        assert rec.drain(lambda e: isinstance(e, SessionClosed) or session.pending_error,
                         timeout=10)
        pending = session.pending_error
        closed = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=10)[-1] \
            if session.closed is None else session.closed
    finally:
        session.close(0)
    assert closed.code == 3005 and "***" in closed.reason and KEY not in closed.reason
    assert pending is None or KEY not in pending.message
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pttd"))
    assert KEY not in ours and "Invalid credential ***" in ours  # (the fake server logs its own)


def test_an_exception_in_the_receiver_is_one_close_report(server, monkeypatch):
    """Whatever pttd's own receive path raises (here: parsing, at the third message) ends in one
    close report, never a receiver that dies without a word."""
    real = protocol.parse_message
    calls = []

    def flaky(text):
        calls.append(text)
        if len(calls) == 3:
            raise RuntimeError("a bug in pttd")
        return real(text)

    monkeypatch.setattr(protocol, "parse_message", flaky)
    server.set_default_faults(Faults())
    rec = Recorder()
    session = open_session(server, rec)
    try:
        session.connect(timeout=5)
        for frame in frames(speech(1500)):
            if not session.send_audio_now(frame):
                break
        events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=10)
        session.close(2)
    finally:
        session.close(0)
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closed) == 1 and "RuntimeError: a bug in pttd" in closed[0].reason
    assert closed[0].policy.kind == "transport" and not closed[0].before_begin
    assert not session._receiver.is_alive()


@pytest.mark.parametrize("url", ["ws://[::1/v3/ws", "ws://127.0.0.1:99999/v3/ws"])
def test_a_url_websocket_client_cannot_use_is_a_config_failure_not_the_network(url):
    """Reported once, as a configuration problem: not retried, not taken for "offline"."""
    from pttd.config import Secret
    from pttd.stt.assemblyai.session import Session

    rec = Recorder()
    session = Session(url, Secret(KEY), on_event=rec)
    session.start()
    closed = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=5)
    session.close(2)
    assert len(closed) == 1 and closed[0].before_begin
    assert closed[0].policy is CANNOT_OPEN and not closed[0].policy.retry
    assert "ValueError" in closed[0].reason
