"""Streams one press's audio from the ring buffer into a session, then sends ForceEndpoint.

A thread of its own so that neither the capture thread nor the controller ever waits on the
network; it is the press's sender: it puts each frame on the wire itself
(``Session.send_audio_now``), so a frame costs one wake-up from ring to wire, and its
ForceEndpoint goes out on the same thread after its last frame, so it can never overtake
the audio. It reads whole ``chunk`` frames from an absolute ring position: a backlog (pre-roll,
audio captured while connecting) goes out at once but never more than ``max_lead_s`` ahead of
real time, which keeps the server's "Audio Transmission Rate Exceeded" (3007) out of reach;
then it follows the live audio. The end position, once known, is a whole number of chunks from
the start, so every frame is exactly ``chunk`` long (always within the server's 50-1000 ms).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

# The real service's look-ahead allowance is estimated at ~310 s (research §2.1, unverified);
# staying within 2 s of real time is far inside it and still flushes a connect-time backlog.
MAX_LEAD_S = 2.0


@dataclass(frozen=True)
class StreamDone:
    """Posted to the controller when the last frame and ForceEndpoint are sent."""

    streamer: "Streamer"
    samples_sent: int
    lost_samples: int
    force_endpoint_at: float   # monotonic time the ForceEndpoint was sent


@dataclass(frozen=True)
class StreamFailed:
    streamer: "Streamer"
    reason: str


class Streamer:
    """Owns a read cursor; the controller sets the end with :meth:`finish`."""

    def __init__(self, ring, session, start_pos: int, chunk_samples: int, *,
                 post: Callable[[object], None], sample_rate: int, max_lead_s: float = MAX_LEAD_S,
                 name: str = "streamer"):
        self.ring = ring
        self.session = session
        self.start_pos = start_pos
        self.chunk = chunk_samples
        self.sample_rate = sample_rate
        self.max_lead_s = max_lead_s
        self._post = post
        self._end: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.cursor = start_pos
        self.samples_sent = 0
        self.lost_samples = 0
        self._t_first: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def end(self) -> int | None:
        return self._end

    def start(self) -> None:
        self._thread.start()

    def finish(self, end_pos: int) -> int:
        """Stream up to ``end_pos`` rounded up to whole chunks; returns the actual end."""
        span = max(0, end_pos - self.start_pos)
        chunks = max(1, -(-span // self.chunk))
        with self._lock:
            self._end = self.start_pos + chunks * self.chunk
            end = self._end
        self.ring.wake()
        return end

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
            end = self._end
            if end is not None and self.cursor >= end:
                if self.session.force_endpoint_now():
                    self._post(StreamDone(self, self.samples_sent, self.lost_samples,
                                          time.monotonic()))
                return  # else the link failed: the session reports its close
            if self.ring.end < self.cursor + self.chunk:
                self.ring.wait_for(self.cursor + self.chunk - 1, 0.5)
                continue
            if not self._pace():
                continue
            if not self._send_one():
                return  # the link failed: the session reports its close, the press is replayed

    def _pace(self) -> bool:
        """Wait while we are more than max_lead_s ahead of real time; False if interrupted."""
        if self._t_first is None:
            return True
        lead = self.samples_sent / self.sample_rate - (time.monotonic() - self._t_first)
        if lead <= self.max_lead_s:
            return True
        self._stop.wait(lead - self.max_lead_s)
        return False

    def _send_one(self) -> bool:
        result = self.ring.read(self.cursor, self.chunk)
        if result.lost:
            self.lost_samples += result.lost
            log.warning("ring buffer overran: %d samples of this press were lost", result.lost)
        data = result.data
        if len(data) < self.chunk * 2:  # overrun left a short frame: pad to keep the frame legal
            data = data + bytes(self.chunk * 2 - len(data))
        if not self.session.send_audio_now(data):
            return False
        if self._t_first is None:
            self._t_first = time.monotonic()
        self.samples_sent += self.chunk
        self.cursor = result.pos + self.chunk if result.lost else self.cursor + self.chunk
        return True
