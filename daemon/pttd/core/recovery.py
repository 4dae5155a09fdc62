"""A press whose session or stream fails before its final: replay it, wait, fall back, or end it.

The press is replayed on a new session from just after the last word already delivered (its
audio is still in the ring, or kept outside it while it waits), after the backoff of the
session's close policy. A server that cannot be reached makes it wait for the network, queued
presses behind it. With ``[stt] fallback = "local"`` a cloud failure sends it to the local engine
instead. The key or the configuration refused, or out of attempts: it ends with the one error
event that says why.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from pttd import events
from pttd.core.budget import SessionBudget
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.sessions import PressSessions, SessionPool
from pttd.core.streamer import StreamFailed
from pttd.events import State
from pttd.stt.base import LINK_LOST, CloseKind, SessionClosed, SttSession

if TYPE_CHECKING:
    from pttd.core.controller import Context

log = logging.getLogger(__name__)

# the cloud's failures that send a press to the local engine (fallback = "local"): not a refused
# key, not a configuration that cannot work
_FALLS_BACK = (CloseKind.TRANSPORT, CloseKind.SERVER, CloseKind.RATE_LIMITED, CloseKind.IDLE)


class Recovery:
    """Decides what follows a session's end or a streamer's failure, and retries on time."""

    def __init__(
        self,
        ctx: Context,
        sessions: PressSessions,
        pool: SessionPool,
        budget: SessionBudget,
        rng: random.Random,
    ):
        self.s = ctx.settings
        self.ring = ctx.ring
        self._presses = ctx.presses
        self._status = ctx.status
        self._emit = ctx.emit
        self._clock = ctx.clock
        self._sessions = sessions
        self._pool = pool
        self._budget = budget
        self._rng = rng  # the backoff's jitter

    def on_closed(self, press: Press | None, session: SttSession, closed: SessionClosed) -> None:
        """A session's end (each session reports exactly one)."""
        self._pool.closed(session)
        if closed.before_begin and not closed.local:  # the service never let it in
            if closed.policy.kind is CloseKind.RATE_LIMITED:
                self._budget.refused(session)
            else:
                self._budget.not_admitted(session)
        if press is None or press.session is not session or closed.local:
            return
        if press.phase is PressPhase.DELIVERING:  # its last final is already out
            self._sessions.end(press, Outcome.FINAL, terminate=False)
        elif (
            closed.policy.kind is CloseKind.NORMAL
            and press.fe_sent_at is not None
            and not press.last_partial
        ):  # ended cleanly after ForceEndpoint, nothing said
            outcome = Outcome.FINAL if press.finals else Outcome.SILENT
            self._sessions.end(press, outcome, terminate=False)
        else:
            self.session_failed(press, closed)
        self._status.refresh()

    def on_stream_failed(self, failed: StreamFailed) -> None:
        """A streamer died: replay the press on a new session once, like a dropped session;
        a second failure is not a passing fault, so the press ends with an error."""
        press = self._presses.of_streamer(failed.streamer)
        if press is None:
            return
        log.error("press %d: streaming failed: %s", press.press_id, failed.reason)
        press.stream_failures += 1
        if press.stream_failures > 1:
            self._sessions.fail(press, None, f"streaming failed: {failed.reason}")
            return
        session = press.session
        self.session_failed(
            press,
            SessionClosed(
                code=None,
                reason=f"streaming failed: {failed.reason}",
                before_begin=False,
                policy=LINK_LOST,
            ),
        )
        if session is not None:
            session.close(0)

    def session_failed(self, press: Press, closed: SessionClosed) -> None:
        """The press's session is gone before its final: replay it, wait for the network, or
        (not retryable, or out of attempts) end it with an error."""
        policy = closed.policy
        if press.streamer is not None:
            press.streamer.stop(0.5)
            press.streamer = None
        press.session = None
        press.fe_sent_at = None
        if policy.kind in (CloseKind.AUTH, CloseKind.CONFIG):
            # the key, or the configuration (a URL, an HTTP 400/404 at the upgrade): retrying
            # or falling back cannot help; after a 1008 only a new press tries again
            self._status.auth_blocked = True
            self._sessions.fail(press, closed.code, closed.describe(), bug=policy.bug)
            self._status.set(State.ERROR, policy.message)
            return
        if self._fall_back(press, closed):
            return
        offline = policy.kind is CloseKind.TRANSPORT and closed.before_begin
        if offline:
            self._status.net_down = closed.reason or "cannot reach the server"
            press.late = True
        elif not policy.retry or press.attempts >= self.s.max_connect_attempts:
            self._sessions.fail(press, closed.code, closed.describe(), bug=policy.bug)
            self._status.refresh()
            return
        delay = policy.delay(press.attempts - 1, self._rng)
        if policy.kind is CloseKind.RATE_LIMITED and self._sessions.budgeted(press):
            # the window's oldest session leaving it is when one more may fit (budget.py)
            delay = self._budget.wait_s() or delay
        self._report_error(closed, delay)
        press.move(PressPhase.WAITING, self._clock() + delay)
        self._status.refresh()

    def _fall_back(self, press: Press, closed: SessionClosed) -> bool:
        """[stt] fallback = "local": the cloud is unreachable or refuses (not 1008) -> go local."""
        if not self.s.fallback or press.engine == "local" or closed.policy.kind not in _FALLS_BACK:
            return False
        press.engine = "local"
        self._sessions.use_local_engine_until(self._clock() + self.s.fallback_retry_s)
        self._emit(
            events.error_event(
                closed.code,
                f"{closed.describe()}; using the local engine for {self.s.fallback_retry_s:g} s",
                0.0,
            )
        )
        press.move(PressPhase.WAITING, self._clock())
        self._status.refresh()
        return True

    def _report_error(self, closed: SessionClosed, retry_in: float | None) -> None:
        """An error that does not end a press (a retry follows)."""
        message = closed.describe()
        if closed.policy.bug:
            log.error("server reported a pttd bug: %s", message)
        self._emit(events.error_event(closed.code, message, retry_in))

    def retry(self, press: Press) -> None:
        """A waiting press's backoff is over: open a session for it, from the audio it still
        has (what the ring overwrote meanwhile is lost, and said so in its final's ``gap_ms``)."""
        press.deadline = None
        oldest = press.replay_pos if press.replay_pos is not None else press.start_pos
        if press.audio is not None or press.spool is not None:
            self._sessions.open(press)
            return
        if press.end_pos is not None and press.end_pos <= self.ring.start:
            self._sessions.fail(
                press,
                None,
                f"press {press.press_id}: its audio was "
                "overwritten before the server could be reached "
                f"(the ring buffer holds {self.ring.capacity // self.s.sample_rate} s)",
            )
            return
        if oldest < self.ring.start:
            press.lost_samples += self.ring.start - oldest
            press.replay_pos = self.ring.start
        self._sessions.open(press)
