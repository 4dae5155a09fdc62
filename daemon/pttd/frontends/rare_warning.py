"""Warnings that a flood (of connections, of refused clients) cannot turn into a flood of log
lines: the control socket and the kiosk say each kind of trouble at most once every few seconds."""

from __future__ import annotations

import logging
import time

WARN_EVERY_S = 10.0


class RareWarning:
    """Logs a warning at most once per ``every_s`` seconds; the ones in between are dropped."""

    def __init__(self, log: logging.Logger, every_s: float = WARN_EVERY_S):
        self._log = log
        self._every_s = every_s
        self._last = -every_s

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._log.warning(msg + " (such warnings: at most one per %g s)", *args, self._every_s)
