"""Issue 27 through the real daemon: presses made while the server is unreachable survive a
restart (SIGTERM, SIGKILL), a truncated file planted in the spool, and the spool's size bound.

Run 1: ``pttd run`` with the WAV mic against a closed port (unreachable), three presses. Run 2:
``pttd run`` again on the same spool directory against the fake v3 server: the three presses come
out as ``final`` events, in order, once each, ``late: true`` with ``pressed_at``, and the files
are gone. The fake server records what each session received: each session's audio is the audio
of its own press (found in the WAV by content), so the order is the presses' order.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import numpy as np

from tests.daemon_proc import E2E_KEY, DaemonProcess, speech_wav, write_config

RATE = 16000
# three loud bursts (1.0-2.5 s, 4.0-5.5 s, 7.0-8.5 s), then quiet
LAYOUT = ((1000, False),) + ((1500, True), (1500, False)) * 3 + ((40000, False),)
PRESSES = [(800 + k * 3000, 2700 + k * 3000) for k in range(3)]
HELLO = "Hello world."


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v3/ws"


class Setup:
    def __init__(self, tmp_path: Path, spool_extra: str = ""):
        self.tmp = tmp_path
        self.spool = tmp_path / "state" / "spool"   # made by pttd (0700)
        self.wav = tmp_path / "mic.wav"
        self.samples = speech_wav(self.wav, layout=LAYOUT)
        self.sock = tmp_path / "ctl.sock"
        self.spool_extra = spool_extra

    def start(self, url: str) -> DaemonProcess:
        cfg = write_config(self.tmp / "pttd.toml", url=url, key=E2E_KEY, wav=self.wav,
                           socket=self.sock,
                           tail=f'[spool]\ndir = "{self.spool}"\n{self.spool_extra}\n')
        d = DaemonProcess(cfg, self.sock)
        d.wait_ready()
        return d

    def files(self) -> list[Path]:
        return sorted(self.spool.iterdir()) if self.spool.exists() else []


def wait_status(d: DaemonProcess, pred, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = d.command("status")
        if pred(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched: {status}")
        time.sleep(0.05)  # polling the daemon's published state, bounded


def offline_presses(s: Setup) -> tuple[DaemonProcess, list[float]]:
    """Run 1: three presses while the server is unreachable; returns the daemon and the wall
    time of each press."""
    d = s.start(closed_url())
    pressed = []
    for press_ms, release_ms in PRESSES:
        d.wait_audio_ms(press_ms)
        pressed.append(time.time())
        assert d.command("press")["ok"]
        d.wait_audio_ms(release_ms)
        assert d.command("release")["ok"]
    d.wait_event(lambda e: e["event"] == "state" and e["state"] == "offline", timeout=10)
    return d, pressed


def delivered_again(s: Setup, fake_v3, pressed) -> float:
    """Run 2 with the server back delivers the spooled presses (``check_delivered``); returns
    start-up -> first final."""
    d2, srv, first_s = deliver(s, fake_v3)
    try:
        check_delivered(s, d2, srv, pressed)
    finally:
        d2.kill()
    return first_s


def deliver(s: Setup, fake_v3, ids=(1, 2, 3)) -> tuple[DaemonProcess, object, float]:
    """Run 2: the server is back. Returns the daemon, the server, and start-up -> first final."""
    srv = fake_v3(script=["hello world"], api_keys={E2E_KEY})
    t0 = time.monotonic()
    d = s.start(srv.url)
    first = d.wait_event(lambda e: e["event"] == "final", timeout=30)
    took = time.monotonic() - t0
    assert first["press_id"] == ids[0]
    for k in ids[1:]:
        d.wait_event(lambda e, k=k: e["event"] == "final" and e["press_id"] == k, timeout=30)
    return d, srv, took


def check_delivered(s: Setup, d: DaemonProcess, srv, pressed: list[float], ids=(1, 2, 3)):
    finals = [e for e in d.all_events if e["event"] == "final"]
    assert [f["press_id"] for f in finals] == list(ids), finals   # in order, once each
    assert all(f["text"] == HELLO and f["late"] is True for f in finals)
    for f in finals:
        assert abs(f["pressed_at"] - pressed[f["press_id"] - 1]) < 1.0, (f, pressed)
    assert not [e for e in d.all_events if e["event"] == "error" and "press_id" in e]
    # each session carried its own press's audio: the first 50 ms frame is found in the WAV
    # at that press's start (press - 500 ms pre-roll)
    wav = s.samples.tobytes()
    for conn, pid in zip(srv.connections, ids):
        head = conn.audio_frames()[0].data[:3200]
        at_ms = wav.find(head) // 2 * 1000 // RATE
        assert abs(at_ms - (PRESSES[pid - 1][0] - 500)) <= 120, (pid, at_ms)
    # the files are removed once delivered (by the spool thread, just after each final)
    deadline = time.monotonic() + 5
    while s.files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.files() == []
    assert d.command("status")["waiting"] == 0
    code, _ = d.stop()
    assert code == 0
    assert not any("Traceback" in line for line in d.stderr_lines), "".join(d.stderr_lines)


def check_files(s: Setup, n: int) -> list[Path]:
    files = s.files()
    assert len(files) == n, files
    assert stat.S_IMODE(s.spool.stat().st_mode) == 0o700
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.name.endswith(".wav") and not f.name.startswith(".")
    return files


def test_sigterm_then_restart_delivers_three_late_finals_in_order(tmp_path, fake_v3):
    s = Setup(tmp_path)
    d, pressed = offline_presses(s)
    try:
        # SIGTERM at once: the last press's post-roll may not even be captured yet
        status = wait_status(d, lambda st: st["waiting"] == 3, timeout=5)
        assert status["state"] == "offline" and 6 < status["waiting_s"] < 10, status
        code, took = d.stop(signal.SIGTERM)
        assert code == 0 and took < 5.0
        # retries are reported (errors without a press_id); no press ended here
        assert not [e for e in d.all_events if e["event"] == "final" or "press_id" in e]
    finally:
        d.kill()
    files = check_files(s, 3)
    seconds = sum((f.stat().st_size - 44) / 2 / RATE for f in files)
    print(f"\nspool: {sum(f.stat().st_size for f in files)} bytes for {seconds:.2f} s of audio "
          f"= {sum(f.stat().st_size for f in files) / seconds:.0f} bytes per spooled second")
    first_s = delivered_again(s, fake_v3, pressed)
    print(f"spool: start-up (exec of pttd run) -> first spooled final {first_s * 1000:.0f} ms")


def test_sigkill_then_restart_delivers_them_all_once(tmp_path, fake_v3):
    s = Setup(tmp_path)
    d, pressed = offline_presses(s)
    try:
        # a press is on disk once it waits with its audio complete: then nothing can lose it
        wait_status(d, lambda st: st["spooled"] == 3)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(5)
    finally:
        d.kill()
    check_files(s, 3)
    delivered_again(s, fake_v3, pressed)


def test_a_truncated_file_is_ignored_and_removed_the_others_delivered(tmp_path, fake_v3):
    s = Setup(tmp_path)
    d, pressed = offline_presses(s)
    try:
        d.stop(signal.SIGTERM)
    finally:
        d.kill()
    files = check_files(s, 3)
    # a power cut mid-write, planted: a whole-named file cut short (first in the queue), and a
    # temporary file left behind
    data = files[0].read_bytes()
    truncated = s.spool / "0000000000-7.wav"
    truncated.write_bytes(data[: len(data) // 2])
    temp = s.spool / ".0000000009-8.wav.tmp"
    temp.write_bytes(data[:1000])
    unrelated = s.spool / "notes.txt"  # not ours: left alone
    unrelated.write_text("x")
    d2, srv, _ = deliver(s, fake_v3)
    try:
        assert not truncated.exists() and not temp.exists() and unrelated.exists()
        unrelated.unlink()
        assert not [e for e in d2.all_events if e.get("press_id") in (7, 8)]
        assert any("0000000000-7.wav" in line for line in d2.stderr_lines), d2.stderr_lines
        check_delivered(s, d2, srv, pressed)
    finally:
        d2.kill()


def test_spool_size_bound_drops_the_oldest_with_an_error(tmp_path, fake_v3):
    # each press is ~2.75 s = ~88 KB on disk: two fit in 0.2 MB, three do not
    s = Setup(tmp_path, spool_extra="max_mb = 0.2")
    d, pressed = offline_presses(s)
    try:
        err = d.wait_event(lambda e: e["event"] == "error" and "dropped" in e["message"],
                           timeout=10)
        assert err["press_id"] == 1 and "press 1 dropped" in err["message"]
        assert "0000000001-1.wav" in err["message"] and "spool.max_mb" in err["message"]
        wait_status(d, lambda st: st["spooled"] == 2 and st["waiting"] == 2)
        d.stop(signal.SIGTERM)
    finally:
        d.kill()
    files = check_files(s, 2)
    assert sum(f.stat().st_size for f in files) <= 0.2 * 1024 * 1024
    d2, srv, _ = deliver(s, fake_v3, ids=(2, 3))
    try:
        finals = [e for e in d2.all_events if e["event"] == "final"]
        assert [f["press_id"] for f in finals] == [2, 3]
        assert all(f["late"] is True for f in finals)
        code, _ = d2.stop()
        assert code == 0
    finally:
        d2.kill()


def test_an_unusable_spool_dir_is_exit_2_naming_the_key(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("")
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=((1000, False),))
    cfg = write_config(tmp_path / "pttd.toml", url=closed_url(), key=E2E_KEY, wav=wav,
                       socket=tmp_path / "ctl.sock", tail=f'[spool]\ndir = "{blocker}/spool"\n')
    proc = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "spool.dir" in proc.stderr and "Traceback" not in proc.stderr
    cfg.write_text(cfg.read_text().replace(f'dir = "{blocker}/spool"', 'dir = "relative/spool"'))
    proc = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "spool.dir" in proc.stderr, proc.stderr
