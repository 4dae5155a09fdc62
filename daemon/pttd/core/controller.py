"""The one thread that owns pttd's state: presses, sessions, turns, and what the user is told.

Everything else (button, control socket, session threads, streamers, the capture source) only
puts items on this controller's bounded queue. Each press gets its own streamer and, unless a
warm session is idle, its own session, so a press while the previous turn is finalizing starts
a new turn without touching the old one. A press whose session fails before its final is
replayed from the ring buffer on a new session, from just after the last word already delivered.
Each press's phase is stored on it (press.py) and every phase has a deadline, checked here, so a
press always ends: with its last final, with one error event carrying its ``press_id``, with
nothing said, or cancelled. With a spool (spool.py), a press waiting for the network is also
written to disk once its audio is complete; one still waiting when pttd stops is left there
("spooled") and the next run loads it under the same id, sends it and ends it.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pttd import events
from pttd.core.budget import SessionBudget
from pttd.core.mailbox import Mailbox
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.streamer import StreamDone, Streamer, StreamFailed
from pttd.events import State
from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.protocol import Begin, FinalTurn, Turn, WarningMessage
from pttd.stt.assemblyai.session import Session, SessionClosed

log = logging.getLogger(__name__)

QUEUE_BOUND = 1024
# A warm session is not kept when it would expire (Begin.expires_at, close code 3008) within
# its keep-warm time plus this margin: the next press gets a fresh session instead.
EXPIRY_MARGIN_S = 60.0
# A press ends (streamer stopped, Terminate, idle state, LEDs) once the outputs' threads have
# its last final, or after this long: ending it at once woke several threads just as the final's
# output thread needed the interpreter, and the final waited behind them (bench/RESULTS.md).
FINAL_OUT_WAIT_S = 0.05


def _restored(press: Press) -> bool:
    """Loaded from the spool at start-up: its ring positions are an earlier run's."""
    return press.spool is not None and press.spool.restored


def _lifetime_left(session: Session) -> float:
    expires = session.begin.expires_at if session.begin is not None else None
    return float("inf") if expires is None else expires - time.time()


# --- queue items ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str  # press | release | toggle | cancel
    source: str = "control"
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SessionEvent:
    session: Session
    event: object


@dataclass(frozen=True)
class SourceStatus:
    kind: str  # online | offline | xrun
    message: str


@dataclass(frozen=True)
class _Stop:
    deadline: float


@dataclass(frozen=True)
class SpoolDone:
    """The spool thread has written a press's file (``error`` None) or failed to."""

    entry: object
    error: str | None


@dataclass(frozen=True)
class _FinalOut:
    """The outputs' threads have delivered a press's last final (posted by their last one)."""

    press: Press


@dataclass(frozen=True)
class Settings:
    """What the controller needs from the config (plain values, so tests can build it)."""

    sample_rate: int = 16000
    chunk_ms: int = 50
    preroll_ms: int = 500
    postroll_ms: int = 300
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
    # given up (the Session's own connect + Begin timeouts are 10 + 10 s); a released press's
    # audio must be on the wire within the audio left plus this margin; a press held this long
    # is released (a stuck button must not stream, and bill, for ever)
    connect_deadline_s: float = 30.0
    send_margin_s: float = 15.0
    max_press_s: float = 3600.0


