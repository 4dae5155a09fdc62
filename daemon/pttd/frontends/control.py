"""The local control socket (design.md, "Control socket"): server for the daemon, client for the CLI.

Protocol: one JSON object per line each way.
``{"cmd": "press"|"release"|"toggle"|"cancel"|"status"}`` gets one reply from the daemon's
``handle`` callable; ``{"cmd": "subscribe"}`` gets ``{"ok": true}`` and then every published event
until the client closes. Bad input gets ``{"ok": false, "error": ...}``.

Why one selector thread: every socket is non-blocking, so a client that stops reading or sends
garbage can only fill its own bounded buffers; there is exactly one thread to stop and join, and no
per-client threads to bound. ``handle`` runs on that thread, which is fine because the controller's
``handle`` only enqueues or reads a published snapshot. ``publish`` (controller thread) never does
I/O: it appends to each subscriber's bounded queue under a short lock and wakes the selector.
A subscriber whose queue is full is dropped (closed and logged) rather than stalling anyone.

Nobody can lock the socket up (a crashed client, or a member of the socket's group that opens
connections and sends nothing): a connection that has not subscribed must send a complete request
within ``idle_timeout`` seconds of connecting or of its previous request, else it is closed.
Command connections and subscribers have separate caps (``max_clients``, ``max_subscribers``), and
when ``max_clients`` command connections are open a new one takes the place of the one idle
longest, so a command always finds a slot. A full subscriber list refuses the next ``subscribe``.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator

from pttd.events import Command

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
"""Longest accepted request line in bytes (without the newline); longer lines close the client."""

COMMANDS = tuple(c.value for c in Command if c is not Command.SUBSCRIBE)
"""Commands passed to ``handle``; ``subscribe`` is handled by the server itself."""

SUBSCRIBE = Command.SUBSCRIBE.value
SOCKET_MODE = 0o660
IDLE_TIMEOUT_S = 5.0
"""A connection that has not subscribed is closed this long after connecting or its last request."""
_RECV_SIZE = 65536
_WARN_EVERY_S = 10.0  # at most one warning about too many connections this often


class ControlError(OSError):
    """The control socket cannot be served or reached; the message says what to fix."""


class SocketInUseError(ControlError):
    """Another live daemon answers on the socket path (the CLI exits 2)."""


class RequestError(ValueError):
    """A malformed request line; the message is sent back as ``error``."""


# --- protocol helpers (shared with other front ends, e.g. the kiosk WebSocket) -------------------


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


# --- server ---------------------------------------------------------------------------------------


class _Client:
    """One connection's buffers; ``out`` is shared with ``publish`` under the server lock."""

    __slots__ = (
        "sock",
        "inbuf",
        "out",
        "offset",
        "subscribed",
        "eof",
        "closing",
        "overflow",
        "mask",
        "fd",
        "deadline",
    )

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.out: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of out[0] already sent
        self.subscribed = False
        self.eof = False  # peer shut down its sending side
        self.closing = False  # close once ``out`` is flushed
        self.overflow = False  # set by publish: fell behind, drop it
        self.mask = 0  # selector events currently registered
        self.deadline = deadline  # monotonic time by which the next request must be complete


