"""How the controller stops: every press in flight ends within the stop's time.

A stop (``Controller.stop``: SIGTERM) skips the post-roll: a streaming press is released at the
audio captured so far, and its final is waited for until a second before the stop's deadline. A
press not sent yet is left in the spool for the next run ("spooled"), or without a spool ends
with an error. Then whatever is still in flight ends (spooled if its file is written, else with
an error), the sessions left are terminated and closed, and the spool's queued writes finish.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pttd.core.offline import OfflineQueue
from pttd.core.press import Outcome, PressPhase
from pttd.core.sessions import PressSessions, SessionPool

if TYPE_CHECKING:
    from pttd.core.controller import Context


class Stopping:
    """The stop's three steps: ``begin``, ``complete`` (polled by the loop), ``finish``."""

    def __init__(
        self, ctx: Context, sessions: PressSessions, pool: SessionPool, offline: OfflineQueue
    ):
        self.ring = ctx.ring
        self._presses = ctx.presses
        self._status = ctx.status
        self._sessions = sessions
        self._pool = pool
        self._offline = offline
        self.deadline: float | None = None  # (time.monotonic) once the stop has begun

    @property
    def begun(self) -> bool:
        return self.deadline is not None

    def begin(self, deadline: float) -> None:
        """Streaming presses end at the audio there is; unsent ones stay in the spool."""
        self.deadline = deadline
        self._sessions.stopping = True
        self._status.freeze()
        for press in self._presses.live():
            if press.phase is PressPhase.STREAMING:
                assert press.streamer is not None
                press.released_at = press.released_at or time.monotonic()
                press.end_pos = press.streamer.finish(self.ring.end)  # skip the post-roll
                press.move(PressPhase.FINALIZING, self._sessions.send_deadline(press))
            elif press.phase in (PressPhase.WAITING, PressPhase.CONNECTING) and (
                not self._offline.carry_over(press)
            ):
                self._sessions.fail(press, None, "pttd stopped before this press could be sent")

    def complete(self) -> bool:
        """Every press has ended, or the stop's time is nearly up."""
        assert self.deadline is not None
        return not self._presses.live() or time.monotonic() >= self.deadline - 1.0

    def finish(self) -> None:
        """End what is still in flight, close the sessions left, let the spool finish."""
        assert self.deadline is not None
        for press in self._presses.live():
            written = press.spool is not None and press.spool.state == "written"
            if written and not press.finals and press.phase is not PressPhase.DELIVERING:
                self._sessions.end(press, Outcome.SPOOLED, terminate=False)  # sent next run
            else:
                message = "pttd stopped before this press's final arrived"
                self._sessions.fail(press, None, message)
        self._pool.shutdown(self.deadline)
        # the queued spool writes and removals, within the stop's time
        self._offline.close(self.deadline - time.monotonic())
        self._status.publish_numbers()
