"""Every press ends: the controller's press lifecycle under random interleavings and faults.

The controller runs without its thread (``Controller.process``) against a scripted world: the
sessions and streamers it asks for are stand-ins with the owner API of ``pttd.stt.assemblyai.session.Session``
and ``pttd.core.streamer.Streamer`` (the real ones are proven against the fake v3 server elsewhere;
here what matters is every order in which their reports can reach the controller), a fake
clock for every deadline, a real ring buffer and the real ``Outputs`` fan-out with a sink that
fails. Hypothesis draws the interleavings; the invariant is stated once (``check_invariants``).
With a spool (real files in a temporary directory) a stop may leave presses "spooled"; a second
controller on the same directory (the restart) must then end each of them exactly once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.close_policy import CANNOT_OPEN, policy_for
from pttd.core.controller import Command, Controller, SessionEvent, Settings, SourceStatus, _Stop
from pttd.events import State
from pttd.outputs.fanout import Outputs
from pttd.core.press import IllegalMove, Outcome, Press, PressPhase
from pttd.stt.base import Begin, FinalTurn, Turn, Word
from pttd.audio.ring import RingBuffer
from pttd.stt.assemblyai.session import SessionClosed
from pttd.core.spool import Spool
from pttd.core.streamer import StreamDone, StreamFailed

RATE = 16000


class Broken(Exception):
    """An exception injected at a hand-off."""


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """The controller's surroundings: what it asked for, and the faults to inject next."""

    def __init__(self, clock=None):
        self.clock = clock
        self.sessions: list[FakeSession] = []
        self.streamers: list[FakeStreamer] = []
        self.break_next: set[str] = set()   # "factory" | "start" | "streamer"

    def maybe_break(self, where: str) -> None:
        if where in self.break_next:
            self.break_next.discard(where)
            raise Broken(f"injected at {where}")


class FakeSession:
    """The owner API of ``pttd.stt.assemblyai.session.Session`` (what the controller calls and reads)."""

    def __init__(self, world: World, engine: str):
        world.maybe_break("factory")
        self.world = world
        self.engine = engine
        self.index = len(world.sessions)
        self.created_at = world.clock.now if world.clock is not None else 0.0
        self.id = f"session-{self.index}"
        self.name = self.id
        self.begin: Begin | None = None
        self.audio_bytes_sent = 0
        self.turns = 0                  # the server's end-of-turn count ("answer")
        self.finals_sent: set[int] = set()
        self.pending_error = None
        self.started = self.closed = self.terminating = self.reported = False
        world.sessions.append(self)

    @property
    def is_open(self) -> bool:
        return self.begin is not None and not self.closed and not self.reported

    def start(self) -> None:
        self.world.maybe_break("start")
        self.started = True

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True

    def terminate_async(self, timeout: float = 5.0) -> None:
        if self.is_open:
            self.terminating = True
        else:
            self.closed = True

    def wait_closed(self, timeout: float) -> bool:
        return True

    @property
    def done(self) -> bool:
        """Nothing of it is left running: closed by pttd, or its end reported."""
        return self.closed or self.reported or not self.started

    @property
    def can_speak(self) -> bool:
        """Messages may still reach the controller: begun, its end not yet reported (a session
        pttd has just closed may have some on their way)."""
        return self.begin is not None and not self.reported


class FakeStreamer:
    """The API of ``pttd.core.streamer.Streamer`` the controller uses; the world decides when its
    last frame and ForceEndpoint are out (``StreamDone``) or that it failed."""

    def __init__(self, world: World, source, session, start_pos, chunk, *, post, sample_rate,
                 name):
        world.maybe_break("streamer")
        self.session, self.chunk, self.post = session, chunk, post
        self.cursor = self.start_pos = start_pos
        self._end: int | None = None
        self.samples_sent = self.lost_samples = 0
        self.force_endpoint_at: float | None = None
        self.started = self.stopped = self.reported = False
        self.judge = None
        self.postroll_reason = ""
        world.streamers.append(self)

    @property
    def end(self):
        return self._end

    def start(self) -> None:
        self.started = True

    def finish(self, end_pos: int, judge=None) -> int:
        self._end = max(end_pos, self.start_pos + self.chunk)
        self.judge = judge  # the adaptive post-roll's: the world may take its earliest end
        return self._end

    def stop(self, timeout: float = 2.0) -> None:
        self.stopped = True

    @property
    def can_finish(self) -> bool:
        return self.started and not self.stopped and not self.reported and self._end is not None


