"""``pttd check`` and ``pttd record`` through the CLI (wav mic, mock GPIO, fake server)."""
from __future__ import annotations

import subprocess
import sys
import wave

import numpy as np

from tests.daemon_proc import speech_wav, write_config

KEY = "check-key-0123"


def pttd(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pttd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_check_passes_with_good_setup(fake_v3, tmp_path):
    srv = fake_v3(api_keys={KEY})
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    cfg = write_config(tmp_path / "c.toml", url=srv.url, key=KEY, wav=wav, socket=tmp_path / "s")
    r = pttd("check", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for part in ("config", "mic", "leds", "button", "server"):
        assert any(l.split()[:2][1:] == [part] and l.split()[0] in ("PASS", "WARN") for l in lines), part
    assert "key accepted" in r.stdout and "dBFS" in r.stdout
    rec = srv.sessions[0]
    rec.wait_done(5)
    assert [m.get("type") for m in rec.text_messages()] == ["Terminate"]
    assert KEY not in r.stdout + r.stderr


def test_check_fails_on_bad_key_with_fix(fake_v3, tmp_path):
    srv = fake_v3(api_keys={KEY})
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    cfg = write_config(tmp_path / "c.toml", url=srv.url, key="wrong-key", wav=wav,
                       socket=tmp_path / "s")
    r = pttd("check", "-c", str(cfg))
    assert r.returncode == 1
    assert any(l.startswith("FAIL server") for l in r.stdout.splitlines())
    assert "fix: check the key" in r.stdout and "wrong-key" not in r.stdout


def test_record_writes_exactly_what_would_be_sent(tmp_path):
    wav = tmp_path / "mic.wav"
    samples = speech_wav(wav)
    cfg = write_config(tmp_path / "c.toml", url="ws://127.0.0.1:9/v3/ws", key=KEY, wav=wav,
                       socket=tmp_path / "s")
    out = tmp_path / "out.wav"
    r = pttd("record", "-c", str(cfg), "--seconds", "1.5", str(out))
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert len(got) == 24000
    assert np.array_equal(got, samples[:24000])


def test_record_rejects_bad_seconds(tmp_path):
    r = pttd("record", "--seconds", "0", str(tmp_path / "x.wav"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