class Controller:
    """Runs on its own thread; the public methods are safe to call from any thread."""

    def __init__(
        self,
        *,
        ring,
        settings: Settings,
        session_factory: Callable[..., Session],
        emit: Callable[[dict], None],
        on_state: Callable[[State, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        emit_confirmed: Callable[[dict, Callable[[], None]], None] | None = None,
        streamer_factory: Callable[..., Streamer] = Streamer,
        spool=None,
    ):
        """``emit_confirmed(event, on_delivered)`` (optional; ``Outputs.emit``) emits like
        ``emit`` and calls ``on_delivered`` once the outputs have the event: a press's last
        final is emitted so, and the press ends when it is out (``FINAL_OUT_WAIT_S``).
        ``clock`` times every deadline; ``streamer_factory`` builds a press's streamer (tests
        drive the lifecycle with their own). ``spool`` (a ``spool.Spool``, or None: memory
        only) keeps presses waiting for the network on disk across restarts."""
        self.ring = ring
        self.s = settings
        self._new_session = session_factory
        self._new_streamer = streamer_factory
        self._emit = emit
        self._emit_confirmed = emit_confirmed
        self._on_state = on_state
        self._clock = clock
        self._rng = rng or random.Random()
        self._q = Mailbox(QUEUE_BOUND)
        self._thread = threading.Thread(target=self._main, name="controller", daemon=True)
        self._presses: list[Press] = []
        # ended presses, so a late message of theirs is recognised (and dropped) (bounded)
        self._recent: collections.deque[Press] = collections.deque(maxlen=32)
        self._press_counter = 0
        self._warm: Session | None = None
        self._closing: set[Session] = set()
        self._warm_until: float | None = None
        self._budget = SessionBudget(settings.sessions_per_minute, clock)
        self._auth_blocked = False
        self._mic_offline: str | None = None
        self._net_down: str | None = None  # why the server cannot be reached, while so
        self._cloud_retry_at: float | None = None  # fallback: use the local engine until then
        self._stopping: _Stop | None = None
        self.state = State.IDLE
        self.state_detail = ""
        self.last_final: dict | None = None
        self.dropped_items = 0
        self.errors = 0  # items whose handling raised (a pttd bug)
        self._spool = spool
        # presses waiting for the network (published for ``status``: read from other threads)
        self.waiting: dict = {"waiting": 0, "waiting_s": 0.0, "spooled": 0}
        self.budget: dict = self._budget.snapshot()
        self._draining = False
        self._drain_again = False

    # --- thread-safe entry points ----------------------------------------------------------------

    def start(self) -> None:
        self._emit(events.state_event(self.state))
        self.load_spool()
        self._thread.start()

    def load_spool(self) -> None:
        """Take up the presses an earlier run left in the spool, oldest first, under their own
        ids (new presses are numbered after them). They wait like presses made offline: the
        first pass of the loop sends the oldest (or drops those past ``max_age_h``). Called by
        ``start`` before the thread runs (tests without the thread call it themselves)."""
        if self._spool is None:
            return
        entries, problems = self._spool.load()
        for problem in problems:
            log.warning("spool: %s", problem)
        for entry in entries:
            m = entry.meta
            press = Press(entry.press_id, int(m.get("start_pos") or 0), time.monotonic())
            press.released_at = time.monotonic()  # released long ago (``released_wall``)
            press.end_pos = int(m.get("end_pos") or (m["audio_start"] + entry.samples))
            replay = m.get("replay_pos")
            press.replay_pos = int(replay) if isinstance(replay, int) else None
            press.lost_samples = int(m.get("lost_samples") or 0)
            press.pressed_wall = m.get("pressed_at")
            press.late = True
            press.spool = entry
            self._presses.append(press)
            self._press_counter = max(self._press_counter, press.press_id)
        if entries:
            log.info("spool: %d press(es) from an earlier run wait to be sent", len(entries))
        self._publish_waiting()

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
        if name == "status":
            return {
                "ok": True,
                "state": self.state.value,
                "detail": self.state_detail,
                "last_final": self.last_final,
                "audio_ms": int(self.ring.end * 1000 // self.s.sample_rate),
                **self.waiting,
                **self.budget,
            }
        if name not in ("press", "release", "toggle", "cancel"):
            return {"ok": False, "error": f"unknown command {name!r}"}
        if not self.post(Command(name, source)):
            return {"ok": False, "error": "pttd is overloaded; command dropped"}
        return {"ok": True}

    def on_session_event(self, session: Session, event: object) -> None:
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
            if self._stopping is not None and self._stop_complete():
                self._shutdown_sessions()
                return
            timeout = self._next_deadline()
            try:
                item = self._q.get(timeout=timeout)
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
            self._on_stream_done(item)
        elif isinstance(item, StreamFailed):
            self._on_stream_failed(item)
        elif isinstance(item, SourceStatus):
            self._on_source(item)
        elif isinstance(item, _FinalOut):
            if item.press.phase is PressPhase.DELIVERING:
                self._end(item.press, Outcome.FINAL, terminate=True)
        elif isinstance(item, SpoolDone):
            self._on_spool_done(item)
        elif isinstance(item, _Stop):
            self._begin_stop(item)

    # --- commands --------------------------------------------------------------------------------

    def _on_command(self, cmd: Command) -> None:
        if self._stopping is not None:
            return
        name = cmd.name
        if cmd.source == "button" and self.s.button_mode == "toggle":
            if name == "release":
                return
            name = "toggle"
        if name == "toggle":
            name = "release" if self._active() is not None else "press"
        if name == "press":
            self._press(cmd.at)
        elif name == "release":
            press = self._active()
            if press is not None:
                self._release(press, cmd.at)
        elif name == "cancel":
            self._cancel()
        self._refresh_state()

    def _active(self) -> Press | None:
        """The newest press that is held (not yet released; at most one)."""
        for p in reversed(self._presses):
            if p.held:
                return p
        return None

    def _live(self) -> list[Press]:
        return [p for p in self._presses if not p.ended]

    def _press(self, at: float) -> None:
        if self._active() is not None:
            return  # already held: a second press is a bounce or a duplicate
        preroll = self.s.preroll_ms * self.s.sample_rate // 1000
        start = max(self.ring.start, self.ring.position_at(at) - preroll)
        previous = self._presses[-1] if self._presses else None
        if previous is not None and previous.end_pos is not None and not _restored(previous):
            start = max(
                start,
                previous.streamer.end
                if previous.streamer and previous.streamer.end
                else previous.end_pos,
            )
        self._press_counter += 1
        press = Press(self._press_counter, start, at)  # WAITING, no deadline: queued
        press.pressed_wall = time.time() - (time.monotonic() - at)
        waiting = any(p.phase is PressPhase.WAITING for p in self._live())
        self._presses.append(press)
        self._auth_blocked = False  # an explicit press earns one more try after a 1008
        if self._net_down or waiting:
            press.late = True  # captured now, sent in order when it can be
        else:
            self._open_session(press)

    def _release(self, press: Press, at: float) -> None:
        press.released_at = at
        postroll = self.s.postroll_ms * self.s.sample_rate // 1000
        press.end_pos = self.ring.position_at(at) + postroll
        if press.phase is PressPhase.STREAMING:
            press.end_pos = press.streamer.finish(press.end_pos)
            press.move(PressPhase.FINALIZING, self._send_deadline(press))

    def _send_deadline(self, press: Press) -> float:
        """When the rest of a released press's audio and its ForceEndpoint must be on the wire:
        the streamer sends at least as fast as real time, so the audio left, plus a margin."""
        cursor = getattr(press.streamer, "cursor", press.start_pos)
        left_s = max(0, press.end_pos - cursor) / self.s.sample_rate
        return self._clock() + left_s + self.s.send_margin_s

    def _cancel(self) -> None:
        for press in self._live():
            self._end(press, Outcome.CANCELLED, terminate=True)

    # --- sessions --------------------------------------------------------------------------------

    def _open_session(self, press: Press) -> None:
        if press.audio is None and press.spool is not None and not self._load_spooled(press):
            return  # (it ended with an error)
        if self._warm is not None and self._warm.is_open:
            session, self._warm, self._warm_until = self._warm, None, None
            press.session = session
            press.stream_base_ms = protocol.frame_ms(session.audio_bytes_sent, self.s.sample_rate)
            self._start_streaming(press)
            return
        if (
            self.s.fallback
            and self._cloud_retry_at is not None
            and self._clock() < self._cloud_retry_at
        ):
            press.engine = "local"
        if self._budgeted(press):
            wait = self._budget.wait_s()
            if wait > 0:  # the account's window is full: hold the press (its audio is kept)
                log.info(
                    "press %d: %d new sessions in the last minute (the limit): sending it "
                    "in %.1f s",
                    press.press_id,
                    self._budget.count(),
                    wait,
                )
                press.deadline = self._clock() + wait  # (still WAITING: _retry opens it)
                return
        press.attempts += 1
        log.debug("press %d: opening session (attempt %d)", press.press_id, press.attempts)
        session = None
        try:
            session = self._new_session(on_event=self.on_session_event, engine=press.engine)
            session.start()
        except Exception as exc:  # a bad URL, no thread to be had: never raised on this thread
            log.exception("press %d: cannot open a session", press.press_id)
            if session is not None:
                session.close(0)
            self._fail_press(press, None, f"cannot open a session: {type(exc).__name__}: {exc}")
            return
        press.session = session
        if self._budgeted(press):
            self._budget.opened(session)
        press.move(PressPhase.CONNECTING, self._clock() + self.s.connect_deadline_s)

    def _budgeted(self, press: Press) -> bool:
        """Sessions of this press count against the account's new-session budget."""
        return self.s.session_budget and press.engine == "cloud"

    def _press_of(self, session: Session) -> Press | None:
        """The newest press that used ``session`` (a warm session serves one press after another)."""
        for p in reversed(self._presses):
            if p.session is session:
                return p
        for p in reversed(self._recent):
            if p.session is session:
                return p
        return None

    def _on_session(self, session: Session, event: object) -> None:
        press = self._press_of(session)
        if press is not None and press.ended:
            if isinstance(event, FinalTurn) and self._late_final(press, session, event):
                return
            press = None  # a message for a press that has ended (e.g. a warm session's ghost)
        if isinstance(event, Begin):
            self._net_down = None
            if press is not None and press.phase is PressPhase.CONNECTING:
                press.stream_base_ms = 0.0
                self._start_streaming(press)
                self._refresh_state()
            elif press is None and session is not self._warm:
                session.close(0)  # nobody wants it (its press ended while it connected)
        elif isinstance(event, Turn):
            if press is not None and event.text != press.last_partial:
                press.heard_speech = press.heard_speech or bool(event.text)
                press.last_partial = event.text
                if event.text:
                    self._emit(events.partial_event(event.text, event.turn_order, session.id or ""))
        elif isinstance(event, FinalTurn):
            self._on_final(press, session, event)
        elif isinstance(event, SessionClosed):
            self._on_closed(press, session, event)
        elif isinstance(event, WarningMessage):
            log.warning(
                "%s: server warning %s: %s",
                getattr(session, "name", "session"),
                event.code,
                event.message,
            )
            self._emit(events.warning_event(event.code, event.message))

    def _start_streaming(self, press: Press) -> None:
        start = press.replay_pos if press.replay_pos is not None else press.start_pos
        source = press.audio if press.audio is not None else self.ring
        try:
            streamer = self._new_streamer(
                source,
                press.session,
                start,
                self._chunk(),
                post=self.post,
                sample_rate=self.s.sample_rate,
                name=f"streamer-{press.press_id}",
            )
            press.streamer = streamer
            if press.end_pos is not None:
                press.end_pos = streamer.finish(press.end_pos)
            streamer.start()
        except Exception as exc:  # no thread to be had: the press fails like a broken stream
            log.exception("press %d: cannot start streaming", press.press_id)
            press.streamer = None
            self._fail_press(press, None, f"cannot stream: {type(exc).__name__}: {exc}")
            return
        if press.replay_pos is not None:
            # replayed audio restarts the session's stream clock at the replay point
            press.stream_base_ms -= (start - press.start_pos) * 1000 / self.s.sample_rate
        if press.end_pos is None:
            press.move(PressPhase.STREAMING, self._clock() + self.s.max_press_s)
        else:
            press.move(PressPhase.FINALIZING, self._send_deadline(press))

    def _streaming_press(self, streamer: object) -> Press | None:
        return next((p for p in self._presses if p.streamer is streamer and not p.ended), None)

    def _on_stream_done(self, done: StreamDone) -> None:
        press = self._streaming_press(done.streamer)
        if (
            press is None
            or press.phase is not PressPhase.FINALIZING
            or press.fe_sent_at is not None
        ):
            return  # (its final overtook this report: _on_final has done the below)
        self._force_endpoint_sent(press, done.streamer)

    def _on_stream_failed(self, failed: StreamFailed) -> None:
        """A streamer died: replay the press on a new session once, like a dropped session;
        a second failure is not a passing fault, so the press ends with an error."""
        press = self._streaming_press(failed.streamer)
        if press is None:
            return
        log.error("press %d: streaming failed: %s", press.press_id, failed.reason)
        press.stream_failures += 1
        if press.stream_failures > 1:
            self._fail_press(press, None, f"streaming failed: {failed.reason}")
            return
        session = press.session
        self._session_failed(
            press,
            SessionClosed(
                code=None,
                reason=f"streaming failed: {failed.reason}",
                before_begin=False,
                policy=protocol.policy_for(None),
            ),
        )
        if session is not None:
            session.close(0)

    def _force_endpoint_sent(self, press: Press, streamer: Streamer) -> None:
        """The press's audio and ForceEndpoint are on the wire: wait (bounded) for its final."""
        log.debug(
            "press %d: ForceEndpoint sent on %s after %d samples",
            press.press_id,
            press.session.name if press.session else "?",
            streamer.samples_sent,
        )
        press.lost_samples += streamer.lost_samples
        press.audio_ms = (streamer.end - press.start_pos) * 1000 / self.s.sample_rate
        press.fe_sent_at = streamer.force_endpoint_at
        # the short wait is for a press with nothing pending: nothing said, or every word shown
        # already in a final (the server ended the turn on silence before the release); a
        # replayed press may never have had the chance to show its words: it gets the full wait
        # (a final later than the short wait is still delivered: _late_final)
        nothing_pending = not press.heard_speech or (press.finals > 0 and not press.last_partial)
        sure_empty = nothing_pending and press.attempts <= 1 and press.replay_pos is None
        wait = self.s.empty_final_timeout_s if sure_empty else self.s.final_timeout_s
        press.deadline = self._clock() + wait  # still FINALIZING: now waiting for the final

    def _on_final(self, press: Press | None, session: Session, final: FinalTurn) -> None:
        turn = final.turn
        if press is None or press.session is not session:
            log.info(
                "dropping a final that belongs to no live press (turn %d on %s)",
                turn.turn_order,
                getattr(session, "name", "?"),
            )
            return
        streamer = press.streamer
        if (
            press.phase is PressPhase.FINALIZING
            and press.fe_sent_at is None
            and streamer is not None
            and streamer.force_endpoint_at
        ):
            # The server answered the ForceEndpoint before the streamer's StreamDone reached this
            # queue (the streamer marks it before sending, so the mark is there by now): this is
            # the press's last final, not a turn the server ended on silence mid-press.
            self._force_endpoint_sent(press, streamer)
        last = press.phase is PressPhase.FINALIZING and press.fe_sent_at is not None
        if turn.transcript:
            event = self._final_event(press, session, turn)
            self.last_final = event
            if last and self._emit_confirmed is not None:
                press.move(PressPhase.DELIVERING, self._clock() + FINAL_OUT_WAIT_S)
                self._emit_confirmed(event, lambda: self.post(_FinalOut(press)))
            else:
                self._emit(event)
            press.finals += 1
        press.last_partial = ""
        last_word_end = max((w.end for w in turn.words), default=None)
        if last_word_end is not None:
            ring_pos = press.start_pos + int(
                (last_word_end - press.stream_base_ms) * self.s.sample_rate / 1000
            )
            # a word time beyond the audio sent is the server's nonsense: never past the end
            source_end = press.audio.end if press.audio is not None else self.ring.end
            ring_pos = min(
                ring_pos, source_end if press.end_pos is None else min(press.end_pos, source_end)
            )
            press.replay_pos = max(press.replay_pos or press.start_pos, ring_pos)
        if last and press.phase is PressPhase.FINALIZING:
            self._end(press, Outcome.FINAL if press.finals else Outcome.SILENT, terminate=True)
            self._refresh_state()

    def _late_final(self, press: Press, session: Session, final: FinalTurn) -> bool:
        """A final for a press that ended because its wait ran out with no words pending, from
        its own session, within ``final_timeout_s`` of that end, while that session is only
        ending or kept warm (not abandoned, not serving a later press): the server was slower
        than the short wait. It is the press's answer after all, so it is delivered (once)."""
        if (
            not press.waited_out
            or press.session is not session
            or not final.turn.transcript
            or (session not in self._closing and session is not self._warm)  # given up
            or self._clock() > press.ended_at + self.s.final_timeout_s
        ):
            return False
        log.warning(
            "press %d: final arrived after its wait ended; delivering it late", press.press_id
        )
        press.late_final()
        self.last_final = self._final_event(press, session, final.turn)
        self._emit(self.last_final)
        press.finals += 1
        press.last_partial = ""
        return True

    def _final_event(self, press: Press, session: Session, turn: Turn) -> dict:
        latency = 0 if press.released_at is None else (time.monotonic() - press.released_at) * 1000
        if _restored(press) and isinstance(press.spool.meta.get("released_at"), (int, float)):
            latency = max(0.0, (time.time() - press.spool.meta["released_at"]) * 1000)
        extra = {}
        if press.lost_samples:
            extra["gap_ms"] = int(press.lost_samples * 1000 / self.s.sample_rate)
        if press.late:
            extra["late"] = True
            if press.pressed_wall is not None:
                extra["pressed_at"] = round(press.pressed_wall, 3)
        if press.engine == "local":
            extra["engine"] = "local"
        if turn.language_code and isinstance(turn.language_code, str):
            extra["language_code"] = turn.language_code
        return events.final_event(
            turn.transcript,
            turn.turn_order,
            session.id or "",
            press.press_id,
            self._audio_ms(press),
            latency,
            ts=time.time(),
            **extra,
        )

    def _audio_ms(self, press: Press) -> int:
        if press.audio_ms:
            return int(round(press.audio_ms))
        return int((self.ring.end - press.start_pos) * 1000 / self.s.sample_rate)

    def _on_closed(self, press: Press | None, session: Session, closed: SessionClosed) -> None:
        self._closing.discard(session)
        if session is self._warm:
            self._warm, self._warm_until = None, None
        if closed.before_begin and not closed.local:  # the service never let it in
            if closed.policy.kind == "rate_limited":
                self._budget.refused(session)
            else:
                self._budget.not_admitted(session)
        if press is None or press.session is not session or closed.local:
            return
        if press.phase is PressPhase.DELIVERING:  # its last final is already out
            self._end(press, Outcome.FINAL, terminate=False)
        elif (
            closed.policy.kind == "normal"
            and press.fe_sent_at is not None
            and not press.last_partial
        ):  # ended cleanly after ForceEndpoint, nothing said
            self._end(press, Outcome.FINAL if press.finals else Outcome.SILENT, terminate=False)
        else:
            self._session_failed(press, closed)
        self._refresh_state()

    def _session_failed(self, press: Press, closed: SessionClosed) -> None:
        """The press's session is gone before its final: replay it, wait for the network, or
        (not retryable, or out of attempts) end it with an error."""
        policy = closed.policy
        if press.streamer is not None:
            press.streamer.stop(0.5)
            press.streamer = None
        press.session = None
        press.fe_sent_at = None
        if policy.kind in ("auth", "config"):
            # the key, or the configuration (a URL, an HTTP 400/404 at the upgrade): retrying
            # or falling back cannot help; after a 1008 only a new press tries again
            self._auth_blocked = True
            self._fail_press(press, closed.code, closed.describe(), bug=policy.bug)
            self._set_state(State.ERROR, policy.message)
            return
        if self._fall_back(press, closed):
            return
        offline = policy.kind == "transport" and closed.before_begin
        if offline:
            self._net_down = closed.reason or "cannot reach the server"
            press.late = True
        elif not policy.retry or press.attempts >= self.s.max_connect_attempts:
            self._fail_press(press, closed.code, closed.describe(), bug=policy.bug)
            self._refresh_state()
            return
        delay = policy.delay(press.attempts - 1, self._rng)
        if policy.kind == "rate_limited" and self._budgeted(press):
            # the window's oldest session leaving it is when one more may fit (budget.py)
            delay = self._budget.wait_s() or delay
        self._report_error(closed, delay)
        press.move(PressPhase.WAITING, self._clock() + delay)
        self._refresh_state()

    def _fall_back(self, press: Press, closed: SessionClosed) -> bool:
        """[stt] fallback = "local": the cloud is unreachable or refuses (not 1008) -> go local."""
        if (
            not self.s.fallback
            or press.engine == "local"
            or closed.policy.kind not in ("transport", "server", "rate_limited", "idle")
        ):
            return False
        press.engine = "local"
        self._cloud_retry_at = self._clock() + self.s.fallback_retry_s
        self._emit(
            events.error_event(
                closed.code,
                f"{closed.describe()}; using the local engine for {self.s.fallback_retry_s:g} s",
                0.0,
            )
        )
        press.move(PressPhase.WAITING, self._clock())
        self._refresh_state()
        return True

    def _report_error(self, closed: SessionClosed, retry_in: float | None) -> None:
        """An error that does not end a press (a retry follows)."""
        message = closed.describe()
        if closed.policy.bug:
            log.error("server reported a pttd bug: %s", message)
        self._emit(events.error_event(closed.code, message, retry_in))

    def _fail_press(
        self, press: Press, code: int | None, message: str, *, bug: bool = False
    ) -> None:
        """End a press with the one error event that says why (it carries the press's id)."""
        if press.ended:
            return
        if bug:
            log.error("server reported a pttd bug: %s", message)
        log.warning("press %d ended with an error: %s", press.press_id, message)
        self._emit(events.error_event(code, message, None, press_id=press.press_id))
        self._end(press, Outcome.ERROR, terminate=True)

    def _end(self, press: Press, outcome: Outcome, *, terminate: bool) -> None:
        """The one way a press ends: stop its streamer, let its session go, send the next."""
        if press.ended:
            return
        streamer, session = press.streamer, press.session
        press.end(outcome, self._clock())
        log.debug("press %d ended: %s", press.press_id, outcome.value)
        if press.spool is not None and outcome is not Outcome.SPOOLED:
            self._spool.remove(press.spool)  # (after its write, if that is still queued)
            press.audio = None
        if streamer is not None:
            streamer.stop(0.5)
        if session is not None:
            self._release_session(press, session, terminate)
        self._drain_queue()

    def _drain_queue(self) -> None:
        """Queued presses go out one at a time, oldest first, so they are delivered in order.

        While the network is down one press in flight probes it (backing off between tries); if
        that press ends some other way (dropped, failed), the oldest queued one takes its place,
        or the queue would wait for a Begin nobody asks for. (Not re-entered: a press that ends
        while being opened, e.g. its spool file is damaged, makes the loop try the next one.)"""
        if self._stopping is not None:
            return
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            while True:
                self._drain_again = False
                live = self._live()
                if any(not p.queued for p in live):
                    return
                if live:
                    self._open_session(live[0])
                if not self._drain_again:
                    return
        finally:
            self._draining = False

    def _release_session(self, press: Press, session: Session, terminate: bool) -> None:
        """After a press: keep its session open for the next one (``keep_warm_s``, or as long
        as the new-session budget needs: a session is billed while open), or end it."""
        warm_s = self.s.keep_warm_s
        if self._budgeted(press) and terminate:
            warm_s = max(warm_s, self._budget.warm_s())
        keep = (
            terminate
            and press.outcome in (Outcome.FINAL, Outcome.SILENT)
            and warm_s > 0
            and session.is_open
            and self._stopping is None
            and self._warm is None
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
            self._warm, self._warm_until = session, self._clock() + warm_s
        elif terminate and session.is_open:
            self._closing.add(session)
            session.terminate_async()
        else:
            session.close(0)

    # --- mic status --------------------------------------------------------------------------------

    def _on_source(self, status: SourceStatus) -> None:
        if status.kind == "offline":
            self._mic_offline = status.message
            self._emit(events.error_event(None, status.message, None))
        elif status.kind == "online":
            self._mic_offline = None
        self._refresh_state()

    # --- deadlines -----------------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        """How long the loop may sleep; None (until the next item) when nothing is in flight.

        A press in flight is checked at least once a second (its audio may need copying out of
        the ring, see ``_keep_waiting_audio``); an idle daemon has no timed work, so it does not
        wake at all (24/7 on a small board, every wake-up costs).
        """
        if self._stopping is not None:
            return 0.05
        live = self._live()
        times = [p.deadline for p in live if p.deadline is not None]
        if self._warm_until is not None:
            times.append(self._warm_until)
        if not times:
            return 1.0 if live else None
        return max(0.0, min(min(times) - self._clock(), 1.0))

    def _check_deadlines(self) -> None:
        now = self._clock()
        for press in self._live():
            if press.deadline is not None and now >= press.deadline and not press.ended:
                self._overstayed(press)
        if self._warm_until is not None and now >= self._warm_until:
            warm, self._warm, self._warm_until = self._warm, None, None
            if warm is not None:
                self._closing.add(warm)
                warm.terminate_async()
        self._expire_spooled()
        self._keep_waiting_audio()
        self._drain_queue()
        self._recent.extend(p for p in self._presses if p.ended)
        self._presses = [p for p in self._presses if not p.ended]
        self._refresh_state()

    def _overstayed(self, press: Press) -> None:
        """A press's phase deadline passed: act, so that no press outlives its bounds."""
        phase = press.phase
        if phase is PressPhase.WAITING:
            self._retry(press)
        elif phase is PressPhase.CONNECTING:
            session, press.session = press.session, None
            if session is not None:
                session.close(0)
            self._fail_press(
                press, None, f"no session within {self.s.connect_deadline_s:g} s of asking for one"
            )
        elif phase is PressPhase.STREAMING:
            log.warning(
                "press %d held for %g s: releasing it (a stuck button?)",
                press.press_id,
                self.s.max_press_s,
            )
            self._release(press, time.monotonic())
        elif phase is PressPhase.FINALIZING and press.fe_sent_at is not None:
            self._final_overdue(press)
        elif phase is PressPhase.FINALIZING:
            self._fail_press(press, None, "the press's audio could not be sent in time")
        elif phase is PressPhase.DELIVERING:
            log.debug(
                "press %d: final not out in %g s (a slow output, e.g. typing); "
                "ending the press anyway",
                press.press_id,
                FINAL_OUT_WAIT_S,
            )
            self._end(press, Outcome.FINAL, terminate=True)

    def _keep_waiting_audio(self) -> None:
        """Copy the audio of released presses that wait for the network out of the ring, and
        (with a spool) write it to disk: a press is spooled the first time this runs after it
        is WAITING, released and its audio (post-roll included, plus one chunk) is in the ring.
        Once its file is written its audio leaves memory (it is read back to be sent).

        Audio held in memory is bounded by ``offline_queue_s`` in all: the oldest waiting press
        is dropped past it (with a spool, only presses whose file is not written yet count).
        """
        from pttd.audio.ring import snapshot

        waiting = [
            p for p in self._live() if p.phase is PressPhase.WAITING and p.end_pos is not None
        ]
        for press in waiting:
            if (
                press.audio is None
                and press.spool is None
                and self.ring.end >= press.end_pos + self._chunk()
            ):
                start = press.replay_pos if press.replay_pos is not None else press.start_pos
                press.audio = snapshot(self.ring, start, press.end_pos + self._chunk())
                press.lost_samples += press.audio.start - start
                self._spool_press(press)
            elif (
                press.audio is not None
                and press.spool is not None
                and press.spool.state == "written"
            ):
                press.audio = None
        waiting = [p for p in waiting if not p.ended]
        limit = int(self.s.offline_queue_s * self.s.sample_rate)
        kept = [p for p in waiting if p.audio is not None]
        while kept and sum(p.audio.samples for p in kept) > limit:
            oldest = kept.pop(0)
            self._fail_press(
                oldest,
                None,
                f"press {oldest.press_id} dropped: more than "
                f"{self.s.offline_queue_s:g} s of audio waiting for the network",
            )

    def _chunk(self) -> int:
        return protocol.frame_samples(self.s.chunk_ms, self.s.sample_rate)

    def _final_overdue(self, press: Press) -> None:
        """No end-of-turn in time after ForceEndpoint: replay if words are at stake, else end."""
        session = press.session
        error = session.pending_error if session is not None else None
        unfinished_words = bool(press.last_partial) and not press.overdue_replayed
        if session is None or (error is None and not unfinished_words):
            if press.last_partial:
                self._fail_press(
                    press,
                    None,
                    "no end-of-turn after ForceEndpoint, on two "
                    f"sessions; the turn's words were: {press.last_partial}",
                )
                return
            log.info("press %d: no end-of-turn after ForceEndpoint; finishing", press.press_id)
            press.waited_out = True
            self._end(press, Outcome.FINAL if press.finals else Outcome.SILENT, terminate=True)
            return
        press.overdue_replayed = press.overdue_replayed or error is None
        code = error.code if error else None
        reason = error.message if error else "no end-of-turn after ForceEndpoint"
        log.info("press %d: %s; replaying on a new session", press.press_id, reason)
        closed = SessionClosed(
            code=code, reason=reason, before_begin=False, policy=protocol.policy_for(code, reason)
        )
        self._session_failed(press, closed)
        session.close(0)

    def _retry(self, press: Press) -> None:
        press.deadline = None
        oldest = press.replay_pos if press.replay_pos is not None else press.start_pos
        if press.audio is not None or press.spool is not None:
            self._open_session(press)
            return
        if press.end_pos is not None and press.end_pos <= self.ring.start:
            self._fail_press(
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
        self._open_session(press)

    # --- the spool (spool.py) -------------------------------------------------------------------------

    def _spool_press(self, press: Press) -> None:
        """Queue the file of a waiting press whose audio is complete (``press.audio``); the spool
        thread writes it and says so (``SpoolDone``). Room is made by dropping the oldest
        spooled presses that have not started sending; a press that cannot fit stays in memory."""
        if self._spool is None or press.spool is not None or press.audio is None:
            return
        audio = press.audio
        pcm = audio.read(audio.start, audio.samples).data
        size = self._spool.file_size(len(pcm) // 2)
        if size > self._spool.max_bytes or not self._make_room(size):
            log.warning(
                "press %d: %.1f s of audio does not fit in the spool (max %g MB): it "
                "waits in memory only",
                press.press_id,
                len(pcm) / 2 / self.s.sample_rate,
                self._spool.max_bytes / 1048576,
            )
            return
        now_wall, now_mono = time.time(), time.monotonic()
        released = press.released_at if press.released_at is not None else now_mono
        meta = {
            "press_id": press.press_id,
            "pressed_at": press.pressed_wall,
            "released_at": now_wall - (now_mono - released),
            "spooled_at": now_wall,
            "sample_rate": self.s.sample_rate,
            "audio_start": audio.start,
            "start_pos": press.start_pos,
            "end_pos": press.end_pos,
            "replay_pos": press.replay_pos,
            "lost_samples": press.lost_samples,
            "engine": press.engine,
            "attempts": press.attempts,
            "why": self._net_down or "waiting for an earlier press or a retry",
        }
        press.spool = self._spool.add(meta, pcm, self._spool_written)

    def _spool_written(self, entry, error: str | None) -> None:
        """On the spool thread: hand the result to this thread (never refused: the spool's own
        queue bounds how many there can be)."""
        self._q.put_marker(SpoolDone(entry, error))

    def _make_room(self, size: int) -> bool:
        """Drop the oldest spooled presses not yet sending until ``size`` more bytes fit."""
        spooled = [p for p in self._live() if p.spool is not None]
        kept = [p for p in self._presses if p.outcome is Outcome.SPOOLED]  # (pttd is stopping)
        total = sum(p.spool.size for p in spooled + kept)
        candidates = [p for p in spooled if p.phase in (PressPhase.WAITING, PressPhase.CONNECTING)]
        while total + size > self._spool.max_bytes and candidates:
            oldest = candidates.pop(0)
            total -= oldest.spool.size
            self._fail_press(
                oldest,
                None,
                f"press {oldest.press_id} dropped: the spool holds at "
                f"most {self._spool.max_bytes / 1048576:g} MB of presses waiting for "
                f"the network (spool.max_mb); {self._spool.dir / oldest.spool.name} "
                "removed",
            )
        return total + size <= self._spool.max_bytes

    def _on_spool_done(self, done: SpoolDone) -> None:
        press = next((p for p in self._presses if p.spool is done.entry), None)
        if done.error is not None:
            done.entry.state = "failed"
            if press is not None and not press.ended:
                press.spool = None  # its audio is still in memory: it waits there
                self._emit(
                    events.error_event(
                        None,
                        f"press {press.press_id}: cannot write it to "
                        f"the spool ({done.error}); it waits in memory "
                        "only",
                        None,
                    )
                )
                if self._stopping is not None and press.phase is PressPhase.WAITING:
                    self._fail_press(press, None, "pttd stopped before this press could be sent")
            return
        done.entry.state = "written"
        if press is None or press.ended:
            return  # (its removal is queued after the write)
        if self._stopping is not None and press.phase is PressPhase.WAITING:
            self._end(press, Outcome.SPOOLED, terminate=False)

    def _load_spooled(self, press: Press) -> bool:
        """Read a spooled press's audio back to send it; a file too old, recorded at another
        rate, gone or damaged ends the press with an error (False)."""
        from pttd.audio.ring import Snapshot
        from pttd.core.spool import SpoolError, age_s

        entry = press.spool
        try:
            if self._spool.max_age_s and age_s(entry.meta) > self._spool.max_age_s:
                raise SpoolError(self._too_old(press))
            if entry.meta.get("sample_rate") != self.s.sample_rate:
                raise SpoolError(
                    f"recorded at {entry.meta.get('sample_rate')} Hz, and "
                    f"audio.sample_rate is now {self.s.sample_rate}"
                )
            pcm = self._spool.read(entry)
        except SpoolError as exc:
            message = str(exc)
            if not message.startswith("press "):
                message = f"press {press.press_id} dropped: {message}"
            self._fail_press(press, None, message)
            return False
        press.audio = Snapshot(int(entry.meta["audio_start"]), pcm, self.s.sample_rate)
        return True

    def _too_old(self, press: Press) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(press.pressed_wall or 0))
        return (
            f"press {press.press_id} dropped: it waited more than "
            f"{self._spool.max_age_s / 3600:g} h for the network (spool.max_age_h; "
            f"pressed at {when})"
        )

    def _expire_spooled(self) -> None:
        """Spooled presses waiting past ``max_age_h`` end with an error (oldest first; none is
        opened while they go)."""
        if self._spool is None or not self._spool.max_age_s:
            return
        from pttd.core.spool import age_s

        now = time.time()
        old = [
            p
            for p in self._live()
            if p.spool is not None
            and p.phase is PressPhase.WAITING
            and age_s(p.spool.meta, now) > self._spool.max_age_s
        ]
        if not old:
            return
        draining, self._draining = self._draining, True
        try:
            for press in old:
                self._fail_press(press, None, self._too_old(press))
        finally:
            self._draining = draining

    def _carry_over(self, press: Press) -> bool:
        """pttd is stopping with this press not yet sent: leave it in the spool for the next
        run. A press still held, or whose post-roll is not captured yet, is cut at the audio
        there is (as a stop does to a streaming press). False: it cannot be kept."""
        from pttd.audio.ring import snapshot

        if self._spool is None or press.finals:
            return False
        if press.phase is PressPhase.CONNECTING:
            session, press.session = press.session, None
            if session is not None:
                session.close(0)
            press.move(PressPhase.WAITING)
        if press.spool is None:
            if press.audio is None:
                start = press.replay_pos if press.replay_pos is not None else press.start_pos
                end = self.ring.end if press.end_pos is None else min(press.end_pos, self.ring.end)
                if end <= max(start, self.ring.start):
                    return False
                press.released_at = press.released_at or time.monotonic()
                press.end_pos = end
                press.audio = snapshot(self.ring, start, end + self._chunk())
                press.lost_samples += press.audio.start - start
            self._spool_press(press)
            if press.spool is None:
                return False
        if press.spool.state == "written":
            self._end(press, Outcome.SPOOLED, terminate=False)
        return True  # a write still queued: it ends when the spool says it is on disk

    def _publish_waiting(self) -> None:
        """``status``: the presses waiting for the network (released, not sending yet), their
        audio in seconds, and how many of them are on disk."""
        n, samples, on_disk = 0, 0, 0
        for p in self._presses:
            if p.ended or p.end_pos is None:
                continue
            if p.phase is PressPhase.WAITING or (
                p.phase is PressPhase.CONNECTING and (p.late or p.spool is not None)
            ):
                n += 1
                start = p.replay_pos if p.replay_pos is not None else p.start_pos
                samples += max(0, p.end_pos - start)
                on_disk += p.spool is not None and p.spool.state == "written"
        waiting = {
            "waiting": n,
            "waiting_s": round(samples / self.s.sample_rate, 1),
            "spooled": on_disk,
        }
        if waiting != self.waiting:
            self.waiting = waiting
        budget = self._budget.snapshot()
        if budget != self.budget:
            self.budget = budget

    # --- state -------------------------------------------------------------------------------------

    def _refresh_state(self) -> None:
        self._publish_waiting()
        if self._stopping is not None:
            return
        live = self._live()
        if self._mic_offline:
            self._set_state(State.OFFLINE, self._mic_offline)
        elif self._net_down:
            self._set_state(State.OFFLINE, f"server unreachable: {self._net_down}")
        elif not live:
            if self.state is not State.ERROR or not self._auth_blocked:
                self._set_state(State.IDLE, "")
        else:
            newest = live[-1]
            if newest.released or newest.phase in (PressPhase.FINALIZING, PressPhase.DELIVERING):
                self._set_state(State.FINALIZING, "")
            elif newest.phase is PressPhase.STREAMING:
                self._set_state(State.LISTENING, "")
            else:
                retrying = newest.phase is PressPhase.WAITING and newest.deadline is not None
                self._set_state(State.CONNECTING, "retrying" if retrying else "")

    def _set_state(self, state: State, detail: str) -> None:
        if state is self.state and detail == self.state_detail:
            return
        self.state, self.state_detail = state, detail
        self._emit(events.state_event(state))
        if self._on_state is not None:
            self._on_state(state, detail)

    # --- stopping ------------------------------------------------------------------------------------

    def _begin_stop(self, stop: _Stop) -> None:
        self._stopping = stop
        for press in self._live():
            if press.phase is PressPhase.STREAMING:
                press.released_at = press.released_at or time.monotonic()
                press.end_pos = press.streamer.finish(self.ring.end)  # skip the post-roll
                press.move(PressPhase.FINALIZING, self._send_deadline(press))
            elif press.phase in (PressPhase.WAITING, PressPhase.CONNECTING):
                if not self._carry_over(press):
                    self._fail_press(press, None, "pttd stopped before this press could be sent")

    def _stop_complete(self) -> bool:
        return not self._live() or time.monotonic() >= self._stopping.deadline - 1.0

    def _shutdown_sessions(self) -> None:
        for press in self._live():
            written = press.spool is not None and press.spool.state == "written"
            if written and not press.finals and press.phase is not PressPhase.DELIVERING:
                self._end(press, Outcome.SPOOLED, terminate=False)  # sent again next run
            else:
                self._fail_press(press, None, "pttd stopped before this press's final arrived")
        sessions = set(self._closing)
        if self._warm is not None:
            sessions.add(self._warm)
        for session in sessions:
            session.terminate_async()
        deadline = min(self._stopping.deadline, time.monotonic() + 1.0)
        for session in sessions:
            session.wait_closed(deadline - time.monotonic())
        for session in sessions:
            session.close(0.2)  # shuts the socket first, so the joins are quick
        if self._spool is not None:  # the queued writes and removals, within the stop's time
            self._spool.close(max(0.2, self._stopping.deadline - time.monotonic()))
        self._publish_waiting()
