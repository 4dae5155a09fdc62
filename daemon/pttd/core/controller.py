"""The one thread that owns pttd's state: presses, sessions, turns, and what the user is told.

Everything else (button, control socket, session threads, streamers, the capture source, the
spool thread) only puts items on this controller's bounded queue. Its thread takes them one at
a time and hands each to the collaborator whose job it is; they are plain objects, their
methods run on this thread only, and each uses only those listed before it:

- ``presses.py``: the presses in flight, oldest first, and the last few that ended
- ``status.py``: the state (events, LEDs) and the numbers ``status`` reports
- ``sessions.py``: a press's session (the warm one, or a new one the budget allows) and its
  streamer, and the one way a press ends, after which the next queued press is sent
- ``recovery.py``: a session or stream that fails before the press's final: replay, wait for
  the network, fall back to the local engine, or end the press with an error
- ``finals.py``: partials and finals, and the bounded wait for a press's last final
- ``offline.py``: presses waiting for the network: their audio kept, on disk with a spool
- ``stopping.py``: a stop ends every press in flight within its time

Each press gets its own streamer and, unless a warm session is idle, its own session, so a
press while the previous turn is finalizing starts a new turn without touching the old one.
Each press's phase is stored on it (press.py) and every phase has a deadline, checked here, so
a press always ends: with its last final, with one error event carrying its ``press_id``, with
nothing said, or cancelled (or, when pttd stops, "spooled" for the next run).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pttd import events
from pttd.core.budget import SessionBudget
from pttd.core.finals import FinalOut, Finals
from pttd.core.mailbox import Mailbox
from pttd.core.offline import OfflineQueue, SpoolDone
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.presses import Presses
from pttd.core.recovery import Recovery
from pttd.core.sessions import PressSessions, SessionPool
from pttd.core.status import Status
from pttd.core.stopping import Stopping
from pttd.core.streamer import StreamDone, Streamer, StreamFailed
from pttd.events import State
from pttd.stt.assemblyai import protocol
from pttd.stt.base import Begin, FinalTurn, SessionClosed, SttSession, Turn, WarningMessage

if TYPE_CHECKING:
    from pttd.audio.ring import RingBuffer
    from pttd.core.spool import Spool

log = logging.getLogger(__name__)

QUEUE_BOUND = 1024

# --- queue items (also StreamDone, StreamFailed, SpoolDone, FinalOut from their makers) ----------


@dataclass(frozen=True)
class Command:
    name: str  # press | release | toggle | cancel
    source: str = "control"
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SessionEvent:
    session: SttSession
    event: object


@dataclass(frozen=True)
class SourceStatus:
    kind: str  # online | offline | xrun
    message: str


@dataclass(frozen=True)
class _Stop:
    deadline: float


@dataclass(frozen=True)
class Settings:
    """What the controller needs from the config (plain values, so tests can build it)."""

    sample_rate: int = 16000
    chunk_ms: int = 50
    preroll_ms: int = 500
    postroll_ms: int = 300
    # "adaptive": the post-roll ends early when the speaker had stopped (postroll.py)
    postroll: str = "adaptive"
    postroll_silence_ms: int = 250
    keep_warm_s: float = 0.0
    # the account's new sessions per minute (budget.py): 0 = learn it; session_budget False
    # for the offline engine (url = "local"), which has no such limit
    sessions_per_minute: int = 0
    session_budget: bool = True
    button_mode: str = "hold"
    final_timeout_s: float = 10.0  # ForceEndpoint -> end-of-turn Turn, bounded
    empty_final_timeout_s: float = 2.0  # the same, when no speech was heard in the press
    max_connect_attempts: int = 8
    fallback: bool = False  # [stt] fallback = "local"
    fallback_retry_s: float = 30.0  # after a cloud failure, presses use the local engine this long
    # presses waiting for the network keep their audio outside the ring buffer, up to this
    # much in all; past it the oldest waiting press is dropped (reported as an error event)
    offline_queue_s: float = 60.0
    # phase deadlines (press.py): a session that reports neither Begin nor its end by then is
    # given up (the SttSession's own connect + Begin timeouts are 10 + 10 s); a released press's
    # audio must be on the wire within the audio left plus this margin; a press held this long
    # is released (a stuck button must not stream, and bill, for ever)
    connect_deadline_s: float = 30.0
    send_margin_s: float = 15.0
    max_press_s: float = 3600.0

    @property
    def chunk_samples(self) -> int:
        """Samples in one capture period's frame (what a streamer sends per chunk)."""
        return protocol.frame_samples(self.chunk_ms, self.sample_rate)


