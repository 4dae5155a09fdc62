"""One v3 session of the local server, from the upgrade's credentials to the close.

Why: this is the protocol as the service plays it: authentication and query checks before
``Begin`` (1008, 3005), frame size and pacing (3007), client message validation (3006), session
expiry (3008), ``inactivity_timeout`` and ``session_heartbeat``, ``ForceEndpoint``,
``UpdateConfiguration`` (applied silently, as the service does), ``KeepAlive`` and ``Terminate``
(the turn in flight, then ``Termination``, then close 1000). Every ``Error`` frame is followed by
a close with the same code.

A subclass can change what happens at these points (the tests' fake server injects faults and
records every frame through them, tests/fakes/fake_session.py): ``_refusal``,
``_session_config``, ``_make_shaper``, ``_send_begin``, ``_start_tasks``, ``_before_frame``,
``_frame_error``, ``_after_frame``, the ``_on_<ClientMessage>`` handlers, ``_closing_messages``,
``_queue_shaped``, ``_send_now``, ``_fail``, ``_error_close``, ``_finish`` and the observers
``_observe_received`` and ``_observe_sent``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed

from pttd.local.messages import (
    begin_message,
    error_message,
    heartbeat_message,
    parse_client_message,
    termination_message,
)
from pttd.local.outbox import Outbox
from pttd.local.query import QueryError, build_session_config, parse_query, updated_config
from pttd.local.recognizer import Recognizer, RecognizerEvent, SessionConfig
from pttd.local.shaping import TurnShaper
from pttd.local.wire import (
    API_VERSION,
    AUTH_ERROR,
    EXPIRED_ERROR,
    GENERIC_ERROR,
    MAX_FRAME_MS,
    MIN_FRAME_MS,
    close_reason,
    frame_duration_ms,
    frame_error,
    mulaw_to_pcm16,
)

if TYPE_CHECKING:
    from pttd.local.server import V3Server

log = logging.getLogger(__name__)


class Upgrade:
    """What the HTTP upgrade request told the server: path, headers and the parsed query."""

    def __init__(self, path: str, headers: Headers, query_text: str | None = None) -> None:
        """Headers are kept lower-cased. ``query_text``: the query to parse, when not the
        path's own; a bad query is kept as ``query_error`` (the session refuses it after the
        upgrade, as the service does)."""
        self.started = time.monotonic()
        self.path = path
        self.headers: dict[str, str] = {k.lower(): v for k, v in headers.raw_items()}
        split = urllib.parse.urlsplit(path)
        self.route = split.path
        self.raw_query: dict[str, str] = dict(
            urllib.parse.parse_qsl(split.query, keep_blank_values=True)
        )
        self.query: dict[str, Any] = {}
        self.query_error: str | None = None
        try:
            self.query = parse_query(split.query if query_text is None else query_text)
        except QueryError as exc:
            self.query_error = str(exc)


def _is_final(message: dict) -> bool:
    return message.get("type") == "Turn" and bool(message["end_of_turn"])


class V3Session:
    """Runs one accepted WebSocket connection from authentication to close.

    States: opening | open | terminating | closing. Once open, one sender task is the only
    writer, so messages held back keep their order.
    """

    def __init__(self, server: V3Server, ws: ServerConnection, upgrade: Upgrade) -> None:
        self.server = server
        self.options = server.options
        self.ws = ws
        self.upgrade = upgrade
        self.query = upgrade.query
        self.session_id = str(uuid.uuid4())
        #: The session's lifetime in seconds, from the upgrade.
        self.expires_in_s = self.options.expires_in_s
        self.config: SessionConfig | None = None
        self.recognizer: Recognizer | None = None
        self.shaper: TurnShaper | None = None
        self.begin: dict | None = None
        self.state = "opening"
        self.samples = 0
        self.audio_ms = 0.0  # audio received while open, from byte counts
        self.first_audio_at: float | None = None
        self.last_activity = time.monotonic()
        #: The only writer once the session is open.
        self.outbox = Outbox(self._send_now, self._start_close)
        self._tasks: list[asyncio.Task] = []
        self._close_task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._open():
                self._start_tasks()
                await self._recv_loop()
        except ConnectionClosed:
            pass
        except Exception:  # e.g. a recognizer bug: end like the service's catch-all
            log.exception("session %s failed", self.session_id)
            await self._fail(3005, GENERIC_ERROR)
        finally:
            await self._finish()

    async def _open(self) -> bool:
        """Everything before the first client frame is processed; False if the session ended."""
        refusal = self._refusal()
        if refusal is not None:
            await self._fail(*refusal)
            return False
        assert self.config is not None
        self.recognizer = self.server.make_recognizer(self.config)
        self.shaper = self._make_shaper()
        if not await self._send_begin():
            return False
        self.state = "open"
        self.last_activity = time.monotonic()
        return True

    def _refusal(self) -> tuple[int, str] | None:
        """(code, Error text) refusing the session before Begin, or None (``config`` is set)."""
        if not self.server.authorize(self.upgrade):
            return 1008, AUTH_ERROR
        try:
            if self.upgrade.query_error:
                raise QueryError(self.upgrade.query_error)
            self.config = self._session_config()
        except QueryError as exc:
            return 3005, f"Session Cancelled: Invalid query parameter {exc}"
        return None

    def _session_config(self) -> SessionConfig:
        return build_session_config(self.session_id, self.query, self.options)

    def _make_shaper(self) -> TurnShaper:
        assert self.config is not None
        llm_gateway = "llm_gateway" in self.query
        return TurnShaper(self.config, self.options.format_pattern, llm_gateway=llm_gateway)

    async def _send_begin(self) -> bool:
        """Send Begin; False if the connection ended first."""
        assert self.config is not None
        api_version = self.upgrade.headers.get("assemblyai-version", API_VERSION)
        expires_at = int(time.time() + self.expires_in_s)
        self.begin = begin_message(
            self.session_id, self.config, self.query, api_version, expires_at
        )
        await self._send_now(self.begin)
        return True

    def _start_tasks(self) -> None:
        self._tasks.append(self.outbox.start())
        self._spawn(self._expiry())
        if "inactivity_timeout" in self.query:
            self._spawn(self._inactivity(float(self.query["inactivity_timeout"])))
        if self.query.get("session_heartbeat"):
            self._spawn(self._heartbeat())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task:
        """A task that ends with the session."""
        task = asyncio.create_task(work)
        self._tasks.append(task)
        return task

    async def _finish(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._close_task is not None:
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._close_task), self.options.close_timeout_s + 1
                )
            except (TimeoutError, ConnectionClosed):
                pass
        closer = getattr(self.recognizer, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception:  # a broken recognizer must not break the server
                log.exception("recognizer close failed")
        log.debug("session %s done", self.session_id)

    # --- receiving -------------------------------------------------------------------------------

    async def _recv_loop(self) -> None:
        while True:
            data = await self.ws.recv()
            self.last_activity = time.monotonic()
            if isinstance(data, bytes):
                await self._on_binary(data)
            else:
                await self._on_text(data)

    async def _on_binary(self, data: bytes) -> None:
        assert self.config is not None
        duration = frame_duration_ms(len(data), self.config.encoding, self.config.sample_rate)
        counted = duration if self.state == "open" else 0.0
        self.audio_ms += counted
        self._observe_received("binary", data, counted)
        if self.state != "open" or not self._before_frame():
            return
        error = self._frame_error(duration)
        if error is not None:
            await self._fail(3007, error)
            return
        pcm = data if self.config.encoding == "pcm_s16le" else mulaw_to_pcm16(data)
        pcm = pcm[: len(pcm) - len(pcm) % 2]
        stream_ms = self.samples * 1000 // self.config.sample_rate
        self.samples += len(pcm) // 2
        self._emit(await self._call(self._recognizer.feed, pcm, stream_ms))
        await self._after_frame()

    def _before_frame(self) -> bool:
        """An audio frame arrived on an open session; False drops it unchecked."""
        return True

    def _frame_error(self, duration: float) -> str | None:
        """The 3007 text for a frame outside 50-1000 ms or audio ahead of real time, or None."""
        now = time.monotonic()
        if self.first_audio_at is None and MIN_FRAME_MS <= duration <= MAX_FRAME_MS:
            self.first_audio_at = now
        elapsed = now - (self.first_audio_at or now)
        return frame_error(duration, self.audio_ms / 1000.0, elapsed, self.options.max_lead_s)

    async def _after_frame(self) -> None:
        """The recognizer has had the frame and its messages are queued."""

    async def _on_text(self, text: str) -> None:
        parsed, error = parse_client_message(text)
        self._observe_received("text", parsed)
        if self.state != "open":
            return
        if error is not None:
            await self._fail(3006, error)
            return
        await getattr(self, f"_on_{parsed['type']}")(parsed)

    async def _on_KeepAlive(self, message: dict) -> None:
        pass  # receiving it already reset the inactivity timer

    async def _on_UpdateConfiguration(self, message: dict) -> None:
        """Apply silently: the real service sends no acknowledgement."""
        assert self.config is not None and self.shaper is not None
        changes = {k: v for k, v in message.items() if k != "type" and v is not None}
        self.config = updated_config(self.config, changes)
        self.shaper.update_config(self.config)
        await self._call(self._recognizer.update_config, changes)

    async def _on_ForceEndpoint(self, message: dict) -> None:
        self._emit(await self._call(self._recognizer.force_endpoint))

    async def _on_Terminate(self, message: dict) -> None:
        """Flush the turn in flight, then Termination, then close 1000."""
        self.state = "terminating"
        self._emit(await self._call(self._recognizer.finish))
        for closing in self._closing_messages():
            self.outbox.put(closing)
        self.outbox.put_close(1000, "")

    def _closing_messages(self) -> list[dict]:
        """What follows the last Turn on Terminate."""
        session_s = time.monotonic() - self.upgrade.started
        return [termination_message(self.audio_ms, session_s)]

    # --- emitting --------------------------------------------------------------------------------

    @property
    def _recognizer(self) -> Recognizer:
        assert self.recognizer is not None
        return self.recognizer

    def _emit(self, events: Sequence[RecognizerEvent]) -> bool:
        """Shape and queue recognizer events; True if a turn ended."""
        assert self.shaper is not None and self.config is not None
        stream_ms = self.samples * 1000 // self.config.sample_rate
        shaper = self.shaper
        messages = [m for event in events or () for m in shaper.on_event(event, stream_ms)]
        self._queue_shaped(messages)
        return any(_is_final(message) for message in messages)

    def _queue_shaped(self, messages: list[dict]) -> None:
        """Queue one batch of shaped messages for the sender, in order."""
        for message in messages:
            self.outbox.put(message)

    async def _send_now(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))
        self._observe_sent(message)

    def _observe_received(self, kind: str, data: Any, audio_ms: float = 0.0) -> None:
        """A client frame arrived: "binary" (bytes; ``audio_ms`` counted) or "text" (parsed
        JSON, or the raw text when it is not JSON)."""

    def _observe_sent(self, message: dict) -> None:
        """A message went out."""

    # --- ending ----------------------------------------------------------------------------------

    async def _fail(self, code: int, text: str) -> None:
        """Error frame, then a close with the same code."""
        if self.state == "closing":
            return
        self.outbox.stop()
        self.state = "closing"
        log.info("session %s error %d: %s", self.session_id, code, text)
        try:
            await self._send_now(error_message(code, text))
        except ConnectionClosed:
            return
        self._start_close(*self._error_close(code, text))

    def _error_close(self, code: int, text: str) -> tuple[int, str]:
        """The close that follows an Error frame: its code, its text as the reason."""
        return code, close_reason(text)

    def _start_close(self, code: int, reason: str) -> None:
        self.state = "closing"
        self._close_task = asyncio.create_task(self.ws.close(code, reason))

    # --- timers ----------------------------------------------------------------------------------

    async def _expiry(self) -> None:
        remaining = self.upgrade.started + self.expires_in_s - time.monotonic()
        await asyncio.sleep(max(0.0, remaining))
        await self._fail(3008, EXPIRED_ERROR)

    async def _inactivity(self, timeout_s: float) -> None:
        while self.state in ("open", "terminating"):
            remaining = self.last_activity + timeout_s - time.monotonic()
            if remaining <= 0:
                await self._inactivity_close()
                return
            await asyncio.sleep(remaining)

    async def _inactivity_close(self) -> None:
        code, text = self.options.inactivity_close_code, self.options.inactivity_error
        log.info("session %s inactive: closing %d", self.session_id, code)
        if code == 1000:
            self.outbox.stop()
            self._start_close(1000, close_reason(text))
        else:
            await self._fail(code, text)

    async def _heartbeat(self) -> None:
        interval = self.options.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.state != "open":
                continue
            total_ms = int((time.monotonic() - self.upgrade.started) * 1000)
            self.outbox.put(heartbeat_message(int(self.audio_ms), total_ms))

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        if self.options.recognizer_in_thread:
            return await asyncio.to_thread(func, *args)
        return func(*args)
