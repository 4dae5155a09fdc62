"""Each press's session and streamer, from opening to letting go, and the one way a press ends.

A press gets the warm session if one is open (a session kept after the previous press), else a
new one, if the account's new-session budget (budget.py) has room now; if not, it waits (its
audio kept) until the window has. Once the session has begun, a streamer sends the press's audio
(streamer.py). When a press ends, its streamer stops and its session is kept warm for the next
press (``keep_warm_s``, or as long as the budget needs), terminated, or closed; then the oldest
press queued behind it is sent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pttd import events
from pttd.core.budget import SessionBudget
from pttd.core.postroll import PostrollJudge
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.streamer import Streamer
from pttd.stt.assemblyai import protocol
from pttd.stt.base import SttSession

if TYPE_CHECKING:
    from pttd.core.controller import Context
    from pttd.core.spool import Spool

log = logging.getLogger(__name__)

# A warm session is not kept when it would expire (Begin.expires_at, close code 3008) within
# its keep-warm time plus this margin: the next press gets a fresh session instead.
EXPIRY_MARGIN_S = 60.0


def _lifetime_left(session: SttSession) -> float:
    expires = session.begin.expires_at if session.begin is not None else None
    return float("inf") if expires is None else expires - time.time()


class SessionPool:
    """The sessions no press holds: the one kept warm for the next press (until ``warm_until``)
    and those ending (Terminate sent, their close not reported yet)."""

    def __init__(self) -> None:
        self.warm: SttSession | None = None
        self.warm_until: float | None = None
        self._ending: set[SttSession] = set()

    def take_warm(self) -> SttSession | None:
        """The warm session, for a press, if it is still open."""
        if self.warm is None or not self.warm.is_open:
            return None
        session, self.warm, self.warm_until = self.warm, None, None
        return session

    def keep_warm(self, session: SttSession, until: float) -> None:
        self.warm, self.warm_until = session, until

    def terminate(self, session: SttSession) -> None:
        """End it cleanly (Terminate); it is held until its close is reported."""
        self._ending.add(session)
        session.terminate_async()

    def expire(self, now: float) -> None:
        """The warm session's time is up: terminate it."""
        if self.warm_until is not None and now >= self.warm_until:
            warm, self.warm, self.warm_until = self.warm, None, None
            if warm is not None:
                self.terminate(warm)

    def holds(self, session: SttSession) -> bool:
        """Kept warm or ending (not abandoned, not serving another press)."""
        return session in self._ending or session is self.warm

    def closed(self, session: SttSession) -> None:
        """Its close was reported: it is neither warm nor ending any more."""
        self._ending.discard(session)
        if session is self.warm:
            self.warm, self.warm_until = None, None

    def shutdown(self, deadline: float) -> None:
        """pttd stops: terminate them all, wait (bounded, 1 s at most) and close them."""
        sessions = set(self._ending)
        if self.warm is not None:
            sessions.add(self.warm)
        for session in sessions:
            session.terminate_async()
        deadline = min(deadline, time.monotonic() + 1.0)
        for session in sessions:
            session.wait_closed(deadline - time.monotonic())
        for session in sessions:
            session.close(0.2)  # shuts the socket first, so the joins are quick