class Harness:
    """One controller in its world, and a record of everything it emitted."""

    def __init__(self, *, keep_warm_s: float = 0.0, fallback: bool = False,
                 failing_sink: bool = False, button_mode: str = "hold", seed: int = 0,
                 spool_dir=None, max_bytes: int = 64 << 20, max_age_s: float = 86400.0,
                 sessions_per_minute: int = 0, session_budget: bool = True):
        self.clock = FakeClock()
        self.world = World(self.clock)
        self.ring = RingBuffer(RATE * 60, RATE)
        self.events: list[dict] = []
        self.presses: dict[int, Press] = {}
        self.emitted_after_end: list[dict] = []
        sinks = [Recorder(self)]
        if failing_sink:
            sinks.insert(0, FailingSink())
        self.outputs = Outputs(sinks, threaded=False)
        settings_ = Settings(keep_warm_s=keep_warm_s, fallback=fallback, button_mode=button_mode,
                             max_connect_attempts=3, sessions_per_minute=sessions_per_minute,
                             session_budget=session_budget)
        self.sessions_per_minute = sessions_per_minute
        # a real spool on real files; its I/O done at once (the controller still hears of each
        # write through its queue, as from the spool thread)
        self.spool = None if spool_dir is None else Spool(
            spool_dir, max_bytes=max_bytes, max_age_s=max_age_s, threaded=False)
        self.c = Controller(
            ring=self.ring, settings=settings_, emit=self.outputs.emit,
            emit_confirmed=self.outputs.emit, clock=self.clock, rng=random.Random(seed),
            session_factory=lambda on_event, engine="cloud": FakeSession(self.world, engine),
            streamer_factory=lambda *a, **k: FakeStreamer(self.world, *a, **k),
            spool=self.spool)
        self.c.load_spool()  # (Controller.start does this; here there is no thread)
        self.restored = {p.press_id for p in self.c._presses}
        self.first_new = self.c._presses.last_id + 1
        self._see_presses()

    # --- driving ---------------------------------------------------------------------------------

    def step(self, item: object | None = None) -> None:
        self.c.process(item)
        self.c.process_queued()
        self._see_presses()

    def _see_presses(self) -> None:
        # ended presses move to the (bounded, 32) recent list; a step ends only a few at a time
        for p in [*self.c._presses, *self.c._presses.recent]:
            self.presses.setdefault(p.press_id, p)

    def command(self, name: str, source: str = "control") -> None:
        self.step(Command(name, source, at=time.monotonic()))

    def session_event(self, session: FakeSession, event: object) -> None:
        if isinstance(event, FinalTurn):  # Session's TurnAssembler: one final per turn_order
            if event.turn.turn_order in session.finals_sent:
                return
            session.finals_sent.add(event.turn.turn_order)
        if isinstance(event, Begin):
            session.begin = event
        if isinstance(event, SessionClosed):
            session.reported = True
        self.step(SessionEvent(session, event))

    def close_session(self, session: FakeSession, code: int | None, *, before_begin=None) -> None:
        if session.reported or not session.started:
            return
        policy = CANNOT_OPEN if code == "config" else policy_for(code)
        code = None if code == "config" else code
        closed = SessionClosed(code=code, reason=f"closed with {code}", policy=policy,
                               before_begin=session.begin is None if before_begin is None
                               else before_begin)
        self.session_event(session, closed)

    def stream_done(self, streamer: FakeStreamer, cut: bool = False) -> None:
        """``cut``: the adaptive post-roll judged the press over at its release."""
        if not streamer.can_finish:
            return
        if cut and streamer.judge is not None:
            streamer._end = max(streamer.start_pos + streamer.chunk,
                                min(streamer._end, streamer.judge.release))
            streamer.postroll_reason = "silence before the release"
        streamer.force_endpoint_at = self.clock.now
        streamer.samples_sent = streamer._end - streamer.start_pos
        streamer.cursor = streamer._end
        streamer.reported = True
        self.step(StreamDone(streamer))

    def stream_failed(self, streamer: FakeStreamer) -> None:
        if streamer.started and not streamer.stopped and not streamer.reported:
            streamer.reported = True
            self.step(StreamFailed(streamer, "Broken: injected"))

    def tick(self, seconds: float) -> None:
        """Time passes: the mic delivers audio (at most 2 s of it, the ring holds 60 s), so
        presses waiting for the network get their audio complete (and spooled)."""
        self.ring.append(bytes(2 * int(min(seconds, 2.0) * RATE)))
        self.clock.now += seconds
        self.step()

    def settle(self) -> None:
        """Let the world run its course: the button goes up, every session opens, every stream
        finishes, every Terminate is answered, and time passes until nothing is in flight."""
        for _ in range(400):
            active = self.c._presses.active()
            if active is not None:
                self.step(Command("release", at=time.monotonic()))
            for s in list(self.world.sessions):
                if s.started and s.begin is None and not s.done:
                    self.session_event(s, Begin(id=s.id, expires_at=None))
                if s.terminating and not s.reported:
                    self.session_event(s, SessionClosed(code=1000, reason="", terminated=True,
                                                        policy=policy_for(1000),
                                                        before_begin=False))
            for st_ in list(self.world.streamers):
                self.stream_done(st_)
            if not self.c._presses.live() and self.c._pool.warm is None and not self._in_flight():
                return
            self.tick(5.0)
        raise AssertionError(f"not settled: {[(p.press_id, p.phase) for p in self.c._presses.live()]}")

    def _in_flight(self) -> bool:
        return any(s.terminating and not s.reported for s in self.world.sessions)

    def stop(self) -> None:
        """SIGTERM: the daemon's stop, with its deadline already due."""
        self.step(_Stop(time.monotonic()))
        assert self.c._stopping.complete()
        self.c._stopping.finish()
        self._see_presses()

    # --- the invariant ---------------------------------------------------------------------------

    def check_invariants(self, *, stopped: bool = False) -> None:
        c = self.c
        new = set(range(self.first_new, c._presses.last_id + 1))
        assert set(self.presses) == self.restored | new, "a press was never seen"
        errors: dict[int, list[dict]] = {}
        finals: dict[int, list[dict]] = {}
        for e in self.events:
            if e["event"] == "error" and "press_id" in e:
                errors.setdefault(e["press_id"], []).append(e)
            if e["event"] == "final":
                finals.setdefault(e["press_id"], []).append(e)
        assert set(errors) | set(finals) <= set(self.presses), "an event names no press"
        assert not self.emitted_after_end, f"events after their press ended: {self.emitted_after_end}"
        for pid, press in self.presses.items():
            assert press.phase is PressPhase.ENDED, f"press {pid} is {press.phase.value}"
            n_err = len(errors.get(pid, []))
            if press.outcome is Outcome.ERROR:
                assert n_err == 1, f"press {pid} ended in error with {n_err} error events"
            else:
                assert n_err == 0, f"press {pid} ({press.outcome}) has an error event"
            if press.outcome is Outcome.FINAL:
                assert finals.get(pid), f"press {pid} ended with a final that never came out"
            if press.outcome is Outcome.SILENT:
                assert not finals.get(pid), f"press {pid} is silent but had finals"
                assert not press.last_partial, f"press {pid} lost words: {press.last_partial!r}"
            if press.outcome is Outcome.SPOOLED:  # left for the next run, which ends it
                assert stopped, f"press {pid} spooled while pttd runs"
                assert not finals.get(pid), f"press {pid} spooled after a final"
                assert (self.spool.dir / press.spool.name).exists(), f"press {pid}: no file"
            elif press.spool is not None and self.spool is not None:
                assert not (self.spool.dir / press.spool.name).exists(), \
                    f"press {pid} ended ({press.outcome.value}) but its file is still spooled"
            if press.press_id in self.restored and finals.get(pid):
                assert all(f.get("late") is True and "pressed_at" in f for f in finals[pid])
        keys = [(e["session_id"], e["turn_order"]) for e in self.events if e["event"] == "final"]
        assert len(keys) == len(set(keys)), "a final was delivered twice"
        for s in self.world.sessions:
            assert s.done, f"{s.id} left open"
        for st_ in self.world.streamers:
            assert st_.stopped or st_.reported or not st_.started, "a streamer left running"
        if self.sessions_per_minute:  # the account's budget: never more admitted in a minute
            admitted = sorted(s.created_at for s in self.world.sessions
                              if s.engine == "cloud" and s.begin is not None)
            for i, t in enumerate(admitted):
                in_window = [u for u in admitted[:i + 1] if t - u < 60.0]
                assert len(in_window) <= self.sessions_per_minute, \
                    f"{len(in_window)} sessions admitted within a minute (limit " \
                    f"{self.sessions_per_minute}) at t={t - 1000.0:g}"
        if not stopped:
            expect = {State.IDLE}
            if c._status.mic_offline or c._status.net_down:
                expect = {State.OFFLINE}
            elif c._status.auth_blocked:
                expect = {State.ERROR, State.IDLE}
            assert c.state in expect, f"state {c.state.value}, expected {expect}"


