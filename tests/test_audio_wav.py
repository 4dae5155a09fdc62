"""WavSource: real-time pace from a monotonic clock, exact samples, conversion, format errors,
and ``record`` (what ``pttd record`` writes)."""
import struct
import time
import wave

import numpy as np
import pytest

from alsa_fifo import pcm16, sine_fit
from pttd.audio.capture import WavSource
from pttd.audio.convert import AudioError
from pttd.audio.levels import measure_levels
from pttd.audio.record import record
from pttd.audio.ring import RingBuffer


def write_wav(path, frames: np.ndarray, rate: int, width: int = 2):
    frames = frames if frames.ndim == 2 else frames[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return path


def write_float_wav(path, n: int = 100):
    data = np.zeros(n, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.fixture
def ring():
    return RingBuffer(16000 * 10, 16000)


@pytest.fixture
def stop_after():
    sources = []
    yield sources.append
    for src in sources:
        t = time.monotonic()
        assert src.stop(2.0)
        assert time.monotonic() - t < 0.5


def test_plays_in_real_time_exact_samples_then_silence(tmp_path, ring, stop_after):
    data = np.random.default_rng(3).integers(-30000, 30000, 16000, dtype="<i2")  # 1.0 s
    src = WavSource(write_wav(tmp_path / "a.wav", data, 16000), ring, 16000, period_ms=50)
    stop_after(src)
    t0 = time.monotonic()
    src.start()
    arrivals = {}
    for pos in (800, 4000, 8000, 12000, 16000, 19200):
        assert ring.wait_for(pos - 1, timeout=3.0)
        arrivals[pos] = time.monotonic() - t0
        assert ring.end <= (time.monotonic() - t0) * 16000 + 800  # never ahead of real time
    for pos, t in arrivals.items():
        assert pos / 16000 - 0.01 <= t <= pos / 16000 + 0.08, (pos, t)
    pace = (arrivals[19200] - arrivals[4000]) / ((19200 - 4000) / 16000)
    assert pace == pytest.approx(1.0, abs=0.04)
    assert src.first_audio.is_set() and src.progress >= 24
    got = ring.read(0, 19200)
    assert got.data[:32000] == data.tobytes()  # byte for byte: no conversion needed
    assert got.data[32000:] == bytes(2 * 3200)  # then silence, like a mic that never ends


def test_chunks_around_the_data_and_a_truncated_file_play_exactly(tmp_path, ring, stop_after):
    """The PCM is read straight from the file at the data chunk: a LIST chunk before it, a
    chunk after it, and a data chunk that claims more than the file holds must not leak in."""
    data = np.random.default_rng(5).integers(-30000, 30000, 4000, dtype="<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    info = b"INFOISFT" + struct.pack("<I", 6) + b"pttd\0\0"
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"LIST" + struct.pack("<I", len(info)) + info
            + b"data" + struct.pack("<I", len(data)) + data
            + b"junk" + struct.pack("<I", 8) + b"\x7f" * 8)
    full = tmp_path / "chunks.wav"
    full.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    cut = tmp_path / "cut.wav"  # the header claims 4000 samples; 1000 are missing
    cut.write_bytes(full.read_bytes()[:len(full.read_bytes()) - 16 - 2000])
    for path, want in ((full, data), (cut, data[:6000])):
        r = RingBuffer(16000 * 10, 16000)
        src = WavSource(path, r, 16000, period_ms=50)
        stop_after(src)
        src.start()
        assert r.wait_for(6400 - 1, timeout=3.0)
        got = r.read(0, 6400).data
        assert got[:len(want)] == want and got[len(want):] == bytes(12800 - len(want)), path


def test_schedule_has_no_drift_with_uneven_chunks(tmp_path, ring, stop_after):
    """22.05 kHz has 1102.5 frames per 50 ms: deadlines come from one start time, not sums."""
    n = 22050 * 2
    x = np.rint(8000 * np.sin(2 * np.pi * 440 * np.arange(n) / 22050)).astype("<i2")
    src = WavSource(write_wav(tmp_path / "b.wav", x, 22050), ring, 16000, period_ms=50)
    stop_after(src)
    t0 = time.monotonic()
    src.start()
    assert ring.wait_for(16000 - 1, timeout=3.0)
    elapsed = time.monotonic() - t0
    assert elapsed == pytest.approx(1.0, abs=0.08)
    assert src.frames_played == pytest.approx(elapsed * 22050, abs=22050 * 0.08)


def test_stereo_44k_wav_is_mixed_and_resampled(tmp_path, ring, stop_after):
    n = 44100
    t = np.arange(n) / 44100
    left = 6000 * np.sin(2 * np.pi * 1000 * t)
    right = 2000 * np.sin(2 * np.pi * 1000 * t)
    frames = np.rint(np.stack([left, right], axis=1)).astype("<i2")
    src = WavSource(write_wav(tmp_path / "c.wav", frames, 44100), ring, 16000, period_ms=100)
    stop_after(src)
    src.start()
    assert ring.wait_for(12000, timeout=3.0)
    y = pcm16(ring.read(1000, 10000).data)
    amp, snr = sine_fit(y, 1000, 16000)
    assert amp == pytest.approx(4000, rel=0.005)  # the average of the two channels
    assert snr > 60


def test_levels_are_metered_only_while_measure_levels_runs(tmp_path, ring):
    """``pttd check`` on a 16 kHz mono WAV: exact levels, and the file's bytes still sent."""
    tone = np.rint(16384 * np.sin(2 * np.pi * 500 * np.arange(16000) / 16000)).astype("<i2")
    src = WavSource(write_wav(tmp_path / "t.wav", tone, 16000), ring, 16000, period_ms=50)
    assert src.take_levels() is None
    readings = []
    report = measure_levels(src, seconds=0.5, interval=0.1, on_update=readings.append)
    assert readings and report.frames == sum(r.frames for r in readings) >= 4800
    assert report.channels[0].peak_dbfs == pytest.approx(-6.02, abs=0.01)
    assert report.channels[0].rms_dbfs == pytest.approx(-9.03, abs=0.01)
    assert report.out_peak_dbfs == report.channels[0].peak_dbfs
    assert report.warnings == []
    assert src.take_levels() is None
    assert 8000 <= ring.end < 16000
    assert ring.read(0, ring.end).data == tone.tobytes()[:2 * ring.end]


def test_stop_is_prompt_and_first_audio_set(tmp_path, ring):
    src = WavSource(write_wav(tmp_path / "d.wav", np.zeros(1600, "<i2"), 16000), ring, 16000,
                    period_ms=200)
    src.start()
    assert src.first_audio.wait(2.0)
    t = time.monotonic()
    assert src.stop(2.0)
    assert time.monotonic() - t < 0.3
    assert not src.running


def test_missing_file_is_a_clear_error(tmp_path, ring):
    with pytest.raises(AudioError, match="WAV file not found: .*nope.wav"):
        WavSource(tmp_path / "nope.wav", ring, 16000)


@pytest.mark.parametrize("width,bits", [(1, "8-bit"), (3, "24-bit"), (4, "32-bit")])
def test_non_16_bit_pcm_is_refused_with_a_fix(tmp_path, ring, width, bits):
    path = tmp_path / "w.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(bytes(width * 100))
    with pytest.raises(AudioError, match=f"{bits} PCM.*16-bit.*sox"):
        WavSource(path, ring, 16000)


def test_float_wav_is_refused(tmp_path, ring):
    with pytest.raises(AudioError, match="32-bit float.*sox"):
        WavSource(write_float_wav(tmp_path / "f.wav"), ring, 16000)


def test_not_a_wav_is_refused(tmp_path, ring):
    path = tmp_path / "x.wav"
    path.write_text("hello, not audio")
    with pytest.raises(AudioError, match="not a 16-bit PCM WAV"):
        WavSource(path, ring, 16000)


def test_record_writes_exactly_what_would_be_sent(tmp_path, ring):
    data = np.random.default_rng(4).integers(-20000, 20000, 12000, dtype="<i2")
    src = WavSource(write_wav(tmp_path / "in.wav", data, 16000), ring, 16000, period_ms=50)
    out = tmp_path / "out.wav"
    result = record(src, ring, 0.5, out)
    assert not src.running and result["samples"] == 8000
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.readframes(w.getnframes()) == data[:8000].tobytes()
