"""A session's one writer: messages go out in the order queued, some held back, then the close.

Why one writer: a message held back (a slow turn) must also hold back everything queued after
it, and the close must follow the last message, so a single task sends them all in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed


@dataclass(frozen=True)
class _CloseRequest:
    code: int
    reason: str


class Outbox:
    """Queue for one sender task; ``send`` writes a message, ``close`` starts the close."""

    def __init__(
        self, send: Callable[[Any], Awaitable[None]], close: Callable[[int, str], None]
    ) -> None:
        self._send = send
        self._close = close
        self._queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def put(self, message: Any, delay_s: float = 0.0) -> None:
        """``delay_s``: hold it, and so everything queued after it, back this long."""
        self._queue.put_nowait((time.monotonic() + delay_s, message))

    def put_close(self, code: int, reason: str) -> None:
        """Close once everything queued before has gone out."""
        self._queue.put_nowait((0.0, _CloseRequest(code, reason)))

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self._run())
        return self._task

    def stop(self) -> None:
        """Send nothing more (the caller writes, or closes, itself)."""
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            not_before, item = await self._queue.get()
            wait = not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if isinstance(item, _CloseRequest):
                self._close(item.code, item.reason)
                return
            try:
                await self._send(item)
            except ConnectionClosed:
                return
