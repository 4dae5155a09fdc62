"""AlsaSource through real alsa-lib and pyalsaaudio: the ``file`` plugin reads a FIFO that a
feeder process writes in real time (tests/alsa_fifo.py). Nothing of pyalsaaudio is mocked."""
import queue
import time
import wave

import numpy as np
import pytest

from alsa_fifo import FifoMic, pcm16, sine_fit, wait_until
from pttd.audio.alsa import AlsaSource
from pttd.audio.levels import measure_levels
from pttd.audio.record import record
from pttd.audio.ring import RingBuffer

FS32 = 2.0 ** 31
RATE = 16000


class Statuses:
    """on_status that only enqueues, as the controller's does."""

    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, kind, message):
        self.q.put((kind, message))

    def wait(self, kind, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} status within {timeout} s") from None
            if got[0] == kind:
                return got[1]


@pytest.fixture
def mics():
    """FifoMic factory; each mic is closed after the sources using it have stopped."""
    opened = []

    def make(*args, **kw):
        mic = FifoMic(*args, **kw).__enter__()
        opened.append(mic)
        return mic

    yield make
    for mic in opened:
        mic.close()


@pytest.fixture
def sources(mics):
    """Sources to stop at the end (before their mics go); stopping must be prompt."""
    started = []
    yield started.append
    for src in started:
        t = time.monotonic()
        assert src.stop(2.0)
        assert time.monotonic() - t < 0.5


def make_source(mic, ring, sources, **kw):
    args = dict(device=mic.device, capture_format=mic.format, capture_channels=mic.channels,
                capture_rate=mic.rate, channel=0, gain_db=0.0, warmup_ms=150,
                sample_rate=RATE, ring=ring)
    args.update(kw)
    src = AlsaSource(**args)
    sources(src)
    return src


def ramp(start, n):
    """S16 counter: the value tells which world frame it is (mod 65536)."""
    return ((start + np.arange(n)) % 65536 - 32768).astype("<i2")


def frames_of(data: bytes) -> np.ndarray:
    """Inverse of ramp (mod 65536)."""
    return np.frombuffer(data, "<i2").astype(np.int64) + 32768


def mems(channel, rate, dc=-0.03):
    """S32 stereo like an I2S MEMS mic: 24 bits left-justified, DC offset, one live channel.

    The live channel holds 1 kHz at -20 dBFS plus a 10 kHz tone at -20 dBFS that must not
    alias into the 16 kHz output; the other channel holds 3 kHz that must not leak.
    """
    def signal(start, n):
        t = (start + np.arange(n)) / rate
        live = FS32 * (0.1 * np.sin(2 * np.pi * 1000 * t) + 0.1 * np.sin(2 * np.pi * 10000 * t)
                       + dc)
        other = FS32 * 0.5 * np.sin(2 * np.pi * 3000 * t)
        frames = np.zeros((n, 2))
        frames[:, channel], frames[:, 1 - channel] = live, other
        return (np.rint(frames).astype(np.int64) & ~0xFF).astype("<i4")
    return signal


@pytest.mark.parametrize("rate,channel", [(48000, 0), (48000, 1), (44100, 0)])
def test_mems_s32_stereo_becomes_clean_16k_mono(rate, channel, mics, sources):
    ring = RingBuffer(RATE * 10, RATE)
    mic = mics(mems(channel, rate), format="S32_LE", channels=2, rate=rate)
    src = make_source(mic, ring, sources, channel=channel)
    src.start()
    assert src.first_audio.wait(3.0)
    assert ring.wait_for(ring.start + int(1.1 * RATE), timeout=3.0)
    y = pcm16(ring.read(ring.start + 3200, RATE).data)  # skip 0.2 s: DC blocker settles
    amp, snr = sine_fit(y, 1000, RATE)
    assert amp == pytest.approx(0.1 * 32768, rel=0.01)  # 0 dB gain keeps -20 dBFS
    assert snr >= 50.0  # aliases of 10 kHz, 3 kHz leakage and DC are all noise here
    assert abs(y.mean()) < 2.0
    stats = src.stats()
    assert stats["state"] == "online" and stats["xruns"] == 0 and stats["gaps"] == 0
    assert stats["clipped"] == 0 and mic.dropped_periods == 0


