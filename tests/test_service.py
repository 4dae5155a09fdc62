"""sd_notify and the watchdog against a real NOTIFY_SOCKET datagram socket bound by the test."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from pttd.events import State
from pttd.app.service import Notifier, Watchdog, install_stop_signals, status_text, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path):
    """A bound AF_UNIX datagram socket standing in for systemd: (NOTIFY_SOCKET value, socket)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()


def recv(sock: socket.socket, timeout: float = 2.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def drain(sock: socket.socket) -> list[str]:
    sock.settimeout(0)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out


def test_ready_status_stopping(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert recv(sock) == "READY=1"
    notifier.status(status_text(State.OFFLINE, "mic not found"))
    assert recv(sock) == "STATUS=offline: mic not found"
    notifier.status("two\nlines")
    assert recv(sock) == "STATUS=two lines"
    notifier.stopping("stopping")
    assert recv(sock) == "STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_abstract_socket_address():
    name = f"pttd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("listening")
        assert recv(sock) == "READY=1\nSTATUS=listening"
        notifier.close()


def test_noop_without_notify_socket():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False
    assert not Watchdog(notifier, lambda: 0, interval_s=0.1).start().enabled


def test_send_failure_is_not_raised(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.status("x") is False
    assert notifier.status("y") is False
    assert len([r for r in caplog.records if "sd_notify" in r.message]) == 1


def test_watchdog_interval_from_environment():
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == pytest.approx(0.1)
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": me}) == pytest.approx(0.1)
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "nonsense"}) is None
    assert watchdog_interval({}) is None


def test_watchdog_pings_only_while_progress_advances(notify_socket):
    path, sock = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    counter = [0]
    watchdog = Watchdog(Notifier(env), lambda: counter[0], environ=env)
    assert watchdog.interval_s == pytest.approx(0.1)
    watchdog.start()
    try:
        # Capture running: periods advance, pings arrive.
        assert _pings_while(sock, lambda: counter.__setitem__(0, counter[0] + 1), want=3)

        # Capture stalls: after the tick that saw the last period, no more pings.
        # (skipped counts ticks without progress since the last ping.)
        drain(sock)
        _wait_until(lambda: watchdog.skipped >= 4, timeout=3)
        assert drain(sock).count("WATCHDOG=1") <= 1
        _wait_until(lambda: watchdog.skipped >= 6, timeout=3)
        assert drain(sock) == []

        # Capture resumes: pings resume.
        assert _pings_while(sock, lambda: counter.__setitem__(0, counter[0] + 1), want=2)
    finally:
        watchdog.stop()


def test_watchdog_treats_a_raising_progress_as_stalled(notify_socket):
    path, sock = notify_socket

    def broken():
        raise RuntimeError("mic gone")

    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path}), broken, interval_s=0.05).start()
    try:
        _wait_until(lambda: watchdog.skipped >= 3, timeout=3)
        assert drain(sock) == []
    finally:
        watchdog.stop()


def test_watchdog_stop_interrupts_a_long_interval(notify_socket):
    path, _ = notify_socket
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": path}), lambda: 0, interval_s=60).start()
    started = time.monotonic()
    watchdog.stop(timeout=5)
    assert time.monotonic() - started < 1.0


def test_status_text():
    assert status_text(State.LISTENING) == "listening"
    assert status_text(State.OFFLINE, "mic not found") == "offline: mic not found"
    assert status_text("error", "1008 bad key\nretry") == "error: 1008 bad key retry"


def test_install_stop_signals_calls_back_and_restores():
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    restore = install_stop_signals(seen.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_until(lambda: seen, timeout=2)
        os.kill(os.getpid(), signal.SIGINT)
        _wait_until(lambda: len(seen) == 2, timeout=2)
    finally:
        restore()
    assert seen == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before


CHILD = textwrap.dedent("""
    import sys
    from pttd.app.service import Notifier, StopRequest, install_stop_signals
    stop = StopRequest()
    notifier = Notifier()
    install_stop_signals(stop.request)
    with stop.watching_signals():
        notifier.ready("idle")
        if not stop.wait(30):
            sys.exit(3)
    notifier.stopping()
    stop.close()
    sys.exit(0)
""")


def test_sigterm_in_a_real_process_gives_stopping(notify_socket):
    """The pattern the daemon follows: READY=1, then SIGTERM wakes StopRequest.wait → STOPPING=1,
    exit 0."""
    path, sock = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env)
    try:
        assert recv(sock, timeout=10) == "READY=1\nSTATUS=idle"
        proc.send_signal(signal.SIGTERM)
        assert recv(sock, timeout=5) == "STOPPING=1"
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _pings_while(sock: socket.socket, step, want: int, timeout: float = 3.0) -> bool:
    """Call ``step`` (advance the capture counter) every 20 ms until ``want`` pings arrive."""
    deadline = time.monotonic() + timeout
    got = 0
    sock.settimeout(0.02)
    while got < want and time.monotonic() < deadline:
        step()
        try:
            got += sock.recv(4096) == b"WATCHDOG=1"
        except socket.timeout:
            pass
    return got >= want


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)



def test_notify_never_blocks_when_the_receiver_does_not_read(tmp_path):
    """A full NOTIFY_SOCKET queue drops messages instead of blocking the controller thread."""
    import socket as _socket
    import threading as _threading

    path = str(tmp_path / "full.sock")
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(path)
    notifier = Notifier({"NOTIFY_SOCKET": path})
    done = _threading.Event()

    def flood():
        for _ in range(2000):
            notifier.status("listening")
        done.set()

    t = _threading.Thread(target=flood, daemon=True)
    t.start()
    assert done.wait(10), "sd_notify blocked on a full socket"
    notifier.close()
    receiver.close()
