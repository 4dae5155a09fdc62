"""The one thread that owns pttd's state: presses, sessions, turns, and what the user is told.

Everything else (button, control socket, session threads, streamers, the capture source) only
puts items on this controller's bounded queue. Each press gets its own streamer and, unless a
warm session is idle, its own session, so a press while the previous turn is finalizing starts
a new turn without touching the old one. A press whose session fails before its final is
replayed from the ring buffer on a new session, from just after the last word already delivered.
"""
from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import events, protocol
from .events import State
from .mailbox import Mailbox
from .protocol import Begin, FinalTurn, Turn
from .session import Session, SessionClosed
from .streamer import StreamDone, StreamFailed, Streamer

log = logging.getLogger(__name__)

QUEUE_BOUND = 1024
# A warm session is not kept when it would expire (Begin.expires_at, close code 3008) within
# its keep-warm time plus this margin: the next press gets a fresh session instead.
EXPIRY_MARGIN_S = 60.0
# A press ends (streamer stopped, Terminate, idle state, LEDs) once the outputs' threads have
# its last final, or after this long: ending it at once woke several threads just as the final's
# output thread needed the interpreter, and the final waited behind them (bench/RESULTS.md).
FINAL_OUT_WAIT_S = 0.05


def _lifetime_left(session: Session) -> float:
    expires = session.begin.expires_at if session.begin is not None else None
    return float("inf") if expires is None else expires - time.time()


# --- queue items ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str            # press | release | toggle | cancel
    source: str = "control"
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SessionEvent:
    session: Session
    event: object


@dataclass(frozen=True)
class SourceStatus:
    kind: str            # online | offline | xrun
    message: str


@dataclass(frozen=True)
class _Stop:
    deadline: float


@dataclass(frozen=True)
class _FinalOut:
    """The outputs' threads have delivered a press's last final (posted by their last one)."""
    press: "Press"


@dataclass(frozen=True)
class Settings:
    """What the controller needs from the config (plain values, so tests can build it)."""

    sample_rate: int = 16000
    chunk_ms: int = 50
    preroll_ms: int = 500
    postroll_ms: int = 300
    keep_warm_s: float = 0.0
    button_mode: str = "hold"
    final_timeout_s: float = 10.0      # ForceEndpoint -> end-of-turn Turn, bounded
    empty_final_timeout_s: float = 2.0  # the same, when no speech was heard in the press
    max_connect_attempts: int = 8
    fallback: bool = False             # [stt] fallback = "local"
    fallback_retry_s: float = 30.0     # after a cloud failure, presses use the local engine this long
    # presses waiting for the network keep their audio outside the ring buffer, up to this
    # much in all; past it the oldest waiting press is dropped (reported as an error event)
    offline_queue_s: float = 60.0


# --- per-press bookkeeping -----------------------------------------------------------------------

@dataclass
class Press:
    press_id: int
    start_pos: int
    pressed_at: float
    released_at: float | None = None
    end_pos: int | None = None           # requested end (release + post-roll)
    session: Session | None = None
    streamer: Streamer | None = None
    stream_base_ms: float = 0.0          # session stream time at this press's first sample
    replay_pos: int | None = None        # ring position to resume from after a failure
    attempts: int = 0
    retry_at: float | None = None
    fe_sent_at: float | None = None
    final_deadline: float | None = None
    heard_speech: bool = False
    last_partial: str = ""               # text of the turn in progress ("" once finalized)
    overdue_replayed: bool = False
    audio: object = None                 # a ring.Snapshot once the press waits offline
    finals: int = 0
    cancelled: bool = False
    engine: str = "cloud"                # "cloud" or "local" (the offline engine)
    queued: bool = False                 # waiting for the network / an earlier press
    late: bool = False                   # delivered after the network came back
    done: bool = False
    ending_by: float | None = None       # last final handed out; ends when it is out, or then
    lost_samples: int = 0
    audio_ms: float = 0.0

    @property
    def released(self) -> bool:
        return self.released_at is not None


