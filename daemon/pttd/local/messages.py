"""v3 messages as plain values: the server's own (Begin, Termination, Heartbeat, Error) built,
the client's checked.

Why apart: their shapes are the protocol's (tests/spec/usm-streaming*.yml, and the docs for the
ones the specs lack), while the session only decides when each is due.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pttd.local.recognizer import SessionConfig
from pttd.local.wire import CLIENT_MESSAGE_TYPES


def begin_message(
    session_id: str,
    config: SessionConfig,
    query: Mapping[str, Any],
    api_version: str,
    expires_at: int,
) -> dict:
    """Begin: the session id, its expiry (Unix seconds) and the configuration in force."""
    return {
        "type": "Begin",
        "id": session_id,
        "expires_at": expires_at,
        "configuration": {
            "model": config.speech_model,
            "mode": query.get("mode", "balanced") if config.is_u3 else None,
            "api_version": api_version,
            "speaker_labels": bool(query.get("speaker_labels", False)),
            "redact_pii": bool(query.get("redact_pii", False)),
            "filter_profanity": bool(query.get("filter_profanity", False)),
            "domain": query.get("domain"),
            "voice_focus": query.get("voice_focus"),
        },
    }


def termination_message(audio_ms: float, session_s: float) -> dict:
    """Termination: audio received and session length, in whole seconds."""
    return {
        "type": "Termination",
        "audio_duration_seconds": int(round(audio_ms / 1000.0)),
        "session_duration_seconds": int(round(session_s)),
    }


def heartbeat_message(audio_ms: int, total_ms: int) -> dict:
    """Heartbeat (``session_heartbeat=true``): audio received against wall time."""
    return {
        "type": "Heartbeat",
        "total_audio_received_ms": audio_ms,
        "total_duration_ms": total_ms,
        "realtime_factor": round(audio_ms / max(total_ms, 1), 4),
        "max_speech_probability": 0.0,
    }


def error_message(code: int, text: str) -> dict:
    return {"type": "Error", "error_code": code, "error": text}


def parse_client_message(text: str) -> tuple[Any, str | None]:
    """A client text frame: (its JSON, or the text itself when it is not JSON; the 3006 Error
    text, or None for one of the four client messages)."""
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        return text, f"Invalid JSON: {text}"
    if not isinstance(parsed, dict):
        return parsed, f"Invalid Message: {text}"
    message_type = parsed.get("type")
    if message_type not in CLIENT_MESSAGE_TYPES:
        shown = message_type if isinstance(message_type, str) else text
        return parsed, f"Invalid Message Type: {shown}"
    return parsed, None
