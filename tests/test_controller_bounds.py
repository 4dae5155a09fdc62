"""The controller's queue is bounded: overflow drops the item and says so, never blocks."""
import threading

from pttd.core.controller import QUEUE_BOUND, Controller, Settings
from pttd.audio.ring import RingBuffer


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


def test_offline_queue_is_bounded_and_drops_the_oldest_press():
    """Server unreachable (a real Session to a closed port): waiting presses keep their audio
    outside the ring, up to offline_queue_s in all; past it the oldest is dropped and reported."""
    import queue
    import socket
    import time

    from pttd.config import Secret
    from pttd.stt.assemblyai.session import Session

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    events = queue.Queue()
    ring = RingBuffer(16000 * 30, 16000)
    factory = lambda on_event, engine="cloud": Session(  # noqa: E731
        f"ws://127.0.0.1:{port}/v3/ws", Secret("k"), on_event=on_event, connect_timeout=1)
    c = Controller(ring=ring, settings=Settings(offline_queue_s=2.5, postroll_ms=100),
                   session_factory=factory, emit=events.put)
    c.start()
    try:
        second = bytes(32000)
        for _ in range(3):                      # three presses of ~1.5 s each: 4.5 s > 2.5 s
            assert c.command("press")["ok"]
            for _ in range(3):
                ring.append(second[:16000])     # 0.5 s of audio per append
                time.sleep(0.05)                # let the controller see each step in order
            assert c.command("release")["ok"]
            ring.append(second)
        deadline = time.monotonic() + 10
        dropped = []
        while time.monotonic() < deadline and not dropped:
            ring.append(second[:3200])
            try:
                e = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if e["event"] == "error" and "dropped" in e["message"]:
                dropped.append(e)
        assert dropped and "press 1 dropped" in dropped[0]["message"]
        assert c.state.value == "offline"
        kept = [p for p in c._presses if not p.ended]
        assert [p.press_id for p in kept] == [2, 3]
        assert sum(p.audio.samples for p in kept if p.audio) <= 2.5 * 16000
    finally:
        c.stop(2)
