"""One session of the tests' fake v3 server: the runtime session plus faults and records.

Why a subclass: the offline engine's session (pttd/local/session.py) is the protocol; what only
a test needs (a :class:`~tests.fakes.faults.Faults` applied at the session's extension points, a
:class:`~tests.fakes.records.ConnectionRecord` of every frame, the real service's new-session
limit, legacy close codes and temporary-token lifetimes) lives here, out of the runtime package.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed

from pttd.local.messages import error_message
from pttd.local.query import build_session_config
from pttd.local.recognizer import Hypothesis
from pttd.local.session import V3Session
from pttd.local.shaping import TurnShaper
from pttd.local.wire import GENERIC_ERROR
from tests.fakes.records import Received

log = logging.getLogger(__name__)

CONCURRENCY_ERROR = "Unauthorized Connection: Too many concurrent sessions"
LEGACY_CONCURRENCY_ERROR = "Unauthorized connection: Too many concurrent sessions"


@dataclass(frozen=True)
class RawText:
    """A text frame sent exactly as given (``Faults.raw_after_frames``/``raw_after_s``)."""

    text: str


def unknown_message(where: str) -> dict:
    return {"type": "FutureEventForTesting", "where": where, "payload": {"n": 1}}


def _is_final(message: dict) -> bool:
    return message.get("type") == "Turn" and bool(message["end_of_turn"])


class FakeShaper(TurnShaper):
    """The runtime shaper plus what only faults use: an empty final, a speaker revision of the
    final turns so far, and the em dash the real U3 sometimes ends partials with."""

    def __init__(self, config: Any, format_pattern: str, llm_gateway: bool, em_dash: bool):
        super().__init__(config, format_pattern, llm_gateway=llm_gateway)
        self.em_dash = em_dash
        self.finals: dict[int, list[dict]] = {}

    def _final(self, hyp: Hypothesis) -> list[dict]:
        turn_order = self.turn_order
        messages = super()._final(hyp)
        turns = [m for m in messages if m.get("type") == "Turn"]
        if turns:
            self.finals[turn_order] = turns[-1]["words"]
        return messages

    def _u3_partial(self, hyp: Hypothesis, stream_ms: int) -> list[dict]:
        messages = super()._u3_partial(hyp, stream_ms)
        for message in messages if self.em_dash else ():
            message["transcript"] += "\u2014"
        return messages

    def empty_turn(self) -> list[dict]:
        """An end_of_turn Turn with nothing in it (the ``empty_turn`` ForceEndpoint policy)."""
        formatted = self.config.is_u3 or (self.config.format_turns and self.format_pattern == "B")
        message = self._turn([], "", end_of_turn=True, formatted=formatted, confidence=1.0)
        self.finals[self.turn_order] = []
        self.turn_order += 1
        self._reset_turn()
        return [message]

    def speaker_revision(self, label: str = "B") -> dict | None:
        """Relabel every final turn; None if there was no final turn."""
        revisions = [
            {
                "turn_order": order,
                "speaker_label": label,
                "words": [dict(word, speaker=label) for word in words],
            }
            for order, words in sorted(self.finals.items())
            if words
        ]
        return {"type": "SpeakerRevision", "revisions": revisions} if revisions else None


class FakeSession(V3Session):
    """A session that applies its connection's faults and records everything it sees and sends.

    The extra state "silent" (``Faults.error_without_close``): an Error frame, then nothing.
    """

    def __init__(self, server: Any, ws: Any, record: Any) -> None:
        super().__init__(server, ws, record)
        self.record = record
        self.faults = record.faults
        self.frames = 0

    # --- before Begin ----------------------------------------------------------------------------

    async def _open(self) -> bool:
        if self.faults.close_before_begin:
            self.state = "closing"
            await self.ws.close(*self.faults.close_before_begin)
            return False
        return await super()._open()

    def _refusal(self) -> tuple[int, str] | None:
        refusal = super()._refusal()
        if refusal is not None:
            return refusal
        if self.record.token_max_session_s:  # a temporary token caps its session
            self.expires_in_s = min(self.expires_in_s, self.record.token_max_session_s)
        if not self.server.admit():
            return 3009, CONCURRENCY_ERROR
        return None

    def _session_config(self) -> Any:
        family = self.options.model_family_override
        return build_session_config(self.session_id, self.query, self.options, family)

    def _make_shaper(self) -> TurnShaper:
        llm_gateway = "llm_gateway" in self.query or self.faults.llm_gateway_response
        return FakeShaper(
            self.config, self.options.format_pattern, llm_gateway, self.options.u3_partial_em_dash
        )

    async def _send_begin(self) -> bool:
        self.record.config = self.config
        self.record.session_id = self.session_id
        delay = self.faults.begin_delay_s
        if delay > 0 and not await self._sleep(delay):
            return False
        await super()._send_begin()
        self.record.begin = self.begin
        if self.faults.unknown_messages:
            await self._send_now(unknown_message("after_begin"))
        return True

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the connection closes first; True if still open."""
        closed = asyncio.ensure_future(self.ws.wait_closed())
        try:
            done, _ = await asyncio.wait({closed}, timeout=seconds)
        finally:
            closed.cancel()
        return not done

    def _start_tasks(self) -> None:
        super()._start_tasks()
        if self.faults.heartbeat and not self.query.get("session_heartbeat"):
            self._spawn(self._heartbeat())
        if self.faults.raw_after_s:
            self._spawn(self._raw_later(*self.faults.raw_after_s))

    async def _raw_later(self, delay_s: float, texts: tuple[str, ...]) -> None:
        await asyncio.sleep(delay_s)
        for text in texts:
            self.outbox.put(RawText(text))

    # --- audio -----------------------------------------------------------------------------------

    def _before_frame(self) -> bool:
        self.frames += 1
        drop_after = self.faults.drop_after_frames
        if drop_after is not None and self.frames >= drop_after:
            self._abort("drop_after_frames")
            return False
        return True

    def _frame_error(self, duration: float) -> str | None:
        error = super()._frame_error(duration)
        return None if error is None else self.options.duration_error_prefix + error

    async def _after_frame(self) -> None:
        faults = self.faults
        if faults.warning_after_frames == self.frames:
            code, text = faults.warning_code, faults.warning_text
            self.outbox.put({"type": "Warning", "warning_code": code, "warning": text})
        if faults.raw_after_frames and faults.raw_after_frames[0] == self.frames:
            for text in faults.raw_after_frames[1]:
                self.outbox.put(RawText(text))
        if faults.error_mid_turn and faults.error_mid_turn[1] == self.frames:
            await self._fail(faults.error_mid_turn[0], GENERIC_ERROR)
        elif faults.error_without_close == self.frames:
            await self._go_silent()

    # --- client messages -------------------------------------------------------------------------

    async def _on_UpdateConfiguration(self, message: dict) -> None:
        await super()._on_UpdateConfiguration(message)
        self.record.config = self.config

    async def _on_ForceEndpoint(self, message: dict) -> None:
        if self.faults.drop_on_force_endpoint:
            self._abort("drop_on_force_endpoint")
            return
        events = await self._call(self._recognizer.force_endpoint)
        if not self._emit(events) and self.faults.empty_force_endpoint == "empty_turn":
            for turn in self.shaper.empty_turn():
                self.outbox.put(turn, self.faults.turn_delay_s)

    async def _on_Terminate(self, message: dict) -> None:
        if self.faults.no_termination == "ignore":
            log.info("fault: ignoring Terminate")
            return
        await super()._on_Terminate(message)

    def _closing_messages(self) -> list[dict]:
        if self.faults.no_termination == "close":
            return []
        revision = self.shaper.speaker_revision() if self.faults.speaker_revision else None
        return ([revision] if revision else []) + super()._closing_messages()

    # --- sending ---------------------------------------------------------------------------------

    def _queue_shaped(self, messages: list[dict]) -> None:
        """Turn delays hold back finals (and all behind them); an unknown message may precede."""
        delay = self.faults.turn_delay_s
        ended = False
        for message in messages:
            final = _is_final(message)
            late = final or message.get("type") == "LLMGatewayResponse"
            if final and not ended and self.faults.unknown_messages:
                self.outbox.put(unknown_message("before_final"), delay)
            self.outbox.put(message, delay if late else 0.0)
            ended = ended or final

    async def _send_now(self, message: Any) -> None:
        if self.state == "silent":
            return
        if isinstance(message, RawText):
            await self.ws.send(message.text)
            self.record.raw_sent.append(message.text)
            return
        if self.faults.unknown_messages:
            message = dict(message, x_unrecognized_field={"injected": True})
        await super()._send_now(message)

    def _observe_received(self, kind: str, data: Any, audio_ms: float = 0.0) -> None:
        self.record.add_received(Received(time.monotonic(), kind, data), audio_ms)

    def _observe_sent(self, message: dict) -> None:
        self.record.add_sent(message)

    # --- ending ----------------------------------------------------------------------------------

    async def _fail(self, code: int, text: str) -> None:
        if self.state == "silent":
            return
        await super()._fail(*self._mapped_code(code, text))

    def _mapped_code(self, code: int, text: str) -> tuple[int, str]:
        """Legacy (pre-2026-02-25) codes: 3005 for 3006-3008, 1008 for the session limit."""
        if not self.options.legacy_codes:
            return code, text
        if code in (3006, 3007, 3008):
            return 3005, text
        if code == 3009:
            return 1008, LEGACY_CONCURRENCY_ERROR
        return code, text

    def _error_close(self, code: int, text: str) -> tuple[int, str]:
        if self.faults.mismatched_close is not None:
            return super()._error_close(*self.faults.mismatched_close)
        return super()._error_close(code, text)

    async def _go_silent(self) -> None:
        """Fault: an Error frame and then nothing at all, never a close."""
        self.outbox.stop()
        try:
            await self._send_now(error_message(3005, GENERIC_ERROR))
        except ConnectionClosed:
            return
        self.state = "silent"

    def _abort(self, why: str) -> None:
        """Fault: drop TCP with no close frame."""
        log.info("session %s fault %s: aborting transport", self.session_id, why)
        self.outbox.stop()
        self.state = "closing"
        self.record.aborted = True
        self.ws.transport.abort()

    async def _finish(self) -> None:
        try:
            await super()._finish()
        finally:
            protocol = self.ws.protocol
            if protocol.close_sent is not None:
                self.record.close_sent = (protocol.close_sent.code, protocol.close_sent.reason)
            if protocol.close_rcvd is not None:
                self.record.close_received = (protocol.close_rcvd.code, protocol.close_rcvd.reason)
            self.record.done.set()
            log.debug("session %s done: %r", self.session_id, self.record)
