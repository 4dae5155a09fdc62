"""``[output] journal``: finals, errors, warnings and state changes as structured journald records
(the interface contract, docs/contract.md, "journald"); and the daemon's own log lines, which
go to journald as structured records too when systemd runs it."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from collections.abc import Callable
from typing import TextIO

from pttd.events import EventKind

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pttd"


# Contract keys with a fixed journal field name; every other key becomes PTTD_<KEY>.
_FIELD_NAMES = {
    "turn_order": "TURN_ORDER",
    "session_id": "SESSION_ID",
    "press_id": "PRESS_ID",
    "audio_ms": "AUDIO_MS",
    "latency_ms": "LATENCY_MS",
    "code": "ERROR_CODE",
    "state": "PTTD_STATE",
    "language_code": "LANGUAGE_CODE",
}
_MESSAGE_KEY: dict[str, str] = {
    EventKind.FINAL: "text",
    EventKind.PARTIAL: "text",
    EventKind.ERROR: "message",
    EventKind.WARNING: "message",
}
_PRIORITY: dict[str, int] = {  # syslog's: info, err, warning, debug
    EventKind.FINAL: 6,
    EventKind.ERROR: 3,
    EventKind.WARNING: 4,
    EventKind.STATE: 7,
}
_SKIPPED_KEYS = {"event", "ts"}  # journald stamps its own time


class JournalSink:
    """Finals, errors and state changes as structured journald records.

    Partials are not journaled: several a second per turn would flood the journal.
    ``send`` defaults to ``systemd.journal.send``; tests inject their own. libsystemd drops
    records silently when journald is absent, so the socket is checked here and its absence
    (or a send error) is logged once per outage.
    """

    skips = frozenset({EventKind.PARTIAL})  # journal_fields() has no record for them

    def __init__(
        self,
        speech_model: str,
        send: Callable[..., None] | None = None,
        socket_path: str = JOURNAL_SOCKET,
    ):
        self.speech_model = speech_model
        self._send = send
        self._probe = send is None
        self._socket_path = socket_path
        self._down = False
        if send is None:
            self._send = _journal_send()

    def emit(self, event: dict) -> None:
        fields = journal_fields(event, self.speech_model)
        if fields is None:
            return
        if self._send is None or (self._probe and not _is_socket(self._socket_path)):
            self._mark_down(f"journald socket {self._socket_path} not found")
            return
        message = fields.pop("MESSAGE")
        try:
            self._send(message, **fields)
        except OSError as exc:
            self._mark_down(f"sending to journald failed: {exc}")
            return
        if self._down:
            self._down = False
            log.info("journald reachable again; journal output resumed")

    def close(self) -> None:
        pass

    def _mark_down(self, why: str) -> None:
        if not self._down:
            self._down = True
            log.warning("%s; journal output skipped until it is back (other outputs carry on)", why)


def journal_fields(event: dict, speech_model: str) -> dict | None:
    """The journald record for an event: MESSAGE plus upper-case fields, or None to skip it."""
    kind = str(event.get("event"))
    if kind == EventKind.PARTIAL:
        return None
    fields = {
        "MESSAGE": _journal_message(event),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "PTTD_EVENT": kind,
        "PRIORITY": str(_PRIORITY.get(kind, 7)),
    }
    if kind == EventKind.FINAL:
        fields["SPEECH_MODEL"] = speech_model
    message_key = _MESSAGE_KEY.get(kind)
    for key, value in event.items():
        if key in _SKIPPED_KEYS or key == message_key or value is None:
            continue
        name = (
            "WARNING_CODE" if (kind, key) == (EventKind.WARNING, "code") else _FIELD_NAMES.get(key)
        )
        fields[name or _field_name(key)] = _field_value(value)
    return fields


def _journal_message(event: dict) -> str:
    kind = str(event.get("event"))
    if kind in _MESSAGE_KEY:
        return str(event.get(_MESSAGE_KEY[kind], ""))
    if kind == EventKind.STATE:
        return f"state: {event.get('state')}"
    return str(kind)


def _field_name(key: str) -> str:
    """``gap_ms`` → ``PTTD_GAP_MS``; journald accepts only A-Z, 0-9 and _ (64 chars at most)."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(key).upper())
    return ("PTTD_" + name)[:64]


def _field_value(value: object) -> str:
    """Strings as they are; numbers, booleans and lists as their JSON spelling."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _journal_send() -> Callable[..., None] | None:
    try:
        from systemd import journal
    except ImportError:
        log.warning("systemd-python is not installed; journal output disabled")
        return None
    return journal.send


# --------------------------------------------------------------------------- logging


def journal_stream_matches(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is connected to journald by systemd.

    systemd.exec(5): services get ``$JOURNAL_STREAM=<dev>:<inode>`` of their stdout/stderr;
    comparing it with the fd (not just checking it is set) ignores a value inherited by
    a child whose output was redirected.
    """
    stream = sys.stderr if stream is None else stream
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def journal_logging_handler(level: int = logging.NOTSET) -> logging.Handler:
    """The daemon's own log handler: structured journald records under systemd, stderr otherwise.

    Under systemd stderr already reaches the journal, but only as plain text at one priority;
    the JournalHandler keeps each record's level and adds LOGGER, THREAD_NAME and CODE_* fields.
    """
    if journal_stream_matches():
        try:
            from systemd.journal import JournalHandler

            handler: logging.Handler = JournalHandler(level, SYSLOG_IDENTIFIER=IDENTIFIER)
            handler.setFormatter(logging.Formatter("%(message)s"))
            return handler
        except ImportError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("pttd %(levelname)s %(name)s: %(message)s"))
    return handler
