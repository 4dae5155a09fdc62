"""Run ``pttd run`` as a subprocess with a config, and read its JSON-lines events (bounded waits)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

RATE = 16000


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """16-bit WAV of ``samples``: 1-D for mono, or frames × channels."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def speech_wav(path: Path, layout=((2000, False), (2000, True), (4000, False)), seed=1) -> np.ndarray:
    """Low noise everywhere (so every position is unique) with loud tone 'speech' segments."""
    rng = np.random.default_rng(seed)
    parts = []
    for ms, loud in layout:
        n = RATE * ms // 1000
        noise = rng.integers(-60, 60, n)
        if loud:
            t = np.arange(n) / RATE
            noise = noise + 9000 * np.sin(2 * np.pi * 300 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
        parts.append(noise)
    samples = np.concatenate(parts).astype("<i2")
    write_wav(path, samples)
    return samples


def write_config(path: Path, *, url: str, socket: Path, key: str | None = None,
                 wav: Path | None = None, audio: str = "", extra: str = "", tail: str = "",
                 audio_extra: str = "",
                 stdout: str = "jsonl", journal: bool = False) -> Path:
    """A test config: mock GPIO, jsonl stdout; a WAV mic, or ``audio`` lines for [audio].

    ``extra`` goes into [stt]; ``tail`` is appended (more sections).
    """
    key_line = f'api_key = "{key}"' if key else ""
    audio_lines = f'source = "wav"\nwav = "{wav}"' if wav is not None else audio
    path.write_text(f"""
[stt]
url = "{url}"
{key_line}
{extra}
[audio]
{audio_lines}
{audio_extra}
[gpio]
pin_factory = "mock"
[control]
socket = "{socket}"
[output]
stdout = "{stdout}"
journal = {"true" if journal else "false"}
{tail}
""")
    return path


def inprocess_config(*, url: str, key: str, wav: Path, socket: Path, **output):
    """A Config for a ``Daemon`` built in-process (``pttd run``'s wiring without the CLI): the WAV
    mic, mock GPIO, no stdout or journald unless ``output`` says so."""
    from pttd import config

    return config.from_dict({
        "stt": {"url": url, "api_key": key, "format_turns": False},
        "audio": {"source": "wav", "wav": str(wav)}, "gpio": {"pin_factory": "mock"},
        "control": {"socket": str(socket)},
        "output": {"stdout": "none", "journal": False, **output},
    }, environ={})


@pytest.fixture
def inprocess_daemon(fake_v3, tmp_path):
    """``start(text, extra_sinks=(), **output)``: a started in-process ``Daemon`` with the WAV
    mic and mock GPIO, against a fake v3 server (key ``E2E_KEY``) whose turns say ``text``;
    returns ``(daemon, server)``. Every daemon is shut down at teardown (again, if the test
    already did: that is harmless)."""
    from pttd.app.daemon import Daemon

    started = []

    def start(text: str, extra_sinks=(), **output):
        srv = fake_v3(script=[text], api_keys={E2E_KEY})
        wav = tmp_path / "mic.wav"
        speech_wav(wav)
        cfg = inprocess_config(url=srv.url, key=E2E_KEY, wav=wav, socket=tmp_path / "ctl.sock",
                               **output)
        daemon = Daemon(cfg, extra_sinks=list(extra_sinks))
        daemon.build()
        daemon.start()
        started.append(daemon)
        return daemon, srv

    yield start
    for daemon in started:
        daemon.shutdown()


def wait_queue(q: "queue.Queue", pred, timeout: float, describe) -> object:
    """The first item of ``q`` matching ``pred`` within ``timeout`` (items before it are consumed)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(describe())
        try:
            item = q.get(timeout=remaining)
        except queue.Empty:
            continue
        if pred(item):
            return item


class DaemonProcess:
    """``pttd run -c CONFIG`` with its stdout parsed into events on a reader thread."""

    def __init__(self, config: Path, socket: Path, env: dict | None = None, argv=None,
                 popen=None):
        """``popen`` starts the process elsewhere (e.g. ``Journald.popen``, which merges env)."""
        self.socket = socket
        argv = argv or [sys.executable, "-m", "pttd.cli", "run", "-c", str(config)]
        env = dict(PYTHONUNBUFFERED="1", **(env or {}))
        if popen is None:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=dict(os.environ, **env))
        else:
            self.proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.all_events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsable", "line": line}
            self.all_events.append(event)
            self.events.put(event)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_ready(self, timeout: float = 15.0) -> None:
        from pttd.frontends.control.client import request
        from pttd.frontends.control.protocol import ControlError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pttd exited {self.proc.returncode}: {''.join(self.stderr_lines)}")
            if self.socket.exists():
                try:
                    if request(str(self.socket), "status", timeout=1.0).get("ok"):
                        return
                except ControlError:
                    pass
            time.sleep(0.05)  # polling for the socket file with a deadline
        raise AssertionError("pttd did not become ready")

    def command(self, cmd: str) -> dict:
        from pttd.frontends.control.client import request

        return request(str(self.socket), cmd, timeout=5.0)

    def wait_audio_ms(self, ms: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = self.command("status")["audio_ms"]
            if pos >= ms:
                return pos
            time.sleep(0.02)  # polling the daemon's clock with a deadline
        raise AssertionError(f"audio position never reached {ms} ms")

    def wait_event(self, pred, timeout: float = 15.0) -> dict:
        return wait_queue(self.events, pred, timeout,
                          lambda: f"no matching event; saw {self.all_events}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"pttd did not stop within {timeout} s")
        for t in self._threads:
            t.join(5)
        return code, time.monotonic() - t0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def daemon_factory(tmp_path):
    """``make(srv, extra=..., layout=...)`` starts ``pttd run`` against ``srv`` (key KEY) and
    returns ``(DaemonProcess, wav samples)``; every daemon is killed at teardown."""
    started = []

    def make(srv, extra="", layout=None, journal=False, key=None, audio_extra=""):
        wav = tmp_path / "mic.wav"
        samples = speech_wav(wav, **({"layout": layout} if layout else {}))
        sock = tmp_path / "ctl.sock"
        cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=key or E2E_KEY, wav=wav,
                           socket=sock, extra=extra, journal=journal, audio_extra=audio_extra)
        d = DaemonProcess(cfg, sock)
        started.append(d)
        d.wait_ready()
        return d, samples

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def daemons():
    """A list to append ``DaemonProcess``es to (built by the test itself); each is killed at
    teardown."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()


E2E_KEY = "e2e-key-0123456789"
