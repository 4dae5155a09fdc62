"""Fleet mode, broker side: ``pttd serve-tokens``, where the AssemblyAI key lives.

``GET /token`` with ``Authorization: Bearer <device secret>`` mints a token at AssemblyAI's
``/v3/token`` (derived from ``[stt] url``) with ``max_session_duration_seconds`` as a billing
cap, and answers ``{"token": "...", "expires_in_seconds": N}`` (what tokens.py's
:class:`~pttd.stt.assemblyai.tokens.TokenSource` fetches). Unknown secret: 401; over the
per-device rate: 429. Each mint is logged with the device id, never the secret, the key or the
token. TLS is built in (``--tls-cert``/``--tls-key``); without it the broker only listens on
loopback (behind a TLS reverse proxy).

Standard library only: ``http.server`` and ``urllib.request``.
"""

from __future__ import annotations

import collections
import hmac
import http.server
import json
import logging
import os
import signal
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from pttd import __version__
from pttd.config import Config
from pttd.config_files import Secret, read_text_file
from pttd.errors import ConfigError, PttdError
from pttd.stt.assemblyai.tokens import (
    FETCH_TIMEOUT_S,
    MAX_BODY,
    USER_AGENT,
    https_opener,
    is_loopback_host,
)

log = logging.getLogger(__name__)

MIN_SECRET_LEN = 16
EXPIRES_RANGE = (1, 600)  # what AssemblyAI's token endpoint accepts
MAX_SESSION_RANGE = (60, 10800)