class Recorder:
    """A sink that records what the user would see (and checks each press-event is timely)."""

    def __init__(self, h: Harness):
        self.h = h

    def emit(self, event: dict) -> None:
        pid = event.get("press_id")
        if pid is not None:
            press = self.h.presses.get(pid) or next(
                (p for p in self.h.c._presses if p.press_id == pid), None)
            late_final = event["event"] == "final" and press is not None and press.waited_out
            if press is not None and press.ended and not late_final:
                self.h.emitted_after_end.append(event)
        if event["event"] == "final":
            source = next(s for s in self.h.world.sessions if s.id == event["session_id"])
            if source.closed:  # abandoned by pttd (a replay, a give-up): never a source of finals
                self.h.emitted_after_end.append(event)
        self.h.events.append(event)

    def close(self) -> None:
        pass


class FailingSink:
    """An output that raises on every other event: the others must still deliver."""

    def __init__(self):
        self.n = 0

    def emit(self, event: dict) -> None:
        self.n += 1
        if self.n % 2:
            raise RuntimeError("a broken output")

    def close(self) -> None:
        pass


# --- actions Hypothesis draws --------------------------------------------------------------------

CLOSE_CODES = [None, 1000, 1001, 1006, 1008, 1011, 3005, 3006, 3007, 3008, 3009, 4031, 4999,
               "config"]  # (a session pttd could not even open: close_policy.CANNOT_OPEN)

