"""Dropped information no more (issue 24, part 4): a server Warning and a final's language_code
reach jsonl, a control-socket subscriber, journald and MQTT; an Error frame's own text wins
over the close reason; U3 Pro models are not sent ``format_turns``. Real ``pttd run`` against
the fake v3 server."""
from __future__ import annotations

import json
import queue
import threading

import pytest

from pttd.config import Secret
from pttd.stt.assemblyai.session import Session, SessionClosed
from tests.fakes.faults import Faults
from tests.daemon_proc import DaemonProcess, speech_wav, wait_queue, write_config

KEY = "warn-e2e-key-0123456789"
LAYOUT = ((2000, False), (2000, True), (2000, False), (2000, True), (8000, False))
WARNING = Faults(warning_after_frames=5, warning_code=1234, warning_text="Session ending soon")


def start(tmp_path, srv, *, journal=False, popen=None, extra="", tail="") -> DaemonProcess:
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=LAYOUT)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock,
                       journal=journal, tail=tail,
                       extra='speech_model = "universal-streaming-multilingual"\n'
                             f"params = {{ language_detection = true }}\n{extra}")
    d = DaemonProcess(cfg, sock, popen=popen)
    d.wait_ready(timeout=30)
    return d


def press(d: DaemonProcess) -> dict:
    d.wait_audio_ms(1500, timeout=30)
    d.command("press")
    d.wait_audio_ms(4200, timeout=30)
    d.command("release")
    return d.wait_event(lambda e: e["event"] == "final", timeout=20)


def subscriber(sock) -> "queue.Queue[dict]":
    from pttd.frontends.control.client import subscribe

    q: "queue.Queue[dict]" = queue.Queue()

    def run():
        try:
            for event in subscribe(str(sock), timeout=60):
                q.put(event)
        except Exception:  # noqa: BLE001 - the daemon went away at the end of the test
            pass

    threading.Thread(target=run, daemon=True).start()
    return q


def test_warning_and_language_code_in_jsonl_subscriber_and_journald(fake_v3, tmp_path):
    from tests.journald import Journald, unavailable_reason

    srv = fake_v3(script=["hola mundo"], api_keys={KEY}, faults=WARNING)
    reason = unavailable_reason()
    jd = None if reason else Journald().__enter__()
    try:
        d = start(tmp_path, srv, journal=jd is not None, popen=jd.popen if jd else None)
        try:
            sub = subscriber(d.socket)
            final = press(d)
            warning = next(e for e in d.all_events if e["event"] == "warning")
            assert (warning["code"], warning["message"]) == (1234, "Session ending soon")
            assert isinstance(warning["ts"], float)
            assert final["language_code"] == "en"
            got = [wait_queue(sub, lambda e, k=k: e["event"] == k, 15, lambda: "subscriber")
                   for k in ("warning", "final")]
            assert got[0]["code"] == 1234 and got[1]["language_code"] == "en"
            if jd is not None:
                warned = jd.wait_for_records(lambda rs: len(rs) >= 1, "PTTD_EVENT=warning",
                                             timeout=20)
                finals = jd.wait_for_records(lambda rs: len(rs) >= 1, "PTTD_EVENT=final",
                                             timeout=20)
                assert warned[0]["PRIORITY"] == "4" and warned[0]["WARNING_CODE"] == "1234"
                assert warned[0]["MESSAGE"] == "Session ending soon"
                assert finals[0]["LANGUAGE_CODE"] == "en"
            assert d.stop()[0] == 0
        finally:
            d.kill()
    finally:
        if jd is not None:
            jd.__exit__(None, None, None)
    assert srv.sessions[0].query["language_detection"] is True
    if reason:
        pytest.skip(f"jsonl and subscriber checked; journald not: {reason}")


def test_warning_reaches_mqtt(fake_v3, tmp_path):
    from tests.test_mqtt import MOSQUITTO, Mosquitto, Subscriber

    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed")
    srv = fake_v3(script=["hola mundo"], api_keys={KEY}, faults=WARNING)
    b = Mosquitto(tmp_path).start()
    sub = None
    try:
        sub = Subscriber(b.port, ["pttd/pi-w/#"]).wait_subscribed()
        d = start(tmp_path, srv, tail=f'[mqtt]\nurl = "mqtt://127.0.0.1:{b.port}"\n'
                                      'device_id = "pi-w"\n')
        try:
            press(d)
            _, payload, retained = sub.wait(lambda t, p, r: t == "pttd/pi-w/warning")
            assert payload["event"] == "warning" and payload["code"] == 1234 and not retained
            _, final, _ = sub.wait(lambda t, p, r: t == "pttd/pi-w/final")
            assert final["language_code"] == "en"
        finally:
            d.kill()
    finally:
        if sub is not None:
            sub.close()
        b.stop()


def _closed(url: str) -> SessionClosed:
    got: "queue.Queue[SessionClosed]" = queue.Queue()
    s = Session(url, Secret(KEY), on_event=lambda _s, e: isinstance(e, SessionClosed) and got.put(e))
    s.connect(timeout=10)
    s.send_audio_now(b"\0" * 3200)
    closed = got.get(timeout=15)
    s.close()
    return closed


def test_error_frame_text_wins_over_a_different_close(fake_v3):
    """Error 3005 with its text, then a close with another code and a vaguer reason: the Error
    frame is what is reported (it used to be the close's code and reason)."""
    srv = fake_v3(api_keys={KEY}, faults=Faults(
        error_mid_turn=(3005, 1), mismatched_close=(1011, "See Error message for details")))
    closed = _closed(srv.url + "?speech_model=universal-streaming-english")
    assert srv.connections[0].wait_done(10)
    assert srv.connections[0].close_sent == (1011, "See Error message for details")
    assert (closed.code, closed.reason) == (3005, "Session Cancelled: An error occurred")
    assert closed.policy.kind == "server"


def test_u3_pro_is_not_sent_format_turns(fake_v3, tmp_path):
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=LAYOUT)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock,
                       extra='speech_model = "u3-rt-pro"\nformat_turns = true')
    d = DaemonProcess(cfg, sock)
    try:
        d.wait_ready(timeout=30)
        final = press(d)
        assert final["text"] == "Hello world."
    finally:
        d.kill()
    assert "format_turns" not in srv.sessions[0].raw_query
    assert json.loads(json.dumps(srv.sessions[0].query))["speech_model"] == "u3-rt-pro"
