"""A local server that speaks AssemblyAI's Universal Streaming v3 WebSocket protocol.

Why it exists: the test suite needs a faithful stand-in for ``wss://streaming.assemblyai.com/v3/ws``
(with fault injection), and an offline engine (pocketsphinx) needs the same wire protocol so the
daemon cannot tell the difference. The behaviour follows the protocol reference in
``/work/shared/research/assemblyai-v3.md`` (section numbers below point there), not any client.

Layers, from the wire inwards:

* :class:`V3Server` / :class:`ServerThread` - accept connections, keep :class:`ConnectionRecord` s.
* ``_Session`` - one per connection: auth, ``Begin``, frame checks, timers, faults, ``Terminate``.
* :class:`TurnShaper` - turns recognizer hypotheses into US- or U3-shaped ``Turn`` messages.
* :class:`Recognizer` - the seam. The core never decides text; a recognizer does.

Depends only on the standard library and ``websockets`` (asyncio API).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import urllib.parse
import uuid
import weakref
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

# Facts of the API itself, from AssemblyAI's specs and docs (research §1-§5), kept here on the
# server's side: nothing is imported from pttd's client, so a client bug cannot become a fake
# server that agrees with it.
#: The version the SDK pins and the server echoes in Begin (§1.2).
API_VERSION = "2025-05-12"
#: "audio data between 50ms and 1000ms in length" (usm-streaming.yml, sendAudio).
MIN_FRAME_MS = 50
MAX_FRAME_MS = 1000
#: The Universal-3 Pro family (§1.4 "Models"): U3 shaping, SpeechStarted, format_turns ignored.
U3_MODELS = frozenset(
    {"u3-rt-pro", "u3-rt-pro-beta-1", "u3-pro", "universal-3-5-pro", "universal-3-6-pro"}
)

DEFAULT_PATH = "/v3/ws"
#: Temporary tokens (streaming-token.yml): GET with the API key, one session per token.
TOKEN_PATH = "/v3/token"
TOKEN_EXPIRES_RANGE = (1, 600)
TOKEN_MAX_SESSION_RANGE = (60, 10800)
#: Newest docs: a connection with only auth gets this model (§8 "Default speech_model history").
DEFAULT_SPEECH_MODEL = "universal-3-5-pro"
MAX_CLOSE_REASON_BYTES = 123
LONG_REASON = "See Error message for details"
#: Category prefix seen in the wild on 3007 texts (§2.1, pigeonai-org/ViDove#3).
INPUT_DURATION_ERROR_PREFIX = "Input Duration Error: "

AUTH_ERROR = "Unauthorized Connection: Missing Authorization header"
EXPIRED_ERROR = "Session Expired: Maximum session duration exceeded"
CONCURRENCY_ERROR = "Unauthorized Connection: Too many concurrent sessions"
LEGACY_CONCURRENCY_ERROR = "Unauthorized connection: Too many concurrent sessions"
GENERIC_ERROR = "Session Cancelled: An error occurred"

CLIENT_MESSAGE_TYPES = frozenset({"UpdateConfiguration", "ForceEndpoint", "KeepAlive", "Terminate"})
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_mulaw": 1}
#: Encodings the real service accepts but this server cannot decode (§1.4).
UNSUPPORTED_ENCODINGS = frozenset({"opus", "ogg_opus", "aac"})

# Defaults per model family (§1.4 table).
US_DEFAULTS = {"max_turn_silence": 1280, "min_turn_silence": 400}
U3_DEFAULTS = {"max_turn_silence": 1000, "min_turn_silence": 100}
U3_EARLY_PARTIAL_MS = 750  # §4.4: early partial after ~750 ms of continuous speech
U3_CONTINUOUS_PARTIAL_MS = 3000  # §4.4: continuous partials about every 3 s


# ================================================================================================
# Options and faults
# ================================================================================================


@dataclass(frozen=True)
class ServerOptions:
    """Server-wide behaviour. Defaults mimic the real service as of late 2026."""

    #: Accepted API keys (``Authorization`` header). Empty = accept any non-empty credential.
    api_keys: frozenset[str] = frozenset()
    #: Take ``True``/``False`` for booleans in the query as well (what AssemblyAI's Python SDK
    #: sends; reported to work on the real service, §1.4). Off: strict JSON spelling only. On
    #: only for bench/compare_sdk.py, which runs the SDK against this server.
    python_booleans: bool = False
    #: False = accept every connection, even with no or an empty credential (loopback local engine).
    require_auth: bool = True
    #: Temporary tokens, accepted in ``?token=`` or in the header (as the SDK sends them).
    tokens: frozenset[str] = frozenset()
    #: Real temporary tokens open one session only (§1.3).
    single_use_tokens: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    path: str = DEFAULT_PATH
    #: Session lifetime; at expiry Error 3008 + close 3008. ``Begin.expires_at`` reflects it.
    expires_in_s: float = 10800.0
    #: How far received audio may run ahead of wall time since the first frame before 3007.
    max_lead_s: float = 3.0
    #: Pre-2026-02-25 codes: 3005 instead of 3006/3007/3008, 1008 instead of 3009 (§5.1).
    legacy_codes: bool = False
    #: New sessions allowed per ``limiter_window_s`` (0 = unlimited) before Error 3009. The real
    #: service: 5 per minute on a free account, 100+ paid (§6). Off by default here.
    sessions_per_minute: int = 0
    limiter_window_s: float = 60.0
    #: Prefix for 3007 texts, e.g. :data:`INPUT_DURATION_ERROR_PREFIX`.
    duration_error_prefix: str = ""
    #: Inactivity close; the real code and text are unverified (§4.7). Code 1000 sends no Error.
    inactivity_close_code: int = 3005
    inactivity_error: str = "Session Cancelled: Inactivity timeout exceeded"
    #: Accepted ``inactivity_timeout`` range in seconds (real: 5-3600). Tests may lower the floor.
    inactivity_min_s: float = 5.0
    inactivity_max_s: float = 3600.0
    #: ``format_turns=true`` on US models: "A" = unformatted final + formatted copy with the same
    #: ``turn_order``; "B" = every Turn formatted, one final (§4.3).
    format_pattern: str = "A"
    default_speech_model: str = DEFAULT_SPEECH_MODEL
    #: Test knob: force "us" or "u3" shaping whatever ``speech_model`` says (None = faithful).
    model_family_override: str | None = None
    #: Append an em dash to U3 partial transcripts, as the real U3 sometimes does (§3.3).
    u3_partial_em_dash: bool = False
    #: Heartbeat cadence when ``session_heartbeat=true`` (real cadence unverified).
    heartbeat_interval_s: float = 1.0
    #: Run recognizer calls in a worker thread (for CPU-heavy decoders such as pocketsphinx).
    recognizer_in_thread: bool = False
    close_timeout_s: float = 5.0
    ping_interval_s: float | None = 20.0
    max_message_bytes: int = 1 << 24
    #: ``GET /v3/token`` mints one-use temporary tokens (§1.3) when on.
    token_endpoint: bool = True
    #: Lower bound of ``max_session_duration_seconds`` (real: 60). Tests may lower it, which
    #: only makes the server stricter (shorter sessions), never kinder.
    token_min_session_s: float = TOKEN_MAX_SESSION_RANGE[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        object.__setattr__(self, "tokens", frozenset(self.tokens))
        if self.format_pattern not in ("A", "B"):
            raise ValueError(f"format_pattern must be 'A' or 'B', not {self.format_pattern!r}")


@dataclass(frozen=True)
class Faults:
    """Per-connection fault injection. Everything is off by default."""

    #: Abort the TCP connection (no close frame) right after receiving this many audio frames.
    drop_after_frames: int | None = None
    #: Abort the TCP connection when ForceEndpoint arrives.
    drop_on_force_endpoint: bool = False
    #: On Terminate: None = normal; "ignore" = do nothing at all; "close" = flush turns, then
    #: close 1000 without sending Termination.
    no_termination: str | None = None
    #: Wait this long after the upgrade before sending Begin.
    begin_delay_s: float = 0.0
    #: Close with (code, reason) right after the upgrade, before Begin, with no Error frame.
    close_before_begin: tuple[int, str] | None = None
    #: Reject the HTTP upgrade with this status (e.g. 401).
    http_reject_status: int | None = None
    #: Inject an unknown message type after Begin and before each final Turn, and an unknown
    #: extra field into every message.
    unknown_messages: bool = False
    #: Delay end-of-turn Turns (and everything queued behind them) by this long.
    turn_delay_s: float = 0.0
    #: After this many audio frames send Error 3005, then go silent forever (never close).
    error_without_close: int | None = None
    #: (code, after_frames): send Error ``code`` + close ``code`` after that many frames.
    error_mid_turn: tuple[int, int] | None = None
    #: ForceEndpoint with no speech pending: "none" = send nothing, "empty_turn" = send an
    #: end_of_turn Turn with an empty transcript (real behaviour unverified, §4.5).
    empty_force_endpoint: str = "none"
    #: (after_frames, texts): send these text frames exactly as given (hostile or malformed
    #: messages: a real server's bug or a man in the middle) after that many audio frames.
    raw_after_frames: tuple[int, tuple[str, ...]] | None = None
    #: (seconds, texts): the same, that long after Begin, whatever the client is doing (a Turn
    #: that arrives while a kept-warm session is idle, say).
    raw_after_s: tuple[float, tuple[str, ...]] | None = None
    #: After an Error frame, close with this (code, reason) instead of the Error's own: a close
    #: that disagrees with the Error frame before it (the Error frame is the one to believe).
    mismatched_close: tuple[int, str] | None = None
    #: Send ``Warning{warning_code, warning}`` after this many audio frames.
    warning_after_frames: int | None = None
    warning_code: int = 1234
    warning_text: str = "Session ending soon"
    #: Send Heartbeat messages even if the client did not ask (``session_heartbeat``).
    heartbeat: bool = False
    #: Send SpeakerRevision (relabelling every final turn to "B") right before Termination.
    speaker_revision: bool = False
    #: Send LLMGatewayResponse after each final turn even without ``llm_gateway``.
    llm_gateway_response: bool = False


# ================================================================================================
# Recognizer seam
# ================================================================================================


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


RecognizerEvent = Union[SpeechOnset, Hypothesis]


class Recognizer(Protocol):
    """Speech recognizer behind one session; the server core shapes its output.

    Calls arrive in stream order, one at a time (on the event loop, or on a worker thread when
    ``ServerOptions.recognizer_in_thread``). Each returns the events it produced, possibly none.
    A pocketsphinx adapter would keep a decoder per turn, re-decode on ``feed``, report a growing
    :class:`Hypothesis`, and end the turn on silence (``max_turn_silence``) or on
    ``force_endpoint``/``finish``.
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