def _words(draw_ends: list[int]) -> tuple[Word, ...]:
    return tuple(Word(text=f"w{i}", start=max(0, e - 100), end=e) for i, e in enumerate(draw_ends))


# the common steps of a turn are listed more than once: a fault is more telling mid-turn
_turn = [
    st.tuples(st.just("press"), st.just("control")),
    st.tuples(st.just("begin"), st.just(0)),
    st.tuples(st.just("partial"), st.just(0), st.just("hello")),
    st.tuples(st.just("answer"), st.sampled_from(["", "hello world"])),
    st.tuples(st.just("final"), st.just(0), st.integers(0, 3), st.just("hello"), st.just([])),
]
actions = st.one_of(
    *_turn, *_turn, *_turn,
    st.tuples(st.sampled_from(["press", "release", "toggle", "cancel"]),
              st.sampled_from(["control", "button"])),
    st.tuples(st.just("press"), st.just("control")),
    st.tuples(st.just("begin"), st.integers(0, 5)),
    st.tuples(st.just("begin"), st.just(0)),
    st.tuples(st.just("partial"), st.integers(0, 5), st.sampled_from(["", "hel", "hello"])),
    st.tuples(st.just("final"), st.integers(0, 5), st.integers(0, 3),
              st.sampled_from(["", "hello world", "again"]),
              st.lists(st.integers(0, 2 ** 40), max_size=3)),
    st.tuples(st.just("close"), st.integers(0, 5), st.sampled_from(CLOSE_CODES)),
    st.tuples(st.just("answer"), st.sampled_from(["", "hello world", "again"])),
    st.tuples(st.just("stream_done"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("stream_failed"), st.integers(0, 5)),
    st.tuples(st.just("break"), st.sampled_from(["factory", "start", "streamer"])),
    st.tuples(st.just("tick"), st.sampled_from([0.01, 0.06, 1.0, 3.0, 11.0, 40.0])),
    st.tuples(st.just("mic"), st.sampled_from(["offline", "online"])),
    st.tuples(st.just("pending_error"), st.integers(0, 5), st.sampled_from([3005, 3007])),
)


def _pick(items: list, i: int):
    """Index ``i`` counts from the newest (0 = the newest): most faults hit the live one."""
    return items[-1 - i % len(items)] if items else None


def run_action(h: Harness, action: tuple) -> None:
    kind = action[0]
    sessions, streamers = h.world.sessions, h.world.streamers
    if kind in ("press", "release", "toggle", "cancel"):
        h.command(kind, action[1])
    elif kind == "begin":
        s = _pick(sessions, action[1])
        if s is not None and s.started and not s.done:
            h.session_event(s, Begin(id=s.id, expires_at=None))  # (a second Begin included)
    elif kind == "partial":
        s = _pick(sessions, action[1])
        if s is not None and s.can_speak:
            h.session_event(s, Turn(turn_order=0, end_of_turn=False, transcript=action[2]))
    elif kind == "final":
        s = _pick(sessions, action[1])
        if s is not None and s.can_speak:
            turn = Turn(turn_order=action[2], end_of_turn=True, transcript=action[3],
                        words=_words(action[4]))
            h.session_event(s, FinalTurn(turn, formatted=True))
    elif kind == "close":
        s = _pick(sessions, action[1])
        if s is not None:
            h.close_session(s, action[2])
    elif kind == "answer":  # release, the audio out, and the server's final: a whole turn
        h.command("release")
        for st_ in list(streamers):
            h.stream_done(st_)
        s = _pick(sessions, 0)
        if s is not None and s.begin is not None and not s.done:
            order = s.turns = s.turns + 1
            h.session_event(s, FinalTurn(Turn(order, True, action[1]), formatted=True))
    elif kind == "stream_done":
        st_ = _pick(streamers, action[1])
        if st_ is not None:
            h.stream_done(st_, cut=action[2])
    elif kind == "stream_failed":
        st_ = _pick(streamers, action[1])
        if st_ is not None:
            h.stream_failed(st_)
    elif kind == "break":
        h.world.break_next.add(action[1])
    elif kind == "tick":
        h.tick(action[1])
    elif kind == "mic":
        h.step(SourceStatus(action[1], f"mic {action[1]}"))
    elif kind == "pending_error":
        s = _pick(sessions, action[1])
        if s is not None and not s.done:
            s.pending_error = protocol.ErrorMessage(action[2], "session cancelled")


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(actions, min_size=8, max_size=80), keep_warm=st.booleans(), fallback=st.booleans(),
       failing_sink=st.booleans(), toggle_button=st.booleans(), stop_at_end=st.booleans(),
       spool=st.sampled_from([None, 64 << 20, 64_000]),  # 64 kB: ~2 s of audio: drops
       budget=st.sampled_from([0, 0, 2, 5]),  # [stt] sessions_per_minute (0: learned)
       restart_steps=st.lists(st.one_of(st.just(("begin", 0)), st.just(("answer", "late words")),
                                        actions), max_size=24))