def test_warmup_is_discarded_and_samples_are_exact(mics, sources, tmp_path):
    """S16 mono at 16 kHz with no high-pass: what reaches the ring is the device's bytes, minus
    the first warmup_ms of the open. ``record`` writes exactly that."""
    ring = RingBuffer(RATE * 10, RATE)
    mic = mics(ramp, rate=RATE)
    src = make_source(mic, ring, sources, warmup_ms=150, highpass_hz=None)
    out = tmp_path / "rec.wav"
    result = record(src, ring, 0.5, out)
    first = mic.wait_connected().first_frame
    assert result["samples"] == 8000
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        got = frames_of(w.readframes(w.getnframes()))
    assert got[0] == (first + 2400) % 65536  # 150 ms = 2400 frames dropped after the open
    assert np.array_equal(got, (first + 2400 + np.arange(8000)) % 65536)


def test_gain_and_clipping_are_counted_not_wrapped(mics, sources):
    def loud(start, n):
        return np.rint(16384 * np.sin(2 * np.pi * 500 * (start + np.arange(n)) / RATE))

    ring = RingBuffer(RATE * 10, RATE)
    mic = mics(loud, rate=RATE)
    src = make_source(mic, ring, sources, gain_db=12.0, warmup_ms=0)
    src.start()
    assert ring.wait_for(8000, timeout=3.0)
    y = pcm16(ring.read(1600, 6400).data)
    assert src.stats()["clipped"] > 1000
    assert y.max() == 32767 and y.min() == -32768
    assert np.count_nonzero(np.abs(np.diff(y)) > 30000) == 0  # no wrap-around jumps


def test_feeder_stall_becomes_a_gap_aligned_with_wall_time(mics, sources):
    ring = RingBuffer(RATE * 10, RATE)
    mic = mics(ramp, rate=RATE)
    src = make_source(mic, ring, sources, warmup_ms=0, highpass_hz=None)
    src.start()
    assert src.first_audio.wait(3.0)
    t_first = time.monotonic()
    assert ring.wait_for(8000, timeout=3.0)
    mic.stall(0.6)
    p1 = src.progress  # at most the period already in flight may still arrive
    assert not wait_until(lambda: src.progress > p1 + 1, timeout=0.45), \
        "a stalled device must stop the watchdog progress"
    assert wait_until(lambda: ring.gaps(), timeout=2.0)
    assert ring.wait_for(ring.gaps()[0][1] + 3200, timeout=3.0)
    (g0, g1), = ring.gaps()
    before = frames_of(ring.read(g0 - 1, 1).data)[0]
    after = frames_of(ring.read(g1, 1).data)[0]
    lost = (after - before - 1) % 65536
    assert lost == pytest.approx(0.6 * RATE, abs=1600)  # stall rounds to whole periods
    assert g1 - g0 == pytest.approx(lost, abs=1600)  # the gap stands in for what was lost
    assert ring.end == pytest.approx((time.monotonic() - t_first) * RATE + 1600, abs=3200)
    assert src.stats()["gaps"] == 1 and src.stats()["state"] == "online"


