"""RingBuffer: absolute positions, wraparound, lost reporting, gaps, waiting, threads."""
import threading
import time

import numpy as np
import pytest

from pttd.audio.ring import RingBuffer


def pcm(values) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


def samples(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<i2").tolist()


def test_position_at_places_a_moment_inside_the_period_not_yet_appended():
    """A release 30 ms after the newest 100 ms block means 30 ms more than ``end``; at most a
    block more, however long the next block takes."""
    ring = RingBuffer(16000, 16000)
    assert ring.position_at(time.monotonic() + 5) == 0  # nothing captured yet: nothing to add
    before = time.monotonic()
    ring.append(bytes(3200))  # one 100 ms block
    after = time.monotonic()
    assert ring.end == 1600
    assert ring.position_at(before) == 1600  # no earlier than what is there
    at = ring.position_at(after + 0.030)
    assert 1600 + 480 <= at <= 1600 + 480 + int((after - before) * 16000) + 1
    assert at % 160 == 0  # whole 10 ms past the block
    assert ring.position_at(after + 0.0049) == 1600  # jitter after a block lands adds nothing
    assert ring.position_at(after + 10.0) == 1600 + 1600  # capped at one block
    ring.append_gap(160)  # a 10 ms gap tick is the newest block now
    assert ring.position_at(time.monotonic() + 10.0) == 1760 + 160


def test_append_and_read_by_absolute_position():
    ring = RingBuffer(100, 16000)
    ring.append(pcm(range(10)))
    ring.append(pcm(range(10, 25)))
    assert (ring.start, ring.end, ring.now()) == (0, 25, 25)
    res = ring.read(5, 10)
    assert samples(res.data) == list(range(5, 15))
    assert (res.pos, res.next_pos, res.lost, res.gaps) == (5, 15, 0, [])
    short = ring.read(20, 10)  # only what has been written
    assert samples(short.data) == list(range(20, 25)) and short.next_pos == 25


def test_wraparound_keeps_the_newest_samples_in_order():
    ring = RingBuffer(100, 16000)
    for first in range(0, 250, 30):  # 30 does not divide 100: writes straddle the seam
        ring.append(pcm(range(first, min(first + 30, 250))))
    assert (ring.start, ring.end) == (150, 250)
    assert samples(ring.read(150, 100).data) == list(range(150, 250))
    assert samples(ring.read(195, 10).data) == list(range(195, 205))


def test_overwritten_audio_is_reported_as_lost_never_returned():
    ring = RingBuffer(100, 16000)
    ring.append(pcm(range(250)))
    res = ring.read(120, 40)
    assert res.lost == 30
    assert res.pos == 150
    assert samples(res.data) == list(range(150, 190))
    assert res.next_pos == 190


def test_append_larger_than_capacity_keeps_the_tail():
    ring = RingBuffer(64, 16000)
    ring.append(pcm(range(10)))
    ring.append(pcm(range(10, 1010)))
    assert (ring.start, ring.end) == (946, 1010)
    assert samples(ring.read(0, 64).data) == list(range(946, 1010))


def test_reading_ahead_of_the_writer_gives_nothing():
    ring = RingBuffer(100, 16000)
    ring.append(pcm(range(10)))
    res = ring.read(50, 10)
    assert (res.data, res.pos, res.next_pos, res.lost) == (b"", 50, 50, 0)


def test_readers_keep_independent_cursors():
    ring = RingBuffer(1000, 16000)
    ring.append(pcm(range(300)))
    a, b = 0, 100
    got_a, got_b = [], []
    for _ in range(3):
        ra, rb = ring.read(a, 50), ring.read(b, 70)
        got_a += samples(ra.data)
        got_b += samples(rb.data)
        a, b = ra.next_pos, rb.next_pos
    assert got_a == list(range(0, 150)) and got_b == list(range(100, 300))


def test_odd_byte_count_is_rejected():
    with pytest.raises(ValueError):
        RingBuffer(10, 16000).append(b"\x00\x01\x02")


def test_gaps_are_silence_merged_reported_and_pruned():
    ring = RingBuffer(100, 16000)
    ring.append(pcm([7] * 10))
    ring.append_gap(5)
    ring.append_gap(5)  # contiguous: one gap
    ring.append(pcm([9] * 10))
    assert ring.gaps() == [(10, 20)]
    res = ring.read(5, 20)
    assert samples(res.data) == [7] * 5 + [0] * 10 + [9] * 5
    assert res.gaps == [(10, 20)]
    assert ring.read(12, 3).gaps == [(12, 15)]  # clipped to what was read
    assert ring.read(20, 5).gaps == []
    ring.append(pcm([1] * 100))  # overwrites the gap
    assert ring.gaps() == []


def test_long_gap_advances_positions_without_unbounded_memory():
    ring = RingBuffer(100, 16000)
    ring.append_gap(16000 * 3600)
    assert ring.end == 16000 * 3600 and ring.start == ring.end - 100
    assert ring.read(ring.start, 100).data == bytes(200)


def test_wait_for_returns_once_the_position_is_written():
    ring = RingBuffer(1000, 16000)
    waiting = threading.Event()
    result = {}

    def reader():
        waiting.set()
        t = time.monotonic()
        result["ok"] = ring.wait_for(49, timeout=5.0)
        result["dt"] = time.monotonic() - t

    th = threading.Thread(target=reader)
    th.start()
    assert waiting.wait(2.0)
    ring.append(pcm(range(40)))  # not yet past 49
    ring.append(pcm(range(40, 60)))
    th.join(5.0)
    assert result["ok"] is True and result["dt"] < 2.0


def test_wait_for_times_out_with_false():
    ring = RingBuffer(1000, 16000)
    ring.append(pcm(range(10)))
    assert ring.wait_for(5, timeout=0.0) is True
    t = time.monotonic()
    assert ring.wait_for(10, timeout=0.15) is False
    assert 0.14 <= time.monotonic() - t < 1.0


def test_wake_releases_a_waiting_reader_early():
    ring = RingBuffer(1000, 16000)
    started = threading.Event()
    result = {}

    def reader():
        started.set()
        t = time.monotonic()
        result["ok"] = ring.wait_for(0, timeout=10.0)
        result["dt"] = time.monotonic() - t

    th = threading.Thread(target=reader)
    th.start()
    assert started.wait(2.0)
    deadline = time.monotonic() + 5.0
    while th.is_alive() and time.monotonic() < deadline:
        ring.wake()  # repeated: the reader may not be inside wait_for yet
        th.join(0.02)
    assert not th.is_alive()
    assert result["ok"] is False and result["dt"] < 5.0


def test_one_writer_many_readers_see_a_continuous_counter():
    ring = RingBuffer(4000, 16000)
    total = 200_000
    errors = []

    def writer():
        for first in range(0, total, 320):
            ring.append(pcm(np.arange(first, first + 320) % 30000))

    def reader(chunk):
        pos, lost, seen = 0, 0, 0
        while pos < total:
            if not ring.wait_for(pos, 5.0):
                errors.append("timeout")
                return
            res = ring.read(pos, chunk)
            lost += res.lost
            expect = np.arange(res.pos, res.next_pos) % 30000
            if not np.array_equal(np.frombuffer(res.data, "<i2"), expect):
                errors.append(f"mismatch at {res.pos}")
                return
            seen += res.next_pos - res.pos
            pos = res.next_pos
        if seen + lost != total:
            errors.append(f"seen {seen} + lost {lost} != {total}")

    readers = [threading.Thread(target=reader, args=(c,)) for c in (100, 800, 1600)]
    for th in readers:
        th.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(20)
    for th in readers:
        th.join(20)
    assert not errors
