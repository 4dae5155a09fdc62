"""AssemblyAI Universal Streaming v3 on the wire: server messages in, client messages out.

Pure data and functions (no sockets), so every rule here is tested without a network.
Reading is lenient (unknown types and fields are tolerated, durations may be int or float);
sending is conservative (only documented messages, ``speech_model`` always explicit). The
messages the controller sees are the seam's vendor-neutral events (``pttd.stt.base``); the rest
(SpeechStarted, Heartbeat, ...) are AssemblyAI's own. What a close code means is in
``close_policy``.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pttd.errors import PttdError
from pttd.stt.base import (
    Begin,
    ErrorMessage,
    SessionConfiguration,
    Termination,
    Turn,
    WarningMessage,
    Word,
)

log = logging.getLogger(__name__)

API_VERSION = "2025-05-12"
USER_AGENT = "AssemblyAI/1.0 (integration=pttd)"
U3_MODELS = frozenset(
    {"u3-rt-pro", "u3-rt-pro-beta-1", "u3-pro", "universal-3-5-pro", "universal-3-6-pro"}
)
MIN_FRAME_MS = 50
MAX_FRAME_MS = 1000


class ProtocolError(PttdError, ValueError):
    """A server message we cannot make sense of (logged; the session carries on)."""


# --- server -> client: AssemblyAI's own messages (the neutral ones are pttd.stt.base's) ----------


@dataclass(frozen=True)
class SpeechStarted:
    timestamp: int
    confidence: float | None = None


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


ServerMessage = (
    Begin
    | Turn
    | SpeechStarted
    | Termination
    | ErrorMessage
    | WarningMessage
    | Heartbeat
    | SpeakerRevision
    | LLMGatewayResponse
    | UnknownMessage
)


def parse_message(text: str | bytes) -> ServerMessage:
    """Parse one server text frame. Total: anything it cannot make sense of (not JSON, nested
    past the parser's depth, not an object, a field of the wrong type or an absurd number such
    as ``1e400`` for a count) raises :class:`ProtocolError` and nothing else."""
    try:
        # strict UTF-8 (json.loads would guess UTF-16/32 from bytes); the frame is not checked
        # before this (link.py skips websocket-client's slow pure-Python check)
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


_PARSERS: dict[str, Callable[[dict], ServerMessage]] = {
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
