"""Validate v3 messages against AssemblyAI's own AsyncAPI specs (tests/spec/*.yml).

Which message types exist, and in which direction, is read from the spec itself: every
``components.messages`` entry whose payload has a ``type`` const, with the direction taken from
the ``operations`` (``send`` = client to server, ``receive`` = server to client).

The specs lack several messages the service really sends or accepts (AssemblyAI's docs
describe them). Those are validated against the small supplemental schemas below, kept apart
and named as such so nobody mistakes them for AssemblyAI's:

* server to client, missing from both specs: Error, Warning, Heartbeat, SpeakerRevision,
  LLMGatewayResponse; SpeechStarted is only in the U3 spec (US models never send it).
* client to server, missing from both specs: KeepAlive.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec"
SPEC_FILES = {"us": "usm-streaming.yml", "u3": "usm-streaming-u3-pro.yml"}

_WORD = {
    "type": "object",
    "required": ["text", "start", "end", "confidence", "word_is_final"],
    "properties": {"text": {"type": "string"}, "start": {"type": "integer"},
                   "end": {"type": "integer"}, "confidence": {"type": "number"},
                   "word_is_final": {"type": "boolean"}, "speaker": {"type": "string"}},
}

#: Supplemental schemas for messages the specs do not describe (shapes from AssemblyAI's docs).
SUPPLEMENTAL_SERVER: dict[str, dict] = {
    "Error": {
        "type": "object", "required": ["type", "error_code", "error"],
        "properties": {"type": {"const": "Error"}, "error_code": {"type": "integer"},
                       "error": {"type": "string"}},
    },
    "Warning": {
        "type": "object", "required": ["type", "warning_code", "warning"],
        "properties": {"type": {"const": "Warning"}, "warning_code": {"type": "integer"},
                       "warning": {"type": "string"}},
    },
    "Heartbeat": {
        "type": "object",
        "required": ["type", "total_audio_received_ms", "total_duration_ms", "realtime_factor"],
        "properties": {"type": {"const": "Heartbeat"},
                       "total_audio_received_ms": {"type": "integer", "minimum": 0},
                       "total_duration_ms": {"type": "integer", "minimum": 0},
                       "realtime_factor": {"type": "number", "minimum": 0},
                       "max_speech_probability": {"type": "number", "minimum": 0, "maximum": 1}},
    },
    "SpeakerRevision": {
        "type": "object", "required": ["type", "revisions"],
        "properties": {"type": {"const": "SpeakerRevision"}, "revisions": {
            "type": "array", "items": {
                "type": "object", "required": ["turn_order", "speaker_label", "words"],
                "properties": {"turn_order": {"type": "integer"},
                               "speaker_label": {"type": "string"},
                               "words": {"type": "array", "items": _WORD}}}}},
    },
    "LLMGatewayResponse": {
        "type": "object", "required": ["type", "turn_order", "transcript", "data"],
        "properties": {"type": {"const": "LLMGatewayResponse"},
                       "turn_order": {"type": "integer"}, "transcript": {"type": "string"},
                       "data": {"type": "object"}},
    },
}
SUPPLEMENTAL_CLIENT: dict[str, dict] = {
    "KeepAlive": {"type": "object", "required": ["type"],
                  "properties": {"type": {"const": "KeepAlive"}}},
}


class UnknownMessageType(LookupError):
    """Neither the spec nor the supplement knows this message type."""


def _resolve(node: Any, root: dict) -> Any:
    """Inline local ``$ref`` s and turn OpenAPI ``nullable`` into JSON Schema."""
    if isinstance(node, list):
        return [_resolve(item, root) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _resolve(target, root)
    resolved = {key: _resolve(value, root) for key, value in node.items()}
    if resolved.pop("nullable", False) and isinstance(resolved.get("type"), str):
        resolved["type"] = [resolved["type"], "null"]
    return resolved


class SpecValidator:
    """Message schemas of one AsyncAPI spec, keyed by direction and ``type``."""

    def __init__(self, spec_path: Path) -> None:
        self.spec_path = spec_path
        self.spec = yaml.safe_load(spec_path.read_text())
        self.server_schemas: dict[str, dict] = {}
        self.client_schemas: dict[str, dict] = {}
        self._collect()

    def _collect(self) -> None:
        for operation in self.spec["operations"].values():
            target = (self.client_schemas if operation["action"] == "send"
                      else self.server_schemas)
            for ref in operation["messages"]:
                message = _resolve(ref, self.spec)
                payload = message.get("payload", {})
                message_type = payload.get("properties", {}).get("type", {}).get("const")
                if message_type:  # binary audio has no type
                    target[message_type] = payload

    def schema(self, message_type: str, direction: str = "server") -> tuple[dict, bool]:
        """(schema, from_spec) for a type; raises UnknownMessageType."""
        spec_schemas, extra = ((self.server_schemas, SUPPLEMENTAL_SERVER) if direction == "server"
                               else (self.client_schemas, SUPPLEMENTAL_CLIENT))
        if message_type in spec_schemas:
            return spec_schemas[message_type], True
        if message_type in extra:
            return extra[message_type], False
        raise UnknownMessageType(f"{message_type!r} ({direction}) is not in "
                                 f"{self.spec_path.name} nor in the supplement")

    def validate(self, message: dict, direction: str = "server") -> None:
        """Raise ``jsonschema.ValidationError`` (or UnknownMessageType) if invalid."""
        schema, _ = self.schema(message.get("type", ""), direction)
        validator_cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        validator_cls(copy.deepcopy(schema), format_checker=jsonschema.FormatChecker()).validate(
            message)


@functools.cache
def validator(family: str = "us") -> SpecValidator:
    """The cached validator for a model family ("us" or "u3")."""
    return SpecValidator(SPEC_DIR / SPEC_FILES[family])


def validate_server_message(message: dict, family: str = "us") -> None:
    validator(family).validate(message, "server")


def validate_client_message(message: dict, family: str = "us") -> None:
    validator(family).validate(message, "client")


def validate_session(messages: list[dict], family: str, *, allow_unknown: bool = False) -> None:
    """Validate every message a session sent; unknown types only when injected on purpose."""
    for message in messages:
        try:
            validate_server_message(message, family)
        except UnknownMessageType:
            if not allow_unknown:
                raise
