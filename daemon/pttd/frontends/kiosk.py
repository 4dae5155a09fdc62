"""The kiosk endpoint (``[kiosk]``, docs/kiosk.md): the kiosk page over HTTP and the control
protocol over a WebSocket, for a browser that cannot talk to a Unix socket.

``GET /`` (and the page's own files) serve the packaged page (kiosk_http.py). ``/ws`` is
the WebSocket: a new client first gets ``{"event": "snapshot", "state": ..., "last_final": ...,
"waiting": N, "waiting_s": S}`` (presses waiting for the network, and their seconds of audio),
then every event; it may send the control socket's requests (``{"cmd": "press"}`` ...) and gets the
same replies. ``subscribe`` is accepted and answered ``{"ok": true}`` (every client is subscribed).

Who may connect to ``/ws`` (a token, the page's Origin, a cap on clients) is checked before the
upgrade, by the HTTP side (kiosk_http.py, which also serves the page).

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
import json
import logging
import threading
import time
from collections.abc import Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State as WsState

from pttd.events import Command, EventKind, State
from pttd.frontends.control.protocol import MAX_LINE, SUBSCRIBE, RequestError, parse_request
from pttd.frontends.kiosk_http import KioskError, KioskHttp, peer_name
from pttd.frontends.rare_warning import RareWarning

log = logging.getLogger(__name__)

# websockets' debug log shows request lines, which may carry ?token=: keep it at INFO or above.
_WS_LOG = logging.getLogger(__name__ + ".ws")
_WS_LOG.setLevel(logging.INFO)

_TURN_OVER = (State.IDLE, State.FINALIZING)  # states after which no client holds the button
STOP_GRACE_S = 1.5
HANDSHAKE_TIMEOUT_S = 5.0  # a connection that has not finished its HTTP request/upgrade is closed


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8766"``, ``"[::1]:8766"`` or ``":8766"`` → (host, port); else ValueError."""
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
    holding: bool = False  # sent "press", no "release"/"cancel" yet, and the turn is open


class KioskServer:
    """An output sink (``emit``/``close``) and a WebSocket front end for ``handle``; see the
    module docstring."""

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
        self._http = KioskHttp(token, allowed_origins, max_clients)
        self._max_clients = max_clients
        self._max_connections = max_connections
        self._client_queue = client_queue
        self._lock = threading.Lock()  # guards the snapshot fields
        self._state: str = State.IDLE.value
        self._last_final: dict | None = None
        self._accepting_commands = True
        self._clients: set[_Client] = set()  # touched on the loop thread only
        self._connections: dict[ServerConnection, None] = {}  # every TCP connection, oldest first
        self._warn_rarely = RareWarning(log)
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
        loop, closing = self._loop, self._closing
        if thread is None or loop is None or closing is None:
            return
        try:
            loop.call_soon_threadsafe(closing.set)
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
            if event.get("event") == EventKind.STATE:
                self._state = event.get("state", self._state)
            elif event.get("event") == EventKind.FINAL:
                self._last_final = event
        loop = self._loop
        if loop is None:
            return
        turn_over = event.get("event") == EventKind.STATE and event.get("state") in _TURN_OVER
        try:
            loop.call_soon_threadsafe(self._broadcast, text, turn_over)
        except RuntimeError:
            pass  # loop closed: we are shutting down

    def snapshot(self) -> dict:
        waiting = self._status() if self._status is not None else {}
        with self._lock:
            return {
                "event": EventKind.SNAPSHOT.value,
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
            # websockets documents a wrapper as fine here; its annotation names only the class
            create_connection=functools.partial(_TrackedConnection, kiosk=self),  # type: ignore[arg-type]
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
        victim = next((c for c in self._connections if c.state is WsState.CONNECTING), conn)
        self._warn_rarely(
            "kiosk: %d connections open; closing the oldest that has not finished its handshake",
            self._max_connections,
        )
        self._connections.pop(victim, None)
        victim.transport.abort()

    def _connection_lost(self, conn: ServerConnection) -> None:
        self._connections.pop(conn, None)

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
        peer = peer_name(ws)
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
        """A page that vanished mid-hold cannot send its release: we do, or the turn never ends."""
        if client.holding and self._accepting_commands:
            log.warning("kiosk client %s left while holding the button; releasing", client.peer)
            self._call(Command.RELEASE.value)

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
        if reply.get("ok") and cmd in (Command.PRESS, Command.RELEASE, Command.CANCEL):
            client.holding = cmd == Command.PRESS
        return reply

    def _call(self, cmd: str) -> dict:
        try:
            reply = self._handle(cmd)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the connection
            log.exception("kiosk: handling %r failed", cmd)
            return {"ok": False, "error": f"internal error handling {cmd}: {exc}"}
        return reply if isinstance(reply, dict) else {"ok": False, "error": "internal error"}

    # --- HTTP: the page, and the checks before an upgrade (kiosk_http.py) ----------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        return self._http.respond(ws, request, self.port, len(self._clients))
