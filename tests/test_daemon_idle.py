"""``pttd run`` idle after READY=1: its main thread sleeps with no timer, and signals still stop it.

Real subprocesses (WAV mic, mock GPIO, no press, so no server is contacted) with a NOTIFY_SOCKET
bound by the test; wake-ups are read from the kernel's per-thread context-switch counter.
"""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemon_proc import E2E_KEY, DaemonProcess, speech_wav, write_config

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


@pytest.fixture
def idle_daemon(tmp_path):
    """A ``pttd run`` that has sent READY=1: (DaemonProcess, the notify socket)."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    speech_wav(tmp_path / "mic.wav")
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url="ws://127.0.0.1:9", key=E2E_KEY,
                       wav=tmp_path / "mic.wav", socket=sock)
    d = DaemonProcess(cfg, sock, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert _wait_message(notify, "READY=1", timeout=20), "".join(d.stderr_lines)
        yield d, notify
    finally:
        d.kill()
        notify.close()


def _wait_message(notify: socket.socket, prefix: str, timeout: float) -> bool:
    """Read datagrams until one starts with ``prefix`` (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(left)
        try:
            if notify.recv(4096).decode().startswith(prefix):
                return True
        except socket.timeout:
            return False
    return False


def _main_thread_switches(pid: int) -> int:
    """Voluntary context switches of the main thread: one per sleep, so one per wake-up."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")))


def test_main_thread_does_not_wake_while_idle(idle_daemon):
    """After READY=1 nothing needs the main thread; a 0.5 s poll would show 4 wake-ups here."""
    d, _ = idle_daemon
    pid = d.proc.pid
    time.sleep(0.5)  # past sending READY=1
    before = _main_thread_switches(pid)
    time.sleep(2.0)
    assert _main_thread_switches(pid) - before <= 1
    assert d.proc.poll() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_an_idle_daemon(idle_daemon, sig):
    """The untimed wait is interrupted by the signal: STOPPING=1, exit 0, well within 5 s."""
    d, notify = idle_daemon
    time.sleep(1.0)  # settled in the untimed wait
    code, took = d.stop(sig, timeout=5.0)
    assert code == 0, "".join(d.stderr_lines)
    assert took < 5.0
    assert _wait_message(notify, "STOPPING=1", timeout=1.0)
