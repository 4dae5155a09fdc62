"""The receiver thread's half of an AssemblyAI :class:`~pttd.stt.assemblyai.session.Session`.

The receiver connects the link, reads until the end, turns each server message into the
session's events (one final per turn, an Error frame held until its close) and reports the end
exactly once. ``Session`` (session.py) is the owner's half: it creates the state declared here,
starts this thread and sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import websocket

from pttd.stt.assemblyai import close_policy, protocol
from pttd.stt.assemblyai.link import OP_CLOSE, OP_TEXT, Link, Refused
from pttd.stt.assemblyai.turns import TurnAssembler
from pttd.stt.base import (
    Begin,
    ClosePolicy,
    ErrorMessage,
    FinalTurn,
    SessionClosed,
    Termination,
    Turn,
)

log = logging.getLogger(__name__)


class SessionReceiver:
    """Receiving and reporting, run on the session's receiver thread (``close`` also reports)."""

    # the session's state, created by Session.__init__
    name: str
    begin: Begin | None
    _link: Link
    _scrub: Callable[[str], str]
    _credential: str
    _on_event: Callable[[Any, object], None]
    _assembler: TurnAssembler
    _begin_timeout: float
    _error_close_grace_s: float
    _sender: threading.Thread
    _out_cond: threading.Condition
    _stopping: threading.Event
    _begun: threading.Event
    _closed_event: threading.Event
    _closed: SessionClosed | None
    _report_lock: threading.Lock
    _error: ErrorMessage | None
    _error_deadline: float | None
    _terminate_deadline: float | None
    _last_termination: Termination | None
    _local_close: bool

    # --- receiving ------------------------------------------------------------------------------

    def _receive_main(self) -> None:
        """Connect, read until the end, report it: every way out of here reports the close once
        (any exception included: a dead receiver that said nothing would wedge its press)."""
        try:
            self._link.open()
        except Refused as refused:
            self._report_closed(
                refused.code, refused.reason, before_begin=True, policy=refused.policy
            )
            return
        try:
            self._read_loop()
        except Exception as exc:  # noqa: BLE001 - the link's errors and pttd's own alike
            self._receiver_failed(exc)
        finally:
            self._stopping.set()
            with self._out_cond:
                self._out_cond.notify_all()
            self._link.close()

    def _receiver_failed(self, exc: Exception) -> None:
        if self._local_close:
            self._report_closed(None, "closed by pttd", local=True)
            return
        link = isinstance(exc, (OSError, websocket.WebSocketException))
        if link:
            log.info("%s: connection lost: %s", self.name, self._scrub(str(exc)))
        else:
            log.error("%s: receiver failed: %s", self.name, self._scrub(repr(exc)), exc_info=True)
        err = self._error
        reason = (
            "connection lost"
            if link
            else self._scrub(f"receive failed: {type(exc).__name__}: {exc}")
        )
        self._report_closed(
            err.code if err else None,
            err.message if err else reason,
            before_begin=not self._begun.is_set(),
        )

    def _read_loop(self) -> None:
        ws = self._link.ws
        assert ws is not None  # opened by _receive_main
        begin_deadline = time.monotonic() + self._begin_timeout
        while not self._stopping.is_set():
            now = time.monotonic()
            if self._deadline_passed(now, begin_deadline):
                return
            self._emit_finals(self._assembler.expire(now))
            if not self._link.readable(self._next_wakeup(begin_deadline) - now):
                continue
            # control frames come back too: with False, websocket-client answers a ping and
            # then blocks for the next data frame with the send timeout, so a quiet session
            # (kept warm, or a long silent press) died 10 s after a server ping
            opcode, frame = ws.recv_data_frame(True)
            if opcode == OP_CLOSE:
                self._on_close_frame(frame.data)
                return
            if opcode == OP_TEXT:
                self._on_text(frame.data)

    def _deadline_passed(self, now: float, begin_deadline: float) -> bool:
        """No Begin, no Termination after Terminate, no close after an Error: report the end."""
        if not self._begun.is_set() and now >= begin_deadline:
            self._report_closed(
                None, f"no Begin within {self._begin_timeout:g} s", before_begin=True
            )
        elif self._terminate_deadline is not None and now >= self._terminate_deadline:
            log.info("%s: no Termination after Terminate; closing", self.name)
            self._report_closed(None, "no Termination after Terminate", local=True)
        elif self._error and self._error_deadline is not None and now >= self._error_deadline:
            self._report_closed(
                self._error.code, self._error.message, before_begin=not self._begun.is_set()
            )
        else:
            return False
        return True

    def _next_wakeup(self, begin_deadline: float) -> float:
        times = [
            time.monotonic() + 1.0,
            self._assembler.deadline(),
            self._error_deadline,
            self._terminate_deadline,
        ]
        if not self._begun.is_set():
            times.append(begin_deadline)
        return min(t for t in times if t is not None)

    def _on_text(self, data: bytes) -> None:
        try:
            msg = protocol.parse_message(data)
        except protocol.ProtocolError as exc:
            log.warning("%s: %s", self.name, exc)
            return
        if isinstance(msg, Begin):
            self._on_begin(msg)
        elif isinstance(msg, Turn):
            if not msg.end_of_turn:
                self._emit(msg)
            else:
                self._emit_finals(self._assembler.feed(msg, time.monotonic()))
        elif isinstance(msg, ErrorMessage):
            msg = ErrorMessage(msg.code, self._scrub(msg.message))  # it may echo the key
            log.info("%s: server error %s: %s", self.name, msg.code, msg.message)
            if self._error is None:
                self._error = msg
                self._error_deadline = time.monotonic() + self._error_close_grace_s
        elif isinstance(msg, Termination):
            self._last_termination = msg
            self._emit_finals(self._assembler.flush())
            self._emit(msg)
        elif isinstance(msg, protocol.UnknownMessage):
            log.debug("%s: unknown message %s", self.name, msg.type)
        else:
            self._emit(msg)

    def _on_begin(self, begin: Begin) -> None:
        if self._begun.is_set():
            log.warning("%s: a second Begin was ignored", self.name)
            return
        self.begin = begin
        self._begun.set()
        close_policy.credential_worked(self._credential)  # a later 1008 earns one retry
        self._sender.start()
        self._emit(begin)

    def _on_close_frame(self, data: bytes) -> None:
        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
        reason = data[2:].decode("utf-8", "replace") if len(data) > 2 else ""
        if self._error is not None:
            # the Error frame says what went wrong; the close reason is at most 123 bytes and
            # often "See Error message for details": the Error frame wins
            if self._error.code is not None:
                code = self._error.code
            reason = self._error.message or reason
        self._report_closed(code, reason, before_begin=not self._begun.is_set())

    # --- reporting ------------------------------------------------------------------------------

    def _emit(self, event: object) -> None:
        try:
            self._on_event(self, event)
        except Exception:  # a consumer bug must not kill the receiver silently
            log.exception("%s: event consumer failed on %s", self.name, type(event).__name__)

    def _emit_finals(self, finals: list[FinalTurn]) -> None:
        for final in finals:
            self._emit(final)

    def _report_closed(
        self,
        code: int | None,
        reason: str,
        *,
        before_begin: bool = False,
        local: bool = False,
        policy: ClosePolicy | None = None,
    ) -> None:
        """Report the end once. ``policy`` is given where the caller knows better than the code
        (an HTTP refusal, a token broker's answer: a 401 at the upgrade is no sporadic 1008)."""
        with self._report_lock:
            if self._closed is not None:
                return
            if not local:
                self._emit_finals(self._assembler.flush())
            closed = self._closed = SessionClosed(
                code=code,
                reason=self._scrub(reason),
                policy=policy or self._policy(code, reason, local),
                before_begin=before_begin,
                terminated=self._last_termination is not None,
                local=local,
            )
        self._stopping.set()
        self._closed_event.set()
        if closed.policy.bug:
            log.error("%s: server rejected pttd's traffic: %s", self.name, closed.describe())
        self._emit(closed)

    def _policy(self, code: int | None, reason: str, local: bool) -> ClosePolicy:
        """A clean end once pttd closed it or Termination came; else the close-code table, with
        one retry for a 1008 on a credential that has worked in this process."""
        if local or code == 1000 or (code is None and self._last_termination is not None):
            return close_policy.policy_for(1000)
        policy = close_policy.policy_for(code, reason)
        retry = close_policy.auth_retry(self._credential, code, policy)
        if retry is not policy:
            log.info("%s: 1008 on a credential that worked before: one retry", self.name)
        return retry
