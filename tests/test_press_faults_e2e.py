"""Faults no earlier test named, through the real ``pttd run`` process: every press still ends.

Each case: the press ends within 15 s of its release with a ``final`` or an ``error`` event
carrying its ``press_id``, ``status`` is back to ``idle``, and the next press gets its final.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.fakes.faults import Faults
from tests.alsa_fifo import wait_until
from tests.daemon_proc import E2E_KEY, DaemonProcess, speech_wav, write_config, write_wav

HELLO = "Hello world."
# speech at 2-4 s and 6-8 s of the mic's clock (the WAV loops)
LAYOUT = ((2000, False), (2000, True), (2000, False), (2000, True), (8000, False))
DATA = Path(__file__).resolve().parent.parent / "daemon" / "pttd" / "data"


def press_cycle(d, press_ms: int, release_ms: int) -> float:
    d.wait_audio_ms(press_ms)
    assert d.command("press")["ok"]
    d.wait_audio_ms(release_ms)
    assert d.command("release")["ok"]
    return time.monotonic()


def ends_with_one_event(d, press_id: int, released_at: float) -> dict:
    """The press's final or error (exactly one kind), within 15 s of release; then idle."""
    event = d.wait_event(lambda e: e["event"] in ("final", "error")
                         and e.get("press_id") == press_id, timeout=15)
    assert time.monotonic() - released_at < 15
    assert wait_until(lambda: d.command("status")["state"] == "idle", 5), d.command("status")
    kinds = {e["event"] for e in d.all_events if e.get("press_id") == press_id}
    assert kinds in ({"final"}, {"error"}), kinds
    return event


def start(tmp_path, url: str, *, rate: int = 16000, extra: str = "", audio_extra: str = "",
          tail: str = "", wav: Path | None = None) -> DaemonProcess:
    if wav is None:
        wav = tmp_path / "mic.wav"
        samples = speech_wav(wav, layout=LAYOUT)
        if rate != 16000:  # the same sound at the configured rate
            t_old = np.arange(len(samples)) / 16000
            t_new = np.arange(int(len(samples) * rate / 16000)) / rate
            write_wav(wav, np.interp(t_new, t_old, samples).astype("<i2"), rate)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=url, key=E2E_KEY, wav=wav, socket=sock,
                       extra=extra, audio_extra=f"sample_rate = {rate}\n{audio_extra}", tail=tail)
    d = DaemonProcess(cfg, sock)
    d.wait_ready()
    return d


def test_a_rate_whose_50_ms_is_not_whole_samples_streams_and_ends(fake_v3, daemons, tmp_path):
    """22050 Hz: 50 ms is 1102.5 samples. Frames were 1102 (49.98 ms), refused by the session's
    own check, and the press sat in finalizing for good."""
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY})
    d = start(tmp_path, srv.url, rate=22050)
    daemons.append(d)
    released = press_cycle(d, 1500, 4200)
    assert ends_with_one_event(d, 1, released)["text"] == HELLO
    released = press_cycle(d, 5500, 8200)
    assert ends_with_one_event(d, 2, released)["text"] == HELLO
    frames = [r for r in srv.sessions[0].received if r.kind == "binary"]
    assert frames and all(len(r.data) == 2 * 1103 for r in frames[:-1])


def test_the_local_engine_at_22050_hz(daemons, tmp_path):
    """The reproduction as reported: ``url = "local"`` at 22050 Hz."""
    pytest.importorskip("pocketsphinx")
    clip = _read_wav(DATA / "lights_on.wav")
    silence = np.zeros(16000, dtype="<i2")
    samples = np.concatenate([silence, clip, silence, silence, clip, silence, silence])
    t_old = np.arange(len(samples)) / 16000
    t_new = np.arange(int(len(samples) * 22050 / 16000)) / 22050
    wav = write_wav(tmp_path / "mic.wav", np.interp(t_new, t_old, samples).astype("<i2"), 22050)
    clip_ms = len(clip) * 1000 // 16000
    d = start(tmp_path, "local", rate=22050, wav=wav,
              tail='[local]\nphrases = ["turn on the kitchen lights", "what time is it"]')
    daemons.append(d)
    released = press_cycle(d, 800, 1000 + clip_ms + 300)
    first = ends_with_one_event(d, 1, released)
    second_start = 2000 + clip_ms  # the second clip starts 1 s after this, as the first does
    released = press_cycle(d, second_start + 800, second_start + 1000 + clip_ms + 300)
    second = ends_with_one_event(d, 2, released)
    assert first["event"] == second["event"] == "final", (first, second)
    assert second["text"] == "Turn on the kitchen lights."


HOSTILE = {
    "turn_order 1e400": '{"type":"Turn","turn_order":1e400,"end_of_turn":true,'
                        '"transcript":"x","words":[]}',
    "error_code 1e400": '{"type":"Error","error_code":1e400,"error":"nonsense"}',
    "200,000-deep array": "[" * 200_000 + "]" * 200_000,
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_values_mid_press_never_wedge(fake_v3, daemons, tmp_path, text):
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY},
                  faults=[Faults(raw_after_frames=(5, (text,)))])  # the first connection only
    d = start(tmp_path, srv.url)
    daemons.append(d)
    released = press_cycle(d, 1500, 4200)
    ends_with_one_event(d, 1, released)
    assert srv.sessions[0].raw_sent == [text]
    released = press_cycle(d, 5500, 8200)
    assert ends_with_one_event(d, 2, released)["text"] == HELLO
    assert not [line for line in d.stderr_lines if "Traceback" in line]


GHOST = '{"type":"Turn","turn_order":7,"end_of_turn":true,"turn_is_formatted":true,' \
        '"transcript":"A ghost.","words":[]}'


def test_a_turn_on_an_idle_warm_session_is_not_a_final(fake_v3, daemons, tmp_path):
    """keep_warm_s: the server ends a turn while no press is active. It belongs to no press:
    logged, never delivered (it would run the hook as if someone had spoken)."""
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY},
                  faults=[Faults(raw_after_s=(4.0, (GHOST,)))])
    d = start(tmp_path, srv.url, extra="keep_warm_s = 60")
    daemons.append(d)
    released = press_cycle(d, 1500, 4200)
    assert ends_with_one_event(d, 1, released)["text"] == HELLO
    assert wait_until(lambda: srv.sessions[0].raw_sent == [GHOST], 10)
    released = press_cycle(d, 5500, 8200)  # on the same (warm) session, after the ghost
    assert ends_with_one_event(d, 2, released)["text"] == HELLO
    assert len(srv.sessions) == 1
    assert [e["text"] for e in d.all_events if e["event"] == "final"] == [HELLO, HELLO]


@pytest.mark.parametrize("url", ["ws://", "ws://[::1", "ws://127.0.0.1:99999/v3/ws",
                                 "http://127.0.0.1/v3/ws", "ws://:80/x"])
def test_a_url_that_can_never_work_exits_2_naming_stt_url(tmp_path, url):
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    cfg = write_config(tmp_path / "pttd.toml", url=url, key=E2E_KEY, wav=wav,
                       socket=tmp_path / "ctl.sock")
    proc = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "stt.url" in proc.stderr and "Traceback" not in proc.stderr


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_error_events_that_end_a_press_carry_its_id_in_json():
    from pttd.events import error_event

    ending = json.loads(json.dumps(error_event(1011, "x", None, press_id=3)))
    notice = json.loads(json.dumps(error_event(1011, "x", 2.0)))
    assert ending["press_id"] == 3 and "press_id" not in notice
