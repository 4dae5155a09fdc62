"""``[output] stdout``: every event on standard output, as the contract's JSON lines or as
readable text (the interface contract, docs/contract.md, "Events")."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

from pttd.events import EventKind

log = logging.getLogger(__name__)

STDOUT_MODES = ("text", "jsonl", "none")


class StdoutSink:
    """Events on a text stream: ``jsonl`` (the contract's lines), ``text`` (readable) or ``none``.

    Each line goes out in one ``write`` then a ``flush`` (one write(2), atomic on a pipe up to
    PIPE_BUF = 4 KiB), so readers, even after a SIGKILL, only see whole lines. A closed pipe
    disables the sink instead of killing the daemon.
    """

    def __init__(self, mode: str = "text", stream: TextIO | None = None):
        if mode not in STDOUT_MODES:
            raise ValueError(f"stdout mode must be one of {STDOUT_MODES}, not {mode!r}")
        self.mode = mode
        self.stream = sys.stdout if stream is None else stream
        self.enabled = mode != "none"
        self.inline = not self.enabled  # "none" never writes: no worker thread for it

    def emit(self, event: dict) -> None:
        if not self.enabled:
            return
        line = json_line(event) if self.mode == "jsonl" else text_line(event)
        if line is None:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError) as exc:  # EPIPE, EIO (tty hung up); ValueError: closed
            self._disable(exc)

    def close(self) -> None:
        if self.enabled:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _disable(self, exc: Exception) -> None:
        self.enabled = False
        log.warning("stdout is gone (%s); stdout output disabled, other outputs carry on", exc)
        _silence_stream(self.stream)


def _silence_stream(stream: TextIO) -> None:
    """Point the dead stream's fd at /dev/null so the interpreter's exit-time flush stays quiet."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def json_line(event: dict) -> str:
    """The contract's compact one-line JSON (no newline inside: JSON escapes them)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def text_line(event: dict) -> str | None:
    """The readable form: ``state: listening``, ``final: <text>``,
    ``error: [code] msg (retry in Ns)``."""
    kind = event.get("event")
    if kind == EventKind.STATE:
        return f"state: {event.get('state')}"
    if kind in (EventKind.PARTIAL, EventKind.FINAL):
        return f"{kind}: {_flat(event.get('text', ''))}"
    if kind in (EventKind.ERROR, EventKind.WARNING):
        code = event.get("code")
        retry = event.get("retry_in_s")
        return (
            f"{kind}: "
            + (f"[{code}] " if code is not None else "")
            + _flat(event.get("message", ""))
            + (f" (retry in {retry:g}s)" if retry is not None else "")
        )
    rest = {k: v for k, v in event.items() if k not in ("event", "ts")}
    return f"{kind}: {json_line(rest)}"


def _flat(text: object) -> str:
    """One event, one line: a newline in a transcript must not split the text form."""
    return " ".join(str(text).splitlines())
