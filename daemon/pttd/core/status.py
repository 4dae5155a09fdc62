"""What pttd says of itself: its state, and the numbers the ``status`` command reports.

The state follows the newest press in flight (connecting, listening, finalizing), unless
something outside the presses overrides it: the mic is offline, the server cannot be reached,
or the key was refused. Each change is a ``state`` event and an ``on_state`` call (the LEDs).
The published values are plain attributes, read from other threads (``status``, the kiosk);
only the controller's thread writes them.
"""

from __future__ import annotations

from collections.abc import Callable

from pttd import events
from pttd.core.budget import SessionBudget
from pttd.core.press import PressPhase
from pttd.core.presses import Presses
from pttd.events import State


class Status:
    """The published state and numbers, and why the state is not simply the presses'."""

    def __init__(
        self,
        presses: Presses,
        budget: SessionBudget,
        sample_rate: int,
        emit: Callable[[dict], None],
        on_state: Callable[[State, str], None] | None,
    ):
        self._presses = presses
        self._budget = budget
        self._sample_rate = sample_rate
        self._emit = emit
        self._on_state = on_state
        self._frozen = False
        self.state = State.IDLE
        self.detail = ""
        # presses waiting for the network, and the account's new-session budget (``status``)
        self.waiting: dict = {"waiting": 0, "waiting_s": 0.0, "spooled": 0}
        self.budget: dict = budget.snapshot()
        self.mic_offline: str | None = None  # why, while the capture source is offline
        self.net_down: str | None = None  # why the server cannot be reached, while so
        self.auth_blocked = False  # the key was refused: only a new press tries again

    def freeze(self) -> None:
        """pttd is stopping: the state stays as it is (the numbers are still published)."""
        self._frozen = True

    def refresh(self) -> None:
        self.publish_numbers()
        if self._frozen:
            return
        live = self._presses.live()
        if self.mic_offline:
            self.set(State.OFFLINE, self.mic_offline)
        elif self.net_down:
            self.set(State.OFFLINE, f"server unreachable: {self.net_down}")
        elif not live:
            if self.state is not State.ERROR or not self.auth_blocked:
                self.set(State.IDLE, "")
        else:
            newest = live[-1]
            if newest.released or newest.phase in (PressPhase.FINALIZING, PressPhase.DELIVERING):
                self.set(State.FINALIZING, "")
            elif newest.phase is PressPhase.STREAMING:
                self.set(State.LISTENING, "")
            else:
                retrying = newest.phase is PressPhase.WAITING and newest.deadline is not None
                self.set(State.CONNECTING, "retrying" if retrying else "")

    def on_source(self, kind: str, message: str) -> None:
        """The capture source went ``offline`` (an error event says why) or ``online``."""
        if kind == "offline":
            self.mic_offline = message
            self._emit(events.error_event(None, message, None))
        elif kind == "online":
            self.mic_offline = None
        self.refresh()

    def set(self, state: State, detail: str) -> None:
        if state is self.state and detail == self.detail:
            return
        self.state, self.detail = state, detail
        self._emit(events.state_event(state))
        if self._on_state is not None:
            self._on_state(state, detail)

    def publish_numbers(self) -> None:
        """``status``: the presses waiting for the network (released, not sending yet), their
        audio in seconds, how many of them are on disk; and the new-session budget."""
        n, samples, on_disk = 0, 0, 0
        for p in self._presses:
            if p.ended or p.end_pos is None:
                continue
            if p.phase is PressPhase.WAITING or (
                p.phase is PressPhase.CONNECTING and (p.late or p.spool is not None)
            ):
                n += 1
                start = p.replay_pos if p.replay_pos is not None else p.start_pos
                samples += max(0, p.end_pos - start)
                on_disk += p.spool is not None and p.spool.state == "written"
        waiting = {
            "waiting": n,
            "waiting_s": round(samples / self._sample_rate, 1),
            "spooled": on_disk,
        }
        if waiting != self.waiting:
            self.waiting = waiting
        budget = self._budget.snapshot()
        if budget != self.budget:
            self.budget = budget
