"""The offline engine: a v3-compatible endpoint backed by pocketsphinx (``pttd serve-local``).

Why: with no key and no internet (``pttd demo``, ``url = "local"``, ``fallback = "local"``) pttd
still needs real speech recognition behind the same wire protocol, so the daemon cannot tell the
difference. :mod:`pttd.local.server` does the protocol; this module is only its Recognizer seam.

Choices, measured on espeak-ng speech (x86, see bench/local_bench.py):

* **Vocabulary.** Free dictation uses the wheel's en-us LM (poor: ~50-90% WER). Phrases (the
  ``[local] phrases`` list and/or the session's ``keyterms_prompt``) switch to a JSGF grammar of
  exactly those phrases: ~0% WER at ~1/15 of the CPU. With configured phrases the decoders load
  no LM at all (~30 MB and 0.1 s instead of ~90 MB and 0.25 s per decoder).
* **Decoders are pooled**, not shared: a pocketsphinx ``Decoder`` cannot share its loaded model
  with another, and one is not thread-safe, so each live session owns one and returns it to a
  small idle pool when it closes. The next press reuses it (no load, warm CMN).
* **VAD** is an energy detector against a tracked noise floor. ``Decoder.get_in_speech()`` is a
  stub in pocketsphinx 5 (always True), and the bundled WebRTC-style ``Vad`` calls stationary
  noise at -40 dBFS speech in every mode (and the first ~180 ms of any stream), so it could never
  end a turn in a noisy room.
* **No re-decoding.** Audio is decoded once, incrementally, from speech onset (with pre-roll)
  until the turn ends; partials read the decoder's current best path at most every 200 ms.
  ``process_raw`` holds the GIL while it works, so audio goes in 20 ms at a time: other
  threads of the process wait at most one such call (~2 ms here in free dictation).
* **fwdflat and bestpath off.** fwdflat's second pass at ``end_utt`` costs 60-200 ms of
  ForceEndpoint → final latency here (several times that on a Pi) and ~30% more CPU for
  69% instead of 72% WER on ten espeak sentences. bestpath made no WER difference in free
  dictation but breaks grammars: with it, pocketsphinx 5.1.1 turned a clearly decoded
  "what time is it" into "what time" (not even a grammar phrase) whenever words had pauses.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import ipaddress
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pttd.config import ConfigError
from pttd.local.server import (
    Faults,
    Hypothesis,
    HypWord,
    RecognizerEvent,
    RecognizerFactory,
    ServerOptions,
    ServerThread,
    SessionConfig,
    SpeechOnset,
)

log = logging.getLogger(__name__)

MODEL_RATE = 16000  # the en-us acoustic model's rate; other rates are resampled
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
MAX_IDLE_DECODERS = 1  # kept loaded between sessions (one PTT device = one session)
MAX_GRAMMARS = 8  # per decoder; the oldest is dropped beyond this
#: Closing handshake wait: loopback answers in ms, and an in-process engine's stop must be quick.
CLOSE_TIMEOUT_S = 1.0
#: Loopback is open; any other address needs this key (the Authorization header).
API_KEY_ENV = "PTTD_LOCAL_API_KEY"

#: pocketsphinx options: see the module docstring for fwdflat and bestpath. Its C library logs
#: straight to stderr, and "errors" such as speech matching no phrase are normal here: FATAL.
DECODER_OPTIONS: dict[str, Any] = {
    "samprate": MODEL_RATE,
    "loglevel": "FATAL",
    "fwdflat": False,
    "bestpath": False,
}

_LM = "\0lm"  # not a valid grammar name, so never confused with one
_NON_WORD = re.compile(r"[^a-z0-9']+")
_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")


# ================================================================================================
# Phrases and grammars
# ================================================================================================


class UnknownWordsError(ConfigError):
    """Phrases use words the pronunciation dictionary lacks (the recognizer cannot say them)."""

    def __init__(self, unknown: Mapping[str, Sequence[str]]) -> None:
        self.unknown = {phrase: list(words) for phrase, words in unknown.items()}
        listed = "; ".join(f"{phrase!r}: {', '.join(words)}" for phrase, words in unknown.items())
        super().__init__(
            f"local phrases use words not in the pocketsphinx dictionary "
            f"({listed}); spell them as ordinary English words"
        )


def normalize_phrase(text: Any) -> str:
    """Lower case, punctuation to spaces (apostrophes inside words kept: ``what's``)."""
    words = (word.strip("'") for word in _NON_WORD.split(str(text).lower()))
    return " ".join(word for word in words if word)


def normalize_phrases(phrases: Iterable[Any]) -> tuple[str, ...]:
    """Normalized, empty ones dropped, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(p for p in map(normalize_phrase, phrases) if p))


def jsgf(phrases: Sequence[str]) -> str:
    """A JSGF grammar accepting exactly one of the (normalized) phrases."""
    return (
        "#JSGF V1.0;\ngrammar pttd;\npublic <phrase> = "
        + " | ".join(f"( {p} )" for p in phrases)
        + " ;\n"
    )


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A phrase set and the decoder search name it lives under."""

    phrases: tuple[str, ...]

    @property
    def name(self) -> str:
        return "g" + hashlib.sha1("\n".join(self.phrases).encode()).hexdigest()[:16]


# ================================================================================================
# Decoders
# ================================================================================================


class _PooledDecoder:
    """One pocketsphinx Decoder plus the grammar searches already compiled into it."""

    def __init__(self, with_lm: bool) -> None:
        from pocketsphinx import Decoder  # imported late: only engines need it

        options = dict(DECODER_OPTIONS) if with_lm else dict(DECODER_OPTIONS, lm=None)
        self.decoder = Decoder(**options)
        self.with_lm = with_lm
        #: Active search: _LM, a grammar name, or None. Tracked here because
        #: ``Decoder.current_search()`` segfaults on a decoder with no search yet (5.1.1).
        self._active: str | None = _LM if with_lm else None
        self.in_utterance = False
        self._grammars: collections.OrderedDict[str, None] = collections.OrderedDict()

    def unknown_words(self, phrase: str) -> list[str]:
        return [w for w in phrase.split() if self.decoder.lookup_word(w) is None]

    def activate(self, grammar: Grammar | None) -> None:
        """Use ``grammar`` (None = the language model) for the next utterance."""
        if grammar is None and not self.with_lm:
            raise RuntimeError("this decoder has no language model; phrases are required")
        name = _LM if grammar is None else self._add(grammar)
        if self._active != name:
            self.decoder.activate_search(None if grammar is None else name)
            self._active = name

    def _add(self, grammar: Grammar) -> str:
        """Compile the grammar once per decoder; keep at most MAX_GRAMMARS of them."""
        name = grammar.name
        if name in self._grammars:
            self._grammars.move_to_end(name)
            return name
        self.decoder.add_jsgf_string(name, jsgf(grammar.phrases))
        self._grammars[name] = None
        if len(self._grammars) > MAX_GRAMMARS:
            oldest, _ = self._grammars.popitem(last=False)
            if self._active == oldest:
                self.decoder.activate_search(name)
                self._active = name
            self.decoder.remove_search(oldest)
        return name

    def start(self) -> None:
        self.decoder.start_utt()
        self.in_utterance = True

    def end(self) -> None:
        if self.in_utterance:
            self.in_utterance = False
            self.decoder.end_utt()


class DecoderPool:
    """Loaded decoders waiting for the next session (a Decoder costs 0.1-0.25 s to load)."""

    def __init__(self, with_lm: bool, max_idle: int = MAX_IDLE_DECODERS) -> None:
        self.with_lm = with_lm
        self.max_idle = max_idle
        self._idle: list[_PooledDecoder] = []
        self._lock = threading.Lock()
        self.loaded = 0

    def acquire(self) -> _PooledDecoder:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        decoder = _PooledDecoder(self.with_lm)
        with self._lock:
            self.loaded += 1
        log.debug("loaded a pocketsphinx decoder (lm=%s, %d so far)", self.with_lm, self.loaded)
        return decoder

    def release(self, decoder: _PooledDecoder) -> None:
        decoder.end()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(decoder)

    def prewarm(self) -> None:
        """Load one decoder now so the first press does not pay for it."""
        self.release(self.acquire())

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()

    def unknown_words(self, phrases: Sequence[str]) -> dict[str, list[str]]:
        """``{phrase: [words missing from the dictionary]}`` for the phrases that have any."""
        decoder = self.acquire()
        try:
            found = {p: decoder.unknown_words(p) for p in phrases}
        finally:
            self.release(decoder)
        return {p: words for p, words in found.items() if words}


# ================================================================================================
# Audio front end
# ================================================================================================


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


# ================================================================================================
# The recognizer
# ================================================================================================


class PocketsphinxRecognizer:
    """One session's recognizer: energy VAD → incremental pocketsphinx decode → hypotheses.

    A turn starts at speech onset (decoding from ``PREROLL_MS`` before it) and ends on
    ``force_endpoint``/``finish``, after ``max_turn_silence`` ms below the VAD threshold, or at
    ``MAX_TURN_MS``. Every call holds a lock, since ``close`` may come from another thread.
    """

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
        self._decoder: _PooledDecoder | None = None
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

    def _apply_keyterms(self, decoder: _PooledDecoder) -> None:
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


# ================================================================================================
# Factory, engine, CLI
# ================================================================================================


class PocketsphinxFactory:
    """A :data:`RecognizerFactory` with its decoder pool. Configured phrases are checked now."""

    def __init__(self, phrases: Iterable[Any] | None = None) -> None:
        self.phrases = normalize_phrases(phrases or ())
        self.pool = DecoderPool(with_lm=not self.phrases)
        if self.phrases:
            unknown = self.pool.unknown_words(self.phrases)  # also loads the first decoder
            if unknown:
                raise UnknownWordsError(unknown)

    def __call__(self, config: SessionConfig) -> PocketsphinxRecognizer:
        return PocketsphinxRecognizer(config, self.pool, self.phrases)

    @property
    def mode(self) -> str:
        return "grammar" if self.phrases else "free"


def make_factory(phrases: list[str] | None = None) -> RecognizerFactory:
    """Recognizers for a v3 server: free dictation, or only ``phrases`` when given.

    Raises :class:`UnknownWordsError` (a ConfigError) if a phrase has a word pocketsphinx cannot
    pronounce.
    """
    return PocketsphinxFactory(phrases)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalEngine(ServerThread):
    """The pocketsphinx v3 server in a background thread: ``with LocalEngine() as e: e.url``.

    On loopback it accepts any connection (the daemon sends whatever key it has, maybe none).
    ``api_key`` makes it check the ``Authorization`` header instead (required off loopback).
    ``options``/``faults`` are for tests; ``factory`` shares a loaded pool between engines.
    """

    def __init__(
        self,
        phrases: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        options: ServerOptions | None = None,
        faults: Faults | Sequence[Faults] | None = None,
        factory: PocketsphinxFactory | None = None,
        prewarm: bool = True,
    ) -> None:
        if not is_loopback(host) and not api_key:
            raise ConfigError(
                f"the local engine has no authentication of its own: refusing to "
                f"listen on {host} (not loopback) without a key; set "
                f"{API_KEY_ENV} or use 127.0.0.1"
            )
        self.factory = factory or PocketsphinxFactory(phrases)
        self._prewarm = prewarm
        base = options or ServerOptions()
        options = dataclasses.replace(
            base,
            host=host,
            port=port,
            recognizer_in_thread=True,
            close_timeout_s=min(base.close_timeout_s, CLOSE_TIMEOUT_S),
            require_auth=bool(api_key),
            api_keys=frozenset({api_key}) if api_key else base.api_keys,
        )
        super().__init__(options, self.factory, faults)

    def start(self, timeout: float = 10.0) -> LocalEngine:
        if self._prewarm:
            self.factory.pool.prewarm()
        super().start(timeout)
        return self

    @property
    def mode(self) -> str:
        """ "grammar" (phrases configured) or "free" (dictation; keyterms may still constrain)."""
        return self.factory.mode


def serve(host: str = "127.0.0.1", port: int = 8765, phrases: list[str] | None = None) -> int:
    """``pttd serve-local``: print the URL, serve until SIGINT/SIGTERM, return 0.

    Off loopback a key from ``$PTTD_LOCAL_API_KEY`` is required (a ConfigError otherwise), as
    for the kiosk listener: free, CPU-heavy speech recognition should not be open to a LAN.
    """
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    api_key = os.environ.get(API_KEY_ENV) or None
    try:
        with LocalEngine(phrases, host, port, api_key=api_key) as engine:
            log.info("local engine (%s) listening on %s", engine.mode, engine.url)
            print(engine.url, flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
