"""AssemblyAI Universal Streaming v3: typed messages, query building, close-code policy.

Pure data and functions (no sockets), so every rule here is tested without a network.
Reading is lenient (unknown types and fields are tolerated, durations may be int or float);
sending is conservative (only documented messages, ``speech_model`` always explicit).
See ../shared/research/assemblyai-v3.md for the sources behind each rule.
"""

from __future__ import annotations

import json
import logging
import math
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Union

log = logging.getLogger(__name__)

API_VERSION = "2025-05-12"
USER_AGENT = "AssemblyAI/1.0 (integration=pttd)"
U3_MODELS = frozenset(
    {"u3-rt-pro", "u3-rt-pro-beta-1", "u3-pro", "universal-3-5-pro", "universal-3-6-pro"}
)
MIN_FRAME_MS = 50
MAX_FRAME_MS = 1000


class ProtocolError(ValueError):
    """A server message we cannot make sense of (logged; the session carries on)."""


# --- server -> client messages -------------------------------------------------------------------


@dataclass(frozen=True)
class SessionConfiguration:
    model: str | None = None
    mode: str | None = None
    api_version: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Begin:
    id: str
    expires_at: float | None
    configuration: SessionConfiguration | None = None


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int
    confidence: float = 0.0
    word_is_final: bool = True
    speaker: str | None = None


@dataclass(frozen=True)
class Turn:
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
        """The turn's text so far: US partials keep non-final words out of ``transcript``."""
        if self.transcript or self.end_of_turn:
            return self.transcript
        return " ".join(w.text for w in self.words)


@dataclass(frozen=True)
class SpeechStarted:
    timestamp: int
    confidence: float | None = None


@dataclass(frozen=True)
class Termination:
    audio_duration_seconds: float | None = None
    session_duration_seconds: float | None = None


@dataclass(frozen=True)
class ErrorMessage:
    code: int | None
    message: str


@dataclass(frozen=True)
class WarningMessage:
    code: int | None
    message: str


@dataclass(frozen=True)
class Heartbeat:
    total_audio_received_ms: int | None = None
    total_duration_ms: int | None = None
    realtime_factor: float | None = None
    max_speech_probability: float | None = None


@dataclass(frozen=True)
class SpeakerRevision:
    revisions: tuple[dict, ...] = ()


@dataclass(frozen=True)
class LLMGatewayResponse:
    turn_order: int | None
    transcript: str
    data: Any = None


@dataclass(frozen=True)
class UnknownMessage:
    type: str | None
    raw: dict


ServerMessage = Union[
    Begin,
    Turn,
    SpeechStarted,
    Termination,
    ErrorMessage,
    WarningMessage,
    Heartbeat,
    SpeakerRevision,
    LLMGatewayResponse,
    UnknownMessage,
]


