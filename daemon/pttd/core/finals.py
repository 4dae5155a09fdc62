"""What the server heard, delivered: partials as they come, finals, and the wait for a press's last.

Once a press's audio and its ForceEndpoint are on the wire, the next final is its last: that one
goes to the outputs with a receipt, and the press ends when they have it (``FINAL_OUT_WAIT_S``
at most). Its wait for that final is bounded: short when nothing is pending (nothing said, or
every word already in a final), else ``final_timeout_s``; past it, a press with words at stake is
replayed on a new session, one without ends. A final that comes a little after the short wait
ran out is delivered late, once. ``on_final`` is on the hot path bench/compare_sdk.py measures
(Turn -> final event): it does only the work each final needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pttd import events
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.recovery import Recovery
from pttd.core.sessions import PressSessions, SessionPool
from pttd.core.streamer import StreamDone, Streamer
from pttd.stt.assemblyai.close_policy import policy_for
from pttd.stt.base import FinalTurn, SessionClosed, SttSession, Turn

if TYPE_CHECKING:
    from pttd.core.controller import Context

log = logging.getLogger(__name__)

# A press ends (streamer stopped, Terminate, idle state, LEDs) once the outputs' threads have
# its last final, or after this long: ending it at once woke several threads just as the final's
# output thread needed the interpreter, and the final waited behind them (bench/RESULTS.md).
FINAL_OUT_WAIT_S = 0.05


@dataclass(frozen=True)
class FinalOut:
    """The outputs' threads have delivered a press's last final (posted by their last one)."""

    press: Press


class Finals:
    """Turns a press's Turn messages into partial and final events, and ends it on its last."""

    def __init__(
        self,
        ctx: Context,
        sessions: PressSessions,
        recovery: Recovery,
        pool: SessionPool,
        emit_confirmed: Callable[[dict, Callable[[], None]], None] | None,
    ):
        """``emit_confirmed(event, on_delivered)``: see ``Controller``."""
        self.s = ctx.settings
        self.ring = ctx.ring
        self._presses = ctx.presses
        self._status = ctx.status
        self._emit = ctx.emit
        self._post = ctx.post
        self._clock = ctx.clock
        self._sessions = sessions
        self._recovery = recovery
        self._pool = pool
        self._emit_confirmed = emit_confirmed
        self.last_final: dict | None = None  # published for ``status`` (read from any thread)

    def on_partial(self, press: Press | None, session: SttSession, turn: Turn) -> None:
        if press is not None and turn.text != press.last_partial:
            press.heard_speech = press.heard_speech or bool(turn.text)
            press.last_partial = turn.text
            if turn.text:
                self._emit(events.partial_event(turn.text, turn.turn_order, session.id or ""))

    def on_stream_done(self, done: StreamDone) -> None:
        press = self._presses.of_streamer(done.streamer)
        if (
            press is None
            or press.phase is not PressPhase.FINALIZING
            or press.fe_sent_at is not None
        ):
            return  # (its final overtook this report: on_final has done the below)
        self._force_endpoint_sent(press, done.streamer)

    def _force_endpoint_sent(self, press: Press, streamer: Streamer) -> None:
        """The press's audio and ForceEndpoint are on the wire: wait (bounded) for its final."""
        assert streamer.end is not None
        press.end_pos = streamer.end  # where it ended: the adaptive post-roll may have cut it
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "press %d: ForceEndpoint sent on %s after %d samples, %s",
                press.press_id,
                press.session.name if press.session else "?",
                streamer.samples_sent,
                self._postroll_said(press, streamer),
            )
        press.lost_samples += streamer.lost_samples
        press.audio_ms = (streamer.end - press.start_pos) * 1000 / self.s.sample_rate
        press.fe_sent_at = streamer.force_endpoint_at
        # the short wait is for a press with nothing pending: nothing said, or every word shown
        # already in a final (the server ended the turn on silence before the release); a
        # replayed press may never have had the chance to show its words: it gets the full wait
        # (a final later than the short wait is still delivered: late_final)
        nothing_pending = not press.heard_speech or (press.finals > 0 and not press.last_partial)
        sure_empty = nothing_pending and press.attempts <= 1 and press.replay_pos is None
        wait = self.s.empty_final_timeout_s if sure_empty else self.s.final_timeout_s
        press.deadline = self._clock() + wait  # still FINALIZING: now waiting for the final

    def _postroll_said(self, press: Press, streamer: Streamer) -> str:
        """The release -> ForceEndpoint figures for the debug log (bench/postroll_bench.py)."""
        if press.release_pos is None or press.released_at is None:
            return "no release"
        rate = self.s.sample_rate
        fe_ms = ((streamer.force_endpoint_at or self._clock()) - press.released_at) * 1000
        postroll = (press.end_pos or 0) - press.release_pos  # samples
        why = f" ({streamer.postroll_reason})" if streamer.postroll_reason else ""
        return f"{fe_ms:.0f} ms after the release, post-roll {postroll * 1000 // rate} ms{why}"

    def on_final(self, press: Press | None, session: SttSession, final: FinalTurn) -> None:
        turn = final.turn
        if press is None or press.session is not session:
            log.info(
                "dropping a final that belongs to no live press (turn %d on %s)",
                turn.turn_order,
                getattr(session, "name", "?"),
            )
            return
        streamer = press.streamer
        if (
            press.phase is PressPhase.FINALIZING
            and press.fe_sent_at is None
            and streamer is not None
            and streamer.force_endpoint_at
        ):
            # The server answered the ForceEndpoint before the streamer's StreamDone reached this
            # queue (the streamer marks it before sending, so the mark is there by now): this is
            # the press's last final, not a turn the server ended on silence mid-press.
            self._force_endpoint_sent(press, streamer)
        last = press.phase is PressPhase.FINALIZING and press.fe_sent_at is not None
        if turn.transcript:
            event = self._event(press, session, turn)
            self.last_final = event
            if last and self._emit_confirmed is not None:
                press.move(PressPhase.DELIVERING, self._clock() + FINAL_OUT_WAIT_S)

                def delivered() -> None:  # on the output thread that has it out last
                    self._post(FinalOut(press))

                self._emit_confirmed(event, delivered)
            else:
                self._emit(event)
            press.finals += 1
        press.last_partial = ""
        last_word_end = max((w.end for w in turn.words), default=None)
        if last_word_end is not None:
            ring_pos = press.start_pos + int(
                (last_word_end - press.stream_base_ms) * self.s.sample_rate / 1000
            )
            # a word time beyond the audio sent is the server's nonsense: never past the end
            source_end = press.audio.end if press.audio is not None else self.ring.end
            ring_pos = min(
                ring_pos, source_end if press.end_pos is None else min(press.end_pos, source_end)
            )
            press.replay_pos = max(press.replay_pos or press.start_pos, ring_pos)
        if last and press.phase is PressPhase.FINALIZING:
            outcome = Outcome.FINAL if press.finals else Outcome.SILENT
            self._sessions.end(press, outcome, terminate=True)
            self._status.refresh()

    def on_final_out(self, out: FinalOut) -> None:
        if out.press.phase is PressPhase.DELIVERING:
            self._sessions.end(out.press, Outcome.FINAL, terminate=True)

    def late_final(self, press: Press, session: SttSession, final: FinalTurn) -> bool:
        """A final for a press that ended because its wait ran out with no words pending, from
        its own session, within ``final_timeout_s`` of that end, while that session is only
        ending or kept warm (not abandoned, not serving a later press): the server was slower
        than the short wait. It is the press's answer after all, so it is delivered (once)."""
        if (
            not press.waited_out
            or press.session is not session
            or not final.turn.transcript
            or not self._pool.holds(session)  # given up
            or press.ended_at is None
            or self._clock() > press.ended_at + self.s.final_timeout_s
        ):
            return False
        log.warning(
            "press %d: final arrived after its wait ended; delivering it late", press.press_id
        )
        press.late_final()
        self.last_final = self._event(press, session, final.turn)
        self._emit(self.last_final)
        press.finals += 1
        press.last_partial = ""
        return True

    def _event(self, press: Press, session: SttSession, turn: Turn) -> dict:
        latency = 0 if press.released_at is None else (time.monotonic() - press.released_at) * 1000
        spool = press.spool
        if (
            spool is not None
            and spool.restored
            and isinstance(spool.meta.get("released_at"), (int, float))
        ):
            latency = max(0.0, (time.time() - spool.meta["released_at"]) * 1000)
        extra: dict[str, Any] = {}
        if press.lost_samples:
            extra["gap_ms"] = int(press.lost_samples * 1000 / self.s.sample_rate)
        if press.late:
            extra["late"] = True
            if press.pressed_wall is not None:
                extra["pressed_at"] = round(press.pressed_wall, 3)
        if press.engine == "local":
            extra["engine"] = "local"
        if turn.language_code and isinstance(turn.language_code, str):
            extra["language_code"] = turn.language_code
        return events.final_event(
            turn.transcript,
            turn.turn_order,
            session.id or "",
            press.press_id,
            self._audio_ms(press),
            int(latency),
            ts=time.time(),
            **extra,
        )

    def _audio_ms(self, press: Press) -> int:
        if press.audio_ms:
            return int(round(press.audio_ms))
        return int((self.ring.end - press.start_pos) * 1000 / self.s.sample_rate)

    def overdue(self, press: Press) -> None:
        """No end-of-turn in time after ForceEndpoint: replay if words are at stake, else end."""
        session = press.session
        error = session.pending_error if session is not None else None
        unfinished_words = bool(press.last_partial) and not press.overdue_replayed
        if session is None or (error is None and not unfinished_words):
            if press.last_partial:
                self._sessions.fail(
                    press,
                    None,
                    "no end-of-turn after ForceEndpoint, on two "
                    f"sessions; the turn's words were: {press.last_partial}",
                )
                return
            log.info("press %d: no end-of-turn after ForceEndpoint; finishing", press.press_id)
            press.waited_out = True
            outcome = Outcome.FINAL if press.finals else Outcome.SILENT
            self._sessions.end(press, outcome, terminate=True)
            return
        press.overdue_replayed = press.overdue_replayed or error is None
        code = error.code if error else None
        reason = error.message if error else "no end-of-turn after ForceEndpoint"
        log.info("press %d: %s; replaying on a new session", press.press_id, reason)
        closed = SessionClosed(
            code=code, reason=reason, before_begin=False, policy=policy_for(code, reason)
        )
        self._recovery.session_failed(press, closed)
        session.close(0)

    def delivery_overdue(self, press: Press) -> None:
        """The last final is not out within ``FINAL_OUT_WAIT_S``."""
        log.debug(
            "press %d: final not out in %g s (a slow output, e.g. typing); ending the press anyway",
            press.press_id,
            FINAL_OUT_WAIT_S,
        )
        self._sessions.end(press, Outcome.FINAL, terminate=True)
