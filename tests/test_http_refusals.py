"""HTTP refusals at the upgrade (issue 24, part 3): a 400 or 404 is a configuration error, not
the network being down; 5xx is transient. Real websocket-client against the fake v3 server's
HTTP rejection mode, then through the real ``pttd run``."""
from __future__ import annotations

import threading

import pytest

from pttd.config import Secret
from pttd.stt.assemblyai.session import Session, SessionClosed
from tests.fakes.faults import Faults
from tests.alsa_fifo import wait_until
from tests.daemon_proc import E2E_KEY, DaemonProcess, speech_wav, write_config

# speech at 2-4 s and 6-8 s of the mic's clock (the WAV loops)
LAYOUT = ((2000, False), (2000, True), (2000, False), (2000, True), (8000, False))


def closed_by(url: str, key: str = E2E_KEY) -> SessionClosed:
    got: list[SessionClosed] = []
    done = threading.Event()

    def on_event(_s, event):
        if isinstance(event, SessionClosed):
            got.append(event)
            done.set()

    session = Session(url + "?speech_model=universal-streaming-english", Secret(key),
                      on_event=on_event, connect_timeout=5, begin_timeout=5)
    session.start()
    assert done.wait(15), "no SessionClosed"
    session.close()
    return got[0]


@pytest.mark.parametrize("status, code, kind, retry", [
    (400, 400, "config", False), (404, 404, "config", False), (405, 405, "config", False),
    (418, 418, "config", False),
    (401, 1008, "auth", False), (403, 1008, "auth", False), (429, 3009, "rate_limited", True),
    (500, 500, "server", True), (503, 503, "server", True)])
def test_session_classifies_http_statuses_at_the_upgrade(fake_v3, status, code, kind, retry):
    srv = fake_v3(api_keys={E2E_KEY}, faults=Faults(http_reject_status=status))
    closed = closed_by(srv.url)
    assert (closed.code, closed.policy.kind, closed.policy.retry) == (code, kind, retry)
    assert closed.before_begin and f"HTTP {status}" in closed.reason
    assert srv.connections[0].http_status == status


def test_wrong_path_is_a_404_naming_the_url(fake_v3):
    srv = fake_v3(api_keys={E2E_KEY})
    closed = closed_by(srv.url.replace("/v3/ws", "/v2/realtime/ws"))
    assert (closed.code, closed.policy.kind) == (404, "config")
    assert "stt.url" in closed.policy.message and "/v3/ws" in closed.policy.message


def _daemon(tmp_path, srv, extra: str = "") -> DaemonProcess:
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=LAYOUT)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=E2E_KEY, wav=wav, socket=sock,
                       extra=extra)
    d = DaemonProcess(cfg, sock)
    d.wait_ready(timeout=40)
    return d


def _press(d: DaemonProcess, press_ms: int, release_ms: int) -> None:
    d.wait_audio_ms(press_ms, timeout=30)
    assert d.command("press")["ok"]
    d.wait_audio_ms(release_ms, timeout=30)
    assert d.command("release")["ok"]


@pytest.mark.parametrize("status", [400, 404])
def test_400_and_404_end_the_press_with_an_error_no_retry_no_fallback(fake_v3, daemons, tmp_path,
                                                                      status):
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY},
                  faults=Faults(http_reject_status=status))
    d = _daemon(tmp_path, srv, 'fallback = "local"')   # even with the offline engine at hand
    daemons.append(d)
    for press_id, (at, until) in enumerate(((1500, 4200), (5500, 8200)), 1):
        _press(d, at, until)
        error = d.wait_event(lambda e: e["event"] == "error" and e.get("press_id") == press_id,
                             timeout=15)
        assert error["code"] == status and f"HTTP {status}" in error["message"]
        assert wait_until(lambda: d.command("status")["state"] == "error", 5)
        # the press is over: one attempt per press, whatever the retry policy would have said
        assert srv.connection_attempts == press_id
    assert not any(e["event"] == "final" for e in d.all_events)
    assert not any("local engine" in e.get("message", "") for e in d.all_events)
    assert not any(e.get("state") == "offline" for e in d.all_events), d.all_events
    assert [r.http_status for r in srv.connections] == [status, status]


def test_500_is_retried_with_backoff_and_the_press_gets_its_final(fake_v3, daemons, tmp_path):
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY},
                  faults=[Faults(http_reject_status=500)])   # then no faults
    d = _daemon(tmp_path, srv)
    daemons.append(d)
    _press(d, 1500, 4200)
    final = d.wait_event(lambda e: e["event"] == "final" and e.get("press_id") == 1, timeout=20)
    assert final["text"] == "Hello world."
    retried = [e for e in d.all_events if e["event"] == "error" and e.get("code") == 500]
    assert len(retried) == 1 and retried[0]["retry_in_s"] > 0, d.all_events
    assert [r.http_status for r in srv.connections] == [500, None]
    assert srv.connections[1].started - srv.connections[0].started >= 0.5  # backed off


# --- 1008 on a key that worked (issue 24, part 5) ----------------------------------------------------

def test_1008_on_a_key_that_worked_gets_one_retry_and_a_never_seen_key_none(fake_v3):
    key = "worked-key-" + __import__("uuid").uuid4().hex   # a key this process never used
    srv = fake_v3(api_keys={key})
    refuse = Faults(close_before_begin=(1008, "Unauthorized Connection: Incorrect padding"))
    srv.queue_faults(refuse)
    assert closed_by(srv.url, key).policy.kind == "auth"     # never seen working: lock out
    srv.queue_faults(Faults(), refuse, refuse, Faults(), refuse)
    ok = Session(srv.url + "?speech_model=universal-streaming-english", Secret(key),
                 on_event=lambda *_: None)
    ok.connect(timeout=10)
    ok.close()
    first = closed_by(srv.url, key)
    assert (first.code, first.policy.kind, first.policy.retry) == (1008, "auth_retry", True)
    assert closed_by(srv.url, key).policy.kind == "auth"     # the retry is spent
    ok = Session(srv.url + "?speech_model=universal-streaming-english", Secret(key),
                 on_event=lambda *_: None)
    ok.connect(timeout=10)                                   # works again: earns a new retry
    ok.close()
    assert closed_by(srv.url, key).policy.kind == "auth_retry"


def test_a_sporadic_1008_through_the_daemon_is_retried_once(fake_v3, daemons, tmp_path):
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY})
    d = _daemon(tmp_path, srv)
    daemons.append(d)
    _press(d, 1500, 4200)
    assert d.wait_event(lambda e: e["event"] == "final" and e.get("press_id") == 1)["text"]
    srv.queue_faults(Faults(close_before_begin=(1008, "Unauthorized Connection: Incorrect padding")))
    _press(d, 5500, 8200)
    final = d.wait_event(lambda e: e["event"] == "final" and e.get("press_id") == 2, timeout=20)
    assert final["text"] == "Hello world."
    retried = [e for e in d.all_events if e["event"] == "error" and e.get("code") == 1008]
    assert len(retried) == 1 and "press_id" not in retried[0], d.all_events
    assert srv.connection_attempts == 3
