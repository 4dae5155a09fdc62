"""Audio front-end cost: prints figures, never pass/fail.

1. Converter alone: CPU µs per 50 ms frame, S32_LE stereo 48 kHz → S16_LE mono 16 kHz
   (channel pick, 191-tap polyphase FIR, DC blocker, +20 dB gain, clip count; the level meter
   is off, as in the daemon: only `pttd check` turns it on).
2. The whole capture thread through real alsa-lib: pyalsaaudio reads the ALSA ``file`` plugin,
   whose FIFO a feeder process fills in real time (tests/alsa_fifo.py); CPU seconds of that one
   thread (from /proc/self/task/<tid>/schedstat) per second of audio, for 100 ms and 50 ms
   periods: an I2S mic (S32_LE stereo 48 kHz, converted as above) and a 16-bit mono mic at
   16 kHz (a USB mic: the daemon's 80 Hz high-pass is its only conversion; and without it, the
   capture alone). Target: <= 0.02 s/s (2 % of one core) here; a Pi Zero 2 W is ~10x slower.

    OPENBLAS_NUM_THREADS=1 python bench/audio_bench.py [--seconds 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from alsa_fifo import FifoMic  # noqa: E402
from pttd.audio.alsa import AlsaSource  # noqa: E402
from pttd.audio.ring import RingBuffer  # noqa: E402
from pttd.audio.convert import Converter  # noqa: E402


def mems_noise(start: int, n: int) -> np.ndarray:
    """Speech-level noise on the right channel, zeros on the left, 24 bits in 32."""
    rng = np.random.default_rng(start)
    frames = np.zeros((n, 2), dtype="<i4")
    frames[:, 1] = (rng.normal(0, 0.02 * 2 ** 31, n).astype(np.int64) & ~0xFF)
    return frames


def bench_converter(frames: int = 4000) -> float:
    """CPU µs per 50 ms frame of the Converter alone."""
    raw = mems_noise(0, 2400).tobytes()
    conv = Converter("S32_LE", 2, 48000, 1, 20.0, 16000)
    for _ in range(50):
        conv.process(raw)
    t = time.process_time()
    for _ in range(frames):
        conv.process(raw)
    return (time.process_time() - t) / frames * 1e6


def thread_cpu_s(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def usb_noise(start: int, n: int) -> np.ndarray:
    """Speech-level noise, 16-bit mono."""
    rng = np.random.default_rng(start)
    return rng.normal(0, 0.02 * 2 ** 15, (n, 1)).astype("<i2")


MICS = {  # name: FifoMic signal and format, AlsaSource's format, channel, gain, high-pass
    "I2S S32 stereo 48k": (mems_noise, "S32_LE", 2, 48000, 1, 20.0, 80.0),
    "USB S16 mono 16k": (usb_noise, "S16_LE", 1, 16000, 0, 0.0, 80.0),  # the daemon's high-pass
    "the same, high-pass off": (usb_noise, "S16_LE", 1, 16000, 0, 0.0, None),  # capture alone
}


def bench_capture(seconds: float, period_ms: int, mic_kind: str) -> tuple[float, float, dict]:
    """CPU s per audio s of the capture thread, and wall-clock audio rate achieved."""
    signal, fmt, channels, rate, channel, gain_db, highpass = MICS[mic_kind]
    ring = RingBuffer(16000 * 30, 16000)
    with FifoMic(signal, format=fmt, channels=channels, rate=rate,
                 period_frames=rate // 1000 * period_ms) as mic:
        src = AlsaSource(mic.device, fmt, channels, rate, channel, gain_db, 150, 16000, ring,
                         period_ms=period_ms, highpass_hz=highpass)
        src.start()
        if not src.first_audio.wait(5.0):
            raise SystemExit("no audio from the FIFO mic")
        tid = src._thread.native_id
        cpu0, pos0, t0 = thread_cpu_s(tid), ring.end, time.monotonic()
        ring.wait_for(pos0 + int(seconds * 16000) - 1, seconds + 5.0)
        cpu1, pos1, t1 = thread_cpu_s(tid), ring.end, time.monotonic()
        stats = src.stats()
        src.stop()
    audio_s = (pos1 - pos0) / 16000
    return (cpu1 - cpu0) / audio_s, audio_s / (t1 - t0), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    us = bench_converter()
    print(f"converter S32 stereo 48k -> S16 mono 16k: {us:.0f} us CPU per 50 ms frame "
          f"({us / 50000 * 100:.2f} % of one core)")
    for mic_kind in MICS:
        for period_ms in (100, 50):
            per_s, pace, stats = bench_capture(args.seconds, period_ms, mic_kind)
            print(f"capture thread, {mic_kind}, real alsa-lib file plugin, {period_ms} ms "
                  f"periods: {per_s * 1000:.2f} ms CPU per audio s ({per_s * 100:.2f} % of one "
                  f"core), pace {pace:.3f}x real time, xruns {stats['xruns']}, "
                  f"gaps {stats['gaps']}")


if __name__ == "__main__":
    main()
