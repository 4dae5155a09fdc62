"""What one capture period costs the streamer thread, piece by piece, at the daemon's cadence.

    python bench/cold_costs.py [--periods 60] [--period-ms 100]

Each figure is thread CPU (``time.thread_time`` or the thread's CPU clock) per period, measured
the way the daemon runs: one short burst of work every ``--period-ms``, the thread asleep in
between. After 100 ms asleep the caches are cold, so a step costs several times what the same
code costs in a tight loop; the "hot" column runs it back to back for comparison. Prints
figures, never fails.

* wake by another thread: a thread blocked on a lock, released by the writer every period.
* ring wait_for: ``RingBuffer.wait_for`` woken by ``RingBuffer.append`` (what the streamer
  waits on).
* ring wait_for + read: the same plus reading the period back (``RingBuffer.read``).
* streamer pass: a real ``Streamer`` over a real ring with a session whose send does nothing:
  everything the streamer does per period except the socket.
* frame two 50 ms frames: websocket-client's ``ABNF.create_frame(...).format()`` twice, the
  masking websocket-client does in Python (``Link.write_frames`` does this each period).
* the same, one XOR: what framing the two frames would cost if both were masked in one big-int
  XOR (RFC 6455 headers by ``struct``; a fresh ``os.urandom`` key per frame). pttd does not do
  this (its frames are websocket-client's); the row sizes that option for the issue's notes.

websocket-client masks with ``wsaccel`` (C) when that package is importable; the first line
says which masking ran, so ``pip install wsaccel`` and a second run compare the two.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "daemon"))

from pttd.audio.ring import RingBuffer  # noqa: E402
from pttd.core.streamer import Streamer  # noqa: E402

RATE = 16000


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def paced(periods: int, period_s: float, step) -> None:
    """Call ``step`` every ``period_s`` on absolute deadlines (the writer's side)."""
    t0 = time.monotonic()
    for k in range(1, periods + 1):
        time.sleep(max(0.0, t0 + k * period_s - time.monotonic()))
        step()


def reader_cost(periods: int, period_s: float, kind: str) -> float:
    """µs of the reader thread's CPU per period, woken by a writer thread once a period."""
    ring = RingBuffer(RATE * 30, RATE)
    block = bytes(2 * int(RATE * period_s))
    gate = threading.Lock()
    gate.acquire()
    stop = threading.Event()

    def reader():
        pos = 0
        while not stop.is_set():
            if kind == "lock":
                gate.acquire()
                continue
            ring.wait_for(pos + len(block) // 2 - 1, 1.0)
            if ring.end >= pos + len(block) // 2:
                if kind == "read":
                    ring.read(pos, len(block) // 2)
                pos += len(block) // 2

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    time.sleep(0.05)
    c0 = thread_cpu(th)
    paced(periods, period_s, gate.release if kind == "lock" else lambda: ring.append(block))
    time.sleep(0.02)
    c1 = thread_cpu(th)
    stop.set()
    ring.wake()
    if kind == "lock":
        gate.release()
    th.join(2)
    return (c1 - c0) / periods * 1e6


class NullSession:
    """Takes the frames and sends nothing: the streamer's cost without the socket."""

    def send_frames_now(self, frames, force_endpoint=False) -> bool:
        return True

    def force_endpoint_now(self) -> bool:
        return True


def streamer_cost(periods: int, period_s: float) -> float:
    ring = RingBuffer(RATE * 30, RATE)
    block = bytes(2 * int(RATE * period_s))
    streamer = Streamer(ring, NullSession(), 0, RATE // 20, post=lambda item: None,
                        sample_rate=RATE)
    streamer.start()
    time.sleep(0.05)
    c0 = thread_cpu(streamer._thread)
    paced(periods, period_s, lambda: ring.append(block))
    time.sleep(0.02)
    c1 = thread_cpu(streamer._thread)
    streamer.stop()
    return (c1 - c0) / periods * 1e6


def framing_cost(periods: int, period_s: float, hot: bool) -> float:
    from websocket import ABNF

    pcm = bytes(2 * RATE // 20)

    def two_frames():
        return [ABNF.create_frame(pcm, ABNF.OPCODE_BINARY).format() for _ in range(2)]

    total = 0.0
    for _ in range(periods):
        if not hot:
            time.sleep(period_s)
        c0 = time.thread_time()
        two_frames()
        total += time.thread_time() - c0
    return total / periods * 1e6


def one_xor_cost(periods: int, period_s: float) -> float:
    import os
    import struct

    pcm = bytes(2 * RATE // 10)  # a period: two 50 ms frames
    half = len(pcm) // 2

    def two_frames():
        keys = os.urandom(8)
        stream = keys[:4] * (half // 4) + keys[4:] * (half // 4)
        masked = (int.from_bytes(pcm, "little") ^ int.from_bytes(stream, "little")).to_bytes(
            len(pcm), "little")
        head = struct.pack("!BBH", 0x82, 0xFE, half)
        return b"".join((head, keys[:4], masked[:half], head, keys[4:], masked[half:]))

    total = 0.0
    for _ in range(periods):
        time.sleep(period_s)
        c0 = time.thread_time()
        two_frames()
        total += time.thread_time() - c0
    return total / periods * 1e6


def masking() -> str:
    """Which XOR websocket-client uses: its own Python one, or wsaccel's C one if installed."""
    from websocket import _abnf

    return "wsaccel (C)" if "XorMaskerSimple" in _abnf._mask.__code__.co_names else \
        "websocket-client (Python)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=60)
    ap.add_argument("--period-ms", type=int, default=100)
    args = ap.parse_args()
    n, p = args.periods, args.period_ms / 1000
    print(f"cold_costs: thread CPU per {args.period_ms} ms period, {n} periods each, "
          f"Python {sys.version.split()[0]}")
    print(f"  masking: {masking()}")
    rows = [
        ("wake by another thread (Lock)", reader_cost(n, p, "lock")),
        ("ring wait_for, woken by append", reader_cost(n, p, "wait")),
        ("ring wait_for + read of the period", reader_cost(n, p, "read")),
        ("streamer pass, no socket", streamer_cost(n, p)),
        ("frame two 50 ms frames (websocket-client)", framing_cost(n, p, hot=False)),
        ("  the same, hot (back to back)", framing_cost(n * 20, p, hot=True)),
        ("  the same, one XOR for both (not used)", one_xor_cost(n, p)),
    ]
    for label, us in rows:
        print(f"  {label:<44} {us:7.1f} us")


if __name__ == "__main__":
    main()