# ================================================================================================
# Query parsing and audio helpers
# ================================================================================================


class QueryError(ValueError):
    """A query parameter has a value the server refuses."""


BOOL_PARAMS = frozenset(
    {
        "format_turns",
        "formatted_finals",
        "language_detection",
        "speaker_labels",
        "filter_profanity",
        "redact_pii",
        "include_partial_turns",
        "continuous_partials",
        "session_heartbeat",
        "customer_support_audio_capture",
    }
)
INT_PARAMS = frozenset(
    {
        "sample_rate",
        "max_turn_silence",
        "min_turn_silence",
        "max_speakers",
        "interruption_delay",
        "previous_context_n_turns",
        "turn_left_pad_ms",
        "min_end_of_turn_silence_when_confident",
        "word_finalization_max_wait_time",
    }
)
FLOAT_PARAMS = frozenset(
    {
        "end_of_turn_confidence_threshold",
        "vad_threshold",
        "voice_focus_threshold",
        "inactivity_timeout",
    }
)
LIST_PARAMS = frozenset({"keyterms_prompt", "keyterms", "language_codes", "redact_pii_policies"})
OBJECT_PARAMS = frozenset({"llm_gateway"})


def parse_bool(value: str) -> bool:
    """Strict: JSON's lowercase ``true``/``false`` only. (The SDK's ``True`` is reported to work
    on the real service (§1.4); this server is stricter on purpose, never kinder: a client that
    passes here sends what every reader of the docs accepts.)"""
    if value == "true":
        return True
    if value == "false":
        return False
    raise QueryError(f"not a boolean (true or false): {value!r}")