class PressSessions:
    """Opens a press's session and starts its streamer; ends presses, which lets them go and
    sends the next queued press."""

    def __init__(
        self,
        ctx: Context,
        pool: SessionPool,
        budget: SessionBudget,
        spool: Spool | None,
        new_session: Callable[..., SttSession],
        new_streamer: Callable[..., Streamer],
        on_event: Callable[[SttSession, object], None],
    ):
        """``new_session(on_event=, engine=)`` and ``new_streamer`` build a press's session
        (``on_event`` hears from it on its own threads) and streamer."""
        self.s = ctx.settings
        self.ring = ctx.ring
        self._presses = ctx.presses
        self._status = ctx.status
        self._emit = ctx.emit
        self._post = ctx.post
        self._clock = ctx.clock
        self._pool = pool
        self.budget = budget  # the account's new-session budget (budget.py)
        self._spool = spool
        self._new_session = new_session
        self._new_streamer = new_streamer
        self._on_event = on_event
        self.stopping = False  # no queued press is sent, no session kept warm
        self._local_until: float | None = None  # fallback: new sessions use the local engine
        self._draining = False
        self._drain_again = False

    # --- opening ---------------------------------------------------------------------------------

    def open(self, press: Press) -> None:
        """Give a press a session: the warm one, or a new one once the budget allows."""
        if press.audio is None and press.spool is not None and not self._load_spooled(press):
            return  # (it ended with an error)
        warm = self._pool.take_warm()
        if warm is not None:
            press.session = warm
            press.stream_base_ms = protocol.frame_ms(warm.audio_bytes_sent, self.s.sample_rate)
            self.start_streaming(press)
            return
        if self.s.fallback and self._local_until is not None and self._clock() < self._local_until:
            press.engine = "local"
        if self.budgeted(press) and self._held_back(press):
            return
        press.attempts += 1
        log.debug("press %d: opening session (attempt %d)", press.press_id, press.attempts)
        session = None
        try:
            session = self._new_session(on_event=self._on_event, engine=press.engine)
            session.start()
        except Exception as exc:  # a bad URL, no thread to be had: never raised on this thread
            log.exception("press %d: cannot open a session", press.press_id)
            if session is not None:
                session.close(0)
            self.fail(press, None, f"cannot open a session: {type(exc).__name__}: {exc}")
            return
        press.session = session
        if self.budgeted(press):
            self.budget.opened(session)
        press.move(PressPhase.CONNECTING, self._clock() + self.s.connect_deadline_s)

    def use_local_engine_until(self, until: float) -> None:
        """Fallback: the cloud failed; presses opened before ``until`` use the local engine."""
        self._local_until = until

    def budgeted(self, press: Press) -> bool:
        """Sessions of this press count against the account's new-session budget."""
        return self.s.session_budget and press.engine == "cloud"

    def _held_back(self, press: Press) -> bool:
        """The account's window is full: the press waits (its audio kept) until it has room."""
        wait = self.budget.wait_s()
        if wait <= 0:
            return False
        log.info(
            "press %d: %d new sessions in the last minute (the limit): sending it in %.1f s",
            press.press_id,
            self.budget.count(),
            wait,
        )
        press.deadline = self._clock() + wait  # (still WAITING: a retry opens it then)
        return True

    def _load_spooled(self, press: Press) -> bool:
        """Read a spooled press's audio back to send it; a file too old, recorded at another
        rate, gone or damaged ends the press with an error (False)."""
        from pttd.core.spool import SpoolError

        assert self._spool is not None and press.spool is not None
        try:
            press.audio = self._spool.read_audio(press.spool, self.s.sample_rate)
        except SpoolError as exc:
            message = str(exc)
            if not message.startswith("press "):
                message = f"press {press.press_id} dropped: {message}"
            self.fail(press, None, message)
            return False
        return True

    def on_begin(self, press: Press | None, session: SttSession) -> None:
        """A session has begun (so the network is up): its press starts streaming."""
        self._status.net_down = None
        if press is not None and press.phase is PressPhase.CONNECTING:
            press.stream_base_ms = 0.0
            self.start_streaming(press)
            self._status.refresh()
        elif press is None and session is not self._pool.warm:
            session.close(0)  # nobody wants it (its press ended while it connected)

    def give_up_connecting(self, press: Press) -> None:
        """No Begin nor close by the connect deadline."""
        session, press.session = press.session, None
        if session is not None:
            session.close(0)
        self.fail(
            press, None, f"no session within {self.s.connect_deadline_s:g} s of asking for one"
        )

    # --- streaming -------------------------------------------------------------------------------

    def start_streaming(self, press: Press) -> None:
        start = press.replay_pos if press.replay_pos is not None else press.start_pos
        source = press.audio if press.audio is not None else self.ring
        try:
            streamer = self._new_streamer(
                source,
                press.session,
                start,
                self.s.chunk_samples,
                post=self._post,
                sample_rate=self.s.sample_rate,
                name=f"streamer-{press.press_id}",
            )
            press.streamer = streamer
            if press.end_pos is not None:
                press.end_pos = streamer.finish(press.end_pos, self.postroll_judge(press))
            streamer.start()
        except Exception as exc:  # no thread to be had: the press fails like a broken stream
            log.exception("press %d: cannot start streaming", press.press_id)
            press.streamer = None
            self.fail(press, None, f"cannot stream: {type(exc).__name__}: {exc}")
            return
        if press.replay_pos is not None:
            # replayed audio restarts the session's stream clock at the replay point
            press.stream_base_ms -= (start - press.start_pos) * 1000 / self.s.sample_rate
        if press.end_pos is None:
            press.move(PressPhase.STREAMING, self._clock() + self.s.max_press_s)
        else:
            press.move(PressPhase.FINALIZING, self.send_deadline(press))

    def postroll_judge(self, press: Press) -> PostrollJudge | None:
        """The adaptive post-roll's judge for a press's first stream from the ring; a replay or
        a press sent from its saved audio keeps the post-roll it asked for (nobody waits)."""
        s = self.s
        if (
            s.postroll != "adaptive"
            or s.postroll_ms <= 0
            or press.release_pos is None
            or press.replay_pos is not None
            or press.audio is not None
        ):
            return None
        return PostrollJudge(
            self.ring,
            press.release_pos,
            s.postroll_ms * s.sample_rate // 1000,
            s.postroll_silence_ms * s.sample_rate // 1000,
            s.sample_rate,
        )

    def send_deadline(self, press: Press) -> float:
        """When the rest of a released press's audio and its ForceEndpoint must be on the wire:
        the streamer sends at least as fast as real time, so the audio left, plus a margin."""
        assert press.end_pos is not None
        cursor = press.streamer.cursor if press.streamer is not None else press.start_pos
        left_s = max(0, press.end_pos - cursor) / self.s.sample_rate
        return self._clock() + left_s + self.s.send_margin_s

    # --- ending ----------------------------------------------------------------------------------

    def fail(self, press: Press, code: int | None, message: str, *, bug: bool = False) -> None:
        """End a press with the one error event that says why (it carries the press's id)."""
        if press.ended:
            return
        if bug:
            log.error("server reported a pttd bug: %s", message)
        log.warning("press %d ended with an error: %s", press.press_id, message)
        self._emit(events.error_event(code, message, None, press_id=press.press_id))
        self.end(press, Outcome.ERROR, terminate=True)

    def end(self, press: Press, outcome: Outcome, *, terminate: bool) -> None:
        """The one way a press ends: stop its streamer, let its session go, send the next."""
        if press.ended:
            return
        streamer, session = press.streamer, press.session
        press.end(outcome, self._clock())
        log.debug("press %d ended: %s", press.press_id, outcome.value)
        if press.spool is not None and outcome is not Outcome.SPOOLED:
            assert self._spool is not None
            self._spool.remove(press.spool)  # (after its write, if that is still queued)
            press.audio = None
        if streamer is not None:
            streamer.stop(0.5)
        if session is not None:
            self._let_go(press, session, terminate)
        self.send_queued()

    def send_queued(self) -> None:
        """Queued presses go out one at a time, oldest first, so they are delivered in order.

        While the network is down one press in flight probes it (backing off between tries); if
        that press ends some other way (dropped, failed), the oldest queued one takes its place,
        or the queue would wait for a Begin nobody asks for. (Not re-entered: a press that ends
        while being opened, e.g. its spool file is damaged, makes the loop try the next one.)"""
        if self.stopping:
            return
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            while True:
                self._drain_again = False
                live = self._presses.live()
                if any(not p.queued for p in live):
                    return
                if live:
                    self.open(live[0])
                if not self._drain_again:
                    return
        finally:
            self._draining = False

    @contextlib.contextmanager
    def queue_held(self) -> Iterator[None]:
        """Presses that end inside send no queued press (the loop's pass sends it after)."""
        draining, self._draining = self._draining, True
        try:
            yield
        finally:
            self._draining = draining

    def _let_go(self, press: Press, session: SttSession, terminate: bool) -> None:
        """After a press: keep its session open for the next one (``keep_warm_s``, or as long
        as the new-session budget needs: a session is billed while open), or end it."""
        warm_s = self.s.keep_warm_s
        if self.budgeted(press) and terminate:
            warm_s = max(warm_s, self.budget.warm_s())
        keep = (
            terminate
            and press.outcome in (Outcome.FINAL, Outcome.SILENT)
            and warm_s > 0
            and session.is_open
            and not self.stopping
            and self._pool.warm is None
            and _lifetime_left(session) > warm_s + EXPIRY_MARGIN_S
        )
        if keep:
            if warm_s > self.s.keep_warm_s:
                log.info(
                    "press %d: keeping its session %.1f s for the next press (the account's "
                    "new-session budget is spent)",
                    press.press_id,
                    warm_s,
                )
            self._pool.keep_warm(session, self._clock() + warm_s)
        elif terminate and session.is_open:
            self._pool.terminate(session)
        else:
            session.close(0)
