"""Streams one press's audio from the ring buffer into a session, then sends ForceEndpoint.

A thread of its own so that neither the capture thread nor the controller ever waits on the
network; it is the press's sender: it puts its frames on the wire itself
(``Session.send_frames_now``), so the audio costs one wake-up from ring to wire, and the
ForceEndpoint goes out in the same write as the last frame, so it can never overtake the audio.
Each wake-up sends every whole ``chunk`` frame that has been captured (a capture period's
worth) in one socket write. A backlog (pre-roll, audio captured while connecting) goes out at
once but never more than ``max_lead_s`` ahead of real time, which keeps the server's "Audio
Transmission Rate Exceeded" (3007) out of reach; then it follows the live audio. Once the end
is known, the last frame takes the remainder (one to two chunks, split in two if that would pass
the server's 1000 ms), so the turn ends exactly at the end of the post-roll and ForceEndpoint
follows as soon as that audio is captured; every frame stays within the server's 50-1000 ms.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pttd.core.postroll import PostrollJudge
from pttd.stt.assemblyai.protocol import MAX_FRAME_MS, MIN_FRAME_MS, frame_samples

log = logging.getLogger(__name__)

# The real service's look-ahead allowance is estimated at ~310 s (unverified);
# staying within 2 s of real time is far inside it and still flushes a connect-time backlog.
MAX_LEAD_S = 2.0


@dataclass(frozen=True)
class StreamDone:
    """Posted to the controller when the last frame and ForceEndpoint are sent (the streamer's
    ``samples_sent``, ``lost_samples`` and ``force_endpoint_at`` are final by then)."""

    streamer: Streamer


@dataclass(frozen=True)
class StreamFailed:
    streamer: Streamer
    reason: str


class Streamer:
    """Owns a read cursor; the controller sets the end with :meth:`finish`."""

    def __init__(
        self,
        ring,
        session,
        start_pos: int,
        chunk_samples: int,
        *,
        post: Callable[[object], None],
        sample_rate: int,
        max_lead_s: float = MAX_LEAD_S,
        name: str = "streamer",
    ):
        self.ring = ring
        self.session = session
        self.start_pos = start_pos
        self.chunk = chunk_samples
        self.sample_rate = sample_rate
        self.max_lead_s = max_lead_s
        self._min_frame = frame_samples(MIN_FRAME_MS, sample_rate)
        self._max_frame = MAX_FRAME_MS * sample_rate // 1000
        self._post = post
        self._end: int | None = None
        self._judge: PostrollJudge | None = None  # an adaptive post-roll, until it has decided
        self.postroll_reason = ""  # what the judge decided on (for the log)
        self._lock = threading.Lock()  # _end and _claimed: finish() vs. the frames being sent
        self._claimed = start_pos  # where the frames on their way to the wire end
        self._stop = threading.Event()
        self.cursor = start_pos
        self.samples_sent = 0
        self.lost_samples = 0
        self._t_first: float | None = None
        # set (once) just before the ForceEndpoint is sent: the controller reads it when the
        # final overtakes StreamDone on the way to its queue
        self.force_endpoint_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def end(self) -> int | None:
        return self._end

    def start(self) -> None:
        self._thread.start()

    def finish(self, end_pos: int, judge: PostrollJudge | None = None) -> int:
        """Stream up to ``end_pos``; returns the actual end.

        That is ``end_pos`` itself, unless less than one chunk would be left after the frames
        already on their way (a legal frame is at least 50 ms): then one whole chunk past them.
        With a ``judge`` (the adaptive post-roll) the streamer may end earlier, where the judge
        decides, once the audio it needs is captured; ``end`` then says where it did.
        """
        with self._lock:
            end = self._legal_end(end_pos)
            self._end, self._judge = end, judge
        self.ring.wake()
        return end

    def _legal_end(self, end_pos: int) -> int:
        base = self._claimed
        end = max(end_pos, base)
        if end - base < self.chunk and (end > base or base == self.start_pos):
            end = base + self.chunk
        return end

    def _judge_end(self) -> None:
        """Let the post-roll judge move the end earlier once it has decided (this thread only)."""
        judge = self._judge
        if judge is None:
            return
        decided = judge.update()  # reads the ring: outside the lock
        if decided is None:
            return
        with self._lock:
            if self._judge is judge and self._end is not None:
                self._end = min(self._end, self._legal_end(decided))
                self._judge, self.postroll_reason = None, judge.reason

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.ring.wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._stream()
        except Exception as exc:  # never die silently: the controller must hear of it
            log.exception("streamer failed")
            self._post(StreamFailed(self, f"{type(exc).__name__}: {exc}"))

    def _stream(self) -> None:
        while not self._stop.is_set():
            self._judge_end()  # before the frames: the last one must carry the ForceEndpoint
            allowed = self._frames_allowed()
            if allowed == 0:  # a backlog is going out: keep within max_lead_s of real time
                self._stop.wait(self._lead() - self.max_lead_s)
                continue
            with self._lock:
                end = self._end
                sizes = self._frames_ready(end, allowed)
                self._claimed = self.cursor + sum(sizes)
            if sizes:
                if not self._send(sizes, end):
                    return  # done, or the link failed (the session reports its close)
            elif end is not None and self.cursor >= end:
                self.force_endpoint_at = time.monotonic()
                if self.session.force_endpoint_now():
                    self._done()
                return
            # returns at once while a backlog lasts; live, the next period wakes it: one pass
            # of this loop per capture period
            self.ring.wait_for(self._needed(self._end) - 1, 0.5)

    def _frames_ready(self, end: int | None, allowed: int) -> list[int]:
        """Sizes of the frames to send now: whole chunks as far as captured, then, once the
        end is known and all of it is captured, the remainder as the last frame."""
        chunk, ready = self.chunk, self.ring.end - self.cursor
        if end is None:
            return [chunk] * min(allowed, ready // chunk)
        remaining = end - self.cursor
        if remaining <= 0:
            return []
        whole, rest = divmod(remaining, chunk)
        plain = whole if rest == 0 else max(0, whole - 1)
        sizes = [chunk] * min(allowed, plain, ready // chunk)
        tail = remaining - plain * chunk  # 0, or one to two chunks (less only after lost audio)
        if len(sizes) == plain and tail and len(sizes) < allowed and ready >= remaining:
            sizes += [tail] if tail <= self._max_frame else [tail // 2, tail - tail // 2]
        return sizes

    def _needed(self, end: int | None) -> int:
        """The ring position the next frame, or the post-roll judge, waits for."""
        if end is None or end - self.cursor >= 2 * self.chunk:
            needed = self.cursor + self.chunk
        else:
            needed = end
        judge = self._judge
        return needed if judge is None else min(needed, judge.needed())

    def _lead(self) -> float:
        """How far ahead of real time the audio sent is (0 before the first frame)."""
        if self._t_first is None:
            return 0.0
        return self.samples_sent / self.sample_rate - (time.monotonic() - self._t_first)

    def _frames_allowed(self) -> int:
        """How many chunks may go out now without getting more than max_lead_s ahead."""
        room = self.max_lead_s - self._lead()
        if room < 0:
            return 0
        return max(1, int(room * self.sample_rate) // self.chunk)

    def _send(self, sizes: list[int], end: int | None) -> bool:
        """Send the frames (with ForceEndpoint after the last one of the turn); False when the
        streamer is finished: the turn is done or the link failed."""
        total = sum(sizes)
        result = self.ring.read(self.cursor, total)
        if result.lost:
            self.lost_samples += result.lost
            log.warning("ring buffer overran: %d samples of this press were lost", result.lost)
            with self._lock:
                self.cursor = self._claimed = result.pos  # go on from the oldest audio held
            return True
        data, frames, off, padding = result.data, [], 0, 0
        for n in sizes:
            frame = data[off : off + 2 * n]
            off += 2 * n
            if n < self._min_frame:  # only after lost audio: pad to keep the frame legal
                frame += bytes(2 * (self.chunk - n))
                padding += self.chunk - n
            frames.append(frame)
        last = end is not None and self.cursor + total >= end
        if last:
            self.force_endpoint_at = time.monotonic()
        if not self.session.send_frames_now(frames, force_endpoint=last):
            return False
        if self._t_first is None:
            self._t_first = time.monotonic()
        self.samples_sent += total + padding
        self.cursor += total
        if last:
            self._done()
        return not last

    def _done(self) -> None:
        self._post(StreamDone(self))
