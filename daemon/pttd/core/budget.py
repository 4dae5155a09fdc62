"""The account's new-session budget: how many sessions pttd may open in a minute.

AssemblyAI limits new streaming sessions per minute per account (free accounts start at 5; paid
at 100+), not concurrent ones; one more gives close code 3009 and a backoff of seconds to a
minute. One session per press meets that limit at the sixth press of a busy minute. The
controller asks this budget two things: may a press open a session now (else it waits, its audio
in the ring or the offline queue, until the window allows), and after a press, how long to keep
its session open so the next press needs no new one (a session is billed while open, so only
until the window frees a slot).

The limit is ``stt.sessions_per_minute`` or, with 0, learned: until the service refuses one,
sessions are never held back, and kept warm only once the window reaches the free tier's 5 (the
least any account has); after a 3009 the number this daemon had opened in the window is the
limit, until ``FORGET_S`` passes without another (the account's limit grows with use, and other
devices sharing the account come and go).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

WINDOW_S = 60.0
# before anything is known, sessions are kept warm (never held back) at this many a minute:
# the free tier's starting limit, the lowest any AssemblyAI account has
ASSUMED_LIMIT = 5
# a learned limit is forgotten this long after the last 3009
FORGET_S = 600.0
# a session held back waits this much past the moment the window frees a slot (clock skew)
SLACK_S = 0.5


class SessionBudget:
    """A sliding window of the sessions this process opened (or is opening) and the limit."""

    def __init__(self, limit: int = 0, clock: Callable[[], float] | None = None) -> None:
        import time

        self.configured = limit
        self._clock = clock or time.monotonic
        self._opened: collections.deque[tuple[float, object]] = collections.deque()
        self._learned: int | None = None
        self._learned_at = 0.0

    # --- what the controller tells it ----------------------------------------------------------

    def opened(self, key: object) -> None:
        """A session is being opened now (counted from the attempt: conservative)."""
        self._opened.append((self._clock(), key))

    def not_admitted(self, key: object) -> None:
        """That session never got in (refused or unreachable before Begin): it does not count."""
        self._opened = collections.deque(e for e in self._opened if e[1] is not key)

    def refused(self, key: object) -> None:
        """The service said 3009 to that session: the sessions in the window are the limit."""
        self.not_admitted(key)
        now = self._clock()
        seen = max(1, self.count(now))
        limit = self.limit(now)
        self._learned = seen if limit is None else min(limit, seen)
        self._learned_at = now

    # --- what it answers -----------------------------------------------------------------------

    def limit(self, now: float | None = None) -> int | None:
        """The limit to hold sessions back at (None: not known, never hold back)."""
        now = self._clock() if now is None else now
        if self._learned is not None and now - self._learned_at > FORGET_S:
            self._learned = None
        if self._learned is not None:
            return self._learned if not self.configured else min(self.configured, self._learned)
        return self.configured or None

    def count(self, now: float | None = None) -> int:
        """Sessions opened in the last ``WINDOW_S``."""
        now = self._clock() if now is None else now
        while self._opened and now - self._opened[0][0] >= WINDOW_S:
            self._opened.popleft()
        return len(self._opened)

    def wait_s(self) -> float:
        """How long a new session must wait for the window (0: open it now)."""
        now = self._clock()
        return self._until_slot(now, self.limit(now))

    def warm_s(self) -> float:
        """After a press: how long to keep its session open so that the next press does not
        need a session the window would refuse (0: the window has room, close it)."""
        now = self._clock()
        limit = self.limit(now) or ASSUMED_LIMIT
        return self._until_slot(now, limit)

    def _until_slot(self, now: float, limit: int | None) -> float:
        if limit is None:
            return 0.0
        n = self.count(now)
        if n < limit:
            return 0.0
        # the (n - limit + 1)th oldest must leave the window for one more to fit
        oldest = self._opened[n - limit][0]
        return max(0.0, oldest + WINDOW_S - now) + SLACK_S

    def snapshot(self) -> dict:
        """For ``status``: the sessions in the window and the limit held to (0: not known)."""
        now = self._clock()
        return {"sessions_last_min": self.count(now), "session_limit": self.limit(now) or 0}
