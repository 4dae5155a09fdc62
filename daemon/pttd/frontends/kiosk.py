"""The kiosk endpoint (design.md, "[kiosk]"): the kiosk page over HTTP and the control protocol over
a WebSocket, for a browser that cannot talk to a Unix socket.

``GET /`` (and the page's own files) serve the packaged page from ``pttd/kiosk_page``. ``/ws`` is
the WebSocket: a new client first gets ``{"event": "snapshot", "state": ..., "last_final": ...,
"waiting": N, "waiting_s": S}`` (presses waiting for the network, and their seconds of audio),
then every event; it may send the control socket's requests (``{"cmd": "press"}`` ...) and gets the
same replies. ``subscribe`` is accepted and answered ``{"ok": true}`` (every client is subscribed).

Who may connect to ``/ws`` (checked before the upgrade, so a refused client gets a plain HTTP error):

* **token** — when ``[kiosk] token`` is set (required for a non-loopback ``listen``), the request
  must carry it as ``/ws?token=TOKEN`` (what the page does, copying ``?token=`` from its own URL) or
  as ``Authorization: Bearer TOKEN``. Missing: 401; wrong: 403.
* **Origin** — browsers always send it on a WebSocket, so it tells which page is connecting. No
  Origin (a script, not a browser page) passes. Otherwise it must be one of: ``http://127.0.0.1:P``,
  ``http://localhost:P``, ``http://[::1]:P`` (P = the listening port: the page served here);
  ``http(s)://<Host header>`` but only when a token is set (the page served here, or through a
  TLS proxy, under whatever name reaches the device; a DNS-rebinding page still lacks the token);
  or an exact entry of ``[kiosk] allowed_origins``. Anything else, including ``null``: 403.
* More than ``max_clients`` connections: 503. A repeated Origin/Host/Authorization header: 400.

Without a token, a loopback ``listen`` is open to every process on the machine (any local user):
no Origin header passes, so a script needs neither the token nor the control socket's group
permission. That is the contract (the token is required only off loopback); ``start`` logs a
warning saying so, and the README's kiosk section tells who can reach what.

TCP connections are bounded whatever they do: at most ``max_connections`` at once (upgraded
clients, page requests and handshakes in progress); one more closes the oldest that has not
finished its handshake, so a flood of silent connections can neither use up pttd's file
descriptors (which would starve the control socket) nor keep a real client out. A handshake
must be done within ``HANDSHAKE_TIMEOUT_S``.

A client that disconnects while it holds the button (sent ``press``, no ``release`` yet, the turn
still open) gets a ``release`` sent on its behalf: a closed tab must not leave pttd listening.

Threading: one thread runs an asyncio loop with the ``websockets`` server. ``emit`` (the Outputs
worker thread) only records the snapshot fields under a lock and schedules the broadcast on the
loop. Each client has a bounded send queue (``client_queue`` messages); a client that falls that
far behind (it stopped reading) is dropped — its TCP connection aborted — and the others carry on.
Commands go to ``handle`` (``Controller.command``), which only enqueues, so the loop never blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import http
import json
import logging
import threading
import time
from collections.abc import Callable
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from pttd.frontends.control import MAX_LINE, SUBSCRIBE, RequestError, parse_request

log = logging.getLogger(__name__)

# websockets' debug log shows request lines, which may carry ?token=: keep it at INFO or above.
_WS_LOG = logging.getLogger(__name__ + ".ws")
_WS_LOG.setLevel(logging.INFO)

PAGE_PACKAGE = "pttd.frontends"
PAGE_DIR = "kiosk_page"
_PAGE_FILES = {
    "/": "index.html",
    "/index.html": "index.html",
    "/kiosk.js": "kiosk.js",
    "/kiosk.css": "kiosk.css",
    "/icon.svg": "icon.svg",
    "/favicon.ico": "icon.svg",
}
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_TURN_OVER = ("idle", "finalizing")  # states after which no client holds the button any more
PRESS, RELEASE = "press", "release"
STOP_GRACE_S = 1.5
HANDSHAKE_TIMEOUT_S = 5.0  # a connection that has not finished its HTTP request/upgrade is closed
_WARN_EVERY_S = 10.0  # at most one warning about a connection flood this often


class KioskError(OSError):
    """The kiosk endpoint cannot be served (e.g. the port is taken); the message says what to fix."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8766"`` / ``"[::1]:8766"`` / ``":8766"`` → (host, port); ValueError if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"kiosk listen address {listen!r} must be HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


