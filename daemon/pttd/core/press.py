"""One press's lifecycle: its phase, stored and changed only through legal moves, with a deadline.

The controller (the one thread that owns state) reads the phase instead of inferring it from
which fields happen to be set, and every phase but a queued wait has a deadline by which the
controller acts (retry, release, replay, or end the press with an error), so no fault a test
did not think of can leave a press, its LED or its billed session hanging.

    WAITING ──► CONNECTING ──► STREAMING ──► FINALIZING ──► DELIVERING ──► ENDED
       ▲  │           │             │             │              (any phase ──► ENDED)
       │  └───────────┴─► STREAMING/FINALIZING (warm session, or released before Begin)
       └──────────────┴─────────────┴─────────────┘  (a failed session: replay from the ring)

A press ends exactly once, with one outcome: its last final went out (``final``), an ``error``
event carrying its ``press_id`` said why not, nothing was said (``silent``), or the user
cancelled it (``cancelled``). A press still waiting for the network when pttd stops is left in
the spool (``spooled``): the next run loads it, under the same id, and ends it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pttd.errors import PttdError

if TYPE_CHECKING:
    from pttd.audio.ring import Snapshot
    from pttd.core.spool import SpoolEntry
    from pttd.core.streamer import Streamer
    from pttd.stt.base import SttSession


class PressPhase(enum.StrEnum):
    WAITING = "waiting"  # no session: queued behind the network / an earlier press, or backing off
    CONNECTING = "connecting"  # a session is opening (no audio sent yet)
    STREAMING = "streaming"  # held: audio flows
    FINALIZING = "finalizing"  # released: the rest of the audio, ForceEndpoint, then the final
    DELIVERING = "delivering"  # the last final is with the outputs; ends once they have it
    ENDED = "ended"


class Outcome(enum.StrEnum):
    FINAL = "final"
    ERROR = "error"
    SILENT = "silent"  # no words: the server's answer was empty, or none came
    CANCELLED = "cancelled"
    SPOOLED = "spooled"  # pttd stopped with it waiting: its file in the spool carries it
    # to the next run, which ends it (it gets no event in this one)


_P = PressPhase
LEGAL_MOVES: dict[PressPhase, frozenset[PressPhase]] = {
    _P.WAITING: frozenset({_P.CONNECTING, _P.STREAMING, _P.FINALIZING, _P.ENDED}),
    _P.CONNECTING: frozenset({_P.STREAMING, _P.FINALIZING, _P.WAITING, _P.ENDED}),
    _P.STREAMING: frozenset({_P.FINALIZING, _P.WAITING, _P.ENDED}),
    _P.FINALIZING: frozenset({_P.DELIVERING, _P.WAITING, _P.ENDED}),
    _P.DELIVERING: frozenset({_P.ENDED}),
    _P.ENDED: frozenset(),
}


class IllegalMove(PttdError, RuntimeError):
    """A controller bug: a press was asked to move where its lifecycle does not go."""


@dataclass
class Press:
    """What the controller knows of one press. ``phase`` and ``deadline`` change together."""

    press_id: int
    start_pos: int  # ring position of the first sample (pre-roll included)
    pressed_at: float
    phase: PressPhase = PressPhase.WAITING
    deadline: float | None = None  # controller clock; None only for a queued wait
    outcome: Outcome | None = None  # set once, on the move to ENDED (see late_final)
    ended_at: float | None = None
    released_at: float | None = None
    release_pos: int | None = None  # ring position of the release
    end_pos: int | None = None  # requested end (release + post-roll); where it ended once sent
    session: SttSession | None = None  # its session (cloud or the local engine's) while one is open
    streamer: Streamer | None = None
    stream_base_ms: float = 0.0  # session stream time at this press's first sample
    replay_pos: int | None = None  # ring position to resume from after a failure
    attempts: int = 0  # sessions opened for it
    stream_failures: int = 0
    fe_sent_at: float | None = None  # ForceEndpoint is on the wire: the next final is the last
    heard_speech: bool = False
    last_partial: str = ""  # text of the turn in progress ("" once finalized)
    overdue_replayed: bool = False
    waited_out: bool = False  # ended when no final came in its wait: a late one is taken
    audio: Snapshot | None = None  # its audio copied out of the ring once it waits offline
    finals: int = 0
    engine: str = "cloud"  # "cloud" or "local" (the offline engine)
    late: bool = False  # delivered after the network came back
    lost_samples: int = 0
    audio_ms: float = 0.0
    pressed_wall: float | None = None  # unix time of the press ("pressed_at" of a late final)
    spool: SpoolEntry | None = None  # its file once queued for writing (or loaded at start-up)

    @property
    def released(self) -> bool:
        return self.released_at is not None

    @property
    def ended(self) -> bool:
        return self.phase is PressPhase.ENDED

    @property
    def held(self) -> bool:
        """Not yet released, not ended: the press a release or toggle applies to."""
        return self.released_at is None and self.phase is not PressPhase.ENDED

    @property
    def restored(self) -> bool:
        """Loaded from the spool at start-up: its ring positions are an earlier run's."""
        return self.spool is not None and self.spool.restored

    @property
    def queued(self) -> bool:
        """Waiting its turn (network down, or an earlier press first), not backing off."""
        return self.phase is PressPhase.WAITING and self.deadline is None

    def move(self, phase: PressPhase, deadline: float | None = None) -> None:
        """Change phase (a legal move only) and set the new phase's deadline."""
        if phase not in LEGAL_MOVES[self.phase]:
            raise IllegalMove(f"press {self.press_id}: {self.phase.value} -> {phase.value}")
        self.phase, self.deadline = phase, deadline

    def end(self, outcome: Outcome, at: float) -> None:
        self.move(PressPhase.ENDED)
        self.outcome, self.ended_at = outcome, at

    def late_final(self) -> None:
        """A press whose wait for its final ran out got it after all (a slow server): the only
        change of outcome there is."""
        if not self.waited_out or self.outcome not in (Outcome.SILENT, Outcome.FINAL):
            raise IllegalMove(f"press {self.press_id}: a late final after {self.outcome}")
        self.outcome = Outcome.FINAL
