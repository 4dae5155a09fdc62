"""The daemon's running parts, and the one way they stop.

A part is anything with a thread, a socket, a pin or a device to give back. Each is registered
under a name of its own the moment it starts, so a newly added part cannot be left out of the
stop. ``stop_all`` stops them last-started first: a part may rely on those started before it
(the button on the controller, the controller on the control socket), never on later ones.
Each stop runs on a helper thread joined with the part's bound, so a part that raises or hangs
is logged and passed over, and the others still stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pttd.errors import PttdError

log = logging.getLogger(__name__)

#: how long ``stop_all`` waits for one part unless it registered another bound
DEFAULT_STOP_S = 3.0


class DuplicatePartError(PttdError, ValueError):
    """A second part under a name already running: it would hide the first one at stop."""


@dataclass(frozen=True)
class Part:
    name: str
    stop: Callable[[], object]
    timeout_s: float


class Parts:
    """The running parts in start order. Thread-safe; ``stop_all`` empties it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[Part] = []

    @property
    def names(self) -> list[str]:
        """The running parts' names, first started first."""
        with self._lock:
            return [part.name for part in self._running]

    def register(
        self, name: str, stop: Callable[[], object], timeout_s: float = DEFAULT_STOP_S
    ) -> None:
        """Call right after the part has started; ``stop`` must end it within ``timeout_s``."""
        with self._lock:
            if any(part.name == name for part in self._running):
                raise DuplicatePartError(f"a part named {name!r} is already running")
            self._running.append(Part(name, stop, timeout_s))

    def stop_all(self) -> list[str]:
        """Stop every part, last started first; returns their names in that order."""
        stopped: list[str] = []
        while True:
            with self._lock:
                if not self._running:
                    return stopped
                part = self._running.pop()
            _stop_bounded(part)
            stopped.append(part.name)


def _stop_bounded(part: Part) -> None:
    """Run ``part.stop`` on its own thread and wait at most its bound: a hung stop is logged
    and left behind (a daemon thread), so it cannot hold up the parts still to stop."""
    started = time.monotonic()
    thread = threading.Thread(
        target=_stop_logged, args=(part,), name=f"pttd-stop-{part.name}", daemon=True
    )
    thread.start()
    thread.join(part.timeout_s)
    took_ms = (time.monotonic() - started) * 1000
    if thread.is_alive():
        log.warning("stopping %s took over %.1f s; going on without it", part.name, part.timeout_s)
    else:
        log.debug("stopped %s in %.0f ms", part.name, took_ms)


def _stop_logged(part: Part) -> None:
    try:
        part.stop()
    except Exception:  # noqa: BLE001 - one failing part must not keep the others running
        log.exception("stopping %s failed", part.name)
