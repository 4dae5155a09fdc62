"""A v3 connection's query string, parsed and validated into a :class:`SessionConfig`.

Why strict: the offline engine and the tests' fake stand in for AssemblyAI, so they take only
what the service documents (JSON's lowercase booleans, JSON arrays) and refuse the rest with the
service's 3005. Stricter than the service, never kinder: a client that passes here sends what
every reader of the docs accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any

from pttd.errors import PttdError
from pttd.local.options import ServerOptions
from pttd.local.recognizer import SessionConfig
from pttd.local.wire import (
    BYTES_PER_SAMPLE,
    U3_DEFAULTS,
    U3_EARLY_PARTIAL_MS,
    U3_MODELS,
    UNSUPPORTED_ENCODINGS,
    US_DEFAULTS,
)


class QueryError(PttdError, ValueError):
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
    """Strict: JSON's lowercase ``true``/``false`` only (the SDK's ``True`` is reported to work
    on the real service; this server refuses it on purpose)."""
    if value == "true":
        return True
    if value == "false":
        return False
    raise QueryError(f"not a boolean (true or false): {value!r}")


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
    """Lists are JSON arrays (the SDK form) and nothing else: a bare comma list or a lone
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


def parse_query(query: str) -> dict[str, Any]:
    """Parse a v3 query string into typed values; the last occurrence of a key wins."""
    parsed: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
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


def model_family(speech_model: str) -> str:
    """U3 shaping for the Universal-3 Pro family, US shaping for everything else."""
    return "u3" if speech_model in U3_MODELS else "us"


def build_session_config(
    session_id: str,
    query: Mapping[str, Any],
    options: ServerOptions,
    family: str | None = None,
) -> SessionConfig:
    """Validate the parsed query and fill in the per-family defaults.

    ``family``: "us" or "u3" shaping whatever ``speech_model`` says (None = the model's own).
    """
    model = query.get("speech_model") or options.default_speech_model
    family = family or model_family(model)
    defaults = U3_DEFAULTS if family == "u3" else US_DEFAULTS
    encoding = query.get("encoding", "pcm_s16le")
    _check_values(query, options)
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
        sample_rate=query.get("sample_rate", 16000),
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


def _check_values(query: Mapping[str, Any], options: ServerOptions) -> None:
    """Refuse what this server cannot decode and values outside the documented ranges."""
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


def _check_range(query: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = query.get(name)
    if value is not None and not low <= value <= high:
        raise QueryError(f"{name}: {value} outside {low}-{high}")


def updated_config(config: SessionConfig, changes: Mapping[str, Any]) -> SessionConfig:
    """``config`` with the UpdateConfiguration fields it tracks applied (others are ignored)."""
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
    return dataclasses.replace(config, **updates)
