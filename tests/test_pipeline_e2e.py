"""``pttd run`` end to end: a WAV mic, mock GPIO, the control socket, jsonl stdout, the fake server.

Driven only through the interface contract (CLI, config, control socket, events).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.fakes.faults import Faults
from tests.daemon_proc import RATE, DaemonProcess, speech_wav, write_config

KEY = "e2e-key-0123456789"
CHUNK = 800  # 50 ms at 16 kHz


def locate(received: bytes, samples: np.ndarray) -> int:
    """Sample offset of the received audio inside the WAV (the noise makes it unique)."""
    head = np.frombuffer(received[:CHUNK * 2], dtype="<i2")
    hits = np.flatnonzero(samples[: len(samples) - len(head)] == head[0])
    for h in hits:
        if np.array_equal(samples[h:h + len(head)], head):
            return int(h)
    raise AssertionError("received audio is not a slice of the WAV")


def press_and_release(d, press_ms=1500, release_ms=4200):
    press_pos = d.wait_audio_ms(press_ms)
    assert d.command("press") == {"ok": True}
    release_pos = d.wait_audio_ms(release_ms)
    assert d.command("release") == {"ok": True}
    return press_pos, release_pos


FIXED = 'postroll = "fixed"\n'  # these tests place the post-roll itself; adaptive: below


def test_press_release_gives_one_final_with_preroll_and_postroll(fake_v3, daemon_factory):
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    d, samples = daemon_factory(srv, audio_extra=FIXED)
    assert srv.connection_attempts == 0  # no session before the first press
    press_pos, release_pos = press_and_release(d)
    final = d.wait_event(lambda e: e["event"] == "final")
    assert final["text"] == "Hello world." and final["press_id"] == 1
    assert final["turn_order"] == 0 and final["session_id"] == srv.sessions[0].session_id
    code, took = d.stop()
    assert code == 0 and took < 5.0
    finals = [e for e in d.all_events if e["event"] == "final"]
    assert len(finals) == 1
    states = [e["state"] for e in d.all_events if e["event"] == "state"]
    assert states[:4] == ["idle", "connecting", "listening", "finalizing"] and states[-1] == "idle"

    rec = srv.sessions[0]
    rec.wait_done(5)
    frames = rec.audio_frames()
    audio = b"".join(f.data for f in frames)
    # 50 ms frames; the last one takes the remainder (50-100 ms), so the turn ends exactly
    assert all(len(f.data) == CHUNK * 2 for f in frames[:-1])
    assert CHUNK * 2 <= len(frames[-1].data) < 4 * CHUNK
    start = locate(audio, samples)
    n = len(audio) // 2
    assert np.array_equal(np.frombuffer(audio, "<i2"), samples[start:start + n])  # contiguous
    start_ms, end_ms = start * 1000 // RATE, (start + n) * 1000 // RATE
    # pre-roll: the first frame holds audio from ~500 ms before the press
    assert press_pos - 500 - 100 <= start_ms <= press_pos - 500 + 100
    assert start_ms < press_pos
    # post-roll: the last frame holds audio up to 300 ms after the release (no chunk rounding)
    assert release_pos + 300 - 100 <= end_ms <= release_pos + 300 + 100
    assert end_ms > release_pos
    # ForceEndpoint right after the last audio frame, then Terminate
    kinds = [("audio" if f.kind == "binary" else f.data.get("type")) for f in rec.received]
    assert kinds.count("ForceEndpoint") == 1 and kinds[-1] == "Terminate"
    fe = kinds.index("ForceEndpoint")
    assert set(kinds[:fe]) == {"audio"} and "audio" not in kinds[fe:]
    assert final["audio_ms"] == n * 1000 // RATE
    assert 0 <= final["latency_ms"] < 5000
    # never ahead of real time by more than the allowance (the fake would have closed 3007)
    assert rec.close_sent is None or rec.close_sent[0] == 1000


def test_release_inside_a_long_capture_period_keeps_the_whole_postroll(fake_v3, daemon_factory):
    """With 500 ms capture periods the newest captured sample is up to 500 ms old at a release;
    the post-roll must still run 300 ms past the release itself, not past that sample."""
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    d, samples = daemon_factory(srv, audio_extra="period_ms = 500\n" + FIXED)
    d.wait_audio_ms(1500)
    assert d.command("press") == {"ok": True}
    landed = d.wait_audio_ms(3500)  # a block has just landed (polled every 20 ms)
    t_landed = time.monotonic()
    time.sleep(0.25)  # places the release mid-period: timing the action, not awaiting a result
    t_release = time.monotonic()
    assert d.command("release") == {"ok": True}
    # the audio position at the release is at least this (the block landed before the poll)
    release_ms = landed + (t_release - t_landed) * 1000
    final = d.wait_event(lambda e: e["event"] == "final")
    rec = srv.sessions[0]
    rec.wait_done(5)
    audio = b"".join(f.data for f in rec.audio_frames())
    end_ms = (locate(audio, samples) + len(audio) // 2) * 1000 // RATE
    assert end_ms >= release_ms + 300 - 10 - 2, (end_ms, release_ms)  # placed to within 10 ms
    assert final["audio_ms"] == len(audio) // 2 * 1000 // RATE
    assert d.stop()[0] == 0


def test_delayed_begin_loses_no_audio(fake_v3, daemon_factory):
    srv = fake_v3(script=["late begin"], api_keys={KEY}, faults=Faults(begin_delay_s=1.5))
    d, samples = daemon_factory(srv, audio_extra=FIXED)
    press_pos, release_pos = press_and_release(d, 1500, 4200)
    final = d.wait_event(lambda e: e["event"] == "final", timeout=20)
    assert final["text"] == "Late begin."
    rec = srv.sessions[0]
    audio = b"".join(f.data for f in rec.audio_frames())
    start = locate(audio, samples)
    n = len(audio) // 2
    assert np.array_equal(np.frombuffer(audio, "<i2"), samples[start:start + n])
    start_ms, end_ms = start * 1000 // RATE, (start + n) * 1000 // RATE
    assert start_ms <= press_pos - 400 and end_ms >= release_pos + 250
    code, took = d.stop()
    assert code == 0 and took < 5.0


def sent_end_ms(srv, samples) -> int:
    rec = srv.sessions[0]
    rec.wait_done(5)
    audio = b"".join(f.data for f in rec.audio_frames())
    return (locate(audio, samples) + len(audio) // 2) * 1000 // RATE


def test_adaptive_postroll_a_release_after_the_speech_ends_the_stream_at_the_release(
    fake_v3, daemon_factory
):
    """The default post-roll, released 600 ms after the loud stretch ended (4000 ms): the press
    was over, so the audio ends at the release (rounded up to a legal 50 ms frame at most), not
    300 ms later, and the final comes that much sooner."""
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    d, samples = daemon_factory(srv)
    _, release_pos = press_and_release(d, 1500, 4600)
    d.wait_event(lambda e: e["event"] == "final")
    end_ms = sent_end_ms(srv, samples)
    # the release lies up to one 100 ms capture block (+ the command's way) after the position
    # polled; a fixed post-roll would end 300 ms after it
    assert release_pos <= end_ms <= release_pos + 100 + 50 + 50, (end_ms, release_pos)
    assert d.stop()[0] == 0


def test_adaptive_postroll_speech_at_the_release_keeps_the_whole_postroll(
    fake_v3, daemon_factory
):
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    d, samples = daemon_factory(srv)
    _, release_pos = press_and_release(d, 1500, 3900)  # the loud stretch ends at 4000 ms
    d.wait_event(lambda e: e["event"] == "final")
    assert sent_end_ms(srv, samples) >= release_pos + 300 - 10
    assert d.stop()[0] == 0


def test_sigterm_mid_turn_skips_postroll_and_delivers(fake_v3, daemon_factory):
    srv = fake_v3(script=["cut short"], api_keys={KEY})
    d, _ = daemon_factory(srv)
    d.wait_audio_ms(1500)
    d.command("press")
    d.wait_audio_ms(3500)
    d.wait_event(lambda e: e["event"] == "state" and e["state"] == "listening")
    code, took = d.stop()
    assert code == 0 and took < 5.0
    assert [e["text"] for e in d.all_events if e["event"] == "final"] == ["Cut short."]
    kinds = [f.data.get("type") for f in srv.sessions[0].received if f.kind != "binary"]
    assert kinds == ["ForceEndpoint", "Terminate"]


def test_cancel_drops_the_turn(fake_v3, daemon_factory):
    srv = fake_v3(script=["never shown"], api_keys={KEY})
    d, _ = daemon_factory(srv)
    d.wait_audio_ms(1500)
    d.command("press")
    d.wait_audio_ms(3500)
    assert d.command("cancel") == {"ok": True}
    d.wait_event(lambda e: e["event"] == "state" and e["state"] == "idle")
    code, _ = d.stop()
    assert code == 0 and not [e for e in d.all_events if e["event"] == "final"]


def test_two_presses_back_to_back_both_delivered(fake_v3, daemon_factory):
    srv = fake_v3(script=["first turn", "second turn"], api_keys={KEY})
    layout = ((1000, False), (1200, True), (800, False), (1200, True), (3000, False))
    d, _ = daemon_factory(srv, layout=layout)
    d.wait_audio_ms(800)
    d.command("press")
    d.wait_audio_ms(2300)
    d.command("release")
    d.command("press")  # during the first turn's post-roll / finalizing
    d.wait_audio_ms(4400)
    d.command("release")
    got = [d.wait_event(lambda e: e["event"] == "final", timeout=20) for _ in range(2)]
    assert sorted(e["text"] for e in got) == ["First turn.", "Second turn."]
    assert sorted(e["press_id"] for e in got) == [1, 2]
    code, _ = d.stop()
    assert code == 0
    assert len([e for e in d.all_events if e["event"] == "final"]) == 2


def test_garbage_on_control_socket_does_not_disturb(fake_v3, daemon_factory):
    import socket

    srv = fake_v3(script=["still fine"], api_keys={KEY})
    d, _ = daemon_factory(srv)
    for junk in (b"not json\n", b"[1,2]\n", b'{"cmd":"explode"}\n', b"\xff\xfe\n", b"{}\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(d.socket))
            s.sendall(junk)
            reply = json.loads(s.makefile().readline())
            assert reply["ok"] is False and reply["error"]
    press_and_release(d)
    assert d.wait_event(lambda e: e["event"] == "final")["text"] == "Still fine."
    assert d.stop()[0] == 0
    assert not any("Traceback" in line for line in d.stderr_lines)


def run_cli(*args, timeout=20, env=None):
    return subprocess.run([sys.executable, "-m", "pttd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[audio]\nchunk_ms = 10\n")
    r = run_cli("run", "-c", str(bad))
    assert r.returncode == 2 and "audio.chunk_ms" in r.stderr and "Traceback" not in r.stderr


def test_missing_wav_exits_2(tmp_path):
    cfg = write_config(tmp_path / "c.toml", url="ws://127.0.0.1:9/v3/ws", key=KEY,
                       wav=tmp_path / "nope.wav", socket=tmp_path / "s.sock")
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 2 and "nope.wav" in r.stderr and "Traceback" not in r.stderr


def test_busy_control_socket_exits_2(fake_v3, daemon_factory, tmp_path):
    srv = fake_v3(api_keys={KEY})
    d, _ = daemon_factory(srv)
    second = tmp_path / "second.toml"
    second.write_text((tmp_path / "pttd.toml").read_text())
    r = run_cli("run", "-c", str(second))
    assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr
    assert d.command("status")["ok"]
    assert d.stop()[0] == 0


def test_missing_key_exits_2(tmp_path):
    wav = tmp_path / "m.wav"
    speech_wav(wav)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[audio]\nsource = "wav"\nwav = "{wav}"\n[gpio]\npin_factory = "mock"\n')
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ASSEMBLYAI_API_KEY", "CREDENTIALS_DIRECTORY")}
    r = run_cli("run", "-c", str(cfg), env=env)
    assert r.returncode == 2 and "API key" in r.stderr and "Traceback" not in r.stderr


def test_control_commands_without_daemon(tmp_path):
    r = run_cli("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip()


def test_final_turn_in_real_journald(fake_v3, tmp_path):
    from tests.journald import Journald, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    srv = fake_v3(script=["logged turn"], api_keys={KEY}, expires_in_s=60)
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock,
                       journal=True, extra='speech_model = "universal-streaming-english"')
    with Journald() as jd:
        d = DaemonProcess(cfg, sock, popen=jd.popen)
        try:
            d.wait_ready()
            press_and_release(d)
            final = d.wait_event(lambda e: e["event"] == "final")
            records = jd.wait_for_records(lambda rs: len(rs) >= 1, "PTTD_EVENT=final", timeout=20)
            assert d.stop()[0] == 0
        finally:
            d.kill()
        states = jd.records("PTTD_EVENT=state")
    (rec,) = records
    assert rec["MESSAGE"] == "Logged turn." == final["text"]
    assert rec["SYSLOG_IDENTIFIER"] == "pttd" and rec["PRIORITY"] == "6"
    assert rec["TURN_ORDER"] == "0" and rec["PRESS_ID"] == "1"
    assert rec["SESSION_ID"] == final["session_id"] == srv.sessions[0].session_id
    assert rec["SPEECH_MODEL"] == "universal-streaming-english"
    assert rec["AUDIO_MS"] == str(final["audio_ms"]) and rec["LATENCY_MS"] == str(final["latency_ms"])
    assert {r["PTTD_STATE"] for r in states} >= {"listening", "finalizing", "idle"}
    assert all(r["PRIORITY"] == "7" for r in states)
    assert KEY not in json.dumps(records + states)


def test_run_on_local_engine_without_key(tmp_path):
    """url = "local" and no key: the daemon starts the offline engine in-process."""
    import wave
    from importlib import resources

    clip = resources.files("pttd") / "data" / "lights_on.wav"
    with wave.open(str(clip)) as w:
        speech = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    mic = tmp_path / "mic.wav"
    from tests.daemon_proc import write_wav
    write_wav(mic, np.concatenate([np.zeros(RATE, "<i2"), speech, np.zeros(RATE * 3, "<i2")]))
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "local.toml", url="local", wav=mic, socket=sock, tail="""
[local]
phrases = ["turn on the kitchen lights", "turn off the kitchen lights", "what time is it"]""")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ASSEMBLYAI_API_KEY", "CREDENTIALS_DIRECTORY")}
    d = DaemonProcess(cfg, sock, env={"ASSEMBLYAI_API_KEY": ""})
    try:
        d.wait_ready(timeout=30)
        d.wait_audio_ms(700)
        d.command("press")
        d.wait_audio_ms(1000 + len(speech) * 1000 // RATE + 200)
        d.command("release")
        final = d.wait_event(lambda e: e["event"] == "final", timeout=30)
        assert final["text"] == "Turn on the kitchen lights."
        assert d.stop()[0] == 0
    finally:
        d.kill()


def test_fallback_to_local_engine_and_back_to_cloud(fake_v3, tmp_path):
    """[stt] fallback = "local": cloud unreachable -> the offline engine; back to the cloud later."""
    import socket as _socket
    import wave
    from importlib import resources

    from tests.daemon_proc import write_wav
    from tests.fakes.fake_v3 import FakeV3Server

    with _socket.socket() as s:  # a port where nothing listens: the "cloud" is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clip = resources.files("pttd") / "data" / "lights_on.wav"
    with wave.open(str(clip)) as w:
        speech = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    gap = np.zeros(RATE * 3, "<i2")
    mic = tmp_path / "mic.wav"
    write_wav(mic, np.concatenate([np.zeros(RATE, "<i2"), speech, gap, speech, gap, gap]))
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "c.toml", url=f"ws://127.0.0.1:{port}/v3/ws", key=KEY, wav=mic,
                       socket=sock, extra='fallback = "local"\nfallback_retry_s = 2')
    with open(cfg, "a") as fh:
        fh.write('[local]\nphrases = ["turn on the kitchen lights", "what time is it"]\n')
    speech_ms = len(speech) * 1000 // RATE
    d = DaemonProcess(cfg, sock)
    try:
        d.wait_ready(timeout=30)
        d.wait_audio_ms(700)
        d.command("press")
        d.wait_audio_ms(1000 + speech_ms + 200)
        d.command("release")
        final = d.wait_event(lambda e: e["event"] == "final", timeout=30)
        assert final["text"] == "Turn on the kitchen lights." and final["engine"] == "local"
        # the cloud comes back; after fallback_retry_s the next press goes to it again
        cloud = FakeV3Server(script=["back in the cloud"], api_keys={KEY}, port=port)
        cloud.start()
        try:
            second = 1000 + speech_ms + 3000
            d.wait_audio_ms(second - 300)
            d.command("press")
            d.wait_audio_ms(second + speech_ms + 200)
            d.command("release")
            final2 = d.wait_event(lambda e: e["event"] == "final" and e["press_id"] == 2, timeout=30)
            assert final2["text"] == "Back in the cloud." and "engine" not in final2
            assert d.stop()[0] == 0
        finally:
            cloud.stop()
    finally:
        d.kill()