def _strict_int(value: str | None) -> int | None:
    """A decimal integer as the token endpoint takes it ("60"; not "60.0", "1e2" or "")."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


_HTTP_ERRORS = {
    400: "Bad request",
    401: "Invalid API key",
    403: "Forbidden",
    404: "Not found",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


def _parse_number(value: str, integral: bool) -> int | float:
    try:
        number = float(value)
    except ValueError:
        raise QueryError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise QueryError(f"not a finite number: {value!r}")
    if integral:
        if not number.is_integer():
            raise QueryError(f"not an integer: {value!r}")
        return int(number)
    return number


def _parse_list(value: str) -> list:
    """Lists are JSON arrays (the SDK form, §1.4) and nothing else: a bare comma list or a lone
    string is refused (whether the real service reads those is unverified)."""
    try:
        parsed = json.loads(value)
    except ValueError:
        raise QueryError(f"not a JSON array: {value!r}") from None
    if not isinstance(parsed, list):
        raise QueryError(f"not a JSON array: {value!r}")
    return parsed


def _parse_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError:
        raise QueryError(f"not JSON: {value!r}") from None
    if not isinstance(parsed, dict):
        raise QueryError(f"not an object: {value!r}")
    return parsed


def parse_query(query: str, python_booleans: bool = False) -> dict[str, Any]:
    """Parse a v3 query string into typed values; the last occurrence of a key wins.
    ``python_booleans``: also take ``True``/``False`` (ServerOptions.python_booleans)."""
    parsed: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if python_booleans and name in BOOL_PARAMS and value in ("True", "False"):
            value = value.lower()
        try:
            parsed[name] = _parse_value(name, value)
        except QueryError as exc:
            raise QueryError(f"{name}: {exc}") from None
    return parsed


def _parse_value(name: str, value: str) -> Any:
    if name in BOOL_PARAMS:
        return parse_bool(value)
    if name in INT_PARAMS:
        return _parse_number(value, integral=True)
    if name in FLOAT_PARAMS:
        return _parse_number(value, integral=False)
    if name in LIST_PARAMS:
        return _parse_list(value)
    if name in OBJECT_PARAMS:
        return _parse_object(value)
    return value


def model_family(speech_model: str, override: str | None = None) -> str:
    """U3 shaping for the Universal-3 Pro family, US shaping for everything else."""
    if override:
        return override
    return "u3" if speech_model in U3_MODELS else "us"


def build_session_config(
    session_id: str, query: Mapping[str, Any], options: ServerOptions
) -> SessionConfig:
    """Validate the parsed query and fill in the per-family defaults."""
    model = query.get("speech_model") or options.default_speech_model
    family = model_family(model, options.model_family_override)
    defaults = U3_DEFAULTS if family == "u3" else US_DEFAULTS
    encoding = query.get("encoding", "pcm_s16le")
    if encoding not in BYTES_PER_SAMPLE:
        why = "not decodable by this server" if encoding in UNSUPPORTED_ENCODINGS else "unknown"
        raise QueryError(f"encoding: {encoding!r} is {why}")
    sample_rate = query.get("sample_rate", 16000)
    if sample_rate <= 0:
        raise QueryError(f"sample_rate: must be positive, got {sample_rate}")
    _check_range(query, "inactivity_timeout", options.inactivity_min_s, options.inactivity_max_s)
    _check_range(query, "max_speakers", 1, 10)
    for name in ("end_of_turn_confidence_threshold", "vad_threshold", "voice_focus_threshold"):
        _check_range(query, name, 0.0, 1.0)
    min_silence = query.get(
        "min_turn_silence",
        query.get("min_end_of_turn_silence_when_confident", defaults["min_turn_silence"]),
    )
    redact = bool(query.get("redact_pii", False))
    speaker_labels = bool(query.get("speaker_labels", False))
    return SessionConfig(
        session_id=session_id,
        speech_model=model,
        family=family,
        sample_rate=sample_rate,
        encoding=encoding,
        format_turns=bool(query.get("format_turns", query.get("formatted_finals", False))),
        max_turn_silence_ms=query.get("max_turn_silence", defaults["max_turn_silence"]),
        min_turn_silence_ms=min_silence,
        speaker_labels=speaker_labels,
        language_detection=bool(query.get("language_detection", False)),
        include_partial_turns=bool(query.get("include_partial_turns", not redact)),
        continuous_partials=bool(query.get("continuous_partials", not speaker_labels)),
        interruption_delay_ms=query.get("interruption_delay", U3_EARLY_PARTIAL_MS),
        keyterms_prompt=tuple(query.get("keyterms_prompt", ())),
        prompt=query.get("prompt"),
        query=dict(query),
    )


def _check_range(query: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = query.get(name)
    if value is not None and not low <= value <= high:
        raise QueryError(f"{name}: {value} outside {low}-{high}")


def frame_duration_ms(nbytes: int, encoding: str, sample_rate: int) -> float:
    """Duration of one binary frame, from its byte length (§2.1 byte arithmetic)."""
    return nbytes * 1000.0 / (BYTES_PER_SAMPLE[encoding] * sample_rate)


def _mulaw_table() -> list[int]:
    table = []
    for byte in range(256):
        value = ~byte & 0xFF
        magnitude = (((value & 0x0F) << 3) + 0x84) << ((value & 0x70) >> 4)
        table.append(0x84 - magnitude if value & 0x80 else magnitude - 0x84)
    return table


_MULAW = _mulaw_table()


def mulaw_to_pcm16(data: bytes) -> bytes:
    """G.711 mu-law to PCM16LE, so recognizers only ever see one format."""
    samples = array("h", (_MULAW[b] for b in data))
    if samples.itemsize != 2:  # pragma: no cover - exotic platforms
        raise RuntimeError("array('h') is not 16-bit")
    return samples.tobytes()


def close_reason(text: str) -> str:
    """Close reasons are capped at 123 bytes; longer texts point at the Error frame (§3.5)."""
    return text if len(text.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES else LONG_REASON


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0")


# ================================================================================================
# Turn shaping
# ================================================================================================


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
        u3_em_dash: bool = False,
    ) -> None:
        if format_pattern not in ("A", "B"):
            raise ValueError(f"format_pattern must be 'A' or 'B', not {format_pattern!r}")
        self.config = config
        self.format_pattern = format_pattern
        self.llm_gateway = llm_gateway
        self.u3_em_dash = u3_em_dash
        self.turn_order = 0
        self.finals: dict[int, list[dict]] = {}
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

    def empty_turn(self) -> list[dict]:
        """An end_of_turn Turn with nothing in it (the ``empty_turn`` ForceEndpoint policy)."""
        formatted = self.config.is_u3 or (self.config.format_turns and self.format_pattern == "B")
        message = self._turn([], "", end_of_turn=True, formatted=formatted, confidence=1.0)
        self.finals[self.turn_order] = []
        self.turn_order += 1
        self._reset_turn()
        return [message]

    def speaker_revision(self, label: str = "B") -> dict | None:
        """Relabel every final turn (diarization fault); None if there was no final turn."""
        revisions = [
            {
                "turn_order": order,
                "speaker_label": label,
                "words": [dict(word, speaker=label) for word in words],
            }
            for order, words in sorted(self.finals.items())
            if words
        ]
        return {"type": "SpeakerRevision", "revisions": revisions} if revisions else None

    # --- shaping -------------------------------------------------------------------------------

    def _on_onset(self, onset: SpeechOnset) -> list[dict]:
        if self._onset_ms is None:
            self._onset_ms = onset.timestamp_ms
        if not self.config.is_u3:
            return []  # SpeechStarted exists only on U3 models (§3.2)
        return [
            {
                "type": "SpeechStarted",
                "timestamp": int(onset.timestamp_ms),
                "confidence": round(float(onset.confidence), 6),
            }
        ]

    def _us_partial(self, hyp: Hypothesis) -> list[dict]:
        """Final words only in ``transcript``; ``utterance`` once per pause (§4.2)."""
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
        if self.u3_em_dash:
            transcript += "\u2014"
        return [self._turn(words, transcript, end_of_turn=False, formatted=False, confidence=0.0)]

    def _u3_partial_due(self, hyp: Hypothesis, stream_ms: int) -> bool:
        """U3 partials come at pauses, once early in a turn, then every ~3 s (§4.4)."""
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
        self.finals[self.turn_order] = messages[-1]["words"]
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
        """One speaker; turns under ~1 s of audio are UNKNOWN, as documented (§3.3)."""
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


# ================================================================================================
# Records
# ================================================================================================


@dataclass(frozen=True)
class Received:
    """One frame from the client. ``data``: bytes (binary) or parsed JSON / raw str (text)."""

    t: float
    kind: str
    data: Any


@dataclass(frozen=True)
class Sent:
    """One message the server sent, with ``time.monotonic()`` at send time."""

    t: float
    message: dict


class ConnectionRecord:
    """Everything observable about one connection attempt. Safe to read from any thread."""

    def __init__(
        self, index: int, path: str, headers: Headers, faults: Faults, python_booleans: bool = False
    ) -> None:
        """Headers are kept raw and lower-cased; the query is parsed even for rejected attempts."""
        self.index = index
        self.started = time.monotonic()
        self.path = path
        self.header_items: list[tuple[str, str]] = list(headers.raw_items())
        self.headers: dict[str, str] = {k.lower(): v for k, v in self.header_items}
        split = urllib.parse.urlsplit(path)
        self.raw_query: dict[str, str] = dict(
            urllib.parse.parse_qsl(split.query, keep_blank_values=True)
        )
        self.query: dict[str, Any] = {}
        self.query_error: str | None = None
        try:
            self.query = parse_query(split.query, python_booleans)
        except QueryError as exc:
            self.query_error = str(exc)
        self.faults = faults
        self.http_status: int | None = None
        #: A minted temporary token opened this session: its max_session_duration_seconds.
        self.token_max_session_s: float | None = None
        self.session_id: str | None = None
        self.begin: dict | None = None
        self.config: SessionConfig | None = None
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None
        self.aborted = False
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._sent: list[Sent] = []
        self._audio_ms = 0.0
        self.raw_sent: list[str] = []  # Faults.raw_*: the texts sent as given, in order

    # --- writers (server side) ----------------------------------------------------------------

    def add_received(self, item: Received, audio_ms: float = 0.0) -> None:
        with self._lock:
            self._received.append(item)
            self._audio_ms += audio_ms

    def add_sent(self, message: dict) -> None:
        with self._lock:
            self._sent.append(Sent(time.monotonic(), message))

    # --- readers ---------------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    @property
    def messages(self) -> list[dict]:
        """Messages sent, in order."""
        return [item.message for item in self.sent]

    @property
    def audio_ms(self) -> float:
        """Audio received, in ms, from byte counts."""
        with self._lock:
            return self._audio_ms

    def sent_of_type(self, message_type: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == message_type]

    @property
    def turns(self) -> list[dict]:
        return self.sent_of_type("Turn")

    @property
    def final_turns(self) -> list[dict]:
        return [t for t in self.turns if t.get("end_of_turn")]

    def audio_frames(self) -> list[Received]:
        return [r for r in self.received if r.kind == "binary"]

    def text_messages(self) -> list[Any]:
        return [r.data for r in self.received if r.kind == "text"]

    def wait_done(self, timeout: float) -> bool:
        """Wait until the server has finished with this connection."""
        return self.done.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"ConnectionRecord(index={self.index}, path={self.path!r}, "
            f"http_status={self.http_status}, close_sent={self.close_sent}, "
            f"close_received={self.close_received}, aborted={self.aborted})"
        )


# ================================================================================================
# One session
# ================================================================================================


@dataclass(frozen=True)
class _CloseRequest:
    code: int
    reason: str


@dataclass(frozen=True)
class _Raw:
    """A text frame sent as it is (Faults.raw_after_frames)."""

    text: str


class _Session:
    """Runs one accepted WebSocket connection from auth to close."""

    def __init__(self, server: V3Server, ws: ServerConnection, record: ConnectionRecord):
        self.server = server
        self.options = server.options
        self.ws = ws
        self.record = record
        self.faults = record.faults
        self.session_id = str(uuid.uuid4())
        #: The session's lifetime: the server's, or a temporary token's smaller cap (§1.3).
        self.expires_in_s = self.options.expires_in_s
        self.config: SessionConfig | None = None
        self.recognizer: Recognizer | None = None
        self.shaper: TurnShaper | None = None
        self.state = "opening"  # opening | open | terminating | closing | silent
        self.frames = 0
        self.samples = 0
        self.first_audio_at: float | None = None
        self.last_activity = time.monotonic()
        self._outq: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._sender_task: asyncio.Task | None = None
        self._close_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._open():
                self._start_tasks()
                await self._recv_loop()
        except ConnectionClosed:
            pass
        except Exception:  # e.g. a recognizer bug: end like the service's catch-all (§5.1)
            log.exception("session %s failed", self.session_id)
            await self._fail(3005, GENERIC_ERROR)
        finally:
            await self._finish()

    async def _open(self) -> bool:
        """Everything before the first client frame is processed; False if the session ended."""
        if self.faults.close_before_begin:
            code, reason = self.faults.close_before_begin
            await self._close_now(code, reason)
            return False
        if not self.server._authorize(self.record):
            await self._fail(1008, AUTH_ERROR)
            return False
        if self.record.token_max_session_s:  # a temporary token caps its session (§1.3)
            self.expires_in_s = min(self.expires_in_s, self.record.token_max_session_s)
        try:
            if self.record.query_error:
                raise QueryError(self.record.query_error)
            self.config = build_session_config(self.session_id, self.record.query, self.options)
        except QueryError as exc:
            await self._fail(3005, f"Session Cancelled: Invalid query parameter {exc}")
            return False
        if not self.server._admit():
            await self._fail(3009, CONCURRENCY_ERROR)
            return False
        self.record.config = self.config
        self.record.session_id = self.session_id
        self.recognizer = self.server._make_recognizer(self.config)
        llm = "llm_gateway" in self.record.query or self.faults.llm_gateway_response
        self.shaper = TurnShaper(
            self.config,
            self.options.format_pattern,
            llm_gateway=llm,
            u3_em_dash=self.options.u3_partial_em_dash,
        )
        if self.faults.begin_delay_s > 0 and not await self._sleep(self.faults.begin_delay_s):
            return False
        begin = self._begin_message()
        await self._send_now(begin)
        self.record.begin = begin
        if self.faults.unknown_messages:
            await self._send_now(self._unknown_message("after_begin"))
        self.state = "open"
        self.last_activity = time.monotonic()
        return True

    def _start_tasks(self) -> None:
        self._sender_task = asyncio.create_task(self._sender())
        self._tasks.append(self._sender_task)
        self._tasks.append(asyncio.create_task(self._expiry()))
        if "inactivity_timeout" in self.record.query:
            self._tasks.append(
                asyncio.create_task(
                    self._inactivity(float(self.record.query["inactivity_timeout"]))
                )
            )
        if self.record.query.get("session_heartbeat") or self.faults.heartbeat:
            self._tasks.append(asyncio.create_task(self._heartbeat()))
        if self.faults.raw_after_s:
            self._tasks.append(asyncio.create_task(self._raw_later(*self.faults.raw_after_s)))

    async def _raw_later(self, delay_s: float, texts: tuple[str, ...]) -> None:
        await asyncio.sleep(delay_s)
        for text in texts:
            self._enqueue(_Raw(text))

    async def _finish(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._close_task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._close_task), self.options.close_timeout_s + 1
                )
            except (TimeoutError, ConnectionClosed):
                pass
        protocol = self.ws.protocol
        if protocol.close_sent is not None:
            self.record.close_sent = (protocol.close_sent.code, protocol.close_sent.reason)
        if protocol.close_rcvd is not None:
            self.record.close_received = (protocol.close_rcvd.code, protocol.close_rcvd.reason)
        closer = getattr(self.recognizer, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception:  # a broken recognizer must not break the server
                log.exception("recognizer close failed")
        self.record.done.set()
        log.debug("session %s done: %r", self.session_id, self.record)

    def _begin_message(self) -> dict:
        assert self.config is not None
        query = self.record.query
        expires_at = int(time.time() + self.expires_in_s)
        mode = query.get("mode", "balanced") if self.config.is_u3 else None
        return {
            "type": "Begin",
            "id": self.session_id,
            "expires_at": expires_at,
            "configuration": {
                "model": self.config.speech_model,
                "mode": mode,
                "api_version": self.record.headers.get("assemblyai-version", API_VERSION),
                "speaker_labels": bool(query.get("speaker_labels", False)),
                "redact_pii": bool(query.get("redact_pii", False)),
                "filter_profanity": bool(query.get("filter_profanity", False)),
                "domain": query.get("domain"),
                "voice_focus": query.get("voice_focus"),
            },
        }

    # --- receiving -------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            data = await self.ws.recv()
            self.last_activity = time.monotonic()
            if isinstance(data, bytes):
                await self._on_binary(data)
            else:
                await self._on_text(data)

    async def _on_binary(self, data: bytes) -> None:
        assert self.config is not None
        duration = frame_duration_ms(len(data), self.config.encoding, self.config.sample_rate)
        self.record.add_received(
            Received(time.monotonic(), "binary", data), duration if self.state == "open" else 0.0
        )
        if self.state != "open":
            return
        self.frames += 1
        if (
            self.faults.drop_after_frames is not None
            and self.frames >= self.faults.drop_after_frames
        ):
            self._abort("drop_after_frames")
            return
        if not await self._check_frame(duration):
            return
        pcm = data if self.config.encoding == "pcm_s16le" else mulaw_to_pcm16(data)
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        stream_ms = self.samples * 1000 // self.config.sample_rate
        self.samples += len(pcm) // 2
        events = await self._call(self.recognizer.feed, pcm, stream_ms)
        self._emit(events)
        await self._frame_faults()

    async def _check_frame(self, duration: float) -> bool:
        """Enforce the 50-1000 ms frame size and real-time pacing (§2.1)."""
        if not MIN_FRAME_MS <= duration <= MAX_FRAME_MS:
            await self._fail(
                3007,
                self.options.duration_error_prefix
                + f"Input duration violation: {_fmt_number(duration)} ms. "
                f"Expected between {MIN_FRAME_MS} and {MAX_FRAME_MS} ms",
            )
            return False
        now = time.monotonic()
        if self.first_audio_at is None:
            self.first_audio_at = now
        audio_s = self.record.audio_ms / 1000.0
        elapsed = now - self.first_audio_at
        if audio_s - elapsed > self.options.max_lead_s:
            await self._fail(
                3007,
                self.options.duration_error_prefix
                + f"Audio Transmission Rate Exceeded: Received {audio_s:.1f} sec. "
                f"audio in {elapsed:.6f} sec",
            )
            return False
        return True

    async def _frame_faults(self) -> None:
        faults = self.faults
        if faults.warning_after_frames == self.frames:
            self._enqueue(
                {
                    "type": "Warning",
                    "warning_code": faults.warning_code,
                    "warning": faults.warning_text,
                }
            )
        if faults.raw_after_frames and faults.raw_after_frames[0] == self.frames:
            for text in faults.raw_after_frames[1]:
                self._enqueue(_Raw(text))
        if faults.error_mid_turn and faults.error_mid_turn[1] == self.frames:
            await self._fail(faults.error_mid_turn[0], GENERIC_ERROR)
        elif faults.error_without_close == self.frames:
            await self._go_silent()

    async def _on_text(self, text: str) -> None:
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            self.record.add_received(Received(time.monotonic(), "text", text))
            if self.state == "open":
                await self._fail(3006, f"Invalid JSON: {text}")
            return
        self.record.add_received(Received(time.monotonic(), "text", parsed))
        if self.state != "open":
            return
        if not isinstance(parsed, dict):
            await self._fail(3006, f"Invalid Message: {text}")
            return
        message_type = parsed.get("type")
        if message_type not in CLIENT_MESSAGE_TYPES:
            shown = message_type if isinstance(message_type, str) else text
            await self._fail(3006, f"Invalid Message Type: {shown}")
            return
        await getattr(self, f"_on_{message_type}")(parsed)

    async def _on_KeepAlive(self, message: dict) -> None:
        pass  # receiving it already reset the inactivity timer

    async def _on_UpdateConfiguration(self, message: dict) -> None:
        """Apply silently: the real service sends no acknowledgement (§2.2)."""
        assert self.config is not None and self.shaper is not None
        changes = {k: v for k, v in message.items() if k != "type" and v is not None}
        updates: dict[str, Any] = {}
        for key, attr in (
            ("max_turn_silence", "max_turn_silence_ms"),
            ("min_turn_silence", "min_turn_silence_ms"),
        ):
            if isinstance(changes.get(key), (int, float)) and not isinstance(changes[key], bool):
                updates[attr] = int(changes[key])
        if isinstance(changes.get("format_turns"), bool):
            updates["format_turns"] = changes["format_turns"]
        if isinstance(changes.get("keyterms_prompt"), list):
            updates["keyterms_prompt"] = tuple(changes["keyterms_prompt"])
        if isinstance(changes.get("prompt"), str):
            updates["prompt"] = changes["prompt"]
        self.config = dataclasses.replace(self.config, **updates)
        self.record.config = self.config
        self.shaper.update_config(self.config)
        await self._call(self.recognizer.update_config, changes)

    async def _on_ForceEndpoint(self, message: dict) -> None:
        assert self.shaper is not None
        if self.faults.drop_on_force_endpoint:
            self._abort("drop_on_force_endpoint")
            return
        events = await self._call(self.recognizer.force_endpoint)
        if not self._emit(events) and self.faults.empty_force_endpoint == "empty_turn":
            for turn in self.shaper.empty_turn():
                self._enqueue(turn, self.faults.turn_delay_s)

    async def _on_Terminate(self, message: dict) -> None:
        """Flush in-flight turns, then Termination, then close 1000 (§4.6)."""
        assert self.shaper is not None
        mode = self.faults.no_termination
        if mode == "ignore":
            log.info("fault: ignoring Terminate")
            return
        self.state = "terminating"
        self._emit(await self._call(self.recognizer.finish))
        if mode != "close":
            revision = self.shaper.speaker_revision() if self.faults.speaker_revision else None
            if revision:
                self._enqueue(revision)
            self._enqueue(self._termination_message())
        self._outq.put_nowait((0.0, _CloseRequest(1000, "")))

    def _termination_message(self) -> dict:
        return {
            "type": "Termination",
            "audio_duration_seconds": int(round(self.record.audio_ms / 1000.0)),
            "session_duration_seconds": int(round(time.monotonic() - self.record.started)),
        }

    # --- emitting --------------------------------------------------------------------------------

    def _emit(self, events: Sequence[RecognizerEvent]) -> bool:
        """Shape and queue recognizer events; True if a turn ended."""
        assert self.shaper is not None and self.config is not None
        ended = False
        stream_ms = self.samples * 1000 // self.config.sample_rate
        for event in events or ():
            for message in self.shaper.on_event(event, stream_ms):
                is_final = message.get("type") == "Turn" and message["end_of_turn"]
                late = is_final or message.get("type") == "LLMGatewayResponse"
                if is_final and not ended and self.faults.unknown_messages:
                    self._enqueue(self._unknown_message("before_final"), self.faults.turn_delay_s)
                self._enqueue(message, self.faults.turn_delay_s if late else 0.0)
                ended = ended or is_final
        return ended

    def _enqueue(self, message: dict | _Raw, delay_s: float = 0.0) -> None:
        self._outq.put_nowait((time.monotonic() + delay_s, message))

    async def _sender(self) -> None:
        """The only writer once the session is open, so delays keep message order."""
        while True:
            not_before, item = await self._outq.get()
            wait = not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if isinstance(item, _CloseRequest):
                self.state = "closing"
                self._close_task = asyncio.create_task(self._close_now(item.code, item.reason))
                return
            try:
                await self._send_now(item)
            except ConnectionClosed:
                return

    async def _send_now(self, message: dict | _Raw) -> None:
        if self.state == "silent":
            return
        if isinstance(message, _Raw):
            await self.ws.send(message.text)
            self.record.raw_sent.append(message.text)
            return
        if self.faults.unknown_messages:
            message = dict(message, x_unrecognized_field={"injected": True})
        await self.ws.send(json.dumps(message))
        self.record.add_sent(message)

    def _unknown_message(self, where: str) -> dict:
        return {"type": "FutureEventForTesting", "where": where, "payload": {"n": 1}}

    # --- ending ----------------------------------------------------------------------------------

    def _mapped_code(self, code: int, text: str) -> tuple[int, str]:
        """Legacy (pre-2026-02-25) codes: 3005 for 3006-3008, 1008 for concurrency (§5.1)."""
        if not self.options.legacy_codes:
            return code, text
        if code in (3006, 3007, 3008):
            return 3005, text
        if code == 3009:
            return 1008, LEGACY_CONCURRENCY_ERROR
        return code, text

    async def _fail(self, code: int, text: str) -> None:
        """Error frame, then a close with the same code (§3.5)."""
        if self.state in ("closing", "silent"):
            return
        code, text = self._mapped_code(code, text)
        self._stop_sender()
        self.state = "closing"
        log.info("session %s error %d: %s", self.session_id, code, text)
        try:
            await self._send_now({"type": "Error", "error_code": code, "error": text})
        except ConnectionClosed:
            return
        if self.faults.mismatched_close is not None:
            code, text = self.faults.mismatched_close
        self._close_task = asyncio.create_task(self._close_now(code, close_reason(text)))

    async def _go_silent(self) -> None:
        """Fault: an Error frame and then nothing at all, never a close."""
        self._stop_sender()
        try:
            await self._send_now({"type": "Error", "error_code": 3005, "error": GENERIC_ERROR})
        except ConnectionClosed:
            return
        self.state = "silent"

    def _abort(self, why: str) -> None:
        """Fault: drop TCP with no close frame."""
        log.info("session %s fault %s: aborting transport", self.session_id, why)
        self._stop_sender()
        self.state = "closing"
        self.record.aborted = True
        self.ws.transport.abort()

    def _stop_sender(self) -> None:
        if self._sender_task is not None and self._sender_task is not asyncio.current_task():
            self._sender_task.cancel()

    async def _close_now(self, code: int, reason: str) -> None:
        self.state = "closing"
        await self.ws.close(code, reason)

    # --- timers ----------------------------------------------------------------------------------

    async def _expiry(self) -> None:
        remaining = self.record.started + self.expires_in_s - time.monotonic()
        await asyncio.sleep(max(0.0, remaining))
        await self._fail(3008, EXPIRED_ERROR)

    async def _inactivity(self, timeout_s: float) -> None:
        while self.state in ("open", "terminating"):
            remaining = self.last_activity + timeout_s - time.monotonic()
            if remaining <= 0:
                await self._inactivity_close()
                return
            await asyncio.sleep(remaining)

    async def _inactivity_close(self) -> None:
        code, text = self.options.inactivity_close_code, self.options.inactivity_error
        log.info("session %s inactive: closing %d", self.session_id, code)
        if code == 1000:
            self._stop_sender()
            self.state = "closing"
            self._close_task = asyncio.create_task(self._close_now(1000, close_reason(text)))
        else:
            await self._fail(code, text)

    async def _heartbeat(self) -> None:
        interval = self.options.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.state != "open":
                continue
            audio_ms = int(self.record.audio_ms)
            total_ms = int((time.monotonic() - self.record.started) * 1000)
            self._enqueue(
                {
                    "type": "Heartbeat",
                    "total_audio_received_ms": audio_ms,
                    "total_duration_ms": total_ms,
                    "realtime_factor": round(audio_ms / max(total_ms, 1), 4),
                    "max_speech_probability": 0.0,
                }
            )

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the connection closes first; True if still open."""
        closed = asyncio.ensure_future(self.ws.wait_closed())
        try:
            done, _ = await asyncio.wait({closed}, timeout=seconds)
        finally:
            closed.cancel()
        return not done

    async def _call(self, func: Callable, *args: Any) -> Any:
        if self.options.recognizer_in_thread:
            return await asyncio.to_thread(func, *args)
        return func(*args)


