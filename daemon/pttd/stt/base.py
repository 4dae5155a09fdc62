"""The STT seam: what the controller asks of a speech-to-text session and what it gets back.

A vendor package (today only ``pttd.stt.assemblyai``) implements :class:`SttSession` and reports
through ``on_event`` with the vendor-neutral events below, so the controller never learns a
vendor's wire format or close codes. The contract, in short:

* ``start()`` returns at once; the session connects on its own thread and reports
  :class:`Begin`, or a :class:`SessionClosed` with ``before_begin`` set.
* Audio is pcm_s16le mono at the session's sample rate, sent on the caller's thread.
* Partials arrive as :class:`Turn` (``end_of_turn`` false), each turn's one final as
  :class:`FinalTurn`; :class:`WarningMessage` is passed on as is.
* Every session ends with exactly one :class:`SessionClosed`, after any final it still held; its
  :class:`ClosePolicy` says whether to retry and what to tell the user.

``on_event`` is called on the session's threads and must only enqueue. Events not listed here
(a vendor's extras) may be passed to it too; an owner ignores what it does not know.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pttd.errors import PttdError


class CloseKind(enum.StrEnum):
    """What kind of end a session had; the controller picks its next step by it."""

    NORMAL = "normal"  # ended as asked (Terminate, or closed by pttd)
    AUTH = "auth"  # the credential was refused: not retried
    AUTH_RETRY = "auth_retry"  # refused a credential that worked before: one quick retry
    RATE_LIMITED = "rate_limited"  # too many new sessions: retried with backoff
    EXPIRED = "expired"  # the session reached its maximum duration
    CLIENT_BUG = "client_bug"  # the server rejected what pttd sent
    SERVER = "server"  # the server's own trouble: retried
    TRANSPORT = "transport"  # the link failed or could not be made: the network may be down
    IDLE = "idle"  # closed for inactivity
    CONFIG = "config"  # this configuration cannot work: not retried


@dataclass(frozen=True)
class ClosePolicy:
    """What a session end means for the daemon: retry or not, how long to wait, what to say."""

    kind: CloseKind
    retry: bool
    backoff_s: float  # first delay before a new session
    max_backoff_s: float
    message: str  # what the user is told (never contains the key)
    bug: bool = False  # pttd sent something it must not: log the evidence

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Jittered exponential backoff for retry number ``attempt`` (0-based)."""
        if not self.retry:
            return 0.0
        base = min(self.max_backoff_s, self.backoff_s * (2 ** max(0, attempt)))
        return base * (0.75 + 0.5 * (rng or random).random()) if base else 0.0


# The link failed with no word from the server (no close frame, a failed send).
LINK_LOST = ClosePolicy(
    CloseKind.TRANSPORT, True, 0.5, 5.0, "connection to the server lost; reconnecting"
)


# --- events a session reports --------------------------------------------------------------------


@dataclass(frozen=True)
class SessionConfiguration:
    """What the server says it runs for this session (the model, for ``pttd check``)."""

    model: str | None = None
    mode: str | None = None
    api_version: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Begin:
    """The session is open and takes audio."""

    id: str
    expires_at: float | None  # wall-clock time the server ends it, if it says
    configuration: SessionConfiguration | None = None


@dataclass(frozen=True)
class Word:
    text: str
    start: int  # ms into the session's audio
    end: int
    confidence: float = 0.0
    word_is_final: bool = True
    speaker: str | None = None


@dataclass(frozen=True)
class Turn:
    """One update of a turn: a partial while ``end_of_turn`` is false."""

    turn_order: int
    end_of_turn: bool
    transcript: str
    turn_is_formatted: bool = False
    end_of_turn_confidence: float = 0.0
    words: tuple[Word, ...] = ()
    utterance: str = ""
    language_code: str | None = None
    language_confidence: float | None = None
    speaker_label: str | None = None

    @property
    def text(self) -> str:
        """The turn's text so far: partials may keep non-final words out of ``transcript``."""
        if self.transcript or self.end_of_turn:
            return self.transcript
        return " ".join(w.text for w in self.words)


@dataclass(frozen=True)
class FinalTurn:
    """The one final of a turn_order, as delivered."""

    turn: Turn
    formatted: bool


@dataclass(frozen=True)
class Termination:
    """The server confirmed a clean end (after Terminate)."""

    audio_duration_seconds: float | None = None
    session_duration_seconds: float | None = None


@dataclass(frozen=True)
class ErrorMessage:
    """The server's account of an error; its close follows (see ``pending_error``)."""

    code: int | None
    message: str


@dataclass(frozen=True)
class WarningMessage:
    """Something the user may want to know; the session carries on."""

    code: int | None
    message: str


@dataclass(frozen=True)
class SessionClosed:
    """The one report of a session's end."""

    code: int | None  # close or error code; None when the link just died
    reason: str  # server's text (an Error frame preferred over the close reason)
    policy: ClosePolicy
    before_begin: bool  # a connect failure rather than a mid-session end
    terminated: bool = False  # a Termination was received (clean end)
    local: bool = False  # pttd closed it

    def describe(self) -> str:
        code = "no close code" if self.code is None else f"code {self.code}"
        return f"{self.policy.message} ({code}{': ' + self.reason if self.reason else ''})"


class ConnectError(PttdError):
    """The session could not be opened (refused, closed before Begin, no Begin)."""

    def __init__(self, closed: SessionClosed):
        super().__init__(closed.describe())
        self.closed = closed


# --- the session -------------------------------------------------------------------------------


class SttSession(Protocol):
    """One streaming session, driven by one owner (the controller and a press's streamer).

    No method blocks on the network except ``connect`` and ``terminate`` (tools and
    ``pttd check`` only) and the bounded socket write of the ``send_*_now`` calls.
    """

    name: str

    @property
    def begin(self) -> Begin | None: ...

    @property
    def id(self) -> str | None: ...

    @property
    def is_open(self) -> bool: ...

    @property
    def closed(self) -> SessionClosed | None: ...

    @property
    def audio_bytes_sent(self) -> int: ...

    @property
    def pending_error(self) -> ErrorMessage | None:
        """An error the server reported whose close has not come yet."""
        ...

    def start(self) -> None:
        """Connect in the background; ``on_event`` gets Begin or a SessionClosed."""
        ...

    def connect(self, timeout: float | None = None) -> Begin:
        """Start and wait for Begin; raises :class:`ConnectError`."""
        ...

    def send_frames_now(self, frames: Sequence[bytes], force_endpoint: bool = False) -> bool:
        """Audio frames (then, optionally, the end of the turn) on the caller's thread; False
        once the session is not open (its close is reported as usual)."""
        ...

    def send_audio_now(self, pcm: bytes) -> bool: ...

    def force_endpoint_now(self) -> bool:
        """End the current turn now, after the audio already sent."""
        ...

    def keep_alive(self) -> None: ...

    def terminate(self, timeout: float = 5.0) -> Termination | None:
        """End cleanly and wait (bounded) for the server's confirmation."""
        ...

    def terminate_async(self, timeout: float = 5.0) -> None:
        """End cleanly without waiting; the session closes itself."""
        ...

    def wait_closed(self, timeout: float) -> bool: ...

    def close(self, timeout: float = 2.0) -> None:
        """Stop now, from any thread; ``timeout=0`` does not join the session's threads."""
        ...


EventSink = Callable[[SttSession, object], None]


class SessionFactory(Protocol):
    """Makes a new, unstarted session; ``engine`` is "cloud" or "local" (the offline engine)."""

    def __call__(self, *, on_event: EventSink, engine: str = "cloud") -> SttSession: ...
