"""pocketsphinx decoders for the offline engine: phrase grammars and a pool of loaded decoders.

Choices, measured on espeak-ng speech (x86, see bench/local_bench.py):

* **Vocabulary.** Free dictation uses the wheel's en-us LM (poor: ~50-90% WER). Phrases (the
  ``[local] phrases`` list and/or the session's ``keyterms_prompt``) switch to a JSGF grammar of
  exactly those phrases: ~0% WER at ~1/15 of the CPU. With configured phrases the decoders load
  no LM at all (~30 MB and 0.1 s instead of ~90 MB and 0.25 s per decoder).
* **Decoders are pooled**, not shared: a pocketsphinx ``Decoder`` cannot share its loaded model
  with another, and one is not thread-safe, so each live session owns one and returns it to a
  small idle pool when it closes. The next press reuses it (no load, warm CMN).
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
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pttd.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_RATE = 16000  # the en-us acoustic model's rate; other rates are resampled
MAX_IDLE_DECODERS = 1  # kept loaded between sessions (one PTT device = one session)
MAX_GRAMMARS = 8  # per decoder; the oldest is dropped beyond this

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


class PooledDecoder:
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
        self._idle: list[PooledDecoder] = []
        self._lock = threading.Lock()
        self.loaded = 0

    def acquire(self) -> PooledDecoder:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        decoder = PooledDecoder(self.with_lm)
        with self._lock:
            self.loaded += 1
        log.debug("loaded a pocketsphinx decoder (lm=%s, %d so far)", self.with_lm, self.loaded)
        return decoder

    def release(self, decoder: PooledDecoder) -> None:
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