@dataclass(frozen=True)
class Context:
    """What every part of the controller uses (their methods run on the controller's thread)."""

    settings: Settings
    ring: RingBuffer
    presses: Presses
    status: Status
    emit: Callable[[dict], None]  # an event to the outputs
    post: Callable[[object], object]  # an item onto the controller's queue, from any thread
    clock: Callable[[], float]  # times every deadline


class Controller:
    """Runs on its own thread; the public methods are safe to call from any thread."""

    def __init__(
        self,
        *,
        ring: RingBuffer,
        settings: Settings,
        session_factory: Callable[..., SttSession],
        emit: Callable[[dict], None],
        on_state: Callable[[State, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        emit_confirmed: Callable[[dict, Callable[[], None]], None] | None = None,
        streamer_factory: Callable[..., Streamer] = Streamer,
        spool: Spool | None = None,
    ):
        """``emit_confirmed(event, on_delivered)`` (optional; ``Outputs.emit``) emits like
        ``emit`` and calls ``on_delivered`` once the outputs have the event: a press's last
        final is emitted so, and the press ends when it is out (``finals.FINAL_OUT_WAIT_S``).
        ``clock`` times every deadline; ``streamer_factory`` builds a press's streamer (tests
        drive the lifecycle with their own). ``spool`` (a ``spool.Spool``, or None: memory
        only) keeps presses waiting for the network on disk across restarts."""
        self.ring = ring
        self.s = settings
        self._emit = emit
        self._clock = clock
        self._q = Mailbox(QUEUE_BOUND)
        self._thread = threading.Thread(target=self._main, name="controller", daemon=True)
        self.dropped_items = 0
        self.errors = 0  # items whose handling raised (a pttd bug)
        self._presses = Presses()
        budget = SessionBudget(settings.sessions_per_minute, clock)
        self._status = Status(self._presses, budget, settings.sample_rate, emit, on_state)
        ctx = Context(settings, ring, self._presses, self._status, emit, self.post, clock)
        self._pool = pool = SessionPool()
        self._sessions = sessions = PressSessions(
            ctx, pool, budget, spool, session_factory, streamer_factory, self.on_session_event
        )
        self._recovery = recovery = Recovery(ctx, sessions, pool, budget, rng or random.Random())
        self._finals = Finals(ctx, sessions, recovery, pool, emit_confirmed)
        self._offline = OfflineQueue(ctx, sessions, spool, self._q.put_marker)
        self._stopping = Stopping(ctx, sessions, pool, self._offline)

    # --- published (read from any thread) --------------------------------------------------------

    @property
    def state(self) -> State:
        return self._status.state

    @property
    def state_detail(self) -> str:
        return self._status.detail

    @property
    def last_final(self) -> dict | None:
        return self._finals.last_final

    @property
    def waiting(self) -> dict:
        """Presses waiting for the network: ``waiting``, ``waiting_s`` and ``spooled``."""
        return self._status.waiting

    @property
    def budget(self) -> dict:
        """The new-session budget: ``sessions_last_min`` and ``session_limit``."""
        return self._status.budget

    # --- thread-safe entry points ----------------------------------------------------------------

    def start(self) -> None:
        self._emit(events.state_event(self.state))
        self.load_spool()
        self._thread.start()

    def load_spool(self) -> None:
        """Take up the presses an earlier run left in the spool (offline.py); the first pass of
        the loop sends the oldest. Called by ``start`` before the thread runs (tests without
        the thread call it themselves)."""
        self._offline.load()
        self._status.publish_numbers()

    def post(self, item: object) -> bool:
        """Enqueue from any thread; never blocks. Overflow drops the item and counts it."""
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            self.dropped_items += 1
            log.error("controller queue full: dropped %s", type(item).__name__)
            return False

    def command(self, name: str, source: str = "control") -> dict:
        """The control socket's handler: enqueue a command, or read the published state."""
        if name == events.Command.STATUS:
            return {
                "ok": True,
                "state": self.state.value,
                "detail": self.state_detail,
                "last_final": self.last_final,
                "audio_ms": int(self.ring.end * 1000 // self.s.sample_rate),
                **self.waiting,
                **self.budget,
            }
        if name not in events.PRESS_COMMANDS:
            return {"ok": False, "error": f"unknown command {name!r}"}
        if not self.post(Command(name, source)):
            return {"ok": False, "error": "pttd is overloaded; command dropped"}
        return {"ok": True}

    def on_session_event(self, session: SttSession, event: object) -> None:
        self.post(SessionEvent(session, event))

    def on_source_status(self, kind: str, message: str) -> None:
        self.post(SourceStatus(kind, message))

    def stop(self, timeout: float = 3.0) -> None:
        """Finish cleanly: skip post-roll, ForceEndpoint, wait (bounded) for finals, Terminate."""
        deadline = time.monotonic() + timeout
        self._q.put_marker(_Stop(deadline))  # past the bound if need be: stop is never refused
        self._thread.join(max(0.1, deadline - time.monotonic() + 0.5))

    # --- the loop --------------------------------------------------------------------------------

    def _main(self) -> None:
        item = None  # a first pass at once: presses loaded from the spool go out now
        while True:
            try:
                self.process(item)
            except Exception:
                # a pttd bug; the presses' deadlines still end whatever it left half done
                self.errors += 1
                log.exception("controller error (carrying on)")
            if self._stopping.begun and self._stopping.complete():
                self._stopping.finish()
                return
            try:
                item = self._q.get(timeout=self._next_deadline())
            except queue.Empty:
                item = None

    def process(self, item: object | None) -> None:
        """One pass of the loop: handle ``item`` (None: nothing arrived), then act on every
        deadline that has passed. Tests drive a controller without its thread through this."""
        if item is not None:
            self._handle(item)
        self._check_deadlines()

    def process_queued(self) -> int:
        """Process every item already queued, without waiting (tests that drive a controller
        without its thread); returns how many there were."""
        n = 0
        while True:
            try:
                item = self._q.get(timeout=0)
            except queue.Empty:
                return n
            self.process(item)
            n += 1

    def _handle(self, item: object) -> None:
        if isinstance(item, Command):
            self._on_command(item)
        elif isinstance(item, SessionEvent):
            self._on_session(item.session, item.event)
        elif isinstance(item, StreamDone):
            self._finals.on_stream_done(item)
        elif isinstance(item, StreamFailed):
            self._recovery.on_stream_failed(item)
        elif isinstance(item, SourceStatus):
            self._status.on_source(item.kind, item.message)
        elif isinstance(item, FinalOut):
            self._finals.on_final_out(item)
        elif isinstance(item, SpoolDone):
            self._offline.on_spool_done(item, stopping=self._stopping.begun)
        elif isinstance(item, _Stop):
            self._stopping.begin(item.deadline)

    # --- commands --------------------------------------------------------------------------------

    def _on_command(self, cmd: Command) -> None:
        if self._stopping.begun:
            return
        name = cmd.name
        if cmd.source == "button" and self.s.button_mode == "toggle":
            if name == "release":
                return
            name = "toggle"
        if name == "toggle":
            name = "release" if self._presses.active() is not None else "press"
        if name == "press":
            self._press(cmd.at)
        elif name == "release":
            press = self._presses.active()
            if press is not None:
                self._release(press, cmd.at)
        elif name == "cancel":
            for press in self._presses.live():
                self._sessions.end(press, Outcome.CANCELLED, terminate=True)
        self._status.refresh()

    def _press(self, at: float) -> None:
        if self._presses.active() is not None:
            return  # already held: a second press is a bounce or a duplicate
        preroll = self.s.preroll_ms * self.s.sample_rate // 1000
        start = max(self.ring.start, self.ring.position_at(at) - preroll)
        previous = self._presses.newest()
        if previous is not None and previous.end_pos is not None and not previous.restored:
            # never again the audio the previous press sent (its end, or the one it asked for)
            sent_end = previous.streamer.end if previous.streamer is not None else None
            start = max(start, sent_end or previous.end_pos)
        waiting = any(p.phase is PressPhase.WAITING for p in self._presses.live())
        press = self._presses.new(start, at)  # WAITING, no deadline: queued
        press.pressed_wall = time.time() - (time.monotonic() - at)
        self._status.auth_blocked = False  # an explicit press earns one more try after a 1008
        if self._status.net_down or waiting:
            press.late = True  # captured now, sent in order when it can be
        else:
            self._sessions.open(press)

    def _release(self, press: Press, at: float) -> None:
        press.released_at = at
        postroll = self.s.postroll_ms * self.s.sample_rate // 1000
        press.release_pos = self.ring.position_at(at)
        press.end_pos = press.release_pos + postroll
        if press.phase is PressPhase.STREAMING:
            assert press.streamer is not None
            judge = self._sessions.postroll_judge(press)
            press.end_pos = press.streamer.finish(press.end_pos, judge)
            press.move(PressPhase.FINALIZING, self._sessions.send_deadline(press))

    # --- what a session reports ------------------------------------------------------------

    def _on_session(self, session: SttSession, event: object) -> None:
        press = self._presses.of_session(session)
        if press is not None and press.ended:
            if isinstance(event, FinalTurn) and self._finals.late_final(press, session, event):
                return
            press = None  # a message for a press that has ended (e.g. a warm session's ghost)
        if isinstance(event, Begin):
            self._sessions.on_begin(press, session)
        elif isinstance(event, Turn):
            self._finals.on_partial(press, session, event)
        elif isinstance(event, FinalTurn):
            self._finals.on_final(press, session, event)
        elif isinstance(event, SessionClosed):
            self._recovery.on_closed(press, session, event)
        elif isinstance(event, WarningMessage):
            name = getattr(session, "name", "session")
            log.warning("%s: server warning %s: %s", name, event.code, event.message)
            self._emit(events.warning_event(event.code, event.message))

    # --- deadlines -------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        """How long the loop may sleep; None (until the next item) when nothing is in flight.

        A press in flight is checked at least once a second (its audio may need copying out of
        the ring, see ``OfflineQueue.keep_audio``); an idle daemon has no timed work, so it does
        not wake at all (24/7 on a small board, every wake-up costs).
        """
        if self._stopping.begun:
            return 0.05
        live = self._presses.live()
        times = [p.deadline for p in live if p.deadline is not None]
        if self._pool.warm_until is not None:
            times.append(self._pool.warm_until)
        if not times:
            return 1.0 if live else None
        return max(0.0, min(min(times) - self._clock(), 1.0))

    def _check_deadlines(self) -> None:
        now = self._clock()
        for press in self._presses.live():
            if press.deadline is not None and now >= press.deadline and not press.ended:
                self._overstayed(press)
        self._pool.expire(now)
        self._offline.expire()
        self._offline.keep_audio()
        self._sessions.send_queued()
        self._presses.forget_ended()
        self._status.refresh()

    def _overstayed(self, press: Press) -> None:
        """A press's phase deadline passed: act, so that no press outlives its bounds."""
        phase = press.phase
        if phase is PressPhase.WAITING:
            self._recovery.retry(press)
        elif phase is PressPhase.CONNECTING:
            self._sessions.give_up_connecting(press)
        elif phase is PressPhase.STREAMING:
            why = "releasing it (a stuck button?)"
            log.warning("press %d held for %g s: %s", press.press_id, self.s.max_press_s, why)
            self._release(press, time.monotonic())
        elif phase is PressPhase.FINALIZING and press.fe_sent_at is not None:
            self._finals.overdue(press)
        elif phase is PressPhase.FINALIZING:
            self._sessions.fail(press, None, "the press's audio could not be sent in time")
        elif phase is PressPhase.DELIVERING:
            self._finals.delivery_overdue(press)