class Controller:
    """Runs on its own thread; the public methods are safe to call from any thread."""

    def __init__(self, *, ring, settings: Settings, session_factory: Callable[..., Session],
                 emit: Callable[[dict], None], on_state: Callable[[State, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 emit_confirmed: Callable[[dict, Callable[[], None]], None] | None = None):
        """``emit_confirmed(event, on_delivered)`` (optional; ``Outputs.emit``) emits like
        ``emit`` and calls ``on_delivered`` once the outputs have the event: a press's last
        final is emitted so, and the press ends when it is out (``FINAL_OUT_WAIT_S``)."""
        self.ring = ring
        self.s = settings
        self._new_session = session_factory
        self._emit = emit
        self._emit_confirmed = emit_confirmed
        self._on_state = on_state
        self._clock = clock
        self._rng = rng or random.Random()
        self._q = Mailbox(QUEUE_BOUND)
        self._thread = threading.Thread(target=self._main, name="controller", daemon=True)
        self._presses: list[Press] = []
        # finished presses whose sessions may still deliver a late final (bounded)
        self._recent: collections.deque[Press] = collections.deque(maxlen=32)
        self._press_counter = 0
        self._warm: Session | None = None
        self._closing: set[Session] = set()
        self._warm_until: float | None = None
        self._auth_blocked = False
        self._mic_offline: str | None = None
        self._net_down: str | None = None     # why the server cannot be reached, while so
        self._cloud_retry_at: float | None = None  # fallback: use the local engine until then
        self._toggled_on = False
        self._stopping: _Stop | None = None
        self.state = State.IDLE
        self.state_detail = ""
        self.last_final: dict | None = None
        self.dropped_items = 0

    # --- thread-safe entry points ----------------------------------------------------------------

    def start(self) -> None:
        self._emit(events.state_event(self.state))
        self._thread.start()

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
            return {"ok": True, "state": self.state.value, "detail": self.state_detail,
                    "last_final": self.last_final,
                    "audio_ms": int(self.ring.end * 1000 // self.s.sample_rate)}
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
        while True:
            timeout = self._next_deadline()
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(item)
                self._check_deadlines()
            except Exception:
                log.exception("controller error (carrying on)")
            if self._stopping is not None and self._stop_complete():
                self._shutdown_sessions()
                return

    def _handle(self, item: object) -> None:
        if isinstance(item, Command):
            self._on_command(item)
        elif isinstance(item, SessionEvent):
            self._on_session(item.session, item.event)
        elif isinstance(item, StreamDone):
            self._on_stream_done(item)
        elif isinstance(item, StreamFailed):
            log.error("streaming failed: %s", item.reason)
        elif isinstance(item, SourceStatus):
            self._on_source(item)
        elif isinstance(item, _FinalOut):
            self._end_press(item.press)
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
            name = "release" if self._active() and not self._active().released else "press"
        if name == "press":
            self._press(cmd.at)
        elif name == "release":
            self._release(cmd.at)
        elif name == "cancel":
            self._cancel()

    def _active(self) -> Press | None:
        """The newest press that is not yet released (at most one)."""
        for p in reversed(self._presses):
            if not p.released and not p.done:
                return p
        return None

    def _press(self, at: float) -> None:
        if self._active() is not None:
            return  # already held: a second press is a bounce or a duplicate
        preroll = self.s.preroll_ms * self.s.sample_rate // 1000
        start = max(self.ring.start, self.ring.position_at(at) - preroll)
        previous = self._presses[-1] if self._presses else None
        if previous is not None and previous.end_pos is not None:
            start = max(start, previous.streamer.end if previous.streamer and previous.streamer.end
                        else previous.end_pos)
        self._press_counter += 1
        press = Press(self._press_counter, start, at)
        waiting = [p for p in self._presses if not p.done and (p.queued or p.retry_at)]
        self._presses.append(press)
        self._auth_blocked = False  # an explicit press earns one more try after a 1008
        if self._net_down or waiting:
            press.queued = press.late = True  # captured now, sent in order when it can be
        else:
            self._open_session(press)
        self._refresh_state()

    def _release(self, at: float) -> None:
        press = self._active()
        if press is None:
            return
        press.released_at = at
        postroll = self.s.postroll_ms * self.s.sample_rate // 1000
        press.end_pos = self.ring.position_at(at) + postroll
        if press.streamer is not None:
            press.streamer.finish(press.end_pos)
        self._refresh_state()

    def _cancel(self) -> None:
        live = [p for p in self._presses if not p.done]
        for press in live:
            press.cancelled = True
        for press in live:
            self._finish_press(press, terminate=True)
        self._refresh_state()

    # --- sessions --------------------------------------------------------------------------------

    def _open_session(self, press: Press) -> None:
        if self._warm is not None and self._warm.is_open:
            session, self._warm, self._warm_until = self._warm, None, None
            press.session = session
            press.stream_base_ms = protocol.frame_ms(session.audio_bytes_sent, self.s.sample_rate)
            self._start_streaming(press)
            return
        press.attempts += 1
        press.retry_at = None
        log.debug("press %d: opening session (attempt %d)", press.press_id, press.attempts)
        if (self.s.fallback and self._cloud_retry_at is not None
                and self._clock() < self._cloud_retry_at):
            press.engine = "local"
        session = self._new_session(on_event=self.on_session_event, engine=press.engine)
        press.session = session
        session.start()

    def _press_of(self, session: Session) -> Press | None:
        for p in self._presses:
            if p.session is session:
                return p
        for p in self._recent:
            if p.session is session:
                return p
        return None

    def _on_session(self, session: Session, event: object) -> None:
        press = self._press_of(session)
        if isinstance(event, Begin):
            self._net_down = None
            if press is not None and not press.done:
                press.stream_base_ms = 0.0
                self._start_streaming(press)
                self._refresh_state()
            elif session is not self._warm:
                session.close(0)
        elif isinstance(event, Turn):
            if press is not None and not press.cancelled and event.text != press.last_partial:
                press.heard_speech = press.heard_speech or bool(event.text)
                press.last_partial = event.text
                if event.text:
                    self._emit(events.partial_event(event.text, event.turn_order, session.id or ""))
        elif isinstance(event, FinalTurn):
            self._on_final(press, session, event)
        elif isinstance(event, SessionClosed):
            self._on_closed(press, session, event)

    def _start_streaming(self, press: Press) -> None:
        start = press.replay_pos if press.replay_pos is not None else press.start_pos
        chunk = self._chunk()
        source = press.audio if press.audio is not None else self.ring
        streamer = Streamer(source, press.session, start, chunk, post=self.post,
                            sample_rate=self.s.sample_rate, name=f"streamer-{press.press_id}")
        press.streamer = streamer
        if press.replay_pos is not None:
            # replayed audio restarts the session's stream clock at the replay point
            press.stream_base_ms -= (start - press.start_pos) * 1000 / self.s.sample_rate
        if press.end_pos is not None:
            streamer.finish(press.end_pos)
        streamer.start()

    def _on_stream_done(self, done: StreamDone) -> None:
        press = next((p for p in self._presses if p.streamer is done.streamer), None)
        if press is None or press.done or press.fe_sent_at is not None:
            return  # (its final overtook this report: _on_final has done the below)
        self._force_endpoint_sent(press, done.streamer)

    def _force_endpoint_sent(self, press: Press, streamer: Streamer) -> None:
        """The press's audio and ForceEndpoint are on the wire: wait (bounded) for its final."""
        log.debug("press %d: ForceEndpoint sent on %s after %d samples", press.press_id,
                  press.session.name if press.session else "?", streamer.samples_sent)
        press.lost_samples += streamer.lost_samples
        press.audio_ms = (streamer.end - press.start_pos) * 1000 / self.s.sample_rate
        press.fe_sent_at = streamer.force_endpoint_at
        # the short wait is for a press with nothing said; a replayed press may never have had
        # the chance to show its words, so it gets the full wait
        sure_empty = not press.heard_speech and press.attempts <= 1 and press.replay_pos is None
        wait = self.s.empty_final_timeout_s if sure_empty else self.s.final_timeout_s
        press.final_deadline = self._clock() + wait

    def _on_final(self, press: Press | None, session: Session, final: FinalTurn) -> None:
        turn = final.turn
        if press is None or press.cancelled:
            log.info("dropping a final of a cancelled or unknown press")
            return
        if press.done:
            log.warning("press %d: final arrived after its wait ended; delivering it late",
                        press.press_id)
        streamer = press.streamer
        if (not press.done and press.fe_sent_at is None and streamer is not None
                and streamer.force_endpoint_at):
            # The server answered the ForceEndpoint before the streamer's StreamDone reached this
            # queue (the streamer marks it before sending, so the mark is there by now): this is
            # the press's last final, not a turn the server ended on silence mid-press.
            self._force_endpoint_sent(press, streamer)
        last = press.fe_sent_at is not None  # the answer to ForceEndpoint: the press ends
        now_wall = time.time()
        latency = 0 if press.released_at is None else (time.monotonic() - press.released_at) * 1000
        extra = {}
        if press.lost_samples:
            extra["gap_ms"] = int(press.lost_samples * 1000 / self.s.sample_rate)
        if press.late:
            extra["late"] = True
        if press.engine == "local":
            extra["engine"] = "local"
        if turn.transcript:
            event = events.final_event(turn.transcript, turn.turn_order, session.id or "",
                                       press.press_id, self._audio_ms(press), latency,
                                       ts=now_wall, **extra)
            self.last_final = event
            if last and self._emit_confirmed is not None and not press.done:
                press.ending_by = self._clock() + FINAL_OUT_WAIT_S
                press.final_deadline = None
                self._emit_confirmed(event, lambda: self.post(_FinalOut(press)))
            else:
                self._emit(event)
            press.finals += 1
        press.last_partial = ""
        last_word_end = max((w.end for w in turn.words), default=None)
        if last_word_end is not None:
            ring_pos = press.start_pos + int((last_word_end - press.stream_base_ms)
                                             * self.s.sample_rate / 1000)
            press.replay_pos = max(press.replay_pos or press.start_pos, ring_pos)
        if last and press.ending_by is None:
            self._end_press(press)

    def _end_press(self, press: Press) -> None:
        """The press's last final is out (or had no words): stop, Terminate, show the new state."""
        self._finish_press(press, terminate=True)
        self._refresh_state()

    def _audio_ms(self, press: Press) -> int:
        if press.audio_ms:
            return int(round(press.audio_ms))
        return int((self.ring.end - press.start_pos) * 1000 / self.s.sample_rate)

    def _on_closed(self, press: Press | None, session: Session, closed: SessionClosed) -> None:
        self._closing.discard(session)
        if session is self._warm:
            self._warm, self._warm_until = None, None
        if press is None or press.done or closed.local:
            return
        if ((closed.policy.kind == "normal" and press.fe_sent_at is not None)
                or press.ending_by is not None):  # its last final is already out
            self._finish_press(press, terminate=False)
            self._refresh_state()
            return
        self._session_failed(press, closed)

    def _session_failed(self, press: Press, closed: SessionClosed) -> None:
        policy = closed.policy
        if press.streamer is not None:
            press.streamer.stop(0.5)
            press.streamer = None
        press.session = None
        press.fe_sent_at = press.final_deadline = None
        if policy.kind == "auth":
            self._auth_blocked = True
            self._report_error(closed, None)
            self._finish_press(press, terminate=False)
            self._set_state(State.ERROR, policy.message)
            return
        if self._fall_back(press, closed):
            return
        offline = policy.kind == "transport" and closed.before_begin
        if offline:
            self._net_down = closed.reason or "cannot reach the server"
            press.late = True
        elif not policy.retry or press.attempts >= self.s.max_connect_attempts:
            self._report_error(closed, None)
            self._finish_press(press, terminate=False)
            self._refresh_state()
            return
        delay = policy.delay(press.attempts - 1, self._rng)
        self._report_error(closed, delay)
        press.retry_at = self._clock() + delay
        self._refresh_state()

    def _fall_back(self, press: Press, closed: SessionClosed) -> bool:
        """[stt] fallback = "local": the cloud is unreachable or refuses (not 1008) -> go local."""
        if (not self.s.fallback or press.engine == "local"
                or closed.policy.kind not in ("transport", "server", "rate_limited", "idle")):
            return False
        press.engine = "local"
        self._cloud_retry_at = self._clock() + self.s.fallback_retry_s
        self._emit(events.error_event(closed.code, f"{closed.describe()}; using the local engine "
                                      f"for {self.s.fallback_retry_s:g} s", 0.0))
        press.retry_at = self._clock()
        self._refresh_state()
        return True

    def _report_error(self, closed: SessionClosed, retry_in: float | None) -> None:
        message = closed.describe()
        if closed.policy.bug:
            log.error("server reported a pttd bug: %s", message)
        self._emit(events.error_event(closed.code, message, retry_in))

    def _finish_press(self, press: Press, *, terminate: bool) -> None:
        if press.done:
            return
        press.done = True
        if press.streamer is not None:
            press.streamer.stop(0.5)
        session = press.session
        if session is not None:
            self._release_session(press, session, terminate)
        self._drain_queue()

    def _drain_queue(self) -> None:
        """Queued presses go out one at a time, oldest first, so they are delivered in order."""
        if self._net_down or self._stopping is not None:
            return
        live = [p for p in self._presses if not p.done]
        if any(not p.queued and (p.session is not None or p.retry_at) for p in live):
            return
        nxt = next((p for p in live if p.queued and not p.cancelled), None)
        if nxt is not None:
            nxt.queued = False
            self._open_session(nxt)

    def _release_session(self, press: Press, session: Session, terminate: bool) -> None:
        keep = (terminate and not press.cancelled and self.s.keep_warm_s > 0 and session.is_open
                and self._stopping is None and self._warm is None
                and _lifetime_left(session) > self.s.keep_warm_s + EXPIRY_MARGIN_S)
        if keep:
            self._warm, self._warm_until = session, self._clock() + self.s.keep_warm_s
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
        times = [p.retry_at for p in self._presses if p.retry_at is not None and not p.done]
        times += [p.final_deadline for p in self._presses if p.final_deadline and not p.done]
        times += [p.ending_by for p in self._presses if p.ending_by and not p.done]
        if self._warm_until is not None:
            times.append(self._warm_until)
        if not times:
            return 1.0 if any(not p.done for p in self._presses) else None
        return max(0.0, min(min(times) - self._clock(), 1.0))

    def _check_deadlines(self) -> None:
        now = self._clock()
        for press in list(self._presses):
            if press.done:
                continue
            if press.ending_by is not None:
                if now >= press.ending_by:
                    log.debug("press %d: final not out in %g s (a slow output, e.g. typing); "
                              "ending the press anyway", press.press_id, FINAL_OUT_WAIT_S)
                    self._finish_press(press, terminate=True)
            elif press.retry_at is not None and now >= press.retry_at:
                self._retry(press)
            elif press.final_deadline is not None and now >= press.final_deadline:
                self._final_overdue(press)
        if self._warm_until is not None and now >= self._warm_until:
            warm, self._warm, self._warm_until = self._warm, None, None
            if warm is not None:
                self._closing.add(warm)
                warm.terminate_async()
        self._keep_waiting_audio()
        self._recent.extend(p for p in self._presses if p.done)
        self._presses = [p for p in self._presses if not p.done]
        self._refresh_state()

    def _keep_waiting_audio(self) -> None:
        """Copy the audio of released presses that wait for the network out of the ring.

        Bounded by ``offline_queue_s`` in all: the oldest waiting press is dropped past it.
        """
        from .ring import snapshot

        waiting = [p for p in self._presses if not p.done and p.session is None
                   and p.end_pos is not None]
        for press in waiting:
            if press.audio is None and self.ring.end >= press.end_pos + self._chunk():
                start = press.replay_pos if press.replay_pos is not None else press.start_pos
                press.audio = snapshot(self.ring, start, press.end_pos + self._chunk())
                press.lost_samples += press.audio.start - start
        limit = int(self.s.offline_queue_s * self.s.sample_rate)
        kept = [p for p in waiting if p.audio is not None]
        while kept and sum(p.audio.samples for p in kept) > limit:
            oldest = kept.pop(0)
            self._emit(events.error_event(None, f"press {oldest.press_id} dropped: more than "
                                          f"{self.s.offline_queue_s:g} s of audio waiting for the network"))
            self._finish_press(oldest, terminate=False)

    def _chunk(self) -> int:
        return self.s.chunk_ms * self.s.sample_rate // 1000

    def _final_overdue(self, press: Press) -> None:
        """No end-of-turn in time after ForceEndpoint: replay if words are at stake, else finish."""
        session = press.session
        error = session.pending_error if session is not None else None
        unfinished_words = bool(press.last_partial) and not press.overdue_replayed
        if session is None or (error is None and not unfinished_words):
            log.info("press %d: no end-of-turn after ForceEndpoint; finishing", press.press_id)
            self._finish_press(press, terminate=True)
            return
        press.overdue_replayed = press.overdue_replayed or error is None
        code = error.code if error else None
        reason = error.message if error else "no end-of-turn after ForceEndpoint"
        log.info("press %d: %s; replaying on a new session", press.press_id, reason)
        press.final_deadline = None
        closed = SessionClosed(code=code, reason=reason, before_begin=False,
                               policy=protocol.policy_for(code, reason))
        self._session_failed(press, closed)
        session.close(0)

    def _retry(self, press: Press) -> None:
        oldest = press.replay_pos if press.replay_pos is not None else press.start_pos
        if press.audio is not None:
            self._open_session(press)
            return
        if press.end_pos is not None and press.end_pos <= self.ring.start:
            self._emit(events.error_event(None, f"press {press.press_id}: its audio was "
                                          "overwritten before the server could be reached "
                                          f"(the ring buffer holds {self.ring.capacity // self.s.sample_rate} s)"))
            press.retry_at = None
            self._finish_press(press, terminate=False)
            return
        if oldest < self.ring.start:
            press.lost_samples += self.ring.start - oldest
            press.replay_pos = self.ring.start
        self._open_session(press)

    # --- state -------------------------------------------------------------------------------------

    def _refresh_state(self) -> None:
        if self._stopping is not None:
            return
        live = [p for p in self._presses if not p.done]
        if self._mic_offline:
            self._set_state(State.OFFLINE, self._mic_offline)
        elif self._net_down:
            self._set_state(State.OFFLINE, f"server unreachable: {self._net_down}")
        elif not live:
            if self.state is not State.ERROR or not self._auth_blocked:
                self._set_state(State.IDLE, "")
        else:
            newest = live[-1]
            if newest.released:
                self._set_state(State.FINALIZING, "")
            elif newest.streamer is None:
                self._set_state(State.CONNECTING, "retrying" if newest.retry_at else "")
            else:
                self._set_state(State.LISTENING, "")

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
        for press in self._presses:
            if press.done:
                continue
            if press.streamer is not None and press.end_pos is None:
                press.released_at = press.released_at or time.monotonic()
                press.end_pos = self.ring.end  # skip the post-roll
                press.streamer.finish(press.end_pos)
            elif press.streamer is None:
                self._finish_press(press, terminate=False)

    def _stop_complete(self) -> bool:
        pending = [p for p in self._presses if not p.done]
        return not pending or time.monotonic() >= self._stopping.deadline - 1.0

    def _shutdown_sessions(self) -> None:
        sessions = {p.session for p in self._presses if p.session is not None} | self._closing
        if self._warm is not None:
            sessions.add(self._warm)
        for press in self._presses:
            if press.streamer is not None:
                press.streamer.stop(0.5)
        for session in sessions:
            session.terminate_async()
        deadline = min(self._stopping.deadline, time.monotonic() + 1.0)
        for session in sessions:
            session.wait_closed(deadline - time.monotonic())
        for session in sessions:
            session.close(0.2)  # shuts the socket first, so the joins are quick
