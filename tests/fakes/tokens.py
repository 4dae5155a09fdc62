"""AssemblyAI's temporary tokens as the tests' fake v3 server hands them out (:class:`TokenDesk`).

Why: the daemon's token client and the ``serve-tokens`` broker are tested against the endpoint
as AssemblyAI specifies it (tests/spec/streaming-token.yml): ``GET /v3/token`` with the API
key, ``expires_in_seconds`` 1-600, ``max_session_duration_seconds`` 60-10800; a token opens one
session, before it expires, and caps that session's length.
"""

from __future__ import annotations

import secrets
import threading
import time
import urllib.parse
from collections.abc import Set

from pttd.local.wire import fmt_number

TOKEN_PATH = "/v3/token"
TOKEN_EXPIRES_RANGE = (1, 600)
TOKEN_MAX_SESSION_RANGE = (60, 10800)


def _strict_int(value: str | None) -> int | None:
    """A decimal integer as the token endpoint takes it ("60"; not "60.0", "1e2" or "")."""
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


class TokenDesk:
    """Mints temporary tokens and takes each back once; also the preset ``tokens`` option."""

    def __init__(self, api_keys: Set[str], min_session_s: float, single_use: bool) -> None:
        """``min_session_s``: the lowest ``max_session_duration_seconds`` taken (real: 60)."""
        self._api_keys = api_keys
        self._min_session_s = min_session_s
        self._single_use = single_use
        self._lock = threading.Lock()
        self._minted: dict[str, tuple[float, float]] = {}  # live token -> (deadline, max s)
        self._ever_minted: set[str] = set()
        self._used_presets: set[str] = set()

    @property
    def minted(self) -> int:
        with self._lock:
            return len(self._ever_minted)

    def is_minted(self, credential: str) -> bool:
        """Minted here, whether still live or not."""
        with self._lock:
            return credential in self._ever_minted

    def mint(self, authorization: str, query: str) -> tuple[int, dict]:
        """``GET /v3/token?expires_in_seconds=N[&max_session_duration_seconds=M]``:
        (HTTP status, JSON body)."""
        if not self._key_ok(authorization):
            return 401, {"error": "Invalid API key"}
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        low, high = TOKEN_EXPIRES_RANGE
        expires = _strict_int(params.get("expires_in_seconds"))
        if expires is None or not low <= expires <= high:
            return 400, {
                "error": f"expires_in_seconds must be an integer between {low} and {high}",
                "code": "invalid_parameter",
            }
        max_session: float = TOKEN_MAX_SESSION_RANGE[1]
        if "max_session_duration_seconds" in params:
            low_s, high_s = self._min_session_s, TOKEN_MAX_SESSION_RANGE[1]
            value = _strict_int(params["max_session_duration_seconds"])
            if value is None or not low_s <= value <= high_s:
                return 400, {
                    "error": "max_session_duration_seconds must be an integer between "
                    f"{fmt_number(low_s)} and {high_s}",
                    "code": "invalid_parameter",
                }
            max_session = value
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._minted[token] = (time.monotonic() + expires, float(max_session))
            self._ever_minted.add(token)
        return 200, {"token": token, "expires_in_seconds": expires}

    def take_minted(self, token: str) -> float | None:
        """Open a session with a minted token: its max session length in seconds, or None when
        it is spent or expired. Used (or tried) once: gone."""
        with self._lock:
            entry = self._minted.pop(token, None)
        if entry is None or time.monotonic() > entry[0]:
            return None
        return entry[1]

    def take_preset(self, token: str) -> bool:
        """A preset token (the ``tokens`` option): one session each when single-use."""
        if not self._single_use:
            return True
        with self._lock:
            if token in self._used_presets:
                return False
            self._used_presets.add(token)
            return True

    def _key_ok(self, header: str) -> bool:
        """An API key in ``Authorization`` (raw, no Bearer); a temporary token is not a key."""
        header = header.strip()
        if not header or header.lower().startswith("bearer ") or self.is_minted(header):
            return False
        return header in self._api_keys if self._api_keys else True