class _TrackedConnection(ServerConnection):
    """websockets' connection, reporting its TCP connection's start and end to the kiosk."""

    def __init__(self, *args, kiosk: KioskServer, **kwargs):
        super().__init__(*args, **kwargs)
        self._kiosk = kiosk

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._kiosk._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._kiosk._connection_lost(self)
        super().connection_lost(exc)


@dataclasses.dataclass(eq=False)
class _Client:
    ws: ServerConnection
    queue: asyncio.Queue
    peer: str
    dropped: bool = False
    holding: bool = False  # sent "press" and no "release"/"cancel" yet, and the turn is open


class KioskServer:
    """Sink (``emit``/``close``) plus WebSocket front end for ``handle``; see the module docstring."""

    def __init__(
        self,
        listen: str,
        handle: Callable[[str], dict],
        *,
        token: str = "",
        allowed_origins: tuple[str, ...] | list[str] = (),
        max_clients: int = 16,
        client_queue: int = 64,
        max_connections: int = 64,
        status: Callable[[], dict] | None = None,
    ):
        if max_clients < 1 or client_queue < 2 or max_connections <= max_clients:
            raise ValueError(
                "max_clients must be at least 1, client_queue at least 2 and "
                "max_connections more than max_clients"
            )
        self.host, self.port = parse_listen(listen)
        self._handle = handle
        self._status = status  # the controller's published "waiting" figures
        self._token = token
        self._allowed = {_norm_origin(o) for o in allowed_origins}
        self._max_clients = max_clients
        self._max_connections = max_connections
        self._client_queue = client_queue
        self._pages = _load_pages()
        self._lock = threading.Lock()  # guards the snapshot fields
        self._state = "idle"
        self._last_final: dict | None = None
        self._accepting_commands = True
        self._clients: set[_Client] = set()  # touched on the loop thread only
        self._connections: dict[ServerConnection, None] = {}  # every TCP connection, oldest first
        self._last_warning = -_WARN_EVERY_S
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> None:
        """Bind and serve on a new thread; KioskError when the address cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("a KioskServer starts once")
        started = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(started, failure), name="pttd-kiosk", daemon=True
        )
        self._thread.start()
        if not started.wait(timeout):
            raise KioskError(
                f"kiosk endpoint on {self.host}:{self.port} did not start in {timeout:g} s"
            )
        if failure:
            self._thread.join(1.0)
            raise KioskError(
                f"cannot listen on {self.host or '*'}:{self.port} for the kiosk: "
                f"{getattr(failure[0], 'strerror', None) or failure[0]}"
            )
        log.info("kiosk page at http://%s:%d/, WebSocket at /ws", self.host or "0.0.0.0", self.port)
        if not self._token:
            log.warning(
                "kiosk: no [kiosk] token, so every program on this machine (any local "
                "user, not only group pttd) can use ws://%s:%d/ws: press, release, read "
                "transcripts. Set [kiosk] token to require one (the page takes ?token=)",
                self.host or "0.0.0.0",
                self.port,
            )

    def stop_commands(self) -> None:
        """Shutdown step one: refuse commands (no new turn), but keep delivering events."""
        self._accepting_commands = False

    def close(self, timeout: float = STOP_GRACE_S + 1.0) -> None:
        """Outputs calls this after the last event was handed over: flush (bounded), close, join."""
        self._accepting_commands = False
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._closing.set)
        except RuntimeError:
            pass  # the loop already ended
        thread.join(timeout)
        if thread.is_alive():
            log.warning("kiosk thread did not stop within %.1f s", timeout)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # --- sink: called on the controller's thread (inline: it never blocks) -------------------

    inline = True

    def emit(self, event: dict) -> None:
        """Record what a new client's snapshot needs; schedule the broadcast. Never blocks."""
        text = json.dumps(event, ensure_ascii=False)
        with self._lock:
            if event.get("event") == "state":
                self._state = event.get("state", self._state)
            elif event.get("event") == "final":
                self._last_final = event
        loop = self._loop
        if loop is None:
            return
        turn_over = event.get("event") == "state" and event.get("state") in _TURN_OVER
        try:
            loop.call_soon_threadsafe(self._broadcast, text, turn_over)
        except RuntimeError:
            pass  # loop closed: we are shutting down

    def snapshot(self) -> dict:
        waiting = self._status() if self._status is not None else {}
        with self._lock:
            return {
                "event": "snapshot",
                "state": self._state,
                "last_final": self._last_final,
                "waiting": waiting.get("waiting", 0),
                "waiting_s": waiting.get("waiting_s", 0.0),
                "ts": time.time(),
            }

    # --- the loop thread -----------------------------------------------------------------------

    def _run(self, started: threading.Event, failure: list) -> None:
        try:
            asyncio.run(self._main(started, failure))
        except Exception as exc:  # noqa: BLE001 - reported to start(), or logged after it
            if not started.is_set():
                failure.append(exc)
                started.set()
            else:
                log.exception("kiosk endpoint failed")

    async def _main(self, started: threading.Event, failure: list) -> None:
        self._closing = asyncio.Event()
        server = await serve(
            self._serve_client,
            self.host or None,
            self.port,
            process_request=self._process_request,
            max_size=MAX_LINE,
            max_queue=8,
            close_timeout=1.0,
            logger=_WS_LOG,
            compression=None,
            open_timeout=HANDSHAKE_TIMEOUT_S,
            create_connection=functools.partial(_TrackedConnection, kiosk=self),
        )
        if self.port == 0:
            self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        started.set()
        await self._closing.wait()
        await self._shut_down(server)

    async def _shut_down(self, server: Server) -> None:
        """Let queued events (the last final) go out, then close every connection; bounded."""
        waits = [asyncio.create_task(c.queue.join()) for c in self._clients]
        if waits:
            await asyncio.wait(waits, timeout=STOP_GRACE_S / 2)
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), STOP_GRACE_S / 2)
        except TimeoutError:
            for client in list(self._clients):
                client.ws.transport.abort()
        for task in waits:
            task.cancel()

    def _connection_made(self, conn: ServerConnection) -> None:
        """Over ``max_connections``: close the oldest connection still in its handshake."""
        self._connections[conn] = None
        if len(self._connections) <= self._max_connections:
            return
        victim = next((c for c in self._connections if c.state is State.CONNECTING), conn)
        self._warn_rarely(
            "kiosk: %d connections open; closing the oldest that has not finished its handshake",
            self._max_connections,
        )
        self._connections.pop(victim, None)
        victim.transport.abort()

    def _connection_lost(self, conn: ServerConnection) -> None:
        self._connections.pop(conn, None)

    def _warn_rarely(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning(msg + " (such warnings: at most one per %g s)", *args, _WARN_EVERY_S)

    def _broadcast(self, text: str, turn_over: bool = False) -> None:
        for client in list(self._clients):
            if turn_over:
                client.holding = False
            self._queue(client, text)

    def _queue(self, client: _Client, text: str) -> None:
        """Queue one message; a full queue means the client stopped reading: drop it."""
        if client.dropped:
            return
        try:
            client.queue.put_nowait(text)
        except asyncio.QueueFull:
            log.warning(
                "kiosk: dropping client %s, it fell %d messages behind",
                client.peer,
                self._client_queue,
            )
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        client.dropped = True
        self._clients.discard(client)
        client.ws.transport.abort()  # a close frame could not get through a full buffer anyway

    async def _serve_client(self, ws: ServerConnection) -> None:
        peer = _peer_name(ws)
        if len(self._clients) >= self._max_clients:
            await ws.close(1013, "too many kiosk clients")
            return
        client = _Client(ws, asyncio.Queue(self._client_queue), peer)
        client.queue.put_nowait(json.dumps(self.snapshot(), ensure_ascii=False))
        self._clients.add(client)  # same loop turn as the snapshot: no event falls in between
        log.info("kiosk client %s connected", peer)
        sender = asyncio.create_task(self._send_loop(client))
        try:
            async for message in ws:
                self._queue(client, json.dumps(self._answer(client, message), ensure_ascii=False))
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            sender.cancel()
            log.info("kiosk client %s disconnected", peer)
            self._release_for(client)

    def _release_for(self, client: _Client) -> None:
        """A page that vanished mid-hold cannot send its release: send it, or the turn never ends."""
        if client.holding and self._accepting_commands:
            log.warning("kiosk client %s left while holding the button; releasing", client.peer)
            self._call(RELEASE)

    async def _send_loop(self, client: _Client) -> None:
        try:
            while True:
                text = await client.queue.get()
                try:
                    await client.ws.send(text)
                finally:
                    client.queue.task_done()
        except ConnectionClosed:
            pass

    def _answer(self, client: _Client, message: str | bytes) -> dict:
        """The control socket's reply to one request message."""
        try:
            cmd = parse_request(message)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        if cmd == SUBSCRIBE:
            return {"ok": True}
        if not self._accepting_commands:
            return {"ok": False, "error": "pttd is stopping"}
        reply = self._call(cmd)
        if reply.get("ok") and cmd in (PRESS, RELEASE, "cancel"):
            client.holding = cmd == PRESS
        return reply

    def _call(self, cmd: str) -> dict:
        try:
            reply = self._handle(cmd)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the connection
            log.exception("kiosk: handling %r failed", cmd)
            return {"ok": False, "error": f"internal error handling {cmd}: {exc}"}
        return reply if isinstance(reply, dict) else {"ok": False, "error": "internal error"}

    # --- HTTP: the page, and the checks before an upgrade ------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/ws":
            return self._check_ws(ws, request, url.query)
        name = _PAGE_FILES.get(url.path)
        if name is None:
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return _page_response(name, self._pages[name])

    def _check_ws(self, ws: ServerConnection, request: Request, query: str) -> Response | None:
        """None lets the upgrade proceed; otherwise the HTTP refusal (reason in the log, not the token)."""
        try:
            problem = (
                self._token_problem(request, query)
                or self._origin_problem(request)
                or self._capacity_problem()
            )
        except MultipleValuesError as exc:
            problem = http.HTTPStatus.BAD_REQUEST, f"more than one {exc} header"
        if problem is None:
            return None
        status, why = problem
        log.warning("kiosk: refused WebSocket from %s: %s", _peer_name(ws), why)
        return ws.respond(status, why + "\n")

    def _token_problem(self, request: Request, query: str) -> tuple[int, str] | None:
        if not self._token:
            return None
        given = parse_qs(query).get("token", [""])[0]
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            return http.HTTPStatus.UNAUTHORIZED, "token required (?token= or Authorization: Bearer)"
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            return http.HTTPStatus.FORBIDDEN, "wrong token"
        return None

    def _origin_problem(self, request: Request) -> tuple[int, str] | None:
        origin = request.headers.get("Origin")
        if origin is None or _norm_origin(origin) in self._allowed_origins(request):
            return None
        return http.HTTPStatus.FORBIDDEN, f"origin {origin[:80]!r} not allowed"

    def _capacity_problem(self) -> tuple[int, str] | None:
        if len(self._clients) < self._max_clients:
            return None
        return (
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            f"{self._max_clients} kiosk clients already connected",
        )

    def _allowed_origins(self, request: Request) -> set[str]:
        allowed = set(self._allowed)
        allowed.update(_norm_origin(f"http://{name}:{self.port}") for name in _LOOPBACK_NAMES)
        host = request.headers.get("Host")
        if self._token and host:
            allowed.update(_norm_origin(f"{scheme}://{host}") for scheme in ("http", "https"))
        return allowed


def _norm_origin(origin: str) -> str:
    """Compare origins case-insensitively, without a trailing slash or the default port."""
    origin = origin.strip().rstrip("/").lower()
    if origin.startswith("http://") and origin.endswith(":80"):
        origin = origin[:-3]
    elif origin.startswith("https://") and origin.endswith(":443"):
        origin = origin[:-4]
    return origin


def _peer_name(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, OSError):
        return "?"


def _load_pages() -> dict[str, bytes]:
    """Read the packaged page once (a few KiB), so serving never touches the disk."""
    folder = resources.files(PAGE_PACKAGE) / PAGE_DIR
    try:
        return {name: (folder / name).read_bytes() for name in set(_PAGE_FILES.values())}
    except OSError as exc:
        raise KioskError(f"the kiosk page is missing from the installed package ({exc})") from exc


def _page_response(name: str, body: bytes) -> Response:
    ext = name[name.rfind(".") :]
    headers = Headers(
        [
            ("Content-Type", _CONTENT_TYPES[ext]),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *_PAGE_HEADERS,
        ]
    )
    return Response(200, "OK", headers, body)
