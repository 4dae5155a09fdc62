"""Presses waiting for the network (the offline queue): their audio kept, and with a spool on disk.

A released press that waits (no network, or queued behind an earlier press) has its audio
copied out of the ring buffer once it is all captured, so the ring can go on overwriting; in
memory, ``offline_queue_s`` of audio in all at most (past it the oldest waiting press is
dropped, with an error event). With a spool (spool.py) the copy is also written to disk, then
leaves memory; the press is read back when it is sent. Spooled presses older than
``spool.max_age_h`` are dropped. One still waiting when pttd stops is left in the spool
("spooled"), and the next run loads it under the same id, sends it and ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pttd import events
from pttd.audio.ring import snapshot
from pttd.core.press import Outcome, Press, PressPhase
from pttd.core.sessions import PressSessions

if TYPE_CHECKING:
    from pttd.core.controller import Context
    from pttd.core.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpoolDone:
    """The spool thread has written a press's file (``error`` None) or failed to."""

    entry: SpoolEntry
    error: str | None


class OfflineQueue:
    """Keeps the audio of presses waiting for the network: in memory (bounded), on disk."""

    def __init__(
        self,
        ctx: Context,
        sessions: PressSessions,
        spool: Spool | None,
        post_marker: Callable[[object], None],
    ):
        """``post_marker`` puts an item on the controller's queue past its bound (a write's
        result is never refused: the spool's own queue bounds how many there can be)."""
        self.s = ctx.settings
        self.ring = ctx.ring
        self._presses = ctx.presses
        self._status = ctx.status
        self._emit = ctx.emit
        self._sessions = sessions
        self._spool = spool
        self._post_marker = post_marker

    def load(self) -> None:
        """Take up the presses an earlier run left in the spool, oldest first, under their own
        ids (new presses are numbered after them). They wait like presses made offline."""
        if self._spool is None:
            return
        entries, problems = self._spool.load()
        for problem in problems:
            log.warning("spool: %s", problem)
        for entry in entries:
            m = entry.meta
            press = Press(entry.press_id, int(m.get("start_pos") or 0), time.monotonic())
            press.released_at = time.monotonic()  # released long ago (``released_wall``)
            press.end_pos = int(m.get("end_pos") or (m["audio_start"] + entry.samples))
            replay = m.get("replay_pos")
            press.replay_pos = int(replay) if isinstance(replay, int) else None
            press.lost_samples = int(m.get("lost_samples") or 0)
            press.pressed_wall = m.get("pressed_at")
            press.late = True
            press.spool = entry
            self._presses.restore(press)
        if entries:
            log.info("spool: %d press(es) from an earlier run wait to be sent", len(entries))

    def keep_audio(self) -> None:
        """Copy the audio of released presses that wait for the network out of the ring, and
        (with a spool) write it to disk: a press is spooled the first time this runs after it
        is WAITING, released and its audio (post-roll included, plus one chunk) is in the ring.
        Once its file is written its audio leaves memory (it is read back to be sent).

        Audio held in memory is bounded by ``offline_queue_s`` in all: the oldest waiting press
        is dropped past it (with a spool, only presses whose file is not written yet count).
        """
        chunk = self.s.chunk_samples
        waiting = [
            p
            for p in self._presses.live()
            if p.phase is PressPhase.WAITING and p.end_pos is not None
        ]
        for press in waiting:
            assert press.end_pos is not None
            if (
                press.audio is None
                and press.spool is None
                and self.ring.end >= press.end_pos + chunk
            ):
                start = press.replay_pos if press.replay_pos is not None else press.start_pos
                press.audio = snapshot(self.ring, start, press.end_pos + chunk)
                press.lost_samples += press.audio.start - start
                self._write(press)
            elif (
                press.audio is not None
                and press.spool is not None
                and press.spool.state == "written"
            ):
                press.audio = None
        waiting = [p for p in waiting if not p.ended]
        limit = int(self.s.offline_queue_s * self.s.sample_rate)
        kept = [p for p in waiting if p.audio is not None]
        while kept and sum(p.audio.samples for p in kept if p.audio is not None) > limit:
            oldest = kept.pop(0)
            self._sessions.fail(
                oldest,
                None,
                f"press {oldest.press_id} dropped: more than "
                f"{self.s.offline_queue_s:g} s of audio waiting for the network",
            )

    def _write(self, press: Press) -> None:
        """Queue the file of a waiting press whose audio is complete (``press.audio``); the spool
        thread writes it and says so (``SpoolDone``). Room is made by dropping the oldest
        spooled presses that have not started sending; a press that cannot fit stays in memory."""
        if self._spool is None or press.spool is not None or press.audio is None:
            return
        audio = press.audio
        pcm = audio.read(audio.start, audio.samples).data
        size = self._spool.file_size(len(pcm) // 2)
        if size > self._spool.max_bytes or not self._make_room(size):
            log.warning(
                "press %d: %.1f s of audio does not fit in the spool (max %g MB): it "
                "waits in memory only",
                press.press_id,
                len(pcm) / 2 / self.s.sample_rate,
                self._spool.max_bytes / 1048576,
            )
            return
        now_wall, now_mono = time.time(), time.monotonic()
        released = press.released_at if press.released_at is not None else now_mono
        meta = {
            "press_id": press.press_id,
            "pressed_at": press.pressed_wall,
            "released_at": now_wall - (now_mono - released),
            "spooled_at": now_wall,
            "sample_rate": self.s.sample_rate,
            "audio_start": audio.start,
            "start_pos": press.start_pos,
            "end_pos": press.end_pos,
            "replay_pos": press.replay_pos,
            "lost_samples": press.lost_samples,
            "engine": press.engine,
            "attempts": press.attempts,
            "why": self._status.net_down or "waiting for an earlier press or a retry",
        }
        press.spool = self._spool.add(meta, pcm, self._written)

    def _written(self, entry: SpoolEntry, error: str | None) -> None:
        """On the spool thread: hand the result to the controller's thread."""
        self._post_marker(SpoolDone(entry, error))

    def _make_room(self, size: int) -> bool:
        """Drop the oldest spooled presses not yet sending until ``size`` more bytes fit."""
        assert self._spool is not None
        spooled = [p for p in self._presses.live() if p.spool is not None]
        kept = [p for p in self._presses if p.outcome is Outcome.SPOOLED]  # (pttd is stopping)
        total = sum(p.spool.size for p in spooled + kept if p.spool is not None)
        candidates = [p for p in spooled if p.phase in (PressPhase.WAITING, PressPhase.CONNECTING)]
        while total + size > self._spool.max_bytes and candidates:
            oldest = candidates.pop(0)
            assert oldest.spool is not None
            total -= oldest.spool.size
            self._sessions.fail(
                oldest,
                None,
                f"press {oldest.press_id} dropped: the spool holds at "
                f"most {self._spool.max_bytes / 1048576:g} MB of presses waiting for "
                f"the network (spool.max_mb); {self._spool.dir / oldest.spool.name} "
                "removed",
            )
        return total + size <= self._spool.max_bytes

    def on_spool_done(self, done: SpoolDone, *, stopping: bool) -> None:
        press = self._presses.of_spool_entry(done.entry)
        if done.error is not None:
            done.entry.state = "failed"
            if press is not None and not press.ended:
                press.spool = None  # its audio is still in memory: it waits there
                message = (
                    f"press {press.press_id}: cannot write it to the spool ({done.error}); "
                    "it waits in memory only"
                )
                self._emit(events.error_event(None, message, None))
                if stopping and press.phase is PressPhase.WAITING:
                    self._sessions.fail(press, None, "pttd stopped before this press could be sent")
            return
        done.entry.state = "written"
        if press is None or press.ended:
            return  # (its removal is queued after the write)
        if stopping and press.phase is PressPhase.WAITING:
            self._sessions.end(press, Outcome.SPOOLED, terminate=False)

    def expire(self) -> None:
        """Spooled presses waiting past ``max_age_h`` end with an error (oldest first; none is
        opened while they go)."""
        spool = self._spool
        if spool is None or not spool.max_age_s:
            return
        now = time.time()
        old = [
            p
            for p in self._presses.live()
            if p.spool is not None and p.phase is PressPhase.WAITING and spool.expired(p.spool, now)
        ]
        if not old:
            return
        with self._sessions.queue_held():
            for press in old:
                assert press.spool is not None
                self._sessions.fail(press, None, spool.expired_reason(press.spool))

    def carry_over(self, press: Press) -> bool:
        """pttd is stopping with this press not yet sent: leave it in the spool for the next
        run. A press still held, or whose post-roll is not captured yet, is cut at the audio
        there is (as a stop does to a streaming press). False: it cannot be kept."""
        if self._spool is None or press.finals:
            return False
        if press.phase is PressPhase.CONNECTING:
            session, press.session = press.session, None
            if session is not None:
                session.close(0)
            press.move(PressPhase.WAITING)
        if press.spool is None:
            if press.audio is None:
                start = press.replay_pos if press.replay_pos is not None else press.start_pos
                end = self.ring.end if press.end_pos is None else min(press.end_pos, self.ring.end)
                if end <= max(start, self.ring.start):
                    return False
                press.released_at = press.released_at or time.monotonic()
                press.end_pos = end
                press.audio = snapshot(self.ring, start, end + self.s.chunk_samples)
                press.lost_samples += press.audio.start - start
            self._write(press)
            if press.spool is None:
                return False
        if press.spool.state == "written":
            self._sessions.end(press, Outcome.SPOOLED, terminate=False)
        return True  # a write still queued: it ends when the spool says it is on disk

    def close(self, timeout: float) -> None:
        """pttd stops: finish the spool's queued writes and removals (bounded)."""
        if self._spool is not None:
            self._spool.close(max(0.2, timeout))
