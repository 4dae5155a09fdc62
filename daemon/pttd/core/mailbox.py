"""A bounded FIFO for hand-offs between threads, built on ``queue.SimpleQueue``.

``queue.Queue`` wakes a consumer through a Condition: Python-level waiter bookkeeping, and the
woken thread must then take the producer's mutex again. ``SimpleQueue`` does a put and a wake-up
in C under one lock, which roughly halves the cost and the latency of every hop on the Turn ->
final path (receiver -> controller -> output). What it lacks is a bound, added here.
"""

from __future__ import annotations

import queue
from typing import Any


class Mailbox:
    """Bounded FIFO: ``put_nowait`` refuses past ``maxsize`` (the caller's overflow policy).

    The bound is checked just before the put, so producers racing for the last free places can
    pass it by at most one item each: the memory is still bounded. ``put_marker`` ignores the
    bound, for the one stop marker a consumer gets at shutdown (it must never be refused).
    """

    def __init__(self, maxsize: int):
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        self.maxsize = maxsize
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def put_nowait(self, item: Any) -> None:
        """Enqueue; raises ``queue.Full`` when ``maxsize`` items are waiting."""
        if self._q.qsize() >= self.maxsize:
            raise queue.Full
        self._q.put(item)

    def put_marker(self, item: Any) -> None:
        self._q.put(item)

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; blocks (``timeout`` None: without limit); ``queue.Empty`` on timeout."""
        return self._q.get(timeout=timeout)

    def qsize(self) -> int:
        return self._q.qsize()
