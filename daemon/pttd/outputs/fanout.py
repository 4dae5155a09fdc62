"""The fan-out: every event the controller emits (events.py) goes to every output sink.

The controller calls ``Outputs.emit(event)`` and must never stall on an output or see one
raise. So ``Outputs`` gives each sink its own small worker thread and bounded queue: a
stdout pipe nobody reads, or a wedged journald, blocks only its own worker, the others carry on.
Sinks themselves stay plain synchronous objects (the ``Sink`` protocol below); each lives in
its own module next to this one (stdout.py, journal.py, hook.py, keyboard.py; the kiosk and
MQTT, which also take commands, in frontends/).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from pttd.core.mailbox import Mailbox

log = logging.getLogger(__name__)


class Sink(Protocol):
    """An output: ``emit`` gets every event (a plain dict, not to be changed), in order, on the
    sink's own worker thread; ``close`` comes once, after the last event.

    Two optional attributes: ``inline = True`` for a sink whose ``emit`` only queues without
    blocking (the control socket's): it is called on the emitting thread, as a worker would only
    add a wake-up. ``skips``: the event kinds it ignores (e.g. ``{EventKind.PARTIAL}``), never
    queued for it.
    """

    def emit(self, event: dict) -> None: ...
    def close(self) -> None: ...


def is_inline(sink: Sink) -> bool:
    """True for a sink that asks to be called on the emitting thread (its emit never blocks)."""
    return bool(getattr(sink, "inline", False))


def skipped_kinds(sink: Sink) -> frozenset:
    """The event kinds a sink ignores (its ``skips``): they are not queued for its worker, which
    would only wake up to drop them (journald and partials, several a second while speaking)."""
    return frozenset(getattr(sink, "skips", ()))


class Outputs:
    """Delivers every event to every sink, in order, without blocking or raising into the caller.

    Each sink gets a worker thread fed by a bounded queue (``queue_size`` events). When a
    sink falls that far behind, new events for *that* sink are dropped and counted (logged
    once per backlog): memory stays bounded and the other sinks are unaffected.
    ``threaded=False`` calls every sink inline (tests, short-lived commands); an ``inline``
    sink (see ``is_inline``) is always called inline.
    """

    def __init__(self, sinks: Iterable[Sink], threaded: bool = True, queue_size: int = 256):
        self.sinks = list(sinks)
        self._inline = [s for s in self.sinks if not threaded or is_inline(s)]
        self._workers = [
            _SinkWorker(s, queue_size) for s in self.sinks if threaded and not is_inline(s)
        ]
        self._inline_failed: set[int] = set()
        self._inline_failures = 0

    @property
    def failures(self) -> int:
        """How many deliveries raised, over every sink (each is logged; the others still get
        the event)."""
        return self._inline_failures + sum(w.failures for w in self._workers)

    def emit(self, event: dict, on_delivered: Callable[[], None] | None = None) -> None:
        """Hand ``event`` to every sink. ``on_delivered`` (optional) is called once, on whichever
        thread is last, when the inline sinks and every worker that takes the event have
        delivered it (or dropped it); a worker that never gets to it never calls it."""
        kind = event.get("event")
        takers = [w for w in self._workers if kind not in w.skips]
        receipt = None if on_delivered is None else _Receipt(event, len(takers) + 1, on_delivered)
        item = event if receipt is None else receipt
        for worker in takers:
            if not worker.put(item) and receipt is not None:
                receipt.done()
        for sink in self._inline:
            if _deliver(sink, event, first_failure=id(sink) not in self._inline_failed):
                continue
            self._inline_failed.add(id(sink))
            self._inline_failures += 1
        if receipt is not None:
            receipt.done()  # the emitter's own count: the callback never runs before this point

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds in all), then close every sink."""
        for worker in self._workers:
            worker.finish()
        deadline = _deadline(timeout)
        for worker in self._workers:
            worker.join(deadline)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001
                log.exception("closing output %s failed", type(sink).__name__)


_STOP = object()


class _Receipt:
    """An event that its emitter waits for: calls ``on_delivered`` once all ``count`` holders
    (the workers that take it, and the emitter itself) are done with it. The controller ends a
    press only after its final is out (controller.py)."""

    __slots__ = ("event", "_left", "_lock", "_on_delivered")

    def __init__(self, event: dict, count: int, on_delivered: Callable[[], None]):
        self.event = event
        self._left = count
        self._lock = threading.Lock()
        self._on_delivered = on_delivered

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._on_delivered()


class _SinkWorker:
    """One sink's thread and bounded queue."""

    def __init__(self, sink: Sink, queue_size: int):
        self.sink = sink
        self.skips = skipped_kinds(sink)
        self._queue = Mailbox(queue_size)
        self._dropped = 0
        self._failed = False
        self.failures = 0
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"pttd-out-{type(sink).__name__}"
        )
        self._thread.start()

    def put(self, event: dict | _Receipt) -> bool:
        """Queue an event; False when the sink is too far behind and it was dropped."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "output %s is %d events behind; dropping new events for it",
                    type(self.sink).__name__,
                    self._queue.maxsize,
                )
            return False

    def finish(self) -> None:
        """Queue the stop marker (past the bound if need be: it is never refused)."""
        self._queue.put_marker(_STOP)

    def join(self, deadline: float) -> None:
        self._thread.join(max(0.0, deadline - _now()))
        if self._thread.is_alive():
            log.warning(
                "output %s did not finish in time; %d events undelivered",
                type(self.sink).__name__,
                self._queue.qsize(),
            )

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if self._dropped:
                log.warning(
                    "output %s caught up; %d events were dropped",
                    type(self.sink).__name__,
                    self._dropped,
                )
                self._dropped = 0
            receipt = event if type(event) is _Receipt else None
            if receipt is not None:
                event = receipt.event
            if not _deliver(self.sink, event, first_failure=not self._failed):
                self._failed = True
                self.failures += 1
            if receipt is not None:
                receipt.done()


def _deliver(sink: Sink, event: dict, first_failure: bool) -> bool:
    """Call ``sink.emit``; log only the first failure of each sink (with its traceback)."""
    try:
        sink.emit(event)
        return True
    except Exception:  # noqa: BLE001 - a broken output must never take the controller down
        if first_failure:
            log.exception("output %s failed (further failures not logged)", type(sink).__name__)
        return False


def _now() -> float:
    return time.monotonic()


def _deadline(timeout: float) -> float:
    return _now() + timeout