def token_endpoint(stt_url: str) -> str:
    """AssemblyAI's token endpoint on the streaming host of ``[stt] url``:
    ``wss://host/v3/ws`` → ``https://host/v3/token``; ``ws://`` → ``http://`` (tests)."""
    parts = urllib.parse.urlsplit(stt_url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ConfigError(f"stt.url = {stt_url!r}: serve-tokens needs the cloud's wss:// URL")
    path = parts.path[: -len("/ws")] + "/token" if parts.path.endswith("/ws") else "/v3/token"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def read_devices(path: str) -> dict[str, str]:
    """``device_id secret`` per line (``#`` comments, blank lines); secret → device id.

    Refused unless the file is mode 0600 or stricter; errors name the line, never a secret."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"--devices {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"--devices {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"--devices {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others "
            f"read the device secrets; chmod 600 {path}"
        )
    try:
        text = read_text_file(path, "--devices")
    except FileNotFoundError:
        raise ConfigError(f"--devices {path}: not found") from None
    devices: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ConfigError(f"--devices {path} line {number}: expected 'device_id secret'")
        device, secret = fields
        if len(secret) < MIN_SECRET_LEN:
            raise ConfigError(
                f"--devices {path} line {number}: the secret of {device} is "
                f"shorter than {MIN_SECRET_LEN} characters"
            )
        if device in devices.values():
            raise ConfigError(f"--devices {path} line {number}: device {device} listed twice")
        if secret in devices:
            raise ConfigError(
                f"--devices {path} line {number}: {device} has the same secret as {devices[secret]}"
            )
        devices[secret] = device
    if not devices:
        raise ConfigError(f"--devices {path}: no devices listed")
    return devices


class _Refusal(PttdError):
    """A request the broker answers with an HTTP error (``status``) instead of a token."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class TokenBroker:
    """``GET /token`` → a fresh AssemblyAI temporary token for a known device."""

    def __init__(
        self,
        api_key: Secret,
        upstream: str,
        devices: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        expires_s: int = 300,
        max_session_s: int = 600,
        per_device_per_minute: int = 30,
        tls: tuple[str, str] | None = None,
        upstream_timeout: float = FETCH_TIMEOUT_S,
        upstream_context: ssl.SSLContext | None = None,
    ):
        _check_settings(api_key, host, expires_s, max_session_s, per_device_per_minute, tls)
        self._key = api_key
        self.upstream = upstream
        self._devices = dict(devices)
        self.expires_s = expires_s
        self.max_session_s = max_session_s
        self.per_minute = per_device_per_minute
        self._timeout = upstream_timeout
        self._opener = https_opener(upstream_context)
        self._recent: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()
        self.minted: collections.Counter[str] = collections.Counter()
        handler = type("Handler", (_Handler,), {"broker": self})
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            _serve_tls(self._httpd, tls)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        if not isinstance(host, str):  # (typeshed allows bytes; an IP socket gives str)
            host = host.decode()
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{port}/token"

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def start(self) -> TokenBroker:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="token-broker", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> TokenBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- one request -----------------------------------------------------------------------------

    def device_for(self, authorization: str) -> str:
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        found = None
        if scheme.lower() == "bearer" and secret:
            for known, device in self._devices.items():  # compare every one, in constant time
                if hmac.compare_digest(known.encode("utf-8"), secret.encode("utf-8")):
                    found = device
        if found is None:
            raise _Refusal(401, "unknown device")
        return found

    def _admit(self, device: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent.setdefault(device, collections.deque())
            while recent and now - recent[0] >= 60.0:
                recent.popleft()
            if len(recent) >= self.per_minute:
                raise _Refusal(
                    429,
                    "too many tokens for this device",
                    retry_after=int(60 - (now - recent[0])) + 1,
                )
            recent.append(now)

    def mint(self, authorization: str) -> dict:
        device = self.device_for(authorization)
        self._admit(device)
        query = urllib.parse.urlencode(
            {
                "expires_in_seconds": self.expires_s,
                "max_session_duration_seconds": self.max_session_s,
            }
        )
        request = urllib.request.Request(
            f"{self.upstream}?{query}",
            method="GET",
            headers={
                "Authorization": self._key.reveal(),
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                body = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            log.warning("token for device %s: AssemblyAI answered HTTP %d", device, exc.code)
            if exc.code == 429:
                raise _Refusal(429, "AssemblyAI rate-limits token requests", 5) from None
            if exc.code in (401, 403):
                log.error("AssemblyAI refused the broker's API key (HTTP %d)", exc.code)
            raise _Refusal(502, f"AssemblyAI answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning(
                "token for device %s: AssemblyAI unreachable: %s", device, type(exc).__name__
            )
            raise _Refusal(504, "AssemblyAI unreachable") from None
        try:
            obj = json.loads(body[:MAX_BODY].decode("utf-8"))
            token, expires = obj["token"], obj["expires_in_seconds"]
            if not isinstance(token, str) or not token or not isinstance(expires, int):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("token for device %s: AssemblyAI's answer has no token", device)
            raise _Refusal(502, "AssemblyAI's answer has no token") from None
        self.minted[device] += 1
        log.info(
            "minted a token for device %s (valid %d s, sessions capped at %d s)",
            device,
            expires,
            self.max_session_s,
        )
        return {"token": token, "expires_in_seconds": expires}


def _check_settings(
    api_key: Secret,
    host: str,
    expires_s: int,
    max_session_s: int,
    per_device_per_minute: int,
    tls: tuple[str, str] | None,
) -> None:
    if not api_key:
        raise ConfigError(
            "serve-tokens needs the AssemblyAI API key (stt.api_key_file, "
            "$ASSEMBLYAI_API_KEY or the systemd credential)"
        )
    if not EXPIRES_RANGE[0] <= expires_s <= EXPIRES_RANGE[1]:
        raise ConfigError(f"--expires-s must be between {EXPIRES_RANGE[0]} and {EXPIRES_RANGE[1]}")
    if not MAX_SESSION_RANGE[0] <= max_session_s <= MAX_SESSION_RANGE[1]:
        raise ConfigError(
            f"--max-session-s must be between {MAX_SESSION_RANGE[0]} and {MAX_SESSION_RANGE[1]}"
        )
    if per_device_per_minute < 1:
        raise ConfigError("--per-device-per-minute must be at least 1")
    if tls is None and not is_loopback_host(host):
        raise ConfigError(
            f"--listen {host}: without --tls-cert/--tls-key the broker only "
            "listens on loopback (put a TLS reverse proxy in front)"
        )


def _serve_tls(httpd: http.server.ThreadingHTTPServer, tls: tuple[str, str]) -> None:
    """Wrap the listening socket (``tls`` = certificate and key files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(*tls)
    except (OSError, ssl.SSLError) as exc:
        httpd.server_close()
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None
    # the handshake runs in the request's own thread (not in accept())
    httpd.socket = context.wrap_socket(
        httpd.socket, server_side=True, do_handshake_on_connect=False
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    broker: TokenBroker
    server_version = f"pttd-serve-tokens/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout = 15  # a client that says nothing (or stalls the TLS handshake) is dropped

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urllib.parse.urlsplit(self.path).path
        if path != "/token":
            self._reply(404, {"error": "not found"})
            return
        try:
            self._reply(200, self.broker.mint(self.headers.get("Authorization", "")))
        except _Refusal as refusal:
            extra = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            if refusal.retry_after is not None:
                extra["Retry-After"] = str(refusal.retry_after)
            self._reply(refusal.status, {"error": refusal.message}, extra)

    def _method_not_allowed(self) -> None:
        self._reply(405, {"error": "GET only"}, {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)  # no headers: no secrets

    def log_request(self, code="-", size="-") -> None:
        log.debug("GET %s -> %s", urllib.parse.urlsplit(self.path).path, code)


# --- pttd serve-tokens ---------------------------------------------------------------------------


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen {value!r}: must be HOST:PORT, e.g. 127.0.0.1:8767")
    return host, int(port)


def serve(
    cfg: Config,
    listen: str,
    devices_file: str,
    *,
    max_session_s: int,
    expires_s: int,
    per_device_per_minute: int,
    tls_cert: str | None,
    tls_key: str | None,
) -> int:
    """Run the broker until SIGTERM or SIGINT."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if cfg.is_local:
        raise ConfigError('stt.url = "local": serve-tokens needs the cloud URL')
    host, port = parse_listen(listen)
    broker = TokenBroker(
        cfg.stt.api_key,
        token_endpoint(cfg.stt.url),
        read_devices(devices_file),
        host=host,
        port=port,
        expires_s=expires_s,
        max_session_s=max_session_s,
        per_device_per_minute=per_device_per_minute,
        tls=(tls_cert, tls_key) if tls_cert and tls_key else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker.start()
    log.info(
        "serving tokens on %s for %d devices (AssemblyAI endpoint %s)",
        broker.url,
        broker.device_count,
        broker.upstream,
    )
    try:
        while not stop.wait(3600):
            pass
    finally:
        broker.stop()
    return 0
