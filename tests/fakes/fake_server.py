"""The tests' fake AssemblyAI v3 server: the runtime server (pttd/local/server.py) plus what only
tests need, added through its extension points.

Added here: per-connection :class:`~tests.fakes.faults.Faults` (queued or default, HTTP
rejections at the upgrade included), a :class:`~tests.fakes.records.ConnectionRecord` of every
attempt, ``GET /v3/token`` with one-use temporary tokens (tests/fakes/tokens.py), preset
tokens, the real service's new-session limit (3009), its legacy close codes, and the Python SDK's
``True``/``False`` query spelling for bench/compare_sdk.py. All of it is off unless asked for
(:class:`FakeOptions`), so the fake is exactly as strict as the runtime server, never kinder.

Nothing here (nor in the runtime modules it builds on) imports pttd's client: a client bug cannot
become a fake server that agrees with it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from pttd.local.options import ServerOptions
from pttd.local.query import BOOL_PARAMS
from pttd.local.recognizer import RecognizerFactory
from pttd.local.server import V3Server, json_response
from tests.fakes.fake_session import FakeSession
from tests.fakes.faults import Faults
from tests.fakes.records import ConnectionRecord
from tests.fakes.tokens import TOKEN_MAX_SESSION_RANGE, TOKEN_PATH, TokenDesk

#: Category prefix seen in the wild on 3007 texts (pigeonai-org/ViDove#3).
INPUT_DURATION_ERROR_PREFIX = "Input Duration Error: "


@dataclass(frozen=True)
class FakeOptions(ServerOptions):
    """The runtime server's options plus the fake's; every extra one is off by default."""

    #: Take ``True``/``False`` for booleans in the query as well (what AssemblyAI's Python SDK
    #: sends; reported to work on the real service). On only for bench/compare_sdk.py.
    python_booleans: bool = False
    #: Temporary tokens, accepted in ``?token=`` or in the header (as the SDK sends them).
    tokens: frozenset[str] = frozenset()
    #: Real temporary tokens open one session only.
    single_use_tokens: bool = True
    #: Pre-2026-02-25 codes: 3005 instead of 3006/3007/3008, 1008 instead of 3009.
    legacy_codes: bool = False
    #: New sessions allowed per ``limiter_window_s`` (0 = unlimited) before Error 3009. The real
    #: service: 5 per minute on a free account, 100+ paid.
    sessions_per_minute: int = 0
    limiter_window_s: float = 60.0
    #: Prefix for 3007 texts, e.g. :data:`INPUT_DURATION_ERROR_PREFIX`.
    duration_error_prefix: str = ""
    #: Force "us" or "u3" shaping whatever ``speech_model`` says (None = faithful).
    model_family_override: str | None = None
    #: Append an em dash to U3 partial transcripts, as the real U3 sometimes does.
    u3_partial_em_dash: bool = False
    #: ``GET /v3/token`` mints one-use temporary tokens when on.
    token_endpoint: bool = True
    #: Lower bound of ``max_session_duration_seconds`` (real: 60). Tests may lower it, which
    #: only makes the server stricter (shorter sessions), never kinder.
    token_min_session_s: float = TOKEN_MAX_SESSION_RANGE[0]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "tokens", frozenset(self.tokens))

    @classmethod
    def of(cls, options: ServerOptions | None) -> FakeOptions:
        """``options`` as FakeOptions (the fake's extras off when it is plain ServerOptions)."""
        if isinstance(options, FakeOptions):
            return options
        base = options or ServerOptions()
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ServerOptions)})


