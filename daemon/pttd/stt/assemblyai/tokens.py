"""Fleet mode: one-use AssemblyAI temporary tokens instead of the API key on every device.

Two halves (issue 24, part 2; research §1.3):

* Device side, :class:`TokenSource`: with ``[stt] token_url`` set, every session connects with
  a fresh token (``?token=``), fetched by an HTTP(S) GET to ``token_url`` with
  ``Authorization: Bearer <content of stt.token_auth_file>``. The answer is
  ``{"token": "...", "expires_in_seconds": N}``. The next token is fetched ahead, right after
  one is used, so a press does not wait for the broker; a token older than its expiry (less a
  margin) is thrown away. TLS is verified with the system's CAs (``SSL_CERT_FILE`` names
  another bundle); plain ``http://`` is only accepted for a loopback host (config.py checks).
* Broker side, :class:`TokenBroker` (``pttd serve-tokens``): where the key lives. ``GET /token``
  with ``Authorization: Bearer <device secret>`` mints a token at AssemblyAI's ``/v3/token``
  (derived from ``[stt] url``) with ``max_session_duration_seconds`` as a billing cap, and answers
  as above. Unknown secret: 401; over the per-device rate: 429. Each mint is logged with the
  device id, never the secret, the key or the token. TLS is built in (``--tls-cert``/
  ``--tls-key``); without it the broker only listens on loopback (behind a TLS reverse proxy).

Standard library only: ``urllib.request`` (default SSL context) and ``http.server``.
"""

from __future__ import annotations

import collections
import hmac
import http.server
import ipaddress
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
from collections.abc import Callable
from dataclasses import dataclass

from pttd import __version__
from pttd.config import Config, ConfigError, Secret, read_text_file
from pttd.stt.assemblyai.protocol import ClosePolicy
from pttd.stt.assemblyai.session import UrlError

log = logging.getLogger(__name__)

USER_AGENT = f"pttd/{__version__} (token client)"
FETCH_TIMEOUT_S = 10.0
MAX_BODY = 64 * 1024
MIN_SECRET_LEN = 16
EXPIRES_RANGE = (1, 600)  # streaming-token.yml
MAX_SESSION_RANGE = (60, 10800)

_BROKER_AUTH = ClosePolicy(
    "auth",
    False,
    0.0,
    0.0,
    "the token broker refused this device's secret: check "
    "stt.token_auth_file against the broker's devices file; pttd will "
    "not retry until the button is pressed again",
)
_BROKER_RATE = ClosePolicy(
    "rate_limited",
    True,
    5.0,
    60.0,
    "the token broker says too many tokens for this device; retrying with backoff",
)
_BROKER_DOWN = ClosePolicy(
    "transport", True, 0.5, 5.0, "cannot reach the token broker; reconnecting"
)


def _broker_config(status: int | None, what: str) -> ClosePolicy:
    return ClosePolicy(
        "config",
        False,
        0.0,
        0.0,
        f"the token broker at stt.token_url {what}; pttd will not retry until "
        "the button is pressed again",
    )


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could carry the bearer secret elsewhere (even to http://): refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        return None


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    context = context or ssl.create_default_context()  # verifies the certificate and host name
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())


# ================================================================================================
# Device side
# ================================================================================================


@dataclass(frozen=True)
class _Token:
    value: str
    good_until: float  # monotonic: expiry less a margin


