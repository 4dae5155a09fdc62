"""The fake AssemblyAI v3 server used by the tests: a scripted recognizer behind the fake server
core (tests/fakes/fake_server.py: the runtime v3 server with faults and records).

``ScriptedRecognizer`` hears speech with an energy VAD (RMS over 20 ms windows) and "recognizes"
the next text from a script, so tests control exactly what comes back while the server core
handles everything protocol-related. Deterministic: the same audio gives the same messages.

Script rule: turn *k* of the server's lifetime (counted across sessions, so successive
push-to-talk presses get successive lines) uses ``script[k % len(script)]``; the script cycles.
An empty script recognizes nothing (speech produces ``SpeechStarted`` on U3 but no Turn).

Usage::

    with FakeV3Server(script=["hello world"], faults=Faults(turn_delay_s=0.2)) as srv:
        run_daemon_against(srv.url)
        assert srv.sessions[0].final_turns[-1]["transcript"] == "hello world"
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pytest

from pttd.local.options import ServerOptions
from pttd.local.recognizer import Hypothesis, HypWord, RecognizerEvent, SessionConfig, SpeechOnset
from pttd.local.server import ServerThread
from tests.fakes.fake_server import FakeControls, FakeOptions, FakeServer
from tests.fakes.faults import Faults

log = logging.getLogger(__name__)

WINDOW_MS = 20
DEFAULT_RMS_THRESHOLD = 500.0   # int16 RMS; about -36 dBFS
DEFAULT_MS_PER_WORD = 200       # speech time that reveals one more scripted word
WORD_CONFIDENCE = 0.95


class ScriptCursor:
    """Hands out scripted turn texts in order, shared by every session of one server."""

    def __init__(self, script: Sequence[str]) -> None:
        self._script = [str(line) for line in script]
        self._next = 0
        self._lock = threading.Lock()

    def next_words(self) -> list[str]:
        with self._lock:
            if not self._script:
                return []
            line = self._script[self._next % len(self._script)]
            self._next += 1
            return line.split()

    @property
    def turns_started(self) -> int:
        with self._lock:
            return self._next


class ScriptedRecognizer:
    """Energy-VAD recognizer that reveals scripted words as speech time accumulates.

    * A turn starts at the first speech window after the previous turn ended.
    * One more word is revealed per ``ms_per_word`` of speech; all but the newest are final (US).
    * A pause of ``min_turn_silence`` reports ``pause`` (once); ``max_turn_silence`` of silence,
      ForceEndpoint or Terminate end the turn with the full scripted text, timed evenly over the
      detected speech span (stream ms).
    """

    def __init__(self, config: SessionConfig, cursor: ScriptCursor, *,
                 ms_per_word: int = DEFAULT_MS_PER_WORD,
                 rms_threshold: float = DEFAULT_RMS_THRESHOLD) -> None:
        self.config = config
        self.cursor = cursor
        self.ms_per_word = ms_per_word
        self.rms_threshold = rms_threshold
        self.min_silence_ms = config.min_turn_silence_ms
        self.max_silence_ms = config.max_turn_silence_ms
        self._window = config.sample_rate * WINDOW_MS // 1000
        self._pending = array("h")
        self._position = 0          # samples consumed into windows so far
        self._words: list[str] | None = None   # None = no turn in progress
        self._new_turn_state()

    def _new_turn_state(self) -> None:
        self._words = None
        self._onset_ms = 0
        self._speech_end_ms = 0
        self._speech_ms = 0
        self._silence_ms = 0
        self._paused = False
        self._revealed = 0

    # --- Recognizer protocol ---------------------------------------------------------------

    def feed(self, pcm16: bytes, stream_ms: int) -> list[RecognizerEvent]:
        samples = array("h")
        samples.frombytes(pcm16)
        self._pending.extend(samples)
        events: list[RecognizerEvent] = []
        while len(self._pending) >= self._window:
            window = self._pending[: self._window]
            del self._pending[: self._window]
            start_ms = self._position * 1000 // self.config.sample_rate
            self._position += self._window
            events.extend(self._on_window(window, start_ms))
        return events

    def force_endpoint(self) -> list[RecognizerEvent]:
        return [self._end_turn(confidence=1.0)] if self._words is not None else []

    def finish(self) -> list[RecognizerEvent]:
        return self.force_endpoint()

    def update_config(self, changes: Mapping[str, Any]) -> None:
        if isinstance(changes.get("min_turn_silence"), int):
            self.min_silence_ms = changes["min_turn_silence"]
        if isinstance(changes.get("max_turn_silence"), int):
            self.max_silence_ms = changes["max_turn_silence"]

    # --- internals ----------------------------------------------------------------------------

    def _on_window(self, window: array, start_ms: int) -> list[RecognizerEvent]:
        rms = math.sqrt(sum(s * s for s in window) / len(window))
        if rms >= self.rms_threshold:
            return self._on_speech(start_ms, rms)
        if self._words is None:
            return []
        self._silence_ms += WINDOW_MS
        events: list[RecognizerEvent] = []
        if not self._paused and self._silence_ms >= self.min_silence_ms:
            self._paused = True
            events.append(self._partial(pause=True))
        if self._silence_ms >= self.max_silence_ms:
            events.append(self._end_turn(confidence=0.75))
        return events

    def _on_speech(self, start_ms: int, rms: float) -> list[RecognizerEvent]:
        events: list[RecognizerEvent] = []
        if self._words is None:
            self._words = self.cursor.next_words()
            self._onset_ms = start_ms
            confidence = round(min(0.999, rms / (rms + self.rms_threshold)), 6)
            events.append(SpeechOnset(start_ms, confidence))
        self._speech_ms += WINDOW_MS
        self._speech_end_ms = start_ms + WINDOW_MS
        self._silence_ms = 0
        self._paused = False
        revealed = min(len(self._words), self._speech_ms // self.ms_per_word)
        if revealed != self._revealed:
            self._revealed = revealed
            events.append(self._partial(pause=False))
        return events

    def _partial(self, pause: bool) -> Hypothesis:
        """Revealed words at nominal slots; all but the newest final, or all at a pause."""
        assert self._words is not None
        words = []
        for i, text in enumerate(self._words[: self._revealed]):
            start = self._onset_ms + i * self.ms_per_word
            end = max(start, min(start + self.ms_per_word, self._speech_end_ms))
            final = pause or i < self._revealed - 1
            words.append(HypWord(text, start, end, WORD_CONFIDENCE, final))
        confidence = 0.35 if pause else 0.02
        return Hypothesis(tuple(words), pause=pause, end_of_turn_confidence=confidence)

    def _end_turn(self, confidence: float) -> Hypothesis:
        """The whole scripted line, spread evenly over the detected speech span."""
        assert self._words is not None
        n = len(self._words)
        span = max(self._speech_end_ms - self._onset_ms, n)
        words = tuple(
            HypWord(text, self._onset_ms + i * span // n, self._onset_ms + (i + 1) * span // n,
                    WORD_CONFIDENCE, True)
            for i, text in enumerate(self._words))
        self._new_turn_state()
        return Hypothesis(words, end_of_turn=True, end_of_turn_confidence=confidence)


class FakeV3Server(FakeControls, ServerThread):
    """A started-on-enter v3 server with a :class:`ScriptedRecognizer` per session.

    ``model_mode``: None shapes turns by the client's ``speech_model`` (faithful); "us" or "u3"
    forces that shaping. ``format_pattern``: "A" or "B" (unformatted final + formatted copy, or
    every Turn formatted). ``faults``: one :class:`Faults` for every connection, or a sequence
    used one per connection attempt (then no faults). Any other keyword is a
    :class:`~tests.fakes.fake_server.FakeOptions` field.
    """

    server_class = FakeServer

    def __init__(self, script: Sequence[str] = ("hello world",), *,
                 model_mode: str | None = None, format_pattern: str = "A",
                 faults: Faults | Sequence[Faults] | None = None,
                 options: ServerOptions | None = None,
                 ms_per_word: int = DEFAULT_MS_PER_WORD,
                 rms_threshold: float = DEFAULT_RMS_THRESHOLD,
                 **option_fields: Any) -> None:
        if model_mode not in (None, "us", "u3"):
            raise ValueError(f"model_mode must be None, 'us' or 'u3', not {model_mode!r}")
        base = FakeOptions.of(options)
        fields = dict(option_fields, format_pattern=format_pattern,
                      model_family_override=model_mode)
        options = dataclasses.replace(base, **fields)
        self.cursor = ScriptCursor(script)
        self.recognizers: list[ScriptedRecognizer] = []
        self._ms_per_word = ms_per_word
        self._rms_threshold = rms_threshold
        super().__init__(options, self._make_recognizer)
        self.server.use_faults(faults)

    def _make_recognizer(self, config: SessionConfig) -> ScriptedRecognizer:
        recognizer = ScriptedRecognizer(config, self.cursor, ms_per_word=self._ms_per_word,
                                        rms_threshold=self._rms_threshold)
        self.recognizers.append(recognizer)
        return recognizer


@pytest.fixture
def fake_v3() -> Iterable:
    """Factory fixture: ``srv = fake_v3(script=[...], ...)`` returns a started FakeV3Server,
    stopped at teardown."""
    servers: list[FakeV3Server] = []

    def make(*args: Any, **kwargs: Any) -> FakeV3Server:
        server = FakeV3Server(*args, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
