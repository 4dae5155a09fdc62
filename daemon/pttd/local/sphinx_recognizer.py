"""The offline engine's recognizer: energy VAD → incremental pocketsphinx decode → hypotheses.

Choices, measured on espeak-ng speech (x86, see bench/local_bench.py):

* **VAD** is an energy detector against a tracked noise floor. ``Decoder.get_in_speech()`` is a
  stub in pocketsphinx 5 (always True), and the bundled WebRTC-style ``Vad`` calls stationary
  noise at -40 dBFS speech in every mode (and the first ~180 ms of any stream), so it could never
  end a turn in a noisy room.
* **No re-decoding.** Audio is decoded once, incrementally, from speech onset (with pre-roll)
  until the turn ends; partials read the decoder's current best path at most every 200 ms.
  ``process_raw`` holds the GIL while it works, so audio goes in 20 ms at a time: other
  threads of the process wait at most one such call (~2 ms here in free dictation).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pttd.local.decoders import (
    MODEL_RATE,
    DecoderPool,
    Grammar,
    PooledDecoder,
    normalize_phrases,
)
from pttd.local.recognizer import Hypothesis, HypWord, RecognizerEvent, SessionConfig, SpeechOnset

log = logging.getLogger(__name__)

FRAMES_PER_S = 100  # pocketsphinx feature frames (Segment.start_frame units)
WINDOW_MS = 20  # VAD decision unit
WINDOW = MODEL_RATE * WINDOW_MS // 1000
ONSET_WINDOWS = 3  # 60 ms of speech starts a turn (a click does not)
PREROLL_MS = 300  # audio before the onset that is decoded too
PARTIAL_INTERVAL_MS = 200  # at most 5 partial hypotheses per second
MAX_TURN_MS = 60_000  # a stuck button in a noisy room must not grow the lattice forever
VAD_MARGIN_DB = 12.0  # speech is this far above the noise floor ...
VAD_MIN_DB = -50.0  # ... and above this absolute level (dBFS)
VAD_FLOOR_MS = 2000  # the floor is the quietest window of this trailing span

_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")


class _Resampler:
    """Stateful linear-interpolation resampler to 16 kHz, box pre-filter when downsampling.

    Only for sessions not at 16 kHz; adequate for a fallback recognizer, not for hi-fi.
    """

    def __init__(self, rate: int) -> None:
        self.step = rate / MODEL_RATE
        self.box = max(1, int(round(self.step)))
        self._history = np.zeros(self.box - 1)  # raw input the box filter still needs
        self._last: float | None = None  # last filtered sample (interpolation origin)
        self._pos = 0.0  # next output position, 0 = ``_last``

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        raw = np.concatenate([self._history, samples.astype(np.float64)])
        if self.box > 1:
            filtered = np.convolve(raw, np.ones(self.box) / self.box, mode="valid")
            self._history = raw[len(raw) - (self.box - 1) :]
        else:
            filtered = raw
        x = filtered if self._last is None else np.concatenate([[self._last], filtered])
        if len(x) == 0:
            return np.zeros(0, dtype=np.int16)
        span = len(x) - 1
        count = int((span - self._pos) // self.step) + 1 if self._pos <= span else 0
        positions = self._pos + self.step * np.arange(count)
        self._pos += count * self.step - span
        self._last = float(x[-1])
        out = np.interp(positions, np.arange(len(x)), x)
        return np.clip(np.round(out), -32768, 32767).astype(np.int16)


class EnergyVad:
    """Speech = window level above both the tracked noise floor + margin and an absolute minimum.

    The floor is the quietest 20 ms window of the last 2 s, so stationary noise (fans, hum)
    becomes floor within 2 s while the gaps between words keep the floor low during speech.
    """

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=VAD_FLOOR_MS // WINDOW_MS)

    @staticmethod
    def levels(windows: np.ndarray) -> np.ndarray:
        """dBFS per row of int16 samples."""
        power = np.mean(np.square(windows.astype(np.float64)), axis=1)
        return 10.0 * np.log10(power / (32768.0**2) + 1e-12)

    def margin(self, level: float) -> float:
        """dB above the speech threshold (positive = speech); updates the floor."""
        self._recent.append(level)
        floor = min(self._recent)
        return level - max(floor + VAD_MARGIN_DB, VAD_MIN_DB)


class PocketsphinxRecognizer:
    """One session's recognizer: energy VAD → incremental pocketsphinx decode → hypotheses.

    A turn starts at speech onset (decoding from ``PREROLL_MS`` before it) and ends on
    ``force_endpoint``/``finish``, after ``max_turn_silence`` ms below the VAD threshold, or at
    ``MAX_TURN_MS``. Every call holds a lock, since ``close`` may come from another thread.
    """

    # the turn in progress (set by _reset_turn)
    _utt_start_ms: int
    _last_partial_ms: int
    _silence_ms: int

    def __init__(
        self, config: SessionConfig, pool: DecoderPool, phrases: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.pool = pool
        self.base_phrases = tuple(phrases)
        self.min_silence_ms = config.min_turn_silence_ms
        self.max_silence_ms = config.max_turn_silence_ms
        self._keyterms: tuple[Any, ...] | None = tuple(config.keyterms_prompt)  # None = applied
        self.grammar: Grammar | None = Grammar(self.base_phrases) if self.base_phrases else None
        self._lock = threading.Lock()
        self._decoder: PooledDecoder | None = None
        rate = config.sample_rate
        self._resample = _Resampler(rate) if rate != MODEL_RATE else None
        self._vad = EnergyVad()
        self._pending = np.zeros(0, dtype=np.int16)
        self._windows = 0  # 20 ms windows consumed (the stream clock)
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=PREROLL_MS // WINDOW_MS)
        self._speech_run = 0
        self._in_turn = False
        self._reset_turn()

    # --- Recognizer protocol ---------------------------------------------------------------------

    def feed(self, pcm16: bytes, stream_ms: int) -> list[RecognizerEvent]:
        with self._lock:
            samples = np.frombuffer(pcm16, dtype="<i2")
            if self._resample is not None:
                samples = self._resample(samples)
            self._pending = np.concatenate([self._pending, samples])
            count = len(self._pending) // WINDOW
            windows = self._pending[: count * WINDOW].reshape(count, WINDOW)
            self._pending = self._pending[count * WINDOW :]
            events: list[RecognizerEvent] = []
            for window, level in zip(windows, EnergyVad.levels(windows)):
                events.extend(self._on_window(window, float(level)))
            return events

    def force_endpoint(self) -> list[RecognizerEvent]:
        with self._lock:
            if not self._in_turn:
                return []
            return [self._end_turn(confidence=1.0)]

    def finish(self) -> list[RecognizerEvent]:
        return self.force_endpoint()

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Silence limits apply at once; a new ``keyterms_prompt`` from the next turn on."""
        with self._lock:
            for key, attr in (
                ("min_turn_silence", "min_silence_ms"),
                ("max_turn_silence", "max_silence_ms"),
            ):
                value = changes.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(self, attr, int(value))
            if isinstance(changes.get("keyterms_prompt"), list):
                self._keyterms = tuple(changes["keyterms_prompt"])

    def close(self) -> None:
        """Give the decoder back to the pool (called by the server when the session ends)."""
        with self._lock:
            if self._decoder is not None:
                decoder, self._decoder = self._decoder, None
                self.pool.release(decoder)

    # --- vocabulary ------------------------------------------------------------------------------

    def _apply_keyterms(self, decoder: PooledDecoder) -> None:
        """Grammar = configured phrases + keyterms the dictionary knows; None = free dictation.

        Runs at a turn start (on the recognizer's thread, with a decoder at hand), not in the
        factory, which runs on the server's event loop.
        """
        if self._keyterms is None:
            return
        extra = normalize_phrases(self._keyterms)
        self._keyterms = None
        usable = []
        for phrase in extra:
            unknown = decoder.unknown_words(phrase)
            if unknown:
                log.warning(
                    "session %s: keyterm %r ignored, not in the dictionary: %s",
                    self.config.session_id,
                    phrase,
                    ", ".join(unknown),
                )
            else:
                usable.append(phrase)
        phrases = tuple(dict.fromkeys(self.base_phrases + tuple(usable)))
        self.grammar = Grammar(phrases) if phrases else None

    # --- per window ------------------------------------------------------------------------------

    def _on_window(self, window: np.ndarray, level: float) -> list[RecognizerEvent]:
        start_ms = self._windows * WINDOW_MS
        self._windows += 1
        margin = self._vad.margin(level)
        speech = margin > 0
        self._speech_run = self._speech_run + 1 if speech else 0
        if not self._in_turn:
            self._preroll.append(window.tobytes())
            if self._speech_run < ONSET_WINDOWS:
                return []
            return self._start_turn(start_ms - (ONSET_WINDOWS - 1) * WINDOW_MS, margin)
        self._decode(window.tobytes())
        return self._in_turn_window(speech, start_ms + WINDOW_MS)

    def _in_turn_window(self, speech: bool, end_ms: int) -> list[RecognizerEvent]:
        self._silence_ms = 0 if speech else self._silence_ms + WINDOW_MS
        if speech:
            self._paused = False
        if self._silence_ms >= self.max_silence_ms:
            return [self._end_turn(confidence=1.0)]
        if end_ms - self._utt_start_ms >= MAX_TURN_MS:
            log.info(
                "session %s: turn reached %d ms, ending it", self.config.session_id, MAX_TURN_MS
            )
            return [self._end_turn(confidence=0.5)]
        if not self._paused and self._silence_ms >= self.min_silence_ms:
            self._paused = True
            return self._partial(pause=True)
        if end_ms - self._last_partial_ms >= PARTIAL_INTERVAL_MS:
            self._last_partial_ms = end_ms
            return self._partial(pause=False)
        return []

    # --- turns -----------------------------------------------------------------------------------

    def _reset_turn(self) -> None:
        self._in_turn = False
        self._utt_start_ms = 0
        self._last_partial_ms = 0
        self._silence_ms = 0
        self._paused = False
        self._last_words: tuple[HypWord, ...] = ()

    def _start_turn(self, onset_ms: int, margin_db: float) -> list[RecognizerEvent]:
        if self._decoder is None:
            self._decoder = self.pool.acquire()
        self._apply_keyterms(self._decoder)
        self._decoder.activate(self.grammar)
        self._decoder.start()
        self._in_turn = True
        self._utt_start_ms = (self._windows - len(self._preroll)) * WINDOW_MS
        self._last_partial_ms = self._windows * WINDOW_MS
        for window in self._preroll:  # window by window: process_raw holds the GIL
            self._decode(window)
        self._preroll.clear()
        confidence = round(min(0.99, 0.5 + margin_db / 40.0), 3)
        return [SpeechOnset(onset_ms, confidence)]

    def _end_turn(self, confidence: float) -> Hypothesis:
        assert self._decoder is not None
        self._decoder.end()
        words = tuple(dataclasses.replace(w, is_final=True) for w in self._words())
        if not words and self.grammar is not None:
            log.info(
                "session %s: the speech matched none of the %d phrases",
                self.config.session_id,
                len(self.grammar.phrases),
            )
        self._reset_turn()
        return Hypothesis(words, end_of_turn=True, end_of_turn_confidence=confidence)

    def _partial(self, pause: bool) -> list[RecognizerEvent]:
        """The decoder's current best path, only when it changed (or at a pause)."""
        words = self._words()
        if not words or (words == self._last_words and not pause):
            return []
        self._last_words = words
        return [Hypothesis(words, pause=pause, end_of_turn_confidence=0.3 if pause else 0.0)]

    def _decode(self, pcm: bytes) -> None:
        if pcm:
            assert self._decoder is not None
            self._decoder.decoder.process_raw(pcm, False, False)

    def _words(self) -> tuple[HypWord, ...]:
        """Words of the current best path; frame times mapped to stream ms."""
        assert self._decoder is not None
        segments = self._decoder.decoder.seg()
        if segments is None:  # e.g. a grammar with no complete path yet
            return ()
        words = []
        for seg in segments:
            text = _ALT_PRONUNCIATION.sub("", seg.word)
            if not text or text[0] in "<[+(":  # <s>, </s>, <sil>, [NOISE], ++filler++, (NULL)
                continue
            start = self._utt_start_ms + seg.start_frame * 1000 // FRAMES_PER_S
            end = self._utt_start_ms + (seg.end_frame + 1) * 1000 // FRAMES_PER_S
            confidence = seg.prob if math.isfinite(seg.prob) else 0.0
            words.append(HypWord(text, start, end, round(min(max(confidence, 0.0), 1.0), 4)))
        return tuple(words)
