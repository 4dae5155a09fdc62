"""One final per turn, whichever formatting pattern the AssemblyAI server uses.

With ``format_turns`` on, the server may send an unformatted end-of-turn Turn and then a
formatted copy (pattern A), or only the formatted one (pattern B, the U3 models). The owner must
see exactly one final per ``turn_order`` either way.
"""

from __future__ import annotations

from pttd.stt.base import FinalTurn, Turn


class TurnAssembler:
    """One final per ``turn_order``.

    With ``format_turns`` on, an unformatted end-of-turn message is held for a short grace
    period in case a formatted copy follows (pattern A); a formatted one (pattern B) is
    delivered at once. Later copies of a delivered turn are dropped.
    """

    def __init__(self, format_turns: bool, grace_s: float = 1.5):
        self.format_turns = format_turns
        self.grace_s = grace_s
        self._delivered: set[int] = set()
        self._held: dict[int, tuple[Turn, float]] = {}

    def feed(self, turn: Turn, now: float) -> list[FinalTurn]:
        """Take one Turn; return the finals that are now due (in turn order)."""
        out = self._release_older(turn.turn_order)
        if not turn.end_of_turn or turn.turn_order in self._delivered:
            return out
        if turn.turn_is_formatted or not self.format_turns:
            self._held.pop(turn.turn_order, None)
            return out + [self._deliver(turn)]
        self._held.setdefault(turn.turn_order, (turn, now + self.grace_s))
        return out

    def is_final_pending(self, turn_order: int) -> bool:
        return turn_order in self._held

    def deadline(self) -> float | None:
        return min((d for _, d in self._held.values()), default=None)

    def expire(self, now: float) -> list[FinalTurn]:
        due = sorted(k for k, (_, d) in self._held.items() if d <= now)
        return [self._deliver(self._held.pop(k)[0]) for k in due]

    def flush(self) -> list[FinalTurn]:
        """Session ending (Termination, close): deliver whatever is held."""
        return [self._deliver(self._held.pop(k)[0]) for k in sorted(self._held)]

    def _release_older(self, turn_order: int) -> list[FinalTurn]:
        older = sorted(k for k in self._held if k < turn_order)
        return [self._deliver(self._held.pop(k)[0]) for k in older]

    def _deliver(self, turn: Turn) -> FinalTurn:
        self._delivered.add(turn.turn_order)
        return FinalTurn(turn=turn, formatted=turn.turn_is_formatted)