def test_every_press_ends_in_exactly_one_final_or_error(steps, keep_warm, fallback, failing_sink,
                                                         toggle_button, stop_at_end, spool,
                                                         budget, restart_steps):
    with tempfile.TemporaryDirectory() as spool_dir, only_critical_logs():
        kw = dict(keep_warm_s=30.0 if keep_warm else 0.0, fallback=fallback,
                  failing_sink=failing_sink, button_mode="toggle" if toggle_button else "hold",
                  sessions_per_minute=budget)
        if spool is not None:
            kw.update(spool_dir=spool_dir, max_bytes=spool)
        h = Harness(**kw)
        for action in steps:
            run_action(h, action)
        h.step(SourceStatus("online", ""))  # (an injected fault still pending fires while settling)
        if stop_at_end:
            h.stop()
        else:
            h.settle()
        h.check_invariants(stopped=stop_at_end)
        if spool is None or not stop_at_end:
            assert spool is None or not os.listdir(spool_dir), "files left after every press ended"
            return
        # the restart: a new controller on the same spool ends each spooled press exactly once
        spooled = {pid for pid, p in h.presses.items() if p.outcome is Outcome.SPOOLED}
        h2 = Harness(**kw)
        assert h2.restored == spooled
        for action in restart_steps:
            run_action(h2, action)
        h2.step(SourceStatus("online", ""))
        h2.settle()
        h2.check_invariants()
        assert not os.listdir(spool_dir), "files left after every press ended"
        for pid in spooled:  # never an event for it in the first run, one end in the second
            assert not [e for e in h.events if e.get("press_id") == pid]
            assert h2.presses[pid].ended


