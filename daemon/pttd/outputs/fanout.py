"""Output sinks for the contract's event dicts (events.py): stdout, journald, and the fan-out.

The controller calls ``Outputs.emit(event)`` and must never stall on an output or see one
raise. So ``Outputs`` gives each sink its own small worker thread and bounded queue: a
stdout pipe nobody reads, or a wedged journald, blocks only its own worker, the others carry on.
Sinks themselves stay plain synchronous objects with ``emit(event)`` and ``close()``. A sink
whose ``emit`` only queues without blocking (the control socket's) says so with
``inline = True`` and is called on the caller's thread: a worker would only add a wake-up.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol, TextIO

from pttd.core.mailbox import Mailbox

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pttd"
STDOUT_MODES = ("text", "jsonl", "none")


class Sink(Protocol):
    def emit(self, event: dict) -> None: ...
    def close(self) -> None: ...


def is_inline(sink: Sink) -> bool:
    """True for a sink that asks to be called on the emitting thread (its emit never blocks)."""
    return bool(getattr(sink, "inline", False))


def skipped_kinds(sink: Sink) -> frozenset:
    """The event kinds a sink ignores (its ``skips``): they are not queued for its worker, which
    would only wake up to drop them (journald and partials, several a second while speaking)."""
    return frozenset(getattr(sink, "skips", ()))


# --------------------------------------------------------------------------- stdout


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
    """The readable form: ``state: listening``, ``final: <text>``, ``error: [code] msg (retry in Ns)``."""
    kind = event.get("event")
    if kind == "state":
        return f"state: {event.get('state')}"
    if kind in ("partial", "final"):
        return f"{kind}: {_flat(event.get('text', ''))}"
    if kind in ("error", "warning"):
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


# --------------------------------------------------------------------------- journald

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
_MESSAGE_KEY = {"final": "text", "partial": "text", "error": "message", "warning": "message"}
_PRIORITY = {"final": 6, "error": 3, "warning": 4, "state": 7}  # info, err, warning, debug
_SKIPPED_KEYS = {"event", "ts"}  # journald stamps its own time


class JournalSink:
    """Finals, errors and state changes as structured journald records (design.md, "journald").

    Partials are not journaled: several a second per turn would flood the journal.
    ``send`` defaults to ``systemd.journal.send``; tests inject their own. libsystemd drops
    records silently when journald is absent, so the socket is checked here and its absence
    (or a send error) is logged once per outage.
    """

    skips = frozenset({"partial"})  # journal_fields() has no record for them

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
            self._mark_down("journald socket %s not found" % self._socket_path)
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
    kind = event.get("event")
    if kind == "partial":
        return None
    fields = {
        "MESSAGE": _journal_message(event),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "PTTD_EVENT": str(kind),
        "PRIORITY": str(_PRIORITY.get(kind, 7)),
    }
    if kind == "final":
        fields["SPEECH_MODEL"] = speech_model
    for key, value in event.items():
        if key in _SKIPPED_KEYS or key == _MESSAGE_KEY.get(kind) or value is None:
            continue
        name = "WARNING_CODE" if (kind, key) == ("warning", "code") else _FIELD_NAMES.get(key)
        fields[name or _field_name(key)] = _field_value(value)
    return fields


def _journal_message(event: dict) -> str:
    kind = event.get("event")
    if kind in _MESSAGE_KEY:
        return str(event.get(_MESSAGE_KEY[kind], ""))
    if kind == "state":
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


# --------------------------------------------------------------------------- fan-out


class Outputs:
    """Delivers every event to every sink, in order, without blocking or raising into the caller.

    Each sink gets a worker thread fed by a bounded queue (``queue_size`` events). When a
    sink falls that far behind, new events for *that* sink are dropped and counted (logged
    once per backlog): memory stays bounded and the other sinks are unaffected.
    ``threaded=False`` calls every sink inline (tests, short-lived commands); an ``inline``
    sink (see ``is_inline``) is always called inline.
    """

    def __init__(self, sinks: Iterable[Sink], threaded: bool = True, queue_size: int = 256):
        self.sinks = list(sinks)
        self._inline = [s for s in self.sinks if not threaded or is_inline(s)]
        self._workers = [
            _SinkWorker(s, queue_size) for s in self.sinks if threaded and not is_inline(s)
        ]
        self._inline_failed: set[int] = set()
        self._inline_failures = 0

    @property
    def failures(self) -> int:
        """How many deliveries raised, over every sink (each is logged; the others still get
        the event)."""
        return self._inline_failures + sum(w.failures for w in self._workers)

    def emit(self, event: dict, on_delivered: Callable[[], None] | None = None) -> None:
        """Hand ``event`` to every sink. ``on_delivered`` (optional) is called once, on whichever
        thread is last, when the inline sinks and every worker that takes the event have
        delivered it (or dropped it); a worker that never gets to it never calls it."""
        kind = event.get("event")
        takers = [w for w in self._workers if kind not in w.skips]
        receipt = None if on_delivered is None else _Receipt(event, len(takers) + 1, on_delivered)
        item = event if receipt is None else receipt
        for worker in takers:
            if not worker.put(item) and receipt is not None:
                receipt.done()
        for sink in self._inline:
            if _deliver(sink, event, first_failure=id(sink) not in self._inline_failed):
                continue
            self._inline_failed.add(id(sink))
            self._inline_failures += 1
        if receipt is not None:
            receipt.done()  # the emitter's own count: the callback never runs before this point

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds in all), then close every sink."""
        for worker in self._workers:
            worker.finish()
        deadline = _deadline(timeout)
        for worker in self._workers:
            worker.join(deadline)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                log.exception("closing output %s failed", type(sink).__name__)