def sdk_booleans(query: str) -> str:
    """The query with the SDK's ``True``/``False`` booleans spelt as JSON's."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return urllib.parse.urlencode(
        [(n, v.lower() if n in BOOL_PARAMS and v in ("True", "False") else v) for n, v in pairs]
    )


class FakeServer(V3Server):
    """A V3Server whose connections get faults and records; tokens and limits as the service."""

    options: FakeOptions

    def __init__(
        self,
        options: ServerOptions | None = None,
        recognizer_factory: RecognizerFactory | None = None,
    ) -> None:
        super().__init__(FakeOptions.of(options), recognizer_factory)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._default_faults = Faults()
        self._queued_faults: collections.deque[Faults] = collections.deque()
        self._records: list[ConnectionRecord] = []
        self._admitted: collections.deque[float] = collections.deque()
        self.tokens = TokenDesk(
            self.options.api_keys, self.options.token_min_session_s, self.options.single_use_tokens
        )
        #: ``GET /v3/token`` requests: (status, response body), oldest first.
        self.token_requests: list[tuple[int, dict]] = []

    # --- fault control (any thread) ------------------------------------------------------------

    def use_faults(self, faults: Faults | Sequence[Faults] | None) -> None:
        """One Faults for every connection, or a sequence used one per attempt (then none)."""
        if isinstance(faults, Faults):
            self.set_default_faults(faults)
        elif faults:
            self.queue_faults(*faults)

    def set_default_faults(self, faults: Faults) -> None:
        """Faults for every connection once the queued ones are used up."""
        with self._lock:
            self._default_faults = faults

    def queue_faults(self, *faults: Faults) -> None:
        """Faults for the next connection attempts, one each, in order."""
        with self._lock:
            self._queued_faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._queued_faults.clear()
            self._default_faults = Faults()

    # --- records (any thread) ------------------------------------------------------------------

    @property
    def connections(self) -> list[ConnectionRecord]:
        """Every connection attempt, rejected ones included, oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def connection_attempts(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def sessions(self) -> list[ConnectionRecord]:
        """Connections that got a Begin."""
        return [r for r in self.connections if r.begin is not None]

    def wait_for_connections(self, count: int, timeout: float) -> list[ConnectionRecord]:
        """Block until at least ``count`` attempts were seen; raises TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._records) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} connection attempts, saw {len(self._records)}"
                )
            return list(self._records)

    @property
    def token_url(self) -> str:
        """Where temporary tokens are minted (the streaming host's ``/v3/token``)."""
        return f"http://{self.options.host}:{self.port}{TOKEN_PATH}"

    # --- the runtime server's extension points -------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        split = urllib.parse.urlsplit(request.path)
        if not self.options.token_endpoint or split.path != TOKEN_PATH:
            return super()._process_request(connection, request)
        status, body = self.tokens.mint(request.headers.get("Authorization", ""), split.query)
        with self._changed:
            self.token_requests.append((status, body))
            self._changed.notify_all()
        response = json_response(connection, status, body)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _read_upgrade(self, request: Request) -> ConnectionRecord:
        """Count the attempt and give it its faults."""
        query = urllib.parse.urlsplit(request.path).query
        query_text = sdk_booleans(query) if self.options.python_booleans else None
        with self._changed:
            faults = self._queued_faults.popleft() if self._queued_faults else self._default_faults
            index = len(self._records)
            record = ConnectionRecord(index, request.path, request.headers, faults, query_text)
            self._records.append(record)
            self._changed.notify_all()
        return record

    def _refuse_http(self, upgrade: Any) -> int | None:
        status = upgrade.faults.http_reject_status
        if status is None:
            status = super()._refuse_http(upgrade)
        if status is not None:
            upgrade.http_status = status
            upgrade.done.set()
        return status

    def _new_session(self, ws: ServerConnection, upgrade: Any) -> FakeSession:
        return FakeSession(self, ws, upgrade)

    def authorize(self, upgrade: Any) -> bool:
        """Minted tokens (``?token=`` or the header), preset ``tokens``, then the runtime rule."""
        if not self.options.require_auth:
            return True
        header = upgrade.headers.get("authorization", "").strip()
        token = upgrade.raw_query.get("token", "").strip()
        for credential in (token, header):
            if credential and self.tokens.is_minted(credential):
                upgrade.token_max_session_s = self.tokens.take_minted(credential)
                return upgrade.token_max_session_s is not None
        if self.options.tokens:
            if header in self.options.api_keys:
                return True
            presets = self.options.tokens
            return any(c and c in presets and self.tokens.take_preset(c) for c in (header, token))
        return super().authorize(upgrade)

    def admit(self) -> bool:
        """The new-session limiter (the service limits new sessions per minute)."""
        limit = self.options.sessions_per_minute
        if limit <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            while self._admitted and now - self._admitted[0] >= self.options.limiter_window_s:
                self._admitted.popleft()
            if len(self._admitted) >= limit:
                return False
            self._admitted.append(now)
            return True


class FakeControls:
    """What a test reads and steers on a thread that runs a :class:`FakeServer`."""

    server: FakeServer

    @property
    def token_url(self) -> str:
        return self.server.token_url

    @property
    def token_requests(self) -> list[tuple[int, dict]]:
        with self.server._lock:
            return list(self.server.token_requests)

    @property
    def minted_tokens(self) -> int:
        return self.server.tokens.minted

    @property
    def connections(self) -> list[ConnectionRecord]:
        return self.server.connections

    @property
    def sessions(self) -> list[ConnectionRecord]:
        return self.server.sessions

    @property
    def connection_attempts(self) -> int:
        return self.server.connection_attempts

    def wait_for_connections(self, count: int, timeout: float) -> list[ConnectionRecord]:
        return self.server.wait_for_connections(count, timeout)

    def set_default_faults(self, faults: Faults) -> None:
        self.server.set_default_faults(faults)

    def queue_faults(self, *faults: Faults) -> None:
        self.server.queue_faults(*faults)

    def clear_faults(self) -> None:
        self.server.clear_faults()
