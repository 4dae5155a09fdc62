"""The capture ring buffer: PCM16 mono addressed by absolute sample positions.

One writer (the capture thread) appends; any number of readers keep their own cursor (an int
position since capture began) and read from it. Positions never wrap, so a reader can tell
exactly how much it missed: audio that was overwritten is *reported* as ``lost``, never handed out
as if it were the audio the reader asked for. Stretches the device did not deliver (mic
unplugged, overrun) are filled with silence by the writer and recorded as gaps, so positions stay
in step with wall time and a turn that spans a gap is still delivered.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

MAX_GAPS = 1024  # bounded memory even if a flaky device produces a gap every period


class ReadResult(NamedTuple):
    """What ``RingBuffer.read`` returns (a tuple: the streamer reads one every capture period,
    and a frozen dataclass costs several times as much to make).

    ``data`` holds the samples ``[pos, next_pos)``. ``lost`` counts requested samples that were
    already overwritten (the data then begins at the oldest one still held). ``gaps`` lists the
    silence-filled ranges inside ``[pos, next_pos)``.
    """

    data: bytes
    pos: int
    next_pos: int
    lost: int
    gaps: list[tuple[int, int]]  # no default: a shared default list could be mutated


class RingBuffer:
    """Fixed-capacity PCM16 mono ring with absolute positions; thread-safe.

    ``capacity_samples`` bounds memory (``ring_seconds * sample_rate``); ``sample_rate`` is only
    used to convert durations (``wait_for`` callers and gap bookkeeping work in samples).
    """

    def __init__(self, capacity_samples: int, sample_rate: int):
        if capacity_samples <= 0 or sample_rate <= 0:
            raise ValueError("capacity_samples and sample_rate must be positive")
        self.capacity = int(capacity_samples)
        self.sample_rate = int(sample_rate)
        self._buf = bytearray(self.capacity * 2)
        self._end = 0
        self._gaps: list[list[int]] = []
        # readers blocked in wait_for, each on a lock of its own that the writer releases after
        # it has let go of the ring's lock (a Condition would wake them still holding it, and
        # each would block again at once to take it back)
        self._waiters: list = []
        self._wakes = 0
        self._appended_at: float | None = None  # monotonic time of the newest append
        self._block = 0  # samples in it (one capture period)
        self._lock = threading.Lock()

    # --- positions ---------------------------------------------------------------------------

    @property
    def end(self) -> int:
        """Position of the next sample to be written (= samples written since start)."""
        return self._end

    @property
    def start(self) -> int:
        """Oldest position still held."""
        return max(0, self._end - self.capacity)

    def now(self) -> int:
        """The live position (same as ``end``): where a reader starting "now" begins."""
        return self._end

    def position_at(self, t: float) -> int:
        """The position the device had reached at monotonic time ``t``.

        A capture block is appended when its last sample arrives, so ``end`` lags the moment by up
        to one block (100 ms with an ALSA mic). A press or release at ``t`` means the audio up to
        ``t``: ``end`` plus the time since the newest append, at most one block ahead (the next
        append is due by then). Without this a release would cut up to a block off the post-roll.
        The time since the append is rounded down to whole 10 ms (no hand is that quick): a
        scripted press just after a block lands (``pttd demo``) gets the same audio every run
        instead of one moved by a few samples of scheduling jitter.
        """
        with self._lock:
            end, at, block = self._end, self._appended_at, self._block
        if at is None:
            return end
        grain = max(1, self.sample_rate // 100)
        ahead = max(0, min(block, int((t - at) * self.sample_rate)))
        return end + ahead - ahead % grain

    # --- writer ------------------------------------------------------------------------------

    def append(self, pcm: bytes) -> None:
        """Append PCM16 mono samples (little-endian bytes, even length)."""
        if len(pcm) % 2:
            raise ValueError("PCM16 data must have an even number of bytes")
        if not pcm:
            return
        with self._lock:
            self._write(memoryview(pcm).cast("B"))
            self._appended_at, self._block = time.monotonic(), len(pcm) // 2
            if self._gaps and self._gaps[0][1] <= self.start:
                self._prune_gaps()
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()

    def append_gap(self, n_samples: int) -> None:
        """Mark ``n_samples`` of missing audio: written as silence and recorded as a gap."""
        n = int(n_samples)
        if n <= 0:
            return
        with self._lock:
            start = self._end
            self._write_silence(n)
            self._appended_at, self._block = time.monotonic(), n
            self._record_gap(start, self._end)
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()

    def _write(self, data: memoryview) -> None:
        """Copy bytes at the write position with at most two slice assignments (no loops)."""
        n = len(data) // 2
        if n > self.capacity:  # only the newest capacity samples can be kept
            data = data[(n - self.capacity) * 2 :]
            self._end += n - self.capacity
        nbytes = len(data)
        size = len(self._buf)
        off = (self._end % self.capacity) * 2
        first = min(nbytes, size - off)
        self._buf[off : off + first] = data[:first]
        if first < nbytes:
            self._buf[0 : nbytes - first] = data[first:]
        self._end += nbytes // 2

    def _write_silence(self, n: int) -> None:
        keep = min(n, self.capacity)
        self._end += n - keep
        self._write(memoryview(bytes(keep * 2)))

    def _record_gap(self, start: int, end: int) -> None:
        if self._gaps and self._gaps[-1][1] == start:
            self._gaps[-1][1] = end  # one outage filled in ticks stays one gap
        else:
            self._gaps.append([start, end])
        self._prune_gaps()

    def _prune_gaps(self) -> None:
        """Forget gaps that were overwritten (or too many: the oldest go first)."""
        oldest = self.start
        while self._gaps and (self._gaps[0][1] <= oldest or len(self._gaps) > MAX_GAPS):
            self._gaps.pop(0)

    # --- readers -----------------------------------------------------------------------------

    def read(self, pos: int, max_samples: int) -> ReadResult:
        """Up to ``max_samples`` from ``pos`` (fewer if the writer has not got there yet)."""
        with self._lock:
            end = self._end
            start = end - self.capacity
            lost = start - pos if start > pos else 0
            if lost:
                pos = start
            n = max(0, min(int(max_samples), end - pos))
            data = self._copy(pos, n)
            if not self._gaps:
                return ReadResult(data, pos, pos + n, lost, [])
            gaps = [
                (max(s, pos), min(e, pos + n)) for s, e in self._gaps if s < pos + n and e > pos
            ]
        return ReadResult(data, pos, pos + n, lost, gaps)

    def _copy(self, pos: int, n: int) -> bytes:
        if n <= 0:
            return b""
        off = (pos % self.capacity) * 2
        nbytes = n * 2
        first = min(nbytes, len(self._buf) - off)
        if first == nbytes:
            return bytes(self._buf[off : off + nbytes])
        return bytes(self._buf[off:]) + bytes(self._buf[: nbytes - first])

    def gaps(self) -> list[tuple[int, int]]:
        """All recorded gaps still (partly) in the buffer, oldest first."""
        with self._lock:
            return [(s, e) for s, e in self._gaps]

    def wait_for(self, pos: int, timeout: float) -> bool:
        """Block until ``end > pos``; False on timeout or when ``wake()`` is called."""
        deadline = time.monotonic() + max(0.0, timeout)
        wakes = None
        while True:
            with self._lock:
                if self._end > pos:
                    return True
                if wakes is None:
                    wakes = self._wakes
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._wakes != wakes:
                    return False
                waiter = threading.Lock()
                waiter.acquire()
                self._waiters.append(waiter)
            if not waiter.acquire(timeout=remaining):
                with self._lock:  # timed out: unless a release is on its way, unregister
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def wake(self) -> None:
        """Release every ``wait_for`` now (a stopping reader uses this instead of a timeout)."""
        with self._lock:
            self._wakes += 1
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()


class Snapshot:
    """A copy of ``[start, end)`` taken out of the ring, readable like the ring itself.

    A press that must wait for the network keeps its audio here, so the ring buffer can go on
    overwriting; the streamer reads it with the same calls it uses on the ring.
    """

    def __init__(self, start: int, data: bytes, sample_rate: int):
        self.start = start
        self.end = start + len(data) // 2
        self.sample_rate = sample_rate
        self._data = data

    @property
    def samples(self) -> int:
        return self.end - self.start

    def read(self, pos: int, max_samples: int) -> ReadResult:
        lost = max(0, self.start - pos)
        pos = max(pos, self.start)
        n = max(0, min(max_samples, self.end - pos))
        off = (pos - self.start) * 2
        return ReadResult(self._data[off : off + n * 2], pos, pos + n, lost, [])

    def wait_for(self, pos: int, timeout: float) -> bool:
        return self.end > pos  # complete: nothing more will come

    def wake(self) -> None:
        pass


def snapshot(ring: RingBuffer, start: int, end: int) -> Snapshot:
    """Copy ``[start, end)`` (clipped to what the ring still holds) out of the ring."""
    result = ring.read(start, max(0, end - start))
    missing = end - result.next_pos  # not captured yet: pad, a snapshot never grows
    return Snapshot(result.pos, result.data + bytes(2 * max(0, missing)), ring.sample_rate)
