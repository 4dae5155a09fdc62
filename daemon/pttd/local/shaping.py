"""Turn shaping: recognizer events become Turn messages shaped like the requested model family.

Why apart from the session: the shapes (US word finality and ``utterance``, U3 partials at
pauses, formatted finals, speaker labels) are pure rules with no I/O and no clocks, readable and
testable on their own. The session feeds events with the stream position and sends what comes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pttd.local.recognizer import Hypothesis, HypWord, RecognizerEvent, SessionConfig, SpeechOnset
from pttd.local.wire import U3_CONTINUOUS_PARTIAL_MS


def format_words(words: Sequence[dict], capitalise: bool, final: bool) -> list[dict]:
    """Toy formatter: capitalise the first word, end the last with a period."""
    out = [dict(word) for word in words]
    if out and capitalise:
        out[0]["text"] = out[0]["text"][:1].upper() + out[0]["text"][1:]
    if out and final and not out[-1]["text"].endswith((".", "?", "!")):
        out[-1]["text"] += "."
    return out


def _join(words: Iterable[dict]) -> str:
    return " ".join(word["text"] for word in words)


class TurnShaper:
    """Turns recognizer events into server messages shaped like the requested model family.

    Pure (no I/O, no clocks): feed events with the current stream position, get messages back.
    """

    def __init__(
        self,
        config: SessionConfig,
        format_pattern: str = "A",
        llm_gateway: bool = False,
    ) -> None:
        if format_pattern not in ("A", "B"):
            raise ValueError(f"format_pattern must be 'A' or 'B', not {format_pattern!r}")
        self.config = config
        self.format_pattern = format_pattern
        self.llm_gateway = llm_gateway
        self.turn_order = 0
        self._reset_turn()

    def _reset_turn(self) -> None:
        self._partials = 0
        self._last_partial_key: Any = None
        self._last_partial_ms: int | None = None
        self._onset_ms: int | None = None
        self._uttered = 0

    # --- public API ---------------------------------------------------------------------------

    def update_config(self, config: SessionConfig) -> None:
        self.config = config

    def on_event(self, event: RecognizerEvent, stream_ms: int) -> list[dict]:
        """Messages for one recognizer event (may be none)."""
        if isinstance(event, SpeechOnset):
            return self._on_onset(event)
        if event.end_of_turn:
            return self._final(event)
        if not self.config.include_partial_turns or not event.words:
            return []
        if self.config.is_u3:
            return self._u3_partial(event, stream_ms)
        return self._us_partial(event)

    # --- shaping -------------------------------------------------------------------------------

    def _on_onset(self, onset: SpeechOnset) -> list[dict]:
        if self._onset_ms is None:
            self._onset_ms = onset.timestamp_ms
        if not self.config.is_u3:
            return []  # SpeechStarted exists only on U3 models (the U3 spec only)
        return [
            {
                "type": "SpeechStarted",
                "timestamp": int(onset.timestamp_ms),
                "confidence": round(float(onset.confidence), 6),
            }
        ]

    def _us_partial(self, hyp: Hypothesis) -> list[dict]:
        """Final words only in ``transcript``; ``utterance`` once per pause."""
        words = [self._word(w, final=w.is_final or hyp.pause) for w in hyp.words]
        key = tuple((w["text"], w["word_is_final"]) for w in words)
        n_final = sum(1 for w in words if w["word_is_final"])
        new_utterance = hyp.pause and n_final > self._uttered
        if key == self._last_partial_key and not new_utterance:
            return []
        self._last_partial_key = key
        self._partials += 1
        pattern_b = self.config.format_turns and self.format_pattern == "B"
        if pattern_b:
            words = format_words(words, capitalise=True, final=False)
        final_words = [w for w in words if w["word_is_final"]]
        utterance = ""
        if new_utterance:
            utterance = _join(final_words[self._uttered :])
            self._uttered = len(final_words)
        confidence = hyp.end_of_turn_confidence
        return [
            self._turn(
                words,
                _join(final_words),
                end_of_turn=False,
                formatted=pattern_b,
                confidence=0.0 if confidence is None else confidence,
                utterance=utterance,
                with_language=bool(utterance),
            )
        ]

    def _u3_partial(self, hyp: Hypothesis, stream_ms: int) -> list[dict]:
        if not self._u3_partial_due(hyp, stream_ms):
            return []
        words = [self._word(w, final=False) for w in hyp.words]
        transcript = _join(words)
        if transcript == self._last_partial_key:
            return []
        self._last_partial_key = transcript
        self._last_partial_ms = stream_ms
        self._partials += 1
        return [self._turn(words, transcript, end_of_turn=False, formatted=False, confidence=0.0)]

    def _u3_partial_due(self, hyp: Hypothesis, stream_ms: int) -> bool:
        """U3 partials come at pauses, once early in a turn, then every ~3 s."""
        if hyp.pause:
            return True
        onset = self._onset_ms if self._onset_ms is not None else hyp.words[0].start_ms
        if self._partials == 0:
            return stream_ms - onset >= self.config.interruption_delay_ms
        return (
            self.config.continuous_partials
            and self._last_partial_ms is not None
            and stream_ms - self._last_partial_ms >= U3_CONTINUOUS_PARTIAL_MS
        )

    def _final(self, hyp: Hypothesis) -> list[dict]:
        if not hyp.words and self._partials == 0:
            self._reset_turn()
            return []  # nothing was heard and nothing was shown: no turn at all
        words = [self._word(w, final=True) for w in hyp.words]
        confidence = hyp.end_of_turn_confidence
        messages = (
            self._u3_final(words)
            if self.config.is_u3
            else self._us_final(words, 1.0 if confidence is None else confidence)
        )
        if self.llm_gateway:
            messages.append(self._llm_response(messages[-1]["transcript"]))
        self.turn_order += 1
        self._reset_turn()
        return messages

    def _u3_final(self, words: list[dict]) -> list[dict]:
        words = format_words(words, capitalise=True, final=True)
        transcript = _join(words)
        return [
            self._turn(
                words,
                transcript,
                end_of_turn=True,
                formatted=True,
                confidence=1.0,
                utterance=transcript,
                with_language=True,
            )
        ]

    def _us_final(self, words: list[dict], confidence: float) -> list[dict]:
        new_words = words[self._uttered :]
        if self.config.format_turns and self.format_pattern == "B":
            formatted = format_words(words, capitalise=True, final=True)
            utterance = _join(formatted[self._uttered :]) if new_words else ""
            return [
                self._turn(
                    formatted,
                    _join(formatted),
                    end_of_turn=True,
                    formatted=True,
                    confidence=confidence,
                    utterance=utterance,
                    with_language=True,
                )
            ]
        messages = [
            self._turn(
                words,
                _join(words),
                end_of_turn=True,
                formatted=False,
                confidence=confidence,
                utterance=_join(new_words),
                with_language=True,
            )
        ]
        if self.config.format_turns:  # Pattern A: a formatted copy with the same turn_order
            formatted = format_words(words, capitalise=True, final=True)
            messages.append(
                self._turn(
                    formatted,
                    _join(formatted),
                    end_of_turn=True,
                    formatted=True,
                    confidence=confidence,
                    utterance="",
                    with_language=True,
                )
            )
        return messages

    # --- message builders ----------------------------------------------------------------------

    def _word(self, word: HypWord, final: bool) -> dict:
        return {
            "text": word.text,
            "start": int(word.start_ms),
            "end": int(word.end_ms),
            "confidence": round(float(word.confidence), 6),
            "word_is_final": bool(final),
        }

    def _turn(
        self,
        words: list[dict],
        transcript: str,
        *,
        end_of_turn: bool,
        formatted: bool,
        confidence: float,
        utterance: str = "",
        with_language: bool = False,
    ) -> dict:
        message: dict[str, Any] = {
            "type": "Turn",
            "turn_order": self.turn_order,
            "turn_is_formatted": formatted,
            "end_of_turn": end_of_turn,
            "transcript": transcript,
            "end_of_turn_confidence": float(confidence),
            "words": words,
            "utterance": utterance,
        }
        if self.config.language_detection and with_language:
            message["language_code"] = "en"
            message["language_confidence"] = 0.99
        if self.config.speaker_labels:
            label = self._speaker_label(words)
            message["speaker_label"] = label
            for word in words:
                if word["word_is_final"]:
                    word["speaker"] = label
        return message

    @staticmethod
    def _speaker_label(words: list[dict]) -> str:
        """One speaker; turns under ~1 s of audio are UNKNOWN, as documented."""
        if words and words[-1]["end"] - words[0]["start"] >= 1000:
            return "A"
        return "UNKNOWN"

    def _llm_response(self, transcript: str) -> dict:
        return {
            "type": "LLMGatewayResponse",
            "turn_order": self.turn_order,
            "transcript": transcript,
            "data": {
                "id": f"chatcmpl-local-{self.turn_order}",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": transcript},
                    }
                ],
            },
        }
