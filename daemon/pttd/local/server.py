"""The local v3 server: AssemblyAI's Universal Streaming v3 WebSocket protocol on this machine.

Why: with no key and no internet the offline engine (:mod:`pttd.local.engine`) must answer the
daemon on the same wire protocol as the service, so the daemon cannot tell the difference. The
tests' fake AssemblyAI server (tests/fakes/) is this server too, with faults and records added
through its extension points.

Layers, from the wire inwards:

* :class:`V3Server` / :class:`ServerThread` - accept upgrades on the v3 path, one session each.
* :class:`pttd.local.session.V3Session` - one connection: auth, ``Begin``, checks, ``Terminate``.
* :class:`pttd.local.shaping.TurnShaper` - recognizer hypotheses become US- or U3-shaped Turns.
* :class:`pttd.local.recognizer.Recognizer` - the seam: the core never decides text.

Depends only on the standard library, ``websockets`` (asyncio API) and its own modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from typing import Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from pttd.local.options import ServerOptions
from pttd.local.recognizer import NullRecognizer, Recognizer, RecognizerFactory, SessionConfig
from pttd.local.session import Upgrade, V3Session
from pttd.local.wire import HTTP_ERRORS

log = logging.getLogger(__name__)


def json_response(connection: ServerConnection, status: int, body: dict) -> Response:
    """An HTTP answer to an upgrade request, with a JSON body as the service sends."""
    response = connection.respond(status, json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


class V3Server:
    """An asyncio v3 server. Use :class:`ServerThread` to run it from synchronous code.

    A subclass can change the HTTP stage (``_process_request``, ``_read_upgrade``,
    ``_refuse_http``), who may open a session (``authorize``) and the session itself
    (``_new_session``).
    """

    def __init__(
        self,
        options: ServerOptions | None = None,
        recognizer_factory: RecognizerFactory | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self._factory = recognizer_factory or NullRecognizer
        self._pending: weakref.WeakKeyDictionary[ServerConnection, Upgrade] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.options.host}:{self.port}{self.options.path}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.options.host,
            self.options.port,
            process_request=self._process_request,
            max_size=self.options.max_message_bytes,
            close_timeout=self.options.close_timeout_s,
            ping_interval=self.options.ping_interval_s,
        )
        log.info("v3 server listening on %s", self.url)

    async def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("v3 server did not close within %.1f s", timeout)

    # --- connection handling ------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The HTTP stage of an upgrade: refuse it with a status, or keep it for its session."""
        upgrade = self._read_upgrade(request)
        status = self._refuse_http(upgrade)
        if status is not None:
            return json_response(
                connection, status, {"error": HTTP_ERRORS.get(status, "Request rejected")}
            )
        self._pending[connection] = upgrade
        return None

    def _read_upgrade(self, request: Request) -> Upgrade:
        return Upgrade(request.path, request.headers)

    def _refuse_http(self, upgrade: Upgrade) -> int | None:
        """The HTTP status refusing this upgrade, or None: only the v3 path upgrades."""
        return None if upgrade.route == self.options.path else 404

    async def _handle(self, ws: ServerConnection) -> None:
        upgrade = self._pending.pop(ws)
        await self._new_session(ws, upgrade).run()

    def _new_session(self, ws: ServerConnection, upgrade: Upgrade) -> V3Session:
        return V3Session(self, ws, upgrade)

    def authorize(self, upgrade: Upgrade) -> bool:
        """``Authorization: <key>`` (raw, no Bearer), one of ``api_keys``; with no keys, any
        non-empty credential (the header or ``?token=``); everyone without ``require_auth``."""
        if not self.options.require_auth:
            return True
        header = upgrade.headers.get("authorization", "").strip()
        if not self.options.api_keys:
            token = upgrade.raw_query.get("token", "").strip()
            return bool(header or token) and not header.lower().startswith("bearer ")
        return header in self.options.api_keys

    def make_recognizer(self, config: SessionConfig) -> Recognizer:
        return self._factory(config)


class ServerThread:
    """Runs a :class:`V3Server` on its own event loop in a background thread."""

    #: The server it runs (a subclass may run a subclass of V3Server).
    server_class: type[V3Server] = V3Server

    def __init__(
        self,
        options: ServerOptions | None = None,
        recognizer_factory: RecognizerFactory | None = None,
    ) -> None:
        self.server = self.server_class(options, recognizer_factory)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> Self:
        """Return once the server is listening (``url`` is then valid)."""
        self._thread = threading.Thread(target=self._run, name="v3server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("v3 server did not start")
        if self._error is not None:
            raise RuntimeError("v3 server failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop listening and join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("v3 server thread did not stop within %.1f s", timeout)
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.server.start()
        self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- delegation --------------------------------------------------------------------------

    @property
    def options(self) -> ServerOptions:
        return self.server.options

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port
