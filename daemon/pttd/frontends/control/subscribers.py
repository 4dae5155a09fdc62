"""The control socket's subscribers: the one piece of the server the controller's thread touches.

``publish`` never does I/O: it appends the event's line to each subscriber's bounded queue
under a short lock, and the server's thread writes it out. A subscriber whose queue is full is
marked to be dropped rather than stalling anyone.
"""

from __future__ import annotations

import threading

from pttd.frontends.control.connection import Connection


class Subscribers:
    """Who gets every event; ``lock`` also guards each connection's ``out`` (see the server)."""

    def __init__(self, lock: threading.Lock, limit: int, queue_limit: int):
        self.lock = lock
        self.limit = limit
        self.queue_limit = queue_limit
        self._members: list[Connection] = []

    def __len__(self) -> int:
        with self.lock:
            return len(self._members)

    def anyone(self) -> bool:
        """A lock-free peek, so an event nobody listens to (the usual case) costs nothing."""
        return bool(self._members)

    def members(self) -> list[Connection]:
        with self.lock:
            return list(self._members)

    def publish(self, line: bytes) -> bool:
        """Queue ``line`` for every subscriber without blocking; False when nobody listens."""
        with self.lock:
            if not self._members:
                return False
            for sub in self._members:
                if len(sub.out) >= self.queue_limit:
                    sub.overflow = True
                else:
                    sub.out.append(line)
        return True

    def add(self, client: Connection, ok_line: bytes) -> bool:
        """Queue the ok reply and join atomically, so no event precedes it; False when full."""
        with self.lock:
            if len(self._members) >= self.limit:
                return False
            client.out.append(ok_line)
            client.subscribed = True
            self._members.append(client)
        return True

    def remove(self, client: Connection) -> None:
        """Forget ``client`` (subscribed or not) and what was queued for it."""
        with self.lock:
            if client in self._members:
                self._members.remove(client)
            client.out.clear()
