"""``pttd run`` as systemd runs it: an ALSA mic through real alsa-lib (S32 stereo 48 kHz, the
I2S MEMS format, fed by a FIFO in real time), sd_notify on our own NOTIFY_SOCKET, the fake server.
"""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from tests.alsa_fifo import FifoMic, wait_until
from tests.daemon_proc import DaemonProcess, write_config

KEY = "appliance-key-01"
RATE_IN = 48000


def mems_signal(start: int, n: int) -> np.ndarray:
    """Right channel silent, left: 24-bit data left-justified, 'speech' from 1.5 s to 3.5 s."""
    t = (start + np.arange(n)) / RATE_IN
    loud = (t >= 1.5) & (t < 3.5)
    left = np.where(loud, 0.3 * np.sin(2 * np.pi * 440 * t), 0.0005 * np.sin(2 * np.pi * 97 * t))
    left32 = (left * (2 ** 31 - 256)).astype(np.int64) & ~0xFF
    out = np.zeros((n, 2), dtype="<i4")
    out[:, 0] = left32
    return out


class NotifySocket:
    """Our own NOTIFY_SOCKET, read continuously on a thread (as systemd does)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages += [(time.monotonic(), line) for line in data.splitlines()]
                self._cond.notify_all()

    def pump(self, until=None, timeout=10.0) -> bool:
        """Wait (bounded) until ``until(messages)``; without a predicate, just wait ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while time.monotonic() < deadline:
                if until is not None and until(list(self.messages)):
                    return True
                self._cond.wait(max(0.0, min(0.1, deadline - time.monotonic())))
        return until is None

    def lines(self):
        with self._cond:
            return [m for _, m in self.messages]

    def clear(self):
        with self._cond:
            self.messages.clear()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def alsa_config(tmp_path, srv, mic, sock):
    """The I2S MEMS settings: S32 stereo 48 kHz, left channel."""
    return write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, socket=sock, audio=f"""
device = "{mic.device}"
capture_format = "S32_LE"
capture_channels = 2
capture_rate = 48000
channel = 0""")


@pytest.fixture
def mic():
    with FifoMic(mems_signal, format="S32_LE", channels=2, rate=RATE_IN, patch_env=False) as m:
        yield m


def test_alsa_mic_notify_and_a_turn(fake_v3, tmp_path, mic):
    srv = fake_v3(script=["through alsa"], api_keys={KEY})
    sock = tmp_path / "ctl.sock"
    cfg = alsa_config(tmp_path, srv, mic, sock)
    notify = NotifySocket(tmp_path / "notify.sock")
    d = DaemonProcess(cfg, sock, env={**mic.env, "NOTIFY_SOCKET": notify.path,
                                      "WATCHDOG_USEC": "400000"})
    try:
        assert notify.pump(lambda ms: any(m == "READY=1" for _, m in ms), timeout=15), notify.lines()
        d.wait_ready()
        assert notify.pump(lambda ms: sum(m == "WATCHDOG=1" for _, m in ms) >= 3, timeout=5)
        d.wait_audio_ms(1200)
        d.command("press")
        d.wait_audio_ms(3700)
        d.command("release")
        try:
            final = d.wait_event(lambda e: e["event"] == "final", timeout=20)
        except AssertionError:
            raise AssertionError("".join(d.stderr_lines))
        assert final["text"] == "Through alsa."
        assert notify.pump(lambda ms: any(m == "STATUS=finalizing" for _, m in ms), timeout=5)
        status = [m for m in notify.lines() if m.startswith("STATUS=")]
        assert {"STATUS=listening", "STATUS=finalizing", "STATUS=idle"} <= set(status)
        # the sent audio is the mic's left channel, converted: loud in the middle
        audio = b"".join(f.data for f in srv.sessions[0].audio_frames())
        pcm = np.frombuffer(audio, "<i2").astype(float)
        assert pcm.size > 16000 * 2 and np.sqrt(np.mean(pcm ** 2)) > 2000
        # a stalled mic read stops the watchdog pings (systemd would restart us)
        mic.stall(1.5)
        notify.pump(timeout=0.3)  # let the last in-flight period arrive before counting
        notify.clear()
        notify.pump(timeout=1.0)
        assert "WATCHDOG=1" not in notify.lines(), notify.lines()
        assert notify.pump(lambda ms: any(m == "WATCHDOG=1" for _, m in ms), timeout=8)
        code, took = d.stop()
        assert code == 0 and took < 5.0
        notify.pump(lambda ms: any(m.startswith("STOPPING=1") for _, m in ms), timeout=2)
        assert "STOPPING=1" in notify.lines()
    finally:
        d.kill()
        notify.close()


def test_missing_mic_keeps_daemon_up_offline_then_recovers(fake_v3, tmp_path, mic):
    srv = fake_v3(api_keys={KEY})
    sock = tmp_path / "ctl.sock"
    cfg = alsa_config(tmp_path, srv, mic, sock)
    mic.vanish()
    notify = NotifySocket(tmp_path / "notify.sock")
    d = DaemonProcess(cfg, sock, env={**mic.env, "NOTIFY_SOCKET": notify.path})
    try:
        assert notify.pump(lambda ms: any(m == "READY=1" for _, m in ms), timeout=15)
        d.wait_ready()
        assert wait_until(lambda: d.command("status")["state"] == "offline", 10)
        assert "mic not found" in d.command("status")["detail"]
        err = d.wait_event(lambda e: e["event"] == "error")
        assert "mic" in err["message"]
        mic.restore()
        assert wait_until(lambda: d.command("status")["state"] == "idle", 15)
        assert d.stop()[0] == 0
    finally:
        d.kill()
        notify.close()