def parse_message(text: str | bytes) -> ServerMessage:
    """Parse one server text frame. Total: anything it cannot make sense of (not JSON, nested
    past the parser's depth, not an object, a field of the wrong type or an absurd number such
    as ``1e400`` for a count) raises :class:`ProtocolError` and nothing else."""
    try:
        # strict UTF-8 (json.loads would guess UTF-16/32 from bytes); the frame is not checked
        # before this (session.py skips websocket-client's slow pure-Python check)
        obj = json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
    except RecursionError:
        raise ProtocolError("server sent JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise ProtocolError(f"server sent invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"server sent a non-object: {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None and "error" in obj:  # the legacy untyped error shape
        return ErrorMessage(code=_int_or_none(obj.get("error_code")), message=_text(obj["error"]))
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        log.debug("ignoring unknown server message type %r", kind)
        return UnknownMessage(type=kind if isinstance(kind, str) else None, raw=obj)
    try:
        return parser(obj)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a hostile field does, it is one bad message
        raise ProtocolError(f"malformed {kind} message: {type(exc).__name__}") from None


# Bounds for numbers read from the server: a count or a time in ms beyond these is nonsense.
_MAX_COUNT = 2**53
_MAX_MS = 2**40


def _count(v: Any, name: str) -> int:
    """A required non-negative integer (``turn_order``): anything else rejects the message."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"{name} is not a number: {v!r:.40}")
    if not (0 <= v < _MAX_COUNT) or v != int(v):  # nan, inf and negatives fail here
        raise ProtocolError(f"{name} out of range: {v!r:.40}")
    return int(v)


def _ms(v: Any) -> int:
    """A time in ms (word start/end, SpeechStarted): clamped into [0, _MAX_MS]; junk is 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return 0
    return int(min(max(v, 0), _MAX_MS))


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ("" if v is None else str(v))


def _parse_begin(o: dict) -> Begin:
    conf = o.get("configuration")
    configuration = None
    if isinstance(conf, dict):
        known = {"model", "mode", "api_version"}
        configuration = SessionConfiguration(
            model=conf.get("model"),
            mode=conf.get("mode"),
            api_version=conf.get("api_version"),
            extra={k: v for k, v in conf.items() if k not in known},
        )
    if "id" not in o:
        raise ProtocolError("Begin without an id")
    expires = _num_or_none(o.get("expires_at"))
    return Begin(
        id=_text(o["id"]),
        expires_at=expires if expires is None or math.isfinite(expires) else None,
        configuration=configuration,
    )


def _parse_word(w: dict) -> Word:
    return Word(
        text=_text(w.get("text", "")),
        start=_ms(w.get("start", 0)),
        end=_ms(w.get("end", 0)),
        confidence=_num_or_none(w.get("confidence")) or 0.0,
        word_is_final=bool(w.get("word_is_final", True)),
        speaker=w.get("speaker"),
    )


def _parse_turn(o: dict) -> Turn:
    if "turn_order" not in o:
        raise ProtocolError("Turn without a turn_order")
    return Turn(
        turn_order=_count(o["turn_order"], "turn_order"),
        end_of_turn=bool(o.get("end_of_turn", False)),
        transcript=_text(o.get("transcript") or ""),
        turn_is_formatted=bool(o.get("turn_is_formatted", False)),
        end_of_turn_confidence=_num_or_none(o.get("end_of_turn_confidence")) or 0.0,
        words=tuple(_parse_word(w) for w in _list(o.get("words")) if isinstance(w, dict)),
        utterance=_text(o.get("utterance") or ""),
        language_code=o.get("language_code"),
        language_confidence=o.get("language_confidence"),
        speaker_label=o.get("speaker_label"),
    )


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _parse_termination(o: dict) -> Termination:
    return Termination(
        audio_duration_seconds=_num_or_none(o.get("audio_duration_seconds")),
        session_duration_seconds=_num_or_none(o.get("session_duration_seconds")),
    )


def _num_or_none(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = float(v) if not isinstance(v, int) or abs(v) < _MAX_COUNT else None
        return f if f is not None and math.isfinite(f) else None
    return None


def _int_or_none(v: Any) -> int | None:
    """An integer code: ints and integral finite floats; anything else (``1e400``) is None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v.isdigit() and len(v) < 10 else None
    if isinstance(v, (int, float)) and math.isfinite(v) and v == int(v) and abs(v) < _MAX_COUNT:
        return int(v)
    return None


_PARSERS = {
    "Begin": _parse_begin,
    "Turn": _parse_turn,
    "SpeechStarted": lambda o: SpeechStarted(
        timestamp=_ms(o.get("timestamp", 0)), confidence=_num_or_none(o.get("confidence"))
    ),
    "Termination": _parse_termination,
    "Error": lambda o: ErrorMessage(
        code=_int_or_none(o.get("error_code")), message=_text(o.get("error", ""))
    ),
    "Warning": lambda o: WarningMessage(
        code=_int_or_none(o.get("warning_code")), message=_text(o.get("warning", ""))
    ),
    "Heartbeat": lambda o: Heartbeat(
        total_audio_received_ms=_int_or_none(o.get("total_audio_received_ms")),
        total_duration_ms=_int_or_none(o.get("total_duration_ms")),
        realtime_factor=_num_or_none(o.get("realtime_factor")),
        max_speech_probability=_num_or_none(o.get("max_speech_probability")),
    ),
    "SpeakerRevision": lambda o: SpeakerRevision(
        revisions=tuple(r for r in _list(o.get("revisions")) if isinstance(r, dict))
    ),
    "LLMGatewayResponse": lambda o: LLMGatewayResponse(
        turn_order=_int_or_none(o.get("turn_order")),
        transcript=_text(o.get("transcript", "")),
        data=o.get("data"),
    ),
}


# --- client -> server ----------------------------------------------------------------------------

FORCE_ENDPOINT = json.dumps({"type": "ForceEndpoint"})
TERMINATE = json.dumps({"type": "Terminate"})
KEEP_ALIVE = json.dumps({"type": "KeepAlive"})


def update_configuration(**fields: Any) -> str:
    """An UpdateConfiguration message with only the fields that change (None is left out)."""
    body = {k: v for k, v in fields.items() if v is not None}
    if not body:
        raise ValueError("UpdateConfiguration needs at least one field")
    return json.dumps({"type": "UpdateConfiguration", **body})


def build_url(
    base: str,
    speech_model: str,
    sample_rate: int,
    format_turns: bool | None = None,
    params: dict | None = None,
) -> str:
    """The connect URL: lists/objects as JSON, booleans lowercase, unset (None) omitted.

    ``speech_model`` is always sent because the server's default changed four times in 2026.
    """
    if not speech_model:
        raise ValueError("speech_model must be set")
    query: dict[str, Any] = {
        "speech_model": speech_model,
        "sample_rate": sample_rate,
        "encoding": "pcm_s16le",
    }
    if format_turns is not None:
        query["format_turns"] = format_turns
    query.update(params or {})
    encoded = [(k, _query_value(v)) for k, v in query.items() if v is not None]
    parts = urllib.parse.urlsplit(base)
    existing = urllib.parse.parse_qsl(parts.query)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(existing + encoded)))


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def frame_samples(ms: int, sample_rate: int) -> int:
    """Samples in a frame of at least ``ms``: rounded up, so a rate like 22050 Hz, where 50 ms is
    1102.5 samples, never gives a frame the server rejects as too short."""
    return -(-ms * sample_rate // 1000)


def frame_ms(nbytes: int, sample_rate: int) -> float:
    """Duration of a pcm_s16le mono frame."""
    return nbytes * 1000.0 / (2 * sample_rate)


def is_u3(speech_model: str) -> bool:
    return speech_model in U3_MODELS


# --- close-code policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClosePolicy:
    """What a session end means for the daemon: retry or not, how long to wait, what to say."""

    kind: str  # normal | auth | rate_limited | expired | client_bug | server | transport | idle | config
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


_NORMAL = ClosePolicy("normal", False, 0.0, 0.0, "session ended normally")
_AUTH = ClosePolicy(
    "auth",
    False,
    0.0,
    0.0,
    "AssemblyAI refused the API key or account (1008): check /etc/pttd/api-key "
    "and the account balance; pttd will not retry until the config changes or "
    "the button is pressed again",
)
_RATE = ClosePolicy(
    "rate_limited",
    True,
    5.0,
    60.0,
    "too many new sessions per minute for this account; retrying with backoff",
)
_EXPIRED = ClosePolicy(
    "expired", True, 0.0, 0.0, "session reached its maximum duration; opening a new one"
)
_BAD_MESSAGE = ClosePolicy(
    "client_bug",
    False,
    0.0,
    0.0,
    "the server rejected a message from pttd (3006): this is a pttd bug, "
    "please report it with the journal lines around it",
    bug=True,
)
_BAD_AUDIO = ClosePolicy(
    "client_bug",
    True,
    1.0,
    30.0,
    "the server rejected pttd's audio frames or pacing (3007): this is a "
    "pttd bug, please report it",
    bug=True,
)
_SERVER = ClosePolicy("server", True, 1.0, 30.0, "the server cancelled the session; retrying")
_TRANSPORT = ClosePolicy("transport", True, 0.5, 5.0, "connection to the server lost; reconnecting")
_IDLE = ClosePolicy("idle", True, 0.0, 0.0, "session closed for inactivity")
# not a close code: pttd could not even try (a URL websocket-client refuses, say); retrying
# the same thing cannot help, and it is not the network being down
CANNOT_OPEN = ClosePolicy(
    "config", False, 0.0, 0.0, "pttd cannot open a session with this configuration (check stt.url)"
)

# 1008 on a key that has already opened a session in this process: the node SDK (#97) saw
# sporadic ones ("Incorrect padding") that were gone on retry, so it gets one quick retry
AUTH_RETRY_ONCE = ClosePolicy(
    "auth_retry",
    True,
    0.5,
    2.0,
    "AssemblyAI refused a key that worked before (1008); retrying once",
)


def http_refusal_policy(status: int) -> ClosePolicy:
    """An HTTP status other than 101 at the upgrade. 401/403 and 429 are handled as their close
    codes (1008, 3009); 5xx is the server's trouble (retry); any other 4xx means the request
    itself is wrong (a parameter, the path): a configuration error, never retried, never taken
    for the network being down."""
    if status in (401, 403):
        return _AUTH
    if status == 429:
        return _RATE
    if status >= 500:
        return ClosePolicy(
            "server", True, 1.0, 30.0, f"the server failed the upgrade (HTTP {status}); retrying"
        )
    cause = {
        400: "the server refused a query parameter: check stt.speech_model, "
        "audio.sample_rate and stt.params",
        404: "no v3 streaming endpoint at this path: check stt.url (it ends in /v3/ws)",
        405: "the server refused the request method: check stt.url",
        410: "this endpoint is gone: check stt.url",
        426: "the server wants another protocol: check stt.url (wss://)",
    }.get(status, "the server refused the request: check stt.url and stt.params")
    return ClosePolicy(
        "config",
        False,
        0.0,
        0.0,
        f"HTTP {status} at the upgrade: {cause}; pttd will not retry until "
        "the button is pressed again",
    )


# code -> policy; reason texts refine 3005 and 1008 (their meaning moved on 2026-02-25).
CLOSE_POLICIES: dict[int | None, ClosePolicy] = {
    1000: _NORMAL,
    1001: _TRANSPORT,
    1006: _TRANSPORT,
    1008: _AUTH,
    1011: _SERVER,
    1012: _SERVER,
    1013: _SERVER,
    3005: _SERVER,
    3006: _BAD_MESSAGE,
    3007: _BAD_AUDIO,
    3008: _EXPIRED,
    3009: _RATE,
    # legacy v2 codes, still listed by the SDK
    4001: _AUTH,
    4002: _AUTH,
    4003: _AUTH,
    4008: _EXPIRED,
    4029: _BAD_AUDIO,
    4031: _IDLE,
    4032: _BAD_AUDIO,
    4033: _BAD_AUDIO,
    4100: _BAD_MESSAGE,
    4101: _BAD_MESSAGE,
    4102: _RATE,
    None: _TRANSPORT,  # no close frame at all
}


def policy_for(code: int | None, reason: str = "") -> ClosePolicy:
    """Classify a session end by close/error code, using the text where the code is ambiguous."""
    text = (reason or "").lower()
    if code in (1008, 3005) and "too many concurrent" in text:
        return _RATE
    if code == 3005:
        if "session expired" in text:
            return _EXPIRED
        if "input duration" in text or "transmission rate" in text:
            return _BAD_AUDIO
        if "invalid" in text:
            return _BAD_MESSAGE
    if code in CLOSE_POLICIES:
        return CLOSE_POLICIES[code]
    if code is not None and 4000 <= code < 5000:
        return _SERVER
    return _TRANSPORT


# --- turn assembly -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinalTurn:
    """The one final of a turn_order, as delivered."""

    turn: Turn
    formatted: bool


class TurnAssembler:
    """One final per ``turn_order``, whichever formatting pattern the server uses (research §4.3).

    With ``format_turns`` on, an unformatted end-of-turn message is held for a short grace
    period in case a formatted copy follows (Pattern A); a formatted one (Pattern B, U3) is
    delivered at once. Later copies of a delivered turn are dropped.
    """

    def __init__(self, format_turns: bool, grace_s: float = 1.5):
        self.format_turns = format_turns
        self.grace_s = grace_s
        self._delivered: set[int] = set()
        self._held: dict[int, tuple[Turn, float]] = {}

    def feed(self, turn: Turn, now: float) -> list[FinalTurn]:
        """Take one Turn; return the finals that are now due (in turn order)."""
        out = self._release_older(turn.turn_order)
        if not turn.end_of_turn or turn.turn_order in self._delivered:
            return out
        if turn.turn_is_formatted or not self.format_turns:
            self._held.pop(turn.turn_order, None)
            return out + [self._deliver(turn)]
        self._held.setdefault(turn.turn_order, (turn, now + self.grace_s))
        return out

    def is_final_pending(self, turn_order: int) -> bool:
        return turn_order in self._held

    def deadline(self) -> float | None:
        return min((d for _, d in self._held.values()), default=None)

    def expire(self, now: float) -> list[FinalTurn]:
        due = sorted(k for k, (_, d) in self._held.items() if d <= now)
        return [self._deliver(self._held.pop(k)[0]) for k in due]

    def flush(self) -> list[FinalTurn]:
        """Session ending (Termination, close): deliver whatever is held."""
        return [self._deliver(self._held.pop(k)[0]) for k in sorted(self._held)]

    def _release_older(self, turn_order: int) -> list[FinalTurn]:
        older = sorted(k for k in self._held if k < turn_order)
        return [self._deliver(self._held.pop(k)[0]) for k in older]

    def _deliver(self, turn: Turn) -> FinalTurn:
        self._delivered.add(turn.turn_order)
        return FinalTurn(turn=turn, formatted=turn.turn_is_formatted)
