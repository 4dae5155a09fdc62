"""pttd.core.mailbox: the bounded SimpleQueue the controller and the output threads read."""
import queue
import threading
import time

import pytest

from pttd.core.mailbox import Mailbox


def test_fifo_bound_and_a_stop_marker_past_the_bound():
    box = Mailbox(3)
    for i in range(3):
        box.put_nowait(i)
    with pytest.raises(queue.Full):
        box.put_nowait(3)
    box.put_marker("stop")  # never refused
    assert box.qsize() == 4
    assert [box.get(timeout=1) for _ in range(4)] == [0, 1, 2, "stop"]
    box.put_nowait(4)  # room again
    assert box.get(timeout=1) == 4


def test_get_times_out_with_empty_and_wakes_on_a_put():
    box = Mailbox(2)
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        box.get(timeout=0.1)
    assert 0.09 <= time.monotonic() - t < 1.0
    got = []
    th = threading.Thread(target=lambda: got.append(box.get(timeout=5)))
    th.start()
    box.put_nowait("x")
    th.join(5)
    assert got == ["x"]


def test_racing_producers_pass_the_bound_by_at_most_one_each():
    box, producers, bound = Mailbox(10), 4, 10
    start = threading.Barrier(producers)

    def produce():
        start.wait(5)
        for i in range(1000):
            try:
                box.put_nowait(i)
            except queue.Full:
                pass

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert bound <= box.qsize() <= bound + producers - 1


def test_maxsize_must_be_positive():
    with pytest.raises(ValueError):
        Mailbox(0)
