"""The daemon's side of the control socket: ``ControlServer``, on one selector thread.

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

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from pttd.frontends.control import socket_file
from pttd.frontends.control.connection import Connection
from pttd.frontends.control.protocol import MAX_LINE, SUBSCRIBE, RequestError, encode, parse_request
from pttd.frontends.control.subscribers import Subscribers
from pttd.frontends.rare_warning import RareWarning

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 5.0
"""A connection that has not subscribed is closed this long after connecting or its last request."""


class ControlServer:
    """Serves the control socket on one selector thread; see the module docstring for why."""

    # made by start(); the server's thread uses them until it ends
    _sel: selectors.BaseSelector
    _listener: socket.socket
    _wake_r: socket.socket
    _wake_w: socket.socket

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
        self._warn_rarely = RareWarning(log)
        self._lock = threading.Lock()  # guards every connection's ``out`` (publish appends)
        self._subs = Subscribers(self._lock, max_subscribers, subscriber_queue)
        self._stopping = threading.Event()
        self._clients: dict[int, Connection] = {}
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving; raises ControlError."""
        if self._thread is not None or self._stopping.is_set():
            raise RuntimeError("a ControlServer starts once; make a new one")
        # room for a burst of connections while the thread is busy (a full backlog makes a
        # client's connect fail with EAGAIN; request() retries that within its timeout)
        self._listener = socket_file.bind_listener(
            self.path, backlog=max(64, 2 * (self._max_clients + self._max_subs))
        )
        self._identity = socket_file.identity(self.path)
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
        socket_file.remove_if_ours(self.path, self._identity)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @property
    def client_count(self) -> int:
        """Open connections, subscribers included (read from another thread: a snapshot)."""
        return len(self._clients)

    # -- called from the controller thread --

    def publish(self, event: dict) -> None:
        """Queue ``event`` for every subscriber without blocking; full queues mark a drop."""
        if not self._subs.anyone():  # nobody listens (the usual case): skip the encoding
            return
        try:
            line = encode(event)
        except (TypeError, ValueError):
            log.exception("control: cannot encode event %r", event.get("event"))
            return
        if self._subs.publish(line):
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, AttributeError, OSError):
            pass  # a wake-up is already pending, not started yet, or we are shutting down

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

    def _dispatch(self, data: str | Connection, mask: int) -> None:
        if data == "listen":
            self._accept()
        elif data == "wake":
            _drain(self._wake_r)
        elif isinstance(data, Connection):
            self._serve(data, mask)

    def _serve(self, client: Connection, mask: int) -> None:
        """Handle one client's readiness; any socket error just closes that client."""
        if self._clients.get(client.fd) is not client:
            return  # dropped earlier in this round (its fd may already be reused)
        try:
            if mask & selectors.EVENT_WRITE:
                with self._lock:
                    client.flush()
            if mask & selectors.EVENT_READ:
                client.read()
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
        client = Connection(sock, time.monotonic() + self._idle_timeout)
        self._clients[client.fd] = client
        self._update(client)

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

    def _close_with(self, client: Connection, error: str) -> None:
        """Drop ``client``, telling it why when no reply is half-sent (it may not be reading)."""
        if not client.out:
            client.tell(encode({"ok": False, "error": error}))
        self._drop(client)

    def _process_lines(self, client: Connection) -> None:
        """Answer complete lines while the reply queue has room (back-pressure on chatty ones)."""
        while not client.closing and not client.subscribed and len(client.out) < self._queue_limit:
            line = client.next_line()
            if line is None:
                client.closing = client.eof  # it sent all it will: close once answered
                return
            self._answer(client, line)

    def _answer(self, client: Connection, line: bytes) -> None:
        if len(line) > MAX_LINE:
            self._reply(
                client, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
            )
            client.closing = True
            return
        if not line.strip():
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

    def _subscribe(self, client: Connection) -> None:
        """Queue the ok reply and join the subscriber list atomically, so no event precedes it."""
        if not self._subs.add(client, encode({"ok": True})):
            self._warn_rarely(
                "control: refused a subscriber, %d already subscribed", self._max_subs
            )
            self._reply(client, {"ok": False, "error": f"too many subscribers ({self._max_subs})"})
            client.closing = True
            return
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

    def _reply(self, client: Connection, reply: dict) -> None:
        try:
            line = encode(reply)
        except (TypeError, ValueError):
            log.exception("control: cannot encode reply %r", reply)
            line = encode({"ok": False, "error": "internal error: reply not serialisable"})
        with self._lock:
            client.out.append(line)

    def _update(self, client: Connection) -> None:
        """Register the events this client needs now, or close it when it is done."""
        if client.closing and not client.out:
            self._drop(client)
        else:
            client.watch(self._sel)

    def _service_subscribers(self) -> None:
        """After a wake-up: drop subscribers that fell behind, start writing to the others."""
        for sub in self._subs.members():
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

    def _drop(self, client: Connection) -> None:
        if self._clients.get(client.fd) is not client:
            return
        del self._clients[client.fd]
        self._subs.remove(client)
        client.close(self._sel)

    def _close_all(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass
