"""The control protocol's lines: what a request may say, and how a reply or event is written.

Shared by the control socket and the kiosk's WebSocket, so both accept exactly the same
requests and answer with the same bytes.
"""

from __future__ import annotations

import json

from pttd.errors import PttdError
from pttd.events import Command

MAX_LINE = 64 * 1024
"""Longest accepted request line in bytes (without the newline); longer lines close the client."""

COMMANDS = tuple(c.value for c in Command if c is not Command.SUBSCRIBE)
"""Commands passed to the daemon's ``handle``; ``subscribe`` is handled by the server itself."""

SUBSCRIBE = Command.SUBSCRIBE.value


class ControlError(PttdError, OSError):
    """The control socket cannot be served or reached; the message says what to fix.

    At start-up the daemon reports it as a ``StartupError`` (exit 2); ``pttd status`` and the
    other socket commands print it and exit 1.
    """


class RequestError(PttdError, ValueError):
    """A malformed request line; the message is sent back as ``error``."""


def parse_request(data: bytes | str) -> str:
    """Validate one request line and return its command, or raise :class:`RequestError`."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_LINE:
            raise RequestError(f"request line longer than {MAX_LINE} bytes")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("request is not valid UTF-8") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise RequestError('request is not valid JSON (send e.g. {"cmd": "status"})') from None
    if not isinstance(obj, dict):
        raise RequestError('request must be a JSON object like {"cmd": "status"}')
    return _command_of(obj)


def _command_of(obj: dict) -> str:
    if "cmd" not in obj:
        raise RequestError('request has no "cmd"')
    cmd = obj["cmd"]
    if not isinstance(cmd, str) or cmd not in COMMANDS + (SUBSCRIBE,):
        known = ", ".join(COMMANDS + (SUBSCRIBE,))
        raise RequestError(f"unknown cmd {str(cmd)[:40]!r} (known: {known})")
    return cmd


def encode(obj: dict) -> bytes:
    """One protocol line: JSON (UTF-8, not ASCII-escaped so transcripts stay readable) + newline."""
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