class TokenSource:
    """Fetches one-use tokens from ``token_url``; thread-safe. ``connect_url(base)`` is called
    on a session's own thread (it may block up to the fetch timeout, never the controller)."""

    def __init__(
        self,
        token_url: str,
        auth_file: str = "",
        *,
        timeout: float = FETCH_TIMEOUT_S,
        prefetch: bool = True,
        context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.token_url = token_url
        self._auth_file = auth_file
        self._timeout = timeout
        self._prefetch = prefetch
        self._opener = _opener(context)
        self._clock = clock
        self._lock = threading.Lock()
        self._next: _Token | None = None
        self._prefetching: threading.Thread | None = None
        self.fetches = 0

    @property
    def credential_id(self) -> str:
        """Names this credential for the session's 1008 rule (no secret in it)."""
        return "token:" + self.token_url

    def provider(self, base_url: str) -> Callable[[], str]:
        """The callable a :class:`~pttd.stt.assemblyai.session.Session` takes as its URL."""
        return lambda: self.connect_url(base_url)

    def connect_url(self, base_url: str) -> str:
        """``base_url`` with a fresh token as ``token=``; raises :class:`UrlError`."""
        token = self._take()
        if token is None:
            token = self._fetch()
        self._start_prefetch()
        parts = urllib.parse.urlsplit(base_url)
        query = urllib.parse.parse_qsl(parts.query) + [("token", token.value)]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    def _take(self) -> _Token | None:
        with self._lock:
            token, self._next = self._next, None
        if token is not None and self._clock() < token.good_until:
            return token
        return None

    def _start_prefetch(self) -> None:
        if not self._prefetch:
            return
        with self._lock:
            if self._prefetching is not None and self._prefetching.is_alive():
                return
            self._prefetching = threading.Thread(
                target=self._prefetch_main, name="token-prefetch", daemon=True
            )
            self._prefetching.start()

    def _prefetch_main(self) -> None:
        try:
            token = self._fetch()
        except UrlError as exc:
            log.debug("token prefetch failed: %s", exc.reason)
            return
        with self._lock:
            self._next = token

    def _secret(self) -> str:
        if not self._auth_file:
            return ""
        try:
            return read_text_file(self._auth_file, "stt.token_auth_file").strip()
        except FileNotFoundError:
            raise UrlError(
                None,
                f"stt.token_auth_file {self._auth_file} not found",
                _broker_config(None, "cannot be asked: the device secret file is missing"),
            ) from None
        except ConfigError as exc:
            raise UrlError(None, str(exc), _broker_config(None, "cannot be asked")) from None

    def _fetch(self) -> _Token:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        secret = self._secret()
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        request = urllib.request.Request(self.token_url, headers=headers, method="GET")
        started = self._clock()
        self.fetches += 1
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                body = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self._http_error(exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UrlError(
                None, f"token broker unreachable: {type(exc).__name__}: {reason}", _BROKER_DOWN
            ) from None
        return self._parse(body, started)

    def _http_error(self, status: int) -> UrlError:
        if status in (401, 403):
            return UrlError(status, f"token broker: HTTP {status}", _BROKER_AUTH)
        if status == 429:
            return UrlError(status, "token broker: HTTP 429", _BROKER_RATE)
        if status >= 500:
            return UrlError(
                status,
                f"token broker: HTTP {status}",
                ClosePolicy(
                    "server", True, 1.0, 30.0, f"the token broker failed (HTTP {status}); retrying"
                ),
            )
        if 300 <= status < 400:
            return UrlError(
                status,
                f"token broker: HTTP {status} (redirect)",
                _broker_config(status, f"redirects (HTTP {status}): give its final https:// URL"),
            )
        return UrlError(
            status,
            f"token broker: HTTP {status}",
            _broker_config(status, f"refused the request (HTTP {status}): check stt.token_url"),
        )

    def _parse(self, body: bytes, started: float) -> _Token:
        bad = _broker_config(None, "did not answer with a token: check stt.token_url")
        if len(body) > MAX_BODY:
            raise UrlError(None, "token broker: answer too large", bad)
        try:
            obj = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UrlError(None, "token broker: answer is not JSON", bad) from None
        token = obj.get("token") if isinstance(obj, dict) else None
        expires = obj.get("expires_in_seconds") if isinstance(obj, dict) else None
        if (
            not isinstance(token, str)
            or not token
            or any(c.isspace() for c in token)
            or isinstance(expires, bool)
            or not isinstance(expires, (int, float))
            or not 0 < expires <= 86400
        ):
            raise UrlError(None, "token broker: answer has no usable token", bad)
        margin = min(5.0, expires / 4)
        return _Token(token, started + expires - margin)


# ================================================================================================
# Broker side
# ================================================================================================


def token_endpoint(stt_url: str) -> str:
    """AssemblyAI's token endpoint on the streaming host of ``[stt] url`` (research §1.1):
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


class _Refusal(Exception):
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
        if not api_key:
            raise ConfigError(
                "serve-tokens needs the AssemblyAI API key (stt.api_key_file, "
                "$ASSEMBLYAI_API_KEY or the systemd credential)"
            )
        if not EXPIRES_RANGE[0] <= expires_s <= EXPIRES_RANGE[1]:
            raise ConfigError(
                f"--expires-s must be between {EXPIRES_RANGE[0]} and {EXPIRES_RANGE[1]}"
            )
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
        self._key = api_key
        self.upstream = upstream
        self._devices = dict(devices)
        self.expires_s = expires_s
        self.max_session_s = max_session_s
        self.per_minute = per_device_per_minute
        self._timeout = upstream_timeout
        self._opener = _opener(upstream_context)
        self._recent: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()
        self.minted: collections.Counter[str] = collections.Counter()
        handler = type("Handler", (_Handler,), {"broker": self})
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(*tls)
            except (OSError, ssl.SSLError) as exc:
                self._httpd.server_close()
                raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None
            # the handshake runs in the request's own thread (not in accept())
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{port}/token"

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


# ================================================================================================
# pttd serve-tokens
# ================================================================================================


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
        tls=(tls_cert, tls_key) if tls_cert else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    broker.start()
    log.info(
        "serving tokens on %s for %d devices (AssemblyAI endpoint %s)",
        broker.url,
        len(broker._devices),
        broker.upstream,
    )
    try:
        while not stop.wait(3600):
            pass
    finally:
        broker.stop()
    return 0