@contextlib.contextmanager
def only_critical_logs():
    """pytest keeps every log record of a test, and a record of ``log.exception`` keeps its
    traceback, whose frames keep that example's whole Harness (a ring buffer each): over
    thousands of examples that was 2.9 GB. The invariant's assertions say what went wrong."""
    logger = logging.getLogger("pttd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- each phase's deadline, one at a time ---------------------------------------------------------

def started(**kw) -> tuple[Harness, Press]:
    h = Harness(**kw)
    h.command("press")
    return h, h.presses[1]


def sent(**kw) -> tuple[Harness, Press, FakeSession]:
    """A press whose audio and ForceEndpoint are out: it waits for its final."""
    h, press = started(**kw)
    s = h.world.sessions[0]
    h.session_event(s, Begin(id="a", expires_at=None))
    h.command("release")
    h.stream_done(h.world.streamers[0])
    return h, press, s


def test_a_press_opens_a_session_and_waits_for_begin_with_a_deadline():
    h, press = started()
    assert press.phase is PressPhase.CONNECTING and h.c.state is State.CONNECTING
    h.tick(h.c.s.connect_deadline_s - 0.1)
    assert press.phase is PressPhase.CONNECTING
    h.tick(0.2)  # a session that never says Begin nor its end: the press ends, with an error
    assert press.outcome is Outcome.ERROR and h.world.sessions[0].closed
    assert [e["press_id"] for e in h.events if e["event"] == "error"] == [1]
    assert h.c.state is State.IDLE


def test_streaming_is_bounded_a_stuck_button_is_released():
    h, press = started()
    h.session_event(h.world.sessions[0], Begin(id="a", expires_at=None))
    assert press.phase is PressPhase.STREAMING and h.c.state is State.LISTENING
    h.tick(h.c.s.max_press_s + 1)
    assert press.phase is PressPhase.FINALIZING and press.released
    assert h.world.streamers[0].end is not None


def test_finalizing_fails_when_the_audio_never_goes_out():
    h, press = started()
    h.session_event(h.world.sessions[0], Begin(id="a", expires_at=None))
    h.command("release")
    assert press.phase is PressPhase.FINALIZING and h.c.state is State.FINALIZING
    h.tick(h.c.s.send_margin_s + 2)
    assert press.outcome is Outcome.ERROR
    assert h.world.sessions[0].terminating and h.world.streamers[0].stopped


def test_finalizing_waits_for_the_final_then_ends_silent_without_words():
    h, press, _ = sent()
    h.tick(h.c.s.empty_final_timeout_s + 0.1)
    assert press.outcome is Outcome.SILENT
    assert not [e for e in h.events if e["event"] in ("final", "error")]


def test_unfinished_words_are_replayed_once_then_the_press_ends_with_an_error():
    h, press = started()
    h.session_event(h.world.sessions[0], Begin(id="a", expires_at=None))
    h.session_event(h.world.sessions[0], Turn(turn_order=0, end_of_turn=False, transcript="hi"))
    h.command("release")
    h.stream_done(h.world.streamers[0])
    h.tick(h.c.s.final_timeout_s + 0.1)  # no final: replay on a new session
    assert press.phase in (PressPhase.WAITING, PressPhase.CONNECTING) and h.world.sessions[0].closed
    for _ in range(20):
        h.tick(1.0)
        if len(h.world.sessions) > 1:
            break
    s2 = h.world.sessions[1]
    h.session_event(s2, Begin(id="b", expires_at=None))
    h.session_event(s2, Turn(turn_order=0, end_of_turn=False, transcript="hi"))
    h.stream_done(h.world.streamers[1])
    h.tick(h.c.s.final_timeout_s + 0.1)
    assert press.outcome is Outcome.ERROR
    errors = [e for e in h.events if e.get("press_id") == 1]
    assert len(errors) == 1 and "hi" in errors[0]["message"]


def test_delivering_ends_when_the_outputs_have_the_final():
    h, press, s = sent()
    h.session_event(s, FinalTurn(Turn(0, True, "hello"), formatted=True))
    assert press.outcome is Outcome.FINAL and s.terminating  # Outputs(threaded=False): at once
    assert [e["text"] for e in h.events if e["event"] == "final"] == ["hello"]


def test_a_streamer_that_fails_is_replayed_once_then_the_press_fails():
    h, press = started()
    h.session_event(h.world.sessions[0], Begin(id="a", expires_at=None))
    h.stream_failed(h.world.streamers[0])
    assert press.phase is PressPhase.WAITING and press.deadline is not None
    h.tick(10)
    h.session_event(h.world.sessions[1], Begin(id="b", expires_at=None))
    h.stream_failed(h.world.streamers[1])
    assert press.outcome is Outcome.ERROR
    assert [e.get("press_id") for e in h.events if e["event"] == "error"][-1] == 1


@pytest.mark.parametrize("where", ["factory", "start", "streamer"])
def test_an_exception_at_a_hand_off_ends_the_press_with_an_error(where):
    h = Harness()
    h.world.break_next.add(where)
    h.command("press")
    if h.world.sessions:
        h.session_event(h.world.sessions[0], Begin(id="a", expires_at=None))
    press = h.presses[1]
    assert press.outcome is Outcome.ERROR
    assert [e["press_id"] for e in h.events if e["event"] == "error"] == [1]
    assert h.c.state is State.IDLE
    h.command("press")  # the next press works
    assert h.presses[2].phase in (PressPhase.CONNECTING, PressPhase.STREAMING)


def test_a_turn_on_an_idle_warm_session_is_a_ghost_not_a_final():
    h, press, s = sent(keep_warm_s=30.0)
    h.session_event(s, FinalTurn(Turn(0, True, "hello"), formatted=True))
    assert press.outcome is Outcome.FINAL and h.c._pool.warm is s
    h.session_event(s, Turn(1, False, "ghost"))
    h.session_event(s, FinalTurn(Turn(1, True, "ghost"), formatted=True))
    assert [e["text"] for e in h.events if e["event"] in ("final", "partial")] == ["hello"]
    h.tick(31)
    assert s.terminating


def test_illegal_moves_raise():
    p = Press(1, 0, 0.0)
    p.move(PressPhase.CONNECTING, 1.0)
    with pytest.raises(IllegalMove):
        p.move(PressPhase.DELIVERING)
    p.end(Outcome.ERROR, 2.0)
    with pytest.raises(IllegalMove):
        p.move(PressPhase.WAITING)


def test_presses_made_offline_go_out_one_at_a_time_in_order_and_a_lost_prober_is_replaced():
    h = Harness()
    h.command("press")
    h.close_session(h.world.sessions[0], None)  # unreachable: the press waits, probing
    assert h.c.state is State.OFFLINE and h.presses[1].phase is PressPhase.WAITING
    for _ in range(2):
        h.command("release")
        h.command("press")
    h.command("release")
    assert [p.queued for p in h.presses.values()] == [False, True, True]
    # the probing press is given up (here: an injected fault at its next attempt) ...
    h.world.break_next.add("factory")
    h.tick(10)
    assert h.presses[1].outcome is Outcome.ERROR
    # ... and the oldest queued press probes in its place, then each goes out in order
    h.session_event(h.world.sessions[-1], Begin(id="b", expires_at=None))
    order = []
    for _ in range(2):
        live = [p for p in h.c._presses.live() if not p.queued]
        assert len(live) == 1, "one at a time"
        order.append(live[0].press_id)
        h.stream_done(h.world.streamers[-1])
        s = h.world.sessions[-1]
        h.session_event(s, FinalTurn(Turn(0, True, f"press {live[0].press_id}"), formatted=True))
        h.session_event(s, SessionClosed(1000, "", policy_for(1000), False, True))
        if h.c._presses.live():
            h.session_event(h.world.sessions[-1], Begin(id="c", expires_at=None))
    assert order == [2, 3]
    assert [e["text"] for e in h.events if e["event"] == "final"] == ["press 2", "press 3"]
    assert h.c.state is State.IDLE


def test_a_final_slower_than_the_short_wait_is_still_delivered_once():
    h, press, s = sent()
    h.tick(h.c.s.empty_final_timeout_s + 0.1)  # nothing pending: the short wait runs out
    assert press.outcome is Outcome.SILENT and s.terminating
    h.session_event(s, FinalTurn(Turn(0, True, "slow"), formatted=True))
    assert press.outcome is Outcome.FINAL
    h.tick(h.c.s.final_timeout_s + 0.1)  # past the window: a Turn now belongs to no press
    h.session_event(s, FinalTurn(Turn(1, True, "too late"), formatted=True))
    assert [(e["text"], e["press_id"]) for e in h.events if e["event"] == "final"] == [("slow", 1)]
