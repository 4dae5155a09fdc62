"""The kiosk's plain HTTP side: the packaged page, and who may upgrade to the ``/ws`` WebSocket.

``GET /`` (and the page's own files) serve the page from ``pttd/frontends/kiosk_page``, read
once at start. Who may connect to ``/ws`` is checked before the upgrade, so a refused client
gets a plain HTTP error:

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
permission. That is the contract (the token is required only off loopback); the server logs a
warning saying so at start, and docs/kiosk.md ("Token and Origin") tells who can reach what.
"""

from __future__ import annotations

import hmac
import http
import logging
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from pttd.errors import StartupError

log = logging.getLogger(__name__)

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


class KioskError(StartupError, OSError):
    """The kiosk endpoint cannot be served (e.g. the port is taken); the message says what to
    fix."""


class KioskHttp:
    """Answers the kiosk's HTTP requests: a page file, or a verdict on a ``/ws`` upgrade."""

    def __init__(self, token: str, allowed_origins: tuple[str, ...] | list[str], max_clients: int):
        self._token = token
        self._allowed = {_norm_origin(o) for o in allowed_origins}
        self._max_clients = max_clients
        self._pages = _load_pages()

    def respond(
        self, ws: ServerConnection, request: Request, port: int, clients: int
    ) -> Response | None:
        """None lets a ``/ws`` upgrade proceed; otherwise the response (a page, or a refusal).

        ``port`` is the one listened on, ``clients`` how many WebSocket clients are connected.
        """
        url = urlsplit(request.path)
        if url.path == "/ws":
            return self._check_ws(ws, request, url.query, port, clients)
        name = _PAGE_FILES.get(url.path)
        if name is None:
            return ws.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        return _page_response(name, self._pages[name])

    def _check_ws(
        self, ws: ServerConnection, request: Request, query: str, port: int, clients: int
    ) -> Response | None:
        """The HTTP refusal, or None; the reason goes to the log (never the token)."""
        try:
            problem = (
                self._token_problem(request, query)
                or self._origin_problem(request, port)
                or self._capacity_problem(clients)
            )
        except MultipleValuesError as exc:
            problem = http.HTTPStatus.BAD_REQUEST, f"more than one {exc} header"
        if problem is None:
            return None
        status, why = problem
        log.warning("kiosk: refused WebSocket from %s: %s", peer_name(ws), why)
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

    def _origin_problem(self, request: Request, port: int) -> tuple[int, str] | None:
        origin = request.headers.get("Origin")
        if origin is None or _norm_origin(origin) in self._allowed_origins(request, port):
            return None
        return http.HTTPStatus.FORBIDDEN, f"origin {origin[:80]!r} not allowed"

    def _capacity_problem(self, clients: int) -> tuple[int, str] | None:
        if clients < self._max_clients:
            return None
        return (
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            f"{self._max_clients} kiosk clients already connected",
        )

    def _allowed_origins(self, request: Request, port: int) -> set[str]:
        allowed = set(self._allowed)
        allowed.update(_norm_origin(f"http://{name}:{port}") for name in _LOOPBACK_NAMES)
        host = request.headers.get("Host")
        if self._token and host:
            allowed.update(_norm_origin(f"{scheme}://{host}") for scheme in ("http", "https"))
        return allowed


def peer_name(ws: ServerConnection) -> str:
    """``host:port`` of the client, for the log."""
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, OSError):
        return "?"


def _norm_origin(origin: str) -> str:
    """Compare origins case-insensitively, without a trailing slash or the default port."""
    origin = origin.strip().rstrip("/").lower()
    if origin.startswith("http://") and origin.endswith(":80"):
        origin = origin[:-3]
    elif origin.startswith("https://") and origin.endswith(":443"):
        origin = origin[:-4]
    return origin


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