def test_device_vanishes_and_returns_offline_then_online(mics, sources):
    ring = RingBuffer(RATE * 30, RATE)
    status = Statuses()
    mic = mics(ramp, rate=RATE)
    src = make_source(mic, ring, sources, warmup_ms=100, highpass_hz=None,
                      on_status=status)
    src.meter_levels(True)  # as measure_levels does: it must reach every open's converter
    src.start()
    assert src.first_audio.wait(3.0)
    t_first = time.monotonic() - ring.end / RATE
    assert ring.wait_for(6400, timeout=3.0)
    assert src.take_levels().frames >= 6400
    mic.vanish()
    message = status.wait("offline", 3.0)
    assert message.startswith(f"mic not found: {mic.device}: ")
    assert src.stats()["state"] == "offline"
    end_offline = ring.end
    assert ring.wait_for(end_offline + 4800, timeout=2.0), "gap silence keeps pace"
    assert ring.end == pytest.approx((time.monotonic() - t_first) * RATE, abs=4000)
    mic.restore()
    assert status.wait("online", 5.0) == f"mic back: {mic.device}"
    second = mic.wait_connected(2, timeout=3.0)
    assert wait_until(lambda: ring.gaps() and ring.end > ring.gaps()[-1][1] + 3200, 3.0)
    (g0, g1), = ring.gaps()
    assert g0 <= end_offline < g1
    resumed = frames_of(ring.read(g1, 1600).data)
    assert np.array_equal(resumed, (second.first_frame + 1600 + np.arange(1600)) % 65536)
    assert src.take_levels().frames >= 3200  # the reopened device's converter meters too
    assert ring.end == pytest.approx((time.monotonic() - t_first) * RATE, abs=4000)
    stats = src.stats()
    assert stats["reopens"] == 1 and stats["gaps"] == 1 and stats["state"] == "online"


def test_missing_at_start_reports_offline_then_comes_up(mics, sources):
    ring = RingBuffer(RATE * 10, RATE)
    status = Statuses()
    mic = mics(ramp, rate=RATE)
    mic.vanish()
    src = make_source(mic, ring, sources, warmup_ms=0, on_status=status)
    src.start()
    assert "No such file or directory" in status.wait("offline", 2.0)
    assert not src.first_audio.is_set() and ring.end == 0
    progress = src.progress
    assert wait_until(lambda: src.progress > progress, 2.0), "retrying is not stalling"
    mic.restore()
    status.wait("online", 3.0)
    assert src.first_audio.wait(3.0)
    assert ring.gaps() == []  # nothing to align with before the first audio


def test_measure_levels_warns_about_the_silent_channel(mics, sources):
    ring = RingBuffer(RATE * 10, RATE)

    def right_only(start, n):
        frames = np.zeros((n, 2), "<i4")
        frames[:, 1] = (0.05 * FS32 * np.sin(2 * np.pi * 700 * (start + np.arange(n)) / 48000)
                        ).astype(np.int64) & ~0xFF
        return frames

    mic = mics(right_only, format="S32_LE", channels=2, rate=48000)
    src = make_source(mic, ring, sources, channel=0)
    assert src.take_levels() is None  # metering is off unless asked for
    readings = []
    report = measure_levels(src, seconds=0.6, interval=0.2, on_update=readings.append)
    assert src.take_levels() is None  # and off again afterwards
    assert len(readings) >= 2
    assert report.channels[0].all_zeros
    assert report.channels[1].peak_dbfs == pytest.approx(-26.0, abs=0.2)
    assert "channel 0 is all zeros; try channel = 1" in report.warnings


def test_overrun_marks_the_lost_time_as_a_gap():
    """The xrun branch (pyalsaaudio returns -EPIPE) cannot be forced through the null plugin,
    which has no clock; its bookkeeping is checked directly."""
    ring = RingBuffer(RATE * 10, RATE)
    src = AlsaSource("unused", "S16_LE", 1, RATE, 0, 0.0, 0, RATE, ring)
    block = bytes(3200)  # 100 ms
    src._deliver_at(block, 10.0)
    src._deliver_at(block, 10.35)  # late but within the device buffer: not a loss
    assert ring.gaps() == [] and ring.end == 3200
    src._note_xrun(10.5)
    src._deliver_at(block, 11.05)  # 0.7 s since the last block, 0.1 s of it delivered now
    assert ring.gaps() == [(3200, 3200 + 9600)]
    assert src.stats()["xruns"] == 1 and src.stats()["gaps"] == 1
    assert ring.end == 3200 + 9600 + 1600
