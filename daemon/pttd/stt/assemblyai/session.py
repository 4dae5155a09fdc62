"""One AssemblyAI v3 streaming session over websocket-client, with a sender and a receiver thread.

The owner (the controller) never blocks on the network: ``start()`` returns at once, the
receiver thread connects, waits for ``Begin`` and reports everything through ``on_event``
(which must only enqueue). Audio goes out on the caller's thread (``send_audio_now``, then
``force_endpoint_now``): the caller is a press's streamer, which already runs on a thread of its
own, so a frame costs one thread wake-up from ring to wire and a ForceEndpoint can never overtake
the audio before it. ``send_frames_now`` puts several frames (a capture period's worth, and the
ForceEndpoint after a press's last one) on the wire in one socket write. Control messages the
owner sends (``keep_alive``, ``update``, ``terminate``) go through a FIFO drained by the sender
thread, so the owner never waits on the network.

Every session ends with exactly one :class:`SessionClosed`, after any final it still held.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import select
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import websocket

from pttd.config import Secret
from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.protocol import ClosePolicy, FinalTurn, Termination, Turn, TurnAssembler

log = logging.getLogger(__name__)

_OP_TEXT = websocket.ABNF.OPCODE_TEXT
_OP_BINARY = websocket.ABNF.OPCODE_BINARY


class ConnectError(Exception):
    """The session could not be opened (upgrade refused, closed before Begin, no Begin)."""

    def __init__(self, closed: SessionClosed):
        super().__init__(closed.describe())
        self.closed = closed


@dataclass(frozen=True)
class SessionClosed:
    """The one report of a session's end."""

    code: int | None  # close or error code; None when the link just died
    reason: str  # server's text (Error frame preferred over the close reason)
    policy: ClosePolicy
    before_begin: bool  # a connect failure rather than a mid-session end
    terminated: bool = False  # a Termination was received (clean end)
    local: bool = False  # pttd closed it

    def describe(self) -> str:
        code = "no close code" if self.code is None else f"code {self.code}"
        return f"{self.policy.message} ({code}{': ' + self.reason if self.reason else ''})"


class UrlError(Exception):
    """Raised by a URL provider (fleet mode: fetching a temporary token) when it cannot give a
    URL: ``code`` is reported as the close code, ``policy`` says what it means."""

    def __init__(self, code: int | None, reason: str, policy: ClosePolicy):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.policy = policy


