"""The presses the controller knows: those in flight, oldest first, and the last few that ended.

A press that ends stays listed until the end of the loop's pass, so the code handling an item
still sees the press it has just ended; then it moves to a short list of recent ones, so that a
late message from its session is recognised as its own (and dropped, or taken as a late final).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from pttd.core.press import Press

RECENT = 32  # ended presses remembered for their sessions' late messages


class Presses:
    """The controller's list of presses and their ids (new ones are numbered after the last)."""

    def __init__(self) -> None:
        self._listed: list[Press] = []
        self.recent: collections.deque[Press] = collections.deque(maxlen=RECENT)
        self.last_id = 0

    def __iter__(self) -> Iterator[Press]:
        """The listed presses, oldest first (those that ended in this pass included)."""
        return iter(self._listed)

    def new(self, start_pos: int, pressed_at: float) -> Press:
        """A new press, numbered after every press so far (WAITING, no deadline: queued)."""
        self.last_id += 1
        press = Press(self.last_id, start_pos, pressed_at)
        self._listed.append(press)
        return press

    def restore(self, press: Press) -> None:
        """A press an earlier run left in the spool, under its own id."""
        self._listed.append(press)
        self.last_id = max(self.last_id, press.press_id)

    def newest(self) -> Press | None:
        return self._listed[-1] if self._listed else None

    def live(self) -> list[Press]:
        return [p for p in self._listed if not p.ended]

    def active(self) -> Press | None:
        """The newest press that is held (not yet released; at most one)."""
        for p in reversed(self._listed):
            if p.held:
                return p
        return None

    def of_session(self, session: object) -> Press | None:
        """The newest press that used ``session`` (a warm session serves one after another)."""
        for p in reversed(self._listed):
            if p.session is session:
                return p
        for p in reversed(self.recent):
            if p.session is session:
                return p
        return None

    def of_streamer(self, streamer: object) -> Press | None:
        return next((p for p in self._listed if p.streamer is streamer and not p.ended), None)

    def of_spool_entry(self, entry: object) -> Press | None:
        return next((p for p in self._listed if p.spool is entry), None)

    def forget_ended(self) -> None:
        """End of a pass: presses that ended move to the recent list."""
        self.recent.extend(p for p in self._listed if p.ended)
        self._listed = [p for p in self._listed if not p.ended]
