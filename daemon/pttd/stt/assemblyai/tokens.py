"""Fleet mode, device side: one-use AssemblyAI temporary tokens instead of the API key.

With ``[stt] token_url`` set, every session connects with a fresh token (``?token=``), fetched
by an HTTP(S) GET to ``token_url`` with ``Authorization: Bearer <content of
stt.token_auth_file>``. The answer is ``{"token": "...", "expires_in_seconds": N}``. The next
token is fetched ahead, right after one is used, so a press does not wait for the broker; a
token older than its expiry (less a margin) is thrown away. TLS is verified with the system's
CAs (``SSL_CERT_FILE`` names another bundle); plain ``http://`` is only accepted for a loopback
host (the config checks). The other side, ``pttd serve-tokens``, is broker.py.

Standard library only: ``urllib.request`` with the default SSL context.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pttd import __version__
from pttd.config_files import read_text_file
from pttd.errors import ConfigError
from pttd.stt.assemblyai.link import UrlError
from pttd.stt.base import CloseKind, ClosePolicy

log = logging.getLogger(__name__)

USER_AGENT = f"pttd/{__version__} (token client)"
FETCH_TIMEOUT_S = 10.0
MAX_BODY = 64 * 1024

_BROKER_AUTH = ClosePolicy(
    CloseKind.AUTH,
    False,
    0.0,
    0.0,
    "the token broker refused this device's secret: check "
    "stt.token_auth_file against the broker's devices file; pttd will "
    "not retry until the button is pressed again",
)
_BROKER_RATE = ClosePolicy(
    CloseKind.RATE_LIMITED,
    True,
    5.0,
    60.0,
    "the token broker says too many tokens for this device; retrying with backoff",
)
_BROKER_DOWN = ClosePolicy(
    CloseKind.TRANSPORT, True, 0.5, 5.0, "cannot reach the token broker; reconnecting"
)


def _broker_config(status: int | None, what: str) -> ClosePolicy:
    return ClosePolicy(
        CloseKind.CONFIG,
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


def https_opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """An opener that verifies TLS (``context`` or the system's CAs) and follows no redirect."""
    context = context or ssl.create_default_context()  # verifies the certificate and host name
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())


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
        self._opener = https_opener(context)
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
                    CloseKind.SERVER,
                    True,
                    1.0,
                    30.0,
                    f"the token broker failed (HTTP {status}); retrying",
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
