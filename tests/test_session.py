"""pttd.stt.assemblyai.session against the fake v3 server: real websocket-client, real sockets, no mocks."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from pttd.stt.assemblyai import protocol
from pttd.config import Secret
from pttd.stt.assemblyai.session import ConnectError, Session, SessionClosed
from pttd.stt.base import FinalTurn
from tests.fakes.faults import Faults
from tests.fakes.schemas import validate_client_message

KEY = "test-key-0123456789"
RATE = 16000
FRAME = 800  # 50 ms


def speech(ms, freq=440.0):
    n = RATE * ms // 1000
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * np.arange(n) / RATE)).astype("<i2")


def quiet(ms):
    return np.zeros(RATE * ms // 1000, dtype="<i2")


def frames(*parts):
    pcm = np.concatenate(parts).tobytes()
    return [pcm[i:i + FRAME * 2] for i in range(0, len(pcm), FRAME * 2)]


class Recorder:
    """Collects session events the way the controller would: via a queue."""

    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, session, event):
        self.q.put(event)

    def drain(self, until, timeout=10.0):
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            got.append(ev)
            if until(ev):
                return got
        raise AssertionError(f"timed out; got {got}")


def open_session(srv, rec, model="universal-streaming-english", format_turns=True, key=KEY,
                 params=None, **kw):
    url = protocol.build_url(srv.url, model, RATE, format_turns, params)
    s = Session(url, Secret(key), on_event=rec, sample_rate=RATE,
                format_turns=format_turns and not protocol.is_u3(model), **kw)
    return s


def paced_send(session, chunks, period=0.05):
    t0 = time.monotonic()
    for i, chunk in enumerate(chunks):
        delay = t0 + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing a real-time stream, not waiting for a result
        assert session.send_audio_now(chunk)


def finals_of(events):
    return [e for e in events if isinstance(e, FinalTurn)]


TEN_SECONDS = (quiet(500), speech(2000), quiet(1500), speech(2500), quiet(1500), speech(1500),
               quiet(500))


@pytest.mark.parametrize("model,format_turns,pattern", [
    ("universal-streaming-english", True, "A"),
    ("universal-streaming-english", True, "B"),
    ("universal-streaming-english", False, "A"),
    ("u3-rt-pro", True, "A"),
])
def test_paced_ten_seconds_gives_one_final_per_turn(fake_v3, model, format_turns, pattern):
    script = ["hello there", "this is pttd speaking", "goodbye now"]
    srv = fake_v3(script=script, api_keys={KEY}, format_pattern=pattern)
    rec = Recorder()
    s = open_session(srv, rec, model, format_turns, params={"max_turn_silence": 1000})
    begin = s.connect(timeout=5)
    assert begin.id and s.is_open
    paced_send(s, frames(*TEN_SECONDS))
    assert s.force_endpoint_now()
    term = s.terminate(timeout=5)
    assert isinstance(term, protocol.Termination)
    events = rec.drain(lambda e: isinstance(e, SessionClosed))
    finals = finals_of(events)
    texts = [f.turn.transcript for f in finals]
    if format_turns or protocol.is_u3(model):
        assert texts == ["Hello there.", "This is pttd speaking.", "Goodbye now."]
    else:
        assert texts == script
    assert [f.turn.turn_order for f in finals] == [0, 1, 2]
    closed = events[-1]
    assert closed.code == 1000 and closed.terminated and closed.policy.kind == "normal"
    rec_srv = srv.sessions[0]
    rec_srv.wait_done(5)
    # what we sent is what the spec allows: binary frames of 50 ms, and schema-valid JSON
    for msg in rec_srv.text_messages():
        validate_client_message(msg)
    assert {len(f.data) for f in rec_srv.audio_frames()} == {FRAME * 2}


def test_headers_and_query(fake_v3):
    srv = fake_v3(api_keys={KEY})
    s = open_session(srv, Recorder(), params={"keyterms_prompt": ["pttd"], "speaker_labels": False})
    s.connect(timeout=5)
    s.terminate(timeout=5)
    r = srv.sessions[0]
    assert r.headers["authorization"] == KEY
    assert r.headers["assemblyai-version"] == protocol.API_VERSION
    assert r.query["speech_model"] == "universal-streaming-english"
    assert r.query["keyterms_prompt"] == ["pttd"] and r.query["speaker_labels"] is False
    assert r.query["format_turns"] is True


# --- sending on the caller's thread (what a press's streamer does) ---------------------------------

def test_send_now_is_ordered_and_force_endpoint_follows_the_last_frame(fake_v3):
    srv = fake_v3(script=["sent from the caller"], api_keys={KEY})
    rec = Recorder()
    s = open_session(srv, rec)
    s.connect(timeout=5)
    chunks = frames(quiet(200), speech(1000), quiet(300))
    t0 = time.monotonic()
    for i, chunk in enumerate(chunks):
        delay = t0 + i * 0.05 - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing a real-time stream, not waiting for a result
        assert s.send_audio_now(chunk)
    assert s.force_endpoint_now()
    events = rec.drain(lambda e: isinstance(e, FinalTurn))
    assert [f.turn.transcript for f in finals_of(events)] == ["Sent from the caller."]
    assert s.frames_sent == len(chunks) and s.audio_bytes_sent == sum(map(len, chunks))
    s.terminate(timeout=5)
    got = srv.sessions[0].received
    kinds = [r.kind for r in got]
    fe_at = next(i for i, r in enumerate(got)
                 if r.kind == "text" and r.data.get("type") == "ForceEndpoint")
    assert kinds[:fe_at] == ["binary"] * len(chunks)
    assert b"".join(r.data for r in got[:fe_at]) == b"".join(chunks)


def test_send_now_rejects_bad_frames_and_refuses_before_begin(fake_v3):
    srv = fake_v3(api_keys={KEY})
    s = open_session(srv, Recorder())
    assert not s.send_audio_now(b"\0" * 1600) and not s.force_endpoint_now()  # not open yet
    s.connect(timeout=5)
    try:
        for nbytes in (1598, 32002, 801):  # odd, over 1000 ms, under 50 ms
            with pytest.raises(ValueError):
                s.send_audio_now(b"\0" * nbytes)
        assert s.send_audio_now(b"\0" * 32000) and s.send_audio_now(b"\0" * 1600)
    finally:
        s.terminate(timeout=5)
    assert not s.send_audio_now(b"\0" * 1600)  # closed


def test_send_now_on_a_dropped_link_returns_false_and_the_close_is_reported_once(fake_v3):
    srv = fake_v3(script=["dropped"], api_keys={KEY}, faults=Faults(drop_after_frames=5))
    rec = Recorder()
    s = open_session(srv, rec, send_timeout=2.0)
    s.connect(timeout=5)
    results = []
    deadline = time.monotonic() + 10
    for chunk in frames(speech(10_000)):  # keeps sending until the failure shows
        if time.monotonic() > deadline:
            break
        ok = s.send_audio_now(chunk)
        results.append(ok)
        if not ok:
            break
        time.sleep(0.05)  # pacing a real-time stream
    assert results and results[-1] is False
    events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=10)
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closed) == 1 and closed[0].policy.kind == "transport"
    s.close()


# --- connect failures and close codes ---------------------------------------------------------------

def expect_connect_error(srv, rec=None, **kw):
    s = open_session(srv, rec or Recorder(), **kw)
    with pytest.raises(ConnectError) as err:
        s.connect(timeout=8)
    return err.value.closed


def test_bad_key_is_1008_before_begin_and_never_shows_the_key(fake_v3):
    srv = fake_v3(api_keys={KEY})
    closed = expect_connect_error(srv, key="wrong-key-secret")
    assert closed.code == 1008 and closed.before_begin and closed.policy.kind == "auth"
    assert not closed.policy.retry
    assert "wrong-key-secret" not in closed.describe() + repr(closed)


def test_http_rejection_at_upgrade(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(http_reject_status=401))
    closed = expect_connect_error(srv)
    assert closed.policy.kind == "auth" and "HTTP 401" in closed.reason


def test_close_before_begin_reports_server_reason(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(close_before_begin=(3005, "Session Cancelled: x")))
    closed = expect_connect_error(srv)
    assert closed.code == 3005 and "Session Cancelled" in closed.reason and closed.policy.retry


def test_begin_timeout(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(begin_delay_s=3))
    closed = expect_connect_error(srv, begin_timeout=0.5)
    assert closed.code is None and "no Begin" in closed.reason and closed.policy.retry


def test_connection_refused_is_transport(fake_v3):
    s = Session("ws://127.0.0.1:9/v3/ws", Secret(KEY), on_event=Recorder(), connect_timeout=2)
    with pytest.raises(ConnectError) as err:
        s.connect(timeout=5)
    assert err.value.closed.policy.kind == "transport" and err.value.closed.before_begin


def test_rate_limited_3009(fake_v3):
    srv = fake_v3(api_keys={KEY}, sessions_per_minute=1)
    a = open_session(srv, Recorder())
    a.connect(timeout=5)
    closed = expect_connect_error(srv)
    assert closed.code == 3009 and closed.policy.kind == "rate_limited"
    assert closed.policy.delay(0) >= 3.75
    a.terminate(timeout=5)


def test_legacy_concurrency_1008_is_rate_limited_not_auth(fake_v3):
    srv = fake_v3(api_keys={KEY}, sessions_per_minute=1, legacy_codes=True)
    a = open_session(srv, Recorder())
    a.connect(timeout=5)
    closed = expect_connect_error(srv)
    assert closed.code == 1008 and closed.policy.kind == "rate_limited"
    a.terminate(timeout=5)


def run_until_closed(srv, frames_list, **kw):
    rec = Recorder()
    s = open_session(srv, rec, **kw)
    s.connect(timeout=5)
    sender = threading.Thread(target=lambda: _send_quietly(s, frames_list), daemon=True)
    sender.start()
    events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=15)
    s.close()
    sender.join(5)
    assert not sender.is_alive()
    return events


def _send_quietly(s, frames_list):
    t0 = time.monotonic()
    for i, f in enumerate(frames_list):
        if not s.is_open:
            return
        delay = t0 + i * 0.05 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s.send_audio_now(f)


def test_abrupt_drop_mid_turn(fake_v3):
    srv = fake_v3(script=["dropped"], api_keys={KEY}, faults=Faults(drop_after_frames=10))
    events = run_until_closed(srv, frames(speech(2000)))
    closed = events[-1]
    assert closed.code is None and closed.policy.kind == "transport" and not closed.before_begin
    assert sum(isinstance(e, SessionClosed) for e in events) == 1


def test_error_then_close_reported_once_with_code(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(error_mid_turn=(3005, 5)))
    events = run_until_closed(srv, frames(speech(1000)))
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert len(closed) == 1 and closed[0].code == 3005 and closed[0].policy.kind == "server"


def test_error_without_close_frame_is_reported_after_grace(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(error_without_close=5))
    events = run_until_closed(srv, frames(speech(1000)), error_close_grace_s=0.5)
    closed = events[-1]
    assert closed.code == 3005 and not closed.local


def test_session_expiry_3008(fake_v3):
    srv = fake_v3(api_keys={KEY}, expires_in_s=1)
    events = run_until_closed(srv, frames(quiet(3000)))
    closed = events[-1]
    assert closed.code == 3008 and closed.policy.kind == "expired" and closed.policy.retry


def test_rate_exceeded_3007_when_sending_too_fast(fake_v3):
    srv = fake_v3(api_keys={KEY}, max_lead_s=0.5)
    rec = Recorder()
    s = open_session(srv, rec)
    s.connect(timeout=5)
    for f in frames(quiet(3000)):
        s.send_audio_now(f)
    events = rec.drain(lambda e: isinstance(e, SessionClosed))
    assert events[-1].code == 3007 and events[-1].policy.bug
    s.close()


def test_legacy_3005_session_expired_text_is_expiry(fake_v3):
    srv = fake_v3(api_keys={KEY}, expires_in_s=1, legacy_codes=True)
    events = run_until_closed(srv, frames(quiet(3000)))
    assert events[-1].code == 3005 and events[-1].policy.kind == "expired"


def test_invalid_message_3006(fake_v3):
    srv = fake_v3(api_keys={KEY})
    rec = Recorder()
    s = open_session(srv, rec)
    s.connect(timeout=5)
    s._queue_text('{"type":"NoSuchThing"}')  # only a test can make pttd send a bad message
    events = rec.drain(lambda e: isinstance(e, SessionClosed))
    assert events[-1].code == 3006 and events[-1].policy.bug and not events[-1].policy.retry
    s.close()


def test_no_termination_terminate_is_bounded(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(no_termination="ignore"))
    s = open_session(srv, Recorder())
    s.connect(timeout=5)
    t0 = time.monotonic()
    assert s.terminate(timeout=1.0) is None
    assert time.monotonic() - t0 < 3.5
    assert not s._receiver.is_alive() and not s._sender.is_alive()


def test_terminate_async_closes_itself_without_termination(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(no_termination="ignore"))
    rec = Recorder()
    s = open_session(srv, rec)
    s.connect(timeout=5)
    s.terminate_async(timeout=0.5)
    events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=5)
    assert events[-1].local
    s.close()


def test_unknown_messages_and_fields_are_tolerated(fake_v3):
    srv = fake_v3(script=["still works"], api_keys={KEY}, faults=Faults(unknown_messages=True))
    rec = Recorder()
    s = open_session(srv, rec, format_turns=False)
    s.connect(timeout=5)
    paced_send(s, frames(quiet(200), speech(1000), quiet(200)))
    assert s.force_endpoint_now()
    events = rec.drain(lambda e: isinstance(e, FinalTurn))
    assert events[-1].turn.transcript == "still works"
    s.terminate(timeout=5)


def test_slow_turns_still_arrive(fake_v3):
    srv = fake_v3(script=["slow one"], api_keys={KEY}, faults=Faults(turn_delay_s=1.5))
    rec = Recorder()
    s = open_session(srv, rec, format_turns=False)
    s.connect(timeout=5)
    paced_send(s, frames(speech(800), quiet(200)))
    assert s.force_endpoint_now()
    events = rec.drain(lambda e: isinstance(e, FinalTurn), timeout=10)
    assert events[-1].turn.transcript == "slow one"
    s.terminate(timeout=5)


def test_pattern_a_unformatted_copy_held_then_released_when_no_formatted_copy(fake_v3):
    # Pattern B server but client expects Pattern A: never waits forever, never duplicates
    srv = fake_v3(script=["x y"], api_keys={KEY}, format_pattern="A")
    rec = Recorder()
    s = open_session(srv, rec, format_turns=True, format_grace_s=0.3)
    s.connect(timeout=5)
    paced_send(s, frames(speech(600), quiet(200)))
    assert s.force_endpoint_now()
    events = rec.drain(lambda e: isinstance(e, FinalTurn))
    assert events[-1].turn.transcript == "X y." and events[-1].formatted
    s.terminate(timeout=5)
    assert len(finals_of(events + list(rec.q.queue))) == 1


def test_threads_stop_on_close_without_begin(fake_v3):
    srv = fake_v3(api_keys={KEY}, faults=Faults(begin_delay_s=5))
    s = open_session(srv, Recorder())
    s.start()
    srv.wait_for_connections(1, 5)
    s.close(timeout=2)
    assert not s._receiver.is_alive()


@pytest.mark.parametrize("code,reason,kind", [
    (4001, "Not Authorized", "auth"),
    (4002, "Insufficient Funds", "auth"),
    (4029, "Client sent audio too fast", "client_bug"),
    (1011, "Internal error", "server"),
])
def test_legacy_and_other_close_codes_before_begin(fake_v3, code, reason, kind):
    srv = fake_v3(api_keys={KEY}, faults=Faults(close_before_begin=(code, reason)))
    closed = expect_connect_error(srv)
    assert closed.code == code and closed.policy.kind == kind and reason in closed.reason


def test_keep_alive_holds_an_inactivity_timeout_open(fake_v3):
    srv = fake_v3(api_keys={KEY})
    rec = Recorder()
    s = open_session(srv, rec, params={"inactivity_timeout": 5})
    s.connect(timeout=5)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 6.5:  # longer than the timeout: only KeepAlive keeps it open
        s.keep_alive()
        time.sleep(1.0)  # the KeepAlive cadence under test
    assert s.is_open
    events = rec.drain(lambda e: isinstance(e, SessionClosed), timeout=10)  # now idle: closed
    assert events[-1].policy.retry and not events[-1].local
    assert time.monotonic() - t0 >= 10.5
    kinds = [m.get("type") for m in srv.sessions[0].text_messages()]
    assert set(kinds) == {"KeepAlive"}
    s.close()


def test_update_configuration_is_sent_schema_valid(fake_v3):
    srv = fake_v3(api_keys={KEY})
    s = open_session(srv, Recorder())
    s.connect(timeout=5)
    s.update(max_turn_silence=900, keyterms_prompt=["pttd"])
    s.terminate(timeout=5)
    msgs = srv.sessions[0].text_messages()
    assert msgs[0] == {"type": "UpdateConfiguration", "max_turn_silence": 900,
                       "keyterms_prompt": ["pttd"]}
    for m in msgs:
        validate_client_message(m)


def test_a_quiet_session_outlives_the_servers_pings(fake_v3):
    """A server ping used to leave the receiver blocked for the next data frame with the send
    timeout: a session kept warm (or a long silent press) died ``send_timeout`` after a ping
    with "Connection timed out". It must stay open, and still work, however long it is quiet."""
    srv = fake_v3(api_keys={KEY}, script=["still here"], ping_interval_s=0.7)
    rec = Recorder()
    s = open_session(srv, rec, send_timeout=0.5)
    s.start()
    rec.drain(lambda e: isinstance(e, protocol.Begin))
    # quiet for 3 s: four pings, each of which would have ended it 0.5 s later
    with pytest.raises(AssertionError):
        rec.drain(lambda e: isinstance(e, SessionClosed), timeout=3.0)
    assert s.is_open
    paced_send(s, frames(speech(800), quiet(200)))
    assert s.force_endpoint_now()
    events = rec.drain(lambda e: isinstance(e, FinalTurn))
    assert finals_of(events)[0].turn.transcript == "Still here."
    s.close()