# ================================================================================================
# Server
# ================================================================================================


class V3Server:
    """An asyncio v3 server. Use :class:`ServerThread` to run it from synchronous code."""

    def __init__(
        self,
        options: ServerOptions | None = None,
        recognizer_factory: RecognizerFactory | None = None,
        faults: Faults | Sequence[Faults] | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self._factory = recognizer_factory or NullRecognizer
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._default_faults = Faults()
        self._queued_faults: collections.deque[Faults] = collections.deque()
        self._records: list[ConnectionRecord] = []
        self._admitted: collections.deque[float] = collections.deque()
        self._used_tokens: set[str] = set()
        self._minted: dict[str, tuple[float, float]] = {}  # live token -> (deadline, max s)
        self._ever_minted: set[str] = set()
        #: ``GET /v3/token`` requests: (status, response body), oldest first.
        self.token_requests: list[tuple[int, dict]] = []
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._server: Server | None = None
        if isinstance(faults, Faults):
            self._default_faults = faults
        elif faults:
            self._queued_faults.extend(faults)

    # --- fault control (any thread) ------------------------------------------------------------

    def set_default_faults(self, faults: Faults) -> None:
        """Faults for every connection once the queued ones are used up."""
        with self._lock:
            self._default_faults = faults

    def queue_faults(self, *faults: Faults) -> None:
        """Faults for the next connection attempts, one each, in order."""
        with self._lock:
            self._queued_faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._queued_faults.clear()
            self._default_faults = Faults()

    # --- records (any thread) ------------------------------------------------------------------

    @property
    def connections(self) -> list[ConnectionRecord]:
        """Every connection attempt, rejected ones included, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def connection_attempts(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def sessions(self) -> list[ConnectionRecord]:
        """Connections that got a Begin."""
        return [r for r in self.connections if r.begin is not None]

    def wait_for_connections(self, count: int, timeout: float) -> list[ConnectionRecord]:
        """Block until at least ``count`` attempts were seen; raises TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._records) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} connection attempts, saw {len(self._records)}"
                )
            return list(self._records)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.options.host}:{self.port}{self.options.path}"

    @property
    def token_url(self) -> str:
        """Where temporary tokens are minted (the streaming host's ``/v3/token``)."""
        return f"http://{self.options.host}:{self.port}{TOKEN_PATH}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.options.host,
            self.options.port,
            process_request=self._process_request,
            max_size=self.options.max_message_bytes,
            close_timeout=self.options.close_timeout_s,
            ping_interval=self.options.ping_interval_s,
        )
        log.info("v3 server listening on %s", self.url)

    async def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("v3 server did not close within %.1f s", timeout)

    # --- connection handling ------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Count the attempt, pick its faults, and reject at the HTTP level when asked."""
        split = urllib.parse.urlsplit(request.path)
        if self.options.token_endpoint and split.path == TOKEN_PATH:
            status, body = self._mint(request.headers.get("Authorization", ""), split.query)
            with self._changed:
                self.token_requests.append((status, body))
                self._changed.notify_all()
            response = connection.respond(status, json.dumps(body))
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            response.headers["Cache-Control"] = "no-store"
            return response
        with self._changed:
            faults = self._queued_faults.popleft() if self._queued_faults else self._default_faults
            record = ConnectionRecord(
                len(self._records),
                request.path,
                request.headers,
                faults,
                self.options.python_booleans,
            )
            self._records.append(record)
            self._changed.notify_all()
        status = self._http_status(record)
        if status is not None:
            record.http_status = status
            record.done.set()
            body = json.dumps({"error": _HTTP_ERRORS.get(status, "Request rejected")})
            response = connection.respond(status, body)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        self._pending[connection] = record
        return None

    def _http_status(self, record: ConnectionRecord) -> int | None:
        if record.faults.http_reject_status is not None:
            return record.faults.http_reject_status
        if urllib.parse.urlsplit(record.path).path != self.options.path:
            return 404
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._pending.pop(ws)
        await _Session(self, ws, record).run()

    # --- temporary tokens (§1.3, streaming-token.yml) -----------------------------------------

    def _key_ok(self, header: str) -> bool:
        """An API key in ``Authorization`` (raw, no Bearer); a temporary token is not a key."""
        header = header.strip()
        if not header or header.lower().startswith("bearer ") or header in self._ever_minted:
            return False
        return header in self.options.api_keys if self.options.api_keys else True

    def _mint(self, authorization: str, query: str) -> tuple[int, dict]:
        """``GET /v3/token?expires_in_seconds=N[&max_session_duration_seconds=M]``."""
        with self._lock:
            if not self._key_ok(authorization):
                return 401, {"error": "Invalid API key"}
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        low, high = TOKEN_EXPIRES_RANGE
        expires = _strict_int(params.get("expires_in_seconds"))
        if expires is None or not low <= expires <= high:
            return 400, {
                "error": f"expires_in_seconds must be an integer between {low} and {high}",
                "code": "invalid_parameter",
            }
        max_session: float = TOKEN_MAX_SESSION_RANGE[1]
        if "max_session_duration_seconds" in params:
            low_s, high_s = self.options.token_min_session_s, TOKEN_MAX_SESSION_RANGE[1]
            value = _strict_int(params["max_session_duration_seconds"])
            if value is None or not low_s <= value <= high_s:
                return 400, {
                    "error": "max_session_duration_seconds must be an integer between "
                    f"{_fmt_number(low_s)} and {high_s}",
                    "code": "invalid_parameter",
                }
            max_session = value
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._minted[token] = (time.monotonic() + expires, float(max_session))
            self._ever_minted.add(token)
        return 200, {"token": token, "expires_in_seconds": expires}

    def _take_minted(self, token: str, record: ConnectionRecord) -> bool:
        """One session per token, opened before it expires; the session inherits its cap."""
        entry = self._minted.pop(token, None)  # used (or tried) once: gone
        if entry is None or time.monotonic() > entry[0]:
            return False
        record.token_max_session_s = entry[1]
        return True

    @property
    def minted_tokens(self) -> int:
        with self._lock:
            return len(self._ever_minted)

    def _authorize(self, record: ConnectionRecord) -> bool:
        """``Authorization: <key or token>`` (no Bearer) or ``?token=`` (§1.2)."""
        header = record.headers.get("authorization", "").strip()
        token = record.raw_query.get("token", "").strip()
        keys, tokens = self.options.api_keys, self.options.tokens
        if not self.options.require_auth:
            return True
        with self._lock:
            for credential in (token, header):
                if credential and credential in self._ever_minted:
                    return self._take_minted(credential, record)
            if not keys and not tokens:
                return bool(header or token) and not header.lower().startswith("bearer ")
            if header in keys:
                return True
            for credential in (header, token):
                if credential and credential in tokens and self._take_token(credential):
                    return True
            return False

    def _take_token(self, token: str) -> bool:
        if not self.options.single_use_tokens:
            return True
        if token in self._used_tokens:
            return False
        self._used_tokens.add(token)
        return True

    def _admit(self) -> bool:
        """Per-window new-session limiter (§6: limits are on new sessions per minute)."""
        limit = self.options.sessions_per_minute
        if limit <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            while self._admitted and now - self._admitted[0] >= self.options.limiter_window_s:
                self._admitted.popleft()
            if len(self._admitted) >= limit:
                return False
            self._admitted.append(now)
            return True

    def _make_recognizer(self, config: SessionConfig) -> Recognizer:
        return self._factory(config)


