"""The controller's queue is bounded: overflow drops the item and says so, never blocks."""
import threading

from pttd.controller import QUEUE_BOUND, Controller, Settings
from pttd.ring import RingBuffer


def test_queue_overflow_drops_and_counts_without_blocking():
    ring = RingBuffer(16000, 16000)
    emitted = []
    c = Controller(ring=ring, settings=Settings(), session_factory=None, emit=emitted.append)
    # not started: nothing drains the queue
    done = threading.Event()

    def flood():
        for _ in range(QUEUE_BOUND + 10):
            c.post(object())
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(5)
    assert c.dropped_items == 10
    reply = c.command("press")
    assert reply == {"ok": False, "error": "pttd is overloaded; command dropped"}
    assert c.command("status")["ok"] is True  # status reads the published state, never queued