_STOP = object()


class _Receipt:
    """An event that its emitter waits for: calls ``on_delivered`` once all ``count`` holders
    (the workers that take it, and the emitter itself) are done with it. The controller ends a
    press only after its final is out (controller.py)."""

    __slots__ = ("event", "_left", "_lock", "_on_delivered")

    def __init__(self, event: dict, count: int, on_delivered: Callable[[], None]):
        self.event = event
        self._left = count
        self._lock = threading.Lock()
        self._on_delivered = on_delivered

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._on_delivered()


class _SinkWorker:
    """One sink's thread and bounded queue."""

    def __init__(self, sink: Sink, queue_size: int):
        self.sink = sink
        self.skips = skipped_kinds(sink)
        self._queue = Mailbox(queue_size)
        self._dropped = 0
        self._failed = False
        self.failures = 0
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"pttd-out-{type(sink).__name__}"
        )
        self._thread.start()

    def put(self, event: dict | _Receipt) -> bool:
        """Queue an event; False when the sink is too far behind and it was dropped."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "output %s is %d events behind; dropping new events for it",
                    type(self.sink).__name__,
                    self._queue.maxsize,
                )
            return False

    def finish(self) -> None:
        """Queue the stop marker (past the bound if need be: it is never refused)."""
        self._queue.put_marker(_STOP)

    def join(self, deadline: float) -> None:
        self._thread.join(max(0.0, deadline - _now()))
        if self._thread.is_alive():
            log.warning(
                "output %s did not finish in time; %d events undelivered",
                type(self.sink).__name__,
                self._queue.qsize(),
            )

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if self._dropped:
                log.warning(
                    "output %s caught up; %d events were dropped",
                    type(self.sink).__name__,
                    self._dropped,
                )
                self._dropped = 0
            receipt = event if type(event) is _Receipt else None
            if receipt is not None:
                event = receipt.event
            if not _deliver(self.sink, event, first_failure=not self._failed):
                self._failed = True
                self.failures += 1
            if receipt is not None:
                receipt.done()


def _deliver(sink: Sink, event: dict, first_failure: bool) -> bool:
    """Call ``sink.emit``; log only the first failure of each sink (with its traceback)."""
    try:
        sink.emit(event)
        return True
    except Exception:  # noqa: BLE001 - a broken output must never take the controller down
        if first_failure:
            log.exception("output %s failed (further failures not logged)", type(sink).__name__)
        return False


def _now() -> float:
    return time.monotonic()


def _deadline(timeout: float) -> float:
    return _now() + timeout