class ControlServer:
    """Serves the control socket on one selector thread; see the module docstring for why."""

    def __init__(
        self,
        path: str,
        handle: Callable[[str], dict],
        max_clients: int = 16,
        subscriber_queue: int = 256,
        max_subscribers: int = 16,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ):
        if min(max_clients, subscriber_queue, max_subscribers) < 1 or idle_timeout <= 0:
            raise ValueError(
                "max_clients, subscriber_queue and max_subscribers must be at least 1 "
                "and idle_timeout positive"
            )
        self.path = os.fspath(path)
        self._handle = handle
        self._max_clients = max_clients
        self._max_subs = max_subscribers
        self._idle_timeout = idle_timeout
        self._queue_limit = subscriber_queue
        self._last_warning = -_WARN_EVERY_S
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._clients: dict[int, _Client] = {}
        self._subs: list[_Client] = []
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving; raises ControlError."""
        if self._thread is not None or self._stopping.is_set():
            raise RuntimeError("a ControlServer starts once; make a new one")
        # room for a burst of connections while the thread is busy (a full backlog makes a
        # client's connect fail with EAGAIN; request() retries that within its timeout)
        self._listener = _bind_listener(
            self.path, backlog=max(64, 2 * (self._max_clients + self._max_subs))
        )
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="pttd-control", daemon=True)
        self._thread.start()
        log.info("control socket listening on %s", self.path)

    def stop(self, timeout: float = 2.0) -> None:
        """Close every connection, remove the socket file we created, join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("control socket thread did not stop within %.1f s", timeout)
        self._remove_socket_file()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    @property
    def client_count(self) -> int:
        """Open connections, subscribers included (read from another thread: a snapshot)."""
        return len(self._clients)

    # -- called from the controller thread --

    def publish(self, event: dict) -> None:
        """Queue ``event`` for every subscriber without blocking; full queues mark a drop."""
        if not self._subs:  # nobody listens (the usual case): skip the encoding
            return
        try:
            line = encode(event)
        except (TypeError, ValueError):
            log.exception("control: cannot encode event %r", event.get("event"))
            return
        with self._lock:
            if not self._subs:
                return
            for sub in self._subs:
                if len(sub.out) >= self._queue_limit:
                    sub.overflow = True
                else:
                    sub.out.append(line)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, AttributeError, OSError):
            pass  # a wake-up is already pending, or we are shutting down

    # -- the server thread --

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, mask in self._sel.select(self._next_deadline_in()):
                    self._dispatch(key.data, mask)
                self._service_subscribers()
                self._close_idle()
        except Exception:
            log.exception("control socket thread failed; control commands are unavailable")
        finally:
            self._close_all()

    def _dispatch(self, data, mask: int) -> None:
        if data == "listen":
            self._accept()
        elif data == "wake":
            _drain(self._wake_r)
        else:
            self._serve(data, mask)

    def _serve(self, client: _Client, mask: int) -> None:
        """Handle one client's readiness; any socket error just closes that client."""
        if self._clients.get(client.fd) is not client:
            return  # dropped earlier in this round (its fd may already be reused)
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(client)
            if mask & selectors.EVENT_READ:
                self._read(client)
            self._process_lines(client)
            self._update(client)
        except OSError as exc:
            log.debug("control client %d: %s", client.fd, exc)
            self._drop(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("control socket accept failed: %s", exc)
                self._stopping.wait(0.1)
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Take every new connection; at the cap, the command connection idle longest makes room."""
        sock.setblocking(False)
        waiting = [c for c in self._clients.values() if not c.subscribed]
        if len(waiting) >= self._max_clients:
            oldest = min(waiting, key=lambda c: c.deadline)
            self._warn_rarely(
                "control socket: %d clients connected without subscribing; closed "
                "the one idle longest to let a new one in",
                self._max_clients,
            )
            self._close_with(
                oldest, f"{self._max_clients} clients connected; closing the one idle longest"
            )
        client = _Client(sock, time.monotonic() + self._idle_timeout)
        self._clients[client.fd] = client
        self._update(client)

    def _warn_rarely(self, msg: str, *args) -> None:
        """A warning a flood of connections cannot turn into a flood of log lines."""
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning(msg + " (such warnings: at most one per %g s)", *args, _WARN_EVERY_S)

    def _next_deadline_in(self) -> float | None:
        """Seconds until the earliest idle deadline (None: no connection has one)."""
        deadlines = [c.deadline for c in self._clients.values() if not c.subscribed]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _close_idle(self) -> None:
        now = time.monotonic()
        for client in [c for c in self._clients.values() if not c.subscribed and c.deadline <= now]:
            log.debug(
                "control client %d: no complete request within %g s; closing",
                client.fd,
                self._idle_timeout,
            )
            self._close_with(
                client, f"no complete request within {self._idle_timeout:g} s; closing"
            )

    def _close_with(self, client: _Client, error: str) -> None:
        """Drop ``client``, telling it why when no reply is half-sent (it may not be reading)."""
        if not client.out:
            _send_best_effort(client.sock, encode({"ok": False, "error": error}))
        self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            client.eof = True
            # A subscriber may only have shut its sending side (socat does on stdin EOF):
            # keep streaming to it unless the peer is gone entirely.
            if client.subscribed and _peer_gone(client.sock):
                client.closing = True
        elif not client.subscribed:
            client.inbuf += data  # a subscriber's further input is ignored

    def _process_lines(self, client: _Client) -> None:
        """Answer complete lines while the reply queue has room (back-pressure on chatty clients)."""
        while not client.closing and not client.subscribed and len(client.out) < self._queue_limit:
            end = client.inbuf.find(b"\n")
            if end < 0:
                self._process_partial(client)
                return
            line = bytes(client.inbuf[:end])
            del client.inbuf[: end + 1]
            self._answer(client, line)

    def _process_partial(self, client: _Client) -> None:
        if len(client.inbuf) > MAX_LINE:
            client.inbuf.clear()
            self._reply(
                client, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
            )
            client.closing = True
        elif client.eof:
            if client.inbuf.strip():  # a last line without newline
                line = bytes(client.inbuf)
                client.inbuf.clear()
                self._answer(client, line)
            client.closing = not client.subscribed

    def _answer(self, client: _Client, line: bytes) -> None:
        if not line.strip():
            return
        if len(line) > MAX_LINE:
            self._reply(
                client, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
            )
            client.closing = True
            return
        try:
            cmd = parse_request(line)
        except RequestError as exc:
            log.debug("control client %d: bad request: %s", client.fd, exc)
            self._reply(client, {"ok": False, "error": str(exc)})
            return
        client.deadline = time.monotonic() + self._idle_timeout  # only a valid request counts
        if cmd == SUBSCRIBE:
            self._subscribe(client)
        else:
            self._reply(client, self._call_handle(cmd))

    def _subscribe(self, client: _Client) -> None:
        """Queue the ok reply and join the subscriber list atomically, so no event precedes it."""
        if self.subscriber_count >= self._max_subs:  # only this thread adds subscribers
            self._warn_rarely(
                "control: refused a subscriber, %d already subscribed", self._max_subs
            )
            self._reply(client, {"ok": False, "error": f"too many subscribers ({self._max_subs})"})
            client.closing = True
            return
        with self._lock:
            client.out.append(encode({"ok": True}))
            client.subscribed = True
            self._subs.append(client)
        client.inbuf.clear()
        log.debug("control client %d subscribed", client.fd)

    def _call_handle(self, cmd: str) -> dict:
        try:
            reply = self._handle(cmd)
        except Exception as exc:
            log.exception("control: handling %r failed", cmd)
            return {"ok": False, "error": f"internal error handling {cmd}: {exc}"}
        if not isinstance(reply, dict):
            log.error("control: handler returned %r for %r, not a dict", type(reply).__name__, cmd)
            return {"ok": False, "error": f"internal error handling {cmd}"}
        return reply

    def _reply(self, client: _Client, reply: dict) -> None:
        try:
            line = encode(reply)
        except (TypeError, ValueError):
            log.exception("control: cannot encode reply %r", reply)
            line = encode({"ok": False, "error": "internal error: reply not serialisable"})
        with self._lock:
            client.out.append(line)

    def _flush(self, client: _Client) -> None:
        """Send queued lines until the kernel buffer is full; keep partial-send progress."""
        with self._lock:
            while client.out:
                head = client.out[0]
                try:
                    sent = client.sock.send(memoryview(head)[client.offset :], socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    return
                client.offset += sent
                if client.offset < len(head):
                    return
                client.out.popleft()
                client.offset = 0

    def _update(self, client: _Client) -> None:
        """Register the events this client needs now, or close it when it is done."""
        if client.closing and not client.out:
            self._drop(client)
            return
        want = 0
        if not client.eof and not client.closing and b"\n" not in client.inbuf:
            want |= selectors.EVENT_READ
        if client.out:
            want |= selectors.EVENT_WRITE
        if want == client.mask:
            return
        if client.mask == 0:
            self._sel.register(client.sock, want, client)
        elif want == 0:
            self._sel.unregister(client.sock)
        else:
            self._sel.modify(client.sock, want, client)
        client.mask = want

    def _service_subscribers(self) -> None:
        """After a wake-up: drop subscribers that fell behind, start writing to the others."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if sub.overflow:
                log.warning(
                    "control: dropping subscriber %d, it fell %d events behind",
                    sub.fd,
                    self._queue_limit,
                )
                self._drop(sub)
            elif sub.fd in self._clients:
                try:
                    self._update(sub)
                except OSError:
                    self._drop(sub)

    def _drop(self, client: _Client) -> None:
        if self._clients.get(client.fd) is not client:
            return
        del self._clients[client.fd]
        with self._lock:
            if client in self._subs:
                self._subs.remove(client)
            client.out.clear()
        if client.mask:
            self._sel.unregister(client.sock)
            client.mask = 0
        client.sock.close()

    def _close_all(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
        self._sel.close()

    def _remove_socket_file(self) -> None:
        """Unlink the path only if it is still the socket we bound (never another daemon's)."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("control: cannot remove %s: %s", self.path, exc)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer closed both directions (POLLHUP), not just shut down its writes."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def _send_best_effort(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data, socket.MSG_NOSIGNAL)
    except OSError:
        pass


def _bind_listener(path: str, backlog: int) -> socket.socket:
    """Bind at ``path`` with mode 0660; the socket never exists with looser permissions."""
    _check_parent(path)
    _clear_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # process-wide for a moment; only ever more restrictive
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create control socket {path}: {exc.strerror or exc}") from exc
    return sock


def _check_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ControlError(
            f"control socket directory {parent} does not exist "
            f"(create it, e.g. RuntimeDirectory=pttd, or set [control] socket)"
        )


def _clear_path(path: str) -> None:
    """Remove a stale socket; refuse a live one or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(
            f"control socket path {path} exists and is not a socket; "
            f"not removing it (choose another [control] socket)"
        )
    if _is_live(path):
        raise SocketInUseError(f"control socket {path} in use by a running pttd")
    log.info("control: replacing stale socket %s", path)
    os.unlink(path)


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # accept queue full: somebody is listening
    except PermissionError as exc:
        raise ControlError(
            f"control socket {path} exists and we may not connect to it "
            f"(permission denied); is another pttd running as another user?"
        ) from exc
    finally:
        probe.close()


# --- client (the CLI) -----------------------------------------------------------------------------


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    """Send one command and return the daemon's reply dict (``ok`` may be false)."""
    path = os.fspath(path)
    with _connect(path, timeout) as sock, sock.makefile("rb") as reader:
        _send(sock, path, {"cmd": cmd}, timeout)
        return _read_reply(reader, path, timeout)


def subscribe(path: str, timeout: float | None = None) -> Iterator[dict]:
    """Subscribe and return an iterator of events; it ends when the daemon closes the connection.

    Connection problems raise :class:`ControlError` here, before iterating. ``timeout`` bounds the
    connect and each wait for an event (``None``: wait for events forever).
    """
    path = os.fspath(path)
    sock = _connect(path, 5.0 if timeout is None else timeout)
    reader = sock.makefile("rb")
    try:
        sock.settimeout(timeout)
        _send(sock, path, {"cmd": SUBSCRIBE}, timeout)
        reply = _read_reply(reader, path, timeout)
        if not reply.get("ok"):
            raise ControlError(f"pttd refused to subscribe: {reply.get('error', reply)}")
    except BaseException:
        reader.close()
        sock.close()
        raise
    return _events(sock, reader, path, timeout)


def _events(sock: socket.socket, reader, path: str, timeout: float | None) -> Iterator[dict]:
    try:
        while True:
            try:
                yield _read_reply(reader, path, timeout)
            except _Closed:
                return
    finally:
        reader.close()
        sock.close()


class _Closed(ControlError):
    """The daemon closed the connection at a line boundary."""


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect within ``timeout``; a full accept backlog (EAGAIN on a Unix socket) is retried."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise ControlError(
                    f"timed out after {timeout:g} s connecting to pttd on {path} "
                    f"(its connection queue stayed full)"
                ) from exc
            time.sleep(0.01)  # the daemon is accepting a burst; a new attempt has room soon
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise _connect_error(path, exc, timeout) from exc
            raise


def _connect_error(path: str, exc: OSError, timeout: float) -> ControlError:
    if isinstance(exc, FileNotFoundError):
        return ControlError(f"no pttd running? socket {path} not found")
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path} (add your user to the socket's group, "
            f"e.g. pttd, or use sudo)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return ControlError(f"no pttd running? socket {path} refuses connections (stale file)")
    if isinstance(exc, socket.timeout):
        return ControlError(f"timed out after {timeout:g} s connecting to pttd on {path}")
    if exc.errno == errno.ENOTSOCK or exc.errno == errno.ECONNREFUSED:
        return ControlError(f"{path} is not a pttd control socket")
    return ControlError(f"cannot connect to pttd on {path}: {exc.strerror or exc}")


def _send(sock: socket.socket, path: str, obj: dict, timeout: float | None) -> None:
    try:
        sock.sendall(encode(obj))
    except TimeoutError:
        raise ControlError(f"timed out after {timeout:g} s sending to pttd on {path}") from None
    except OSError as exc:
        raise ControlError(f"pttd on {path} closed the connection: {exc.strerror or exc}") from exc


def _read_reply(reader, path: str, timeout: float | None) -> dict:
    try:
        line = reader.readline(16 * MAX_LINE)
    except TimeoutError:
        raise ControlError(f"timed out after {timeout:g} s waiting for pttd on {path}") from None
    except OSError as exc:
        raise ControlError(f"connection to pttd on {path} failed: {exc.strerror or exc}") from exc
    if not line:
        raise _Closed(f"pttd on {path} closed the connection without a reply")
    if not line.endswith(b"\n"):  # cut mid-line: a subscriber that fell behind is dropped so
        raise ControlError(
            f"pttd on {path} closed the connection mid-line "
            f"(a subscriber that reads too slowly is dropped)"
        )
    try:
        obj = json.loads(line)
    except ValueError:
        raise ControlError(
            f"pttd on {path} sent something that is not JSON: {line[:80]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise ControlError(f"pttd on {path} sent a non-object reply: {line[:80]!r}")
    return obj
