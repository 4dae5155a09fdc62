"""The seam between the v3 server and whatever recognizes speech behind it.

Why: the server core never decides text. A recognizer (pocketsphinx for the offline engine, a
scripted one in the tests) hears PCM and reports hypotheses; :mod:`pttd.local.shaping` turns
them into the Turn messages of the requested model family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pttd.local.wire import U3_EARLY_PARTIAL_MS


@dataclass(frozen=True)
class SessionConfig:
    """What a recognizer (and the shaper) needs to know about one session."""

    session_id: str
    speech_model: str
    family: str  # "us" or "u3"
    sample_rate: int
    encoding: str
    format_turns: bool
    max_turn_silence_ms: int
    min_turn_silence_ms: int
    speaker_labels: bool = False
    language_detection: bool = False
    include_partial_turns: bool = True
    continuous_partials: bool = True
    interruption_delay_ms: int = U3_EARLY_PARTIAL_MS
    keyterms_prompt: tuple[str, ...] = ()
    prompt: str | None = None
    query: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_u3(self) -> bool:
        return self.family == "u3"


@dataclass(frozen=True)
class HypWord:
    """One recognized word. Times are ms on the session's audio stream (samples received)."""

    text: str
    start_ms: int
    end_ms: int
    confidence: float = 1.0
    #: US finality: once a word is final it must keep its text and position in later updates.
    is_final: bool = False


@dataclass(frozen=True)
class SpeechOnset:
    """Speech began at ``timestamp_ms`` (becomes ``SpeechStarted`` on U3 models)."""

    timestamp_ms: int
    confidence: float = 1.0


@dataclass(frozen=True)
class Hypothesis:
    """A full snapshot of the current turn's words (not a delta).

    ``pause``: a pause of at least ``min_turn_silence`` was just detected (US ``utterance``,
    U3 silence partial); send it once per silence period. ``end_of_turn``: the turn is over;
    the next hypothesis belongs to a new turn.
    """

    words: tuple[HypWord, ...]
    end_of_turn: bool = False
    pause: bool = False
    end_of_turn_confidence: float | None = None


RecognizerEvent = SpeechOnset | Hypothesis


class Recognizer(Protocol):
    """Speech recognizer behind one session; the server core shapes its output.

    Calls arrive in stream order, one at a time (on the event loop, or on a worker thread when
    ``ServerOptions.recognizer_in_thread``). Each returns the events it produced, possibly none.
    A recognizer may also have a ``close()``, called once when its session ends.
    """

    def feed(self, pcm16: bytes, stream_ms: int) -> Sequence[RecognizerEvent]:
        """Take mono PCM16LE at the session rate; ``stream_ms`` is the first sample's position."""

    def force_endpoint(self) -> Sequence[RecognizerEvent]:
        """End the current turn now: return an end_of_turn Hypothesis, or nothing if idle."""

    def finish(self) -> Sequence[RecognizerEvent]:
        """End of stream (Terminate): flush the in-flight turn like ``force_endpoint``."""

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Apply UpdateConfiguration fields (e.g. ``max_turn_silence``)."""


RecognizerFactory = Callable[[SessionConfig], Recognizer]


class NullRecognizer:
    """Recognizes nothing: sessions work but never produce a Turn."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.config = config

    def feed(self, pcm16: bytes, stream_ms: int) -> Sequence[RecognizerEvent]:
        return ()

    def force_endpoint(self) -> Sequence[RecognizerEvent]:
        return ()

    def finish(self) -> Sequence[RecognizerEvent]:
        return ()

    def update_config(self, changes: Mapping[str, Any]) -> None:
        pass