# Credentials (a fingerprint, never the key) that have opened a session in this process, and
# whether the one retry a later 1008 earns is spent (issue 24, part 5).
_worked: dict[str, bool] = {}
_worked_lock = threading.Lock()


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Session:
    """A v3 session. Thread-safe for one owner calling the public methods.

    ``url`` is the full connect URL, or a callable returning it, called on the receiver thread
    right before connecting (fleet mode: it fetches a one-use temporary token, so the owner's
    thread never waits on it); it may raise :class:`UrlError`. A ``token`` in the URL is never
    logged or reported. ``credential_id`` names the credential for the 1008 rule (default: the
    key's fingerprint).
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        api_key: Secret,
        *,
        on_event: Callable[[Session, object], None],
        sample_rate: int = 16000,
        format_turns: bool = True,
        connect_timeout: float = 10.0,
        begin_timeout: float = 10.0,
        send_timeout: float = 10.0,
        format_grace_s: float = 1.5,
        error_close_grace_s: float = 2.0,
        on_sent: Callable[[int, int], None] | None = None,
        name: str = "session",
        credential_id: str | None = None,
    ):
        self._url_source = url
        self.url = url if isinstance(url, str) else "(a temporary-token URL)"
        self._secrets: list[str] = []
        self._key = api_key
        self._credential = credential_id or ("key:" + _fingerprint(api_key.reveal()))
        self._on_event = on_event
        self.sample_rate = sample_rate
        self._connect_timeout = connect_timeout
        self._begin_timeout = begin_timeout
        self._send_timeout = send_timeout
        self._error_close_grace_s = error_close_grace_s
        self._on_sent = on_sent
        self.name = name
        self._assembler = TurnAssembler(format_turns, format_grace_s)
        self._ws: websocket.WebSocket | None = None
        self._out: collections.deque[str] = collections.deque()  # a few control messages at most
        self._out_cond = threading.Condition()
        self._stopping = threading.Event()
        self._begun = threading.Event()
        self._closed_event = threading.Event()
        self._termination = threading.Event()
        self._closed: SessionClosed | None = None
        self._report_lock = threading.Lock()
        self._error: protocol.ErrorMessage | None = None
        self._error_deadline: float | None = None
        self._receiver = threading.Thread(
            target=self._receive_main, name=f"{name}-recv", daemon=True
        )
        self._sender = threading.Thread(target=self._send_main, name=f"{name}-send", daemon=True)
        self.begin: protocol.Begin | None = None
        self.audio_bytes_sent = 0
        self.frames_sent = 0
        self.opened_at: float | None = None

    # --- owner API ------------------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self.begin.id if self.begin else None

    @property
    def is_open(self) -> bool:
        return self._begun.is_set() and not self._closed_event.is_set()

    @property
    def closed(self) -> SessionClosed | None:
        return self._closed

    @property
    def pending_error(self) -> protocol.ErrorMessage | None:
        """An Error frame whose close has not come yet (the session is as good as gone)."""
        return self._error if self._closed is None else None

    def start(self) -> None:
        """Connect in the background; ``on_event`` gets Begin or a SessionClosed."""
        self.opened_at = time.monotonic()
        self._receiver.start()

    def connect(self, timeout: float | None = None) -> protocol.Begin:
        """Blocking convenience for tools and tests: start, then wait for Begin."""
        self.start()
        limit = timeout if timeout is not None else self._connect_timeout + self._begin_timeout + 1
        deadline = time.monotonic() + limit
        while not self._begun.is_set() and not self._closed_event.is_set():
            self._closed_event.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                self.close()
                break
        if self.begin is not None and self._begun.is_set():
            return self.begin
        raise ConnectError(
            self._closed
            or SessionClosed(None, "no Begin", protocol.policy_for(None), before_begin=True)
        )

    def send_frames_now(self, frames: Sequence[bytes], force_endpoint: bool = False) -> bool:
        """Send audio frames, each its own WebSocket frame, then optionally ForceEndpoint, on the
        caller's thread in one socket write; blocks at most ``send_timeout``.

        One write per capture period instead of one per frame: the frames on the wire are the
        same, the system calls fewer. False when the session is not open or the link just
        failed: the receiver then reports the close as usual, so the caller only has to stop.
        Raises ValueError for frames outside the server's 50-1000 ms rule (a 3007 otherwise).
        """
        for pcm in frames:
            self._check_frame(pcm)
        if not self._begun.is_set() or self._stopping.is_set():
            return False
        try:
            self._write_frames(frames, force_endpoint)
        except (OSError, websocket.WebSocketException) as exc:
            self._send_failed(exc)
            return False
        return True

    def send_audio_now(self, pcm: bytes) -> bool:
        """One frame; see :meth:`send_frames_now`."""
        return self.send_frames_now((pcm,))

    def force_endpoint_now(self) -> bool:
        """ForceEndpoint on the caller's thread, after the audio it sent itself (see above)."""
        return self.send_frames_now((), force_endpoint=True)

    def keep_alive(self) -> None:
        self._queue_text(protocol.KEEP_ALIVE)

    def update(self, **fields) -> None:
        self._queue_text(protocol.update_configuration(**fields))

    def terminate(self, timeout: float = 5.0) -> Termination | None:
        """Send Terminate, wait (bounded) for Termination, then close. Returns it if it came."""
        if self._begun.is_set() and not self._closed_event.is_set():
            self._queue_text(protocol.TERMINATE)
            deadline = time.monotonic() + timeout
            while not self._closed_event.is_set() and time.monotonic() < deadline:
                self._closed_event.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        self.close()
        return self._last_termination

    def terminate_async(self, timeout: float = 5.0) -> None:
        """Send Terminate without waiting; the session closes itself on Termination or timeout."""
        if not self._begun.is_set() or self._closed_event.is_set():
            self.close(0)
            return
        if self._terminate_deadline is not None:
            return  # already terminating: Terminate goes out once
        self._terminate_deadline = time.monotonic() + timeout
        self._queue_text(protocol.TERMINATE)

    def wait_closed(self, timeout: float) -> bool:
        return self._closed_event.wait(max(0.0, timeout))

    def close(self, timeout: float = 2.0) -> None:
        """Stop both threads and the socket; safe to call more than once, from any thread.

        ``timeout=0`` does not join (the controller must not wait on a connect in progress).
        """
        self._local_close = True
        self._stopping.set()
        with self._out_cond:
            self._out_cond.notify_all()
        self._shutdown_socket()
        me = threading.current_thread()
        for thread in (self._sender, self._receiver):
            if timeout and thread.is_alive() and thread is not me:
                thread.join(timeout)
        self._report_closed(None, "closed by pttd", local=True)

    # --- sending --------------------------------------------------------------------------------

    def _queue_text(self, text: str) -> None:
        with self._out_cond:
            self._out.append(text)
            self._out_cond.notify()

    def _check_frame(self, pcm: bytes) -> None:
        ms = protocol.frame_ms(len(pcm), self.sample_rate)
        if len(pcm) % 2 or not protocol.MIN_FRAME_MS <= ms <= protocol.MAX_FRAME_MS:
            raise ValueError(
                f"audio frame of {ms:.1f} ms ({len(pcm)} bytes): the server accepts "
                f"{protocol.MIN_FRAME_MS}-{protocol.MAX_FRAME_MS} ms of pcm_s16le"
            )

    def _write_frames(self, frames: Sequence[bytes], force_endpoint: bool) -> None:
        """Audio (and ForceEndpoint) in one write, under websocket-client's own send lock, which
        every other frame it sends (control texts, pongs, the close) also takes."""
        ws = self._ws
        parts = [websocket.ABNF.create_frame(pcm, _OP_BINARY).format() for pcm in frames]
        if force_endpoint:
            parts.append(websocket.ABNF.create_frame(protocol.FORCE_ENDPOINT, _OP_TEXT).format())
        with ws.lock:
            sock = ws.sock
            if sock is None:
                raise websocket.WebSocketConnectionClosedException("socket is already closed")
            sock.sendall(b"".join(parts) if len(parts) > 1 else parts[0])
        for pcm in frames:
            self.frames_sent += 1
            self.audio_bytes_sent += len(pcm)
            if self._on_sent:
                self._on_sent(_OP_BINARY, len(pcm))
        if force_endpoint and self._on_sent:
            self._on_sent(_OP_TEXT, len(protocol.FORCE_ENDPOINT))

    def _transmit(self, opcode: int, payload: bytes | str) -> None:
        """A control text from the sender thread (websocket-client locks each send)."""
        self._ws.send(payload, opcode)
        if self._on_sent:
            self._on_sent(opcode, len(payload))

    def _send_failed(self, exc: Exception) -> None:
        if not self._stopping.is_set():
            log.info("%s: send failed: %s", self.name, self._scrub(str(exc)))
            self._shutdown_socket()  # the receiver sees the dead link and reports it

    def _send_main(self) -> None:
        try:
            while True:
                with self._out_cond:
                    while not self._out and not self._stopping.is_set():
                        self._out_cond.wait()
                    if self._stopping.is_set():
                        return
                    batch = list(self._out)
                    self._out.clear()
                for text in batch:
                    self._transmit(_OP_TEXT, text)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the receiver reports the close
            self._send_failed(exc)

    # --- receiving ------------------------------------------------------------------------------

    _last_termination: Termination | None = None
    _local_close = False
    _terminate_deadline: float | None = None

    def _receive_main(self) -> None:
        """Connect, read until the end, report it: every way out of here reports the close once
        (any exception included: a dead receiver that said nothing would wedge its press)."""
        try:
            self._ws = self._open()
        except _Refused as refused:
            self._report_closed(
                refused.code, refused.reason, before_begin=True, policy=refused.policy
            )
            return
        try:
            self._read_loop()
        except Exception as exc:  # noqa: BLE001 - the link's errors and pttd's own alike
            if self._local_close:
                self._report_closed(None, "closed by pttd", local=True)
                return
            link = isinstance(exc, (OSError, websocket.WebSocketException))
            if link:
                log.info("%s: connection lost: %s", self.name, self._scrub(str(exc)))
            else:
                log.error(
                    "%s: receiver failed: %s", self.name, self._scrub(repr(exc)), exc_info=True
                )
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
        finally:
            self._stopping.set()
            with self._out_cond:
                self._out_cond.notify_all()
            self._close_socket()

    def _resolve_url(self) -> str:
        if isinstance(self._url_source, str):
            return self._url_source
        try:
            url = self._url_source()
        except UrlError as exc:
            raise _Refused(exc.code, self._scrub(exc.reason), policy=exc.policy) from None
        except Exception as exc:  # noqa: BLE001 - a provider bug is one refused session
            raise _Refused(
                None,
                self._scrub(f"cannot get a URL: {type(exc).__name__}: {exc}"),
                policy=protocol.CANNOT_OPEN,
            ) from None
        for name, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query):
            if name == "token" and value:
                self._secrets.append(value)
        return url

    def _open(self) -> websocket.WebSocket:
        url = self._resolve_url()
        headers = [
            f"AssemblyAI-Version: {protocol.API_VERSION}",
            f"User-Agent: {protocol.USER_AGENT}",
        ]
        if self._key.reveal():  # fleet mode has no key: the token is in the URL
            headers.insert(0, f"Authorization: {self._key.reveal()}")
        try:
            ws = websocket.create_connection(
                url,
                header=headers,
                timeout=self._connect_timeout,
                enable_multithread=True,
                sslopt={"cert_reqs": ssl.CERT_REQUIRED},
                # websocket-client checks UTF-8 in pure Python (~0.2 ms per 1 KB Turn here, on
                # the Turn -> final path); parse_message decodes strictly in C instead
                skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            status = exc.status_code
            code = _http_code(status)
            raise _Refused(
                status if code is None else code,
                f"HTTP {status} at upgrade",
                policy=protocol.http_refusal_policy(status),
            ) from None
        except (OSError, websocket.WebSocketException) as exc:  # refused, unreachable, TLS
            raise _Refused(None, self._scrub(f"{type(exc).__name__}: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - a URL or option websocket-client cannot use
            raise _Refused(
                None, self._scrub(f"{type(exc).__name__}: {exc}"), policy=protocol.CANNOT_OPEN
            ) from None
        ws.settimeout(self._send_timeout)
        return ws

    def _read_loop(self) -> None:
        begin_deadline = time.monotonic() + self._begin_timeout
        while not self._stopping.is_set():
            now = time.monotonic()
            if not self._begun.is_set() and now >= begin_deadline:
                self._report_closed(
                    None, f"no Begin within {self._begin_timeout:g} s", before_begin=True
                )
                return
            if self._terminate_deadline is not None and now >= self._terminate_deadline:
                log.info("%s: no Termination after Terminate; closing", self.name)
                self._report_closed(None, "no Termination after Terminate", local=True)
                return
            if self._error_deadline is not None and now >= self._error_deadline:
                self._report_closed(
                    self._error.code, self._error.message, before_begin=not self._begun.is_set()
                )
                return
            self._emit_finals(self._assembler.expire(now))
            if not self._readable(self._next_wakeup(begin_deadline) - now):
                continue
            # control frames come back too: with False, websocket-client answers a ping and
            # then blocks for the next data frame with the send timeout, so a quiet session
            # (kept warm, or a long silent press) died 10 s after a server ping
            opcode, frame = self._ws.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._on_close_frame(frame.data)
                return
            if opcode == _OP_TEXT:
                self._on_text(frame.data)

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

    def _readable(self, timeout: float) -> bool:
        sock = self._ws.sock
        if sock is None:
            raise websocket.WebSocketConnectionClosedException("socket closed")
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        return bool(ready)

    def _on_text(self, data: bytes) -> None:
        try:
            msg = protocol.parse_message(data)
        except protocol.ProtocolError as exc:
            log.warning("%s: %s", self.name, exc)
            return
        if isinstance(msg, protocol.Begin):
            if self._begun.is_set():
                log.warning("%s: a second Begin was ignored", self.name)
                return
            self.begin = msg
            self._begun.set()
            with _worked_lock:
                _worked[self._credential] = False  # works; a later 1008 earns one retry
            self._sender.start()
            self._emit(msg)
        elif isinstance(msg, Turn):
            self._on_turn(msg)
        elif isinstance(msg, protocol.ErrorMessage):
            msg = protocol.ErrorMessage(msg.code, self._scrub(msg.message))  # it may echo the key
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

    def _on_turn(self, turn: Turn) -> None:
        if not turn.end_of_turn:
            self._emit(turn)
            return
        self._emit_finals(self._assembler.feed(turn, time.monotonic()))

    def _on_close_frame(self, data: bytes) -> None:
        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
        reason = data[2:].decode("utf-8", "replace") if len(data) > 2 else ""
        if self._error is not None:
            # the Error frame says what went wrong; the close reason is at most 123 bytes and
            # often "See Error message for details" (research §3.5): the Error frame wins
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
        with self._report_lock:
            if self._closed is not None:
                return
            if not local:
                self._emit_finals(self._assembler.flush())
            if policy is not None:
                # the caller knows better than the code (an HTTP refusal, a token broker's
                # answer): a 401/403 at the upgrade is definite, not a sporadic 1008
                pass
            elif local or code == 1000 or (code is None and self._last_termination is not None):
                policy = protocol.policy_for(1000)
            else:
                policy = self._auth_retry(code, protocol.policy_for(code, reason))
            self._closed = SessionClosed(
                code=code,
                reason=self._scrub(reason),
                policy=policy,
                before_begin=before_begin,
                terminated=self._last_termination is not None,
                local=local,
            )
        self._stopping.set()
        self._closed_event.set()
        if policy.bug:
            log.error("%s: server rejected pttd's traffic: %s", self.name, self._closed.describe())
        self._emit(self._closed)

    def _shutdown_socket(self) -> None:
        ws = self._ws
        sock = ws.sock if ws is not None else None
        if sock is not None:
            try:
                import socket as _socket

                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_socket(self) -> None:
        ws = self._ws
        if ws is not None:
            try:
                ws.close(timeout=0.2)
            except Exception:  # closing a dead socket can raise anything websocket-client likes
                pass

    def _auth_retry(self, code: int | None, policy: ClosePolicy) -> ClosePolicy:
        """A 1008 on a credential that has already opened a session in this process gets one
        quick retry (sporadic 1008s are known); a 1008 on one never seen working, or a second
        1008 in a row, is the usual lock-out."""
        if policy.kind != "auth" or code != 1008:
            return policy
        with _worked_lock:
            if _worked.get(self._credential) is False:
                _worked[self._credential] = True  # the retry is spent until a Begin
                log.info("%s: 1008 on a credential that worked before: one retry", self.name)
                return protocol.AUTH_RETRY_ONCE
        return policy

    def _scrub(self, text: str) -> str:
        key = self._key.reveal()
        if key:
            text = text.replace(key, "***")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Refused(Exception):
    def __init__(self, code: int | None, reason: str, policy: ClosePolicy | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.policy = policy


def _http_code(status: int) -> int | None:
    """Map an HTTP refusal at the upgrade onto the close-code table."""
    return {401: 1008, 403: 1008, 429: 3009}.get(status)