class ServerThread:
    """Runs a :class:`V3Server` on its own event loop in a background thread."""

    def __init__(
        self,
        options: ServerOptions | None = None,
        recognizer_factory: RecognizerFactory | None = None,
        faults: Faults | Sequence[Faults] | None = None,
    ) -> None:
        self.server = V3Server(options, recognizer_factory, faults)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Return once the server is listening (``url`` is then valid)."""
        self._thread = threading.Thread(target=self._run, name="v3server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("v3 server did not start")
        if self._error is not None:
            raise RuntimeError("v3 server failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop listening and join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("v3 server thread did not stop within %.1f s", timeout)
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.server.start()
        self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- delegation --------------------------------------------------------------------------

    @property
    def options(self) -> ServerOptions:
        return self.server.options

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def token_url(self) -> str:
        return self.server.token_url

    @property
    def token_requests(self) -> list[tuple[int, dict]]:
        with self.server._lock:
            return list(self.server.token_requests)

    @property
    def minted_tokens(self) -> int:
        return self.server.minted_tokens

    @property
    def connections(self) -> list[ConnectionRecord]:
        return self.server.connections

    @property
    def sessions(self) -> list[ConnectionRecord]:
        return self.server.sessions

    @property
    def connection_attempts(self) -> int:
        return self.server.connection_attempts

    def wait_for_connections(self, count: int, timeout: float) -> list[ConnectionRecord]:
        return self.server.wait_for_connections(count, timeout)

    def set_default_faults(self, faults: Faults) -> None:
        self.server.set_default_faults(faults)

    def queue_faults(self, *faults: Faults) -> None:
        self.server.queue_faults(*faults)

    def clear_faults(self) -> None:
        self.server.clear_faults()
