"""A fake microphone that real alsa-lib reads: the ALSA ``file`` plugin fed through a FIFO.

    with FifoMic(signal, format="S32_LE", channels=2, rate=48000) as mic:
        src = AlsaSource(device=mic.device, ...)   # in this process: os.environ is patched
        # or: subprocess.Popen([...], env={**os.environ, **mic.env})
        mic.wait_connected()
        mic.stall(0.6); mic.vanish(); mic.restore()

How it works (all verified against alsa-lib 1.2.8 + pyalsaaudio 0.11, as root, no /dev/snd):

* ``ALSA_CONFIG_PATH=/usr/share/alsa/alsa.conf:<tmp>/asoundrc`` — alsa-lib reads a ':'-separated
  list, so the system config still loads and the temp file only adds ``pcm.<device>``; alsa-lib
  notices the changed list on the next open. (``HOME=<tmp>`` with a ``.asoundrc`` works too but
  changes HOME for everything else.)
* ``pcm.<device> { type file; slave.pcm { type null }; infile "<in.fifo>"; file "<out.fifo>";
  format raw }``: the null slave is infinitely fast, so the pace comes from the FIFO: each
  ``snd_pcm_readi`` returns the bytes the feeder wrote, byte-exact, when it wrote them. The feeder
  writes **whole periods** in the **exact format the source opens** (a ``plug`` over the file
  plugin skips periods; a partial FIFO read would be padded with stale bytes).
* The feeder runs in a **forked child process**, not a thread: pyalsaaudio holds the GIL while
  the file plugin's ``open(infile)`` blocks waiting for a writer, so a feeder thread in the same
  process could never open the other end. The child owns both FIFO ends: it polls for the
  reader (``O_WRONLY|O_NONBLOCK`` gives ENXIO until one exists), then writes a period at each
  deadline, and drains ``out.fifo`` (the plugin copies what it captures there; a reader must
  exist or the plugin's open would block).
* ``vanish()`` unlinks both FIFOs (new opens fail: "No such file or directory") and closes the
  ``out.fifo`` reader, so the plugin's next write gets EPIPE and ``pcm.read()`` raises
  ``ALSAAudioError('Input/output error')`` — the way a USB mic's read fails when unplugged.
  ``restore()`` recreates them. ``stall(s)`` writes nothing for ``s`` seconds; those frames are
  lost, as when a device stops delivering.

The signal is the "sound in the room": frame ``f`` of the world is ``signal(f, n)`` where
``f = (t - t0) * rate`` and ``t0`` is when the context was entered (``clock="world"``) or when
the first reader connected (``clock="connect"``). A reader opening at ``tc`` gets frames from
``round((tc - t0) * rate)`` on; ``connections`` tells each open's time and first frame, so tests
can compute exact references. The signal may be a callable ``f(start, n) -> array``, an array
(played once from frame 0, then silence) or an iterator of arrays (consumed in the child: the
parent cannot see how far it got). Arrays are ``(n, channels)`` or ``(n,)`` (same on every
channel), cast to int16/int32 for S16_LE/S32_LE.
"""
from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import select
import shutil
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np

SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"
DTYPES = {"S16_LE": np.dtype("<i2"), "S32_LE": np.dtype("<i4")}
PIPE_SIZE = 1 << 20
CONNECT_POLL_S = 0.002

Signal = Union[Callable[[int, int], np.ndarray], np.ndarray, Iterator[np.ndarray], None]


@dataclass(frozen=True)
class Connection:
    """One reader open: when (monotonic), and the world frame of its first period."""

    t_open: float
    first_frame: int


class FifoMic:
    """Context manager: FIFOs + asoundrc + a feeder process; see the module docstring."""

    _counter = 0

    def __init__(self, signal: Signal = None, *, format: str = "S16_LE", channels: int = 1,
                 rate: int = 16000, period_frames: int | None = None, clock: str = "world",
                 patch_env: bool = True, name: str | None = None):
        if format not in DTYPES:
            raise ValueError(f"format must be one of {sorted(DTYPES)}")
        FifoMic._counter += 1
        self.signal = signal
        self.format = format
        self.channels = channels
        self.rate = rate
        self.period_frames = period_frames or rate // 10
        self.clock = clock
        self.patch_env = patch_env
        self.device = name or f"pttdfifo{os.getpid()}x{FifoMic._counter}"
        self.connections: list[Connection] = []
        self.disconnects: list[float] = []
        self.dropped_periods = 0
        self._saved_env: str | None = None

    # --- setup -------------------------------------------------------------------------------

    def __enter__(self) -> "FifoMic":
        self.dir = Path(tempfile.mkdtemp(prefix="pttd-fifo-"))
        self.in_fifo = self.dir / "in.fifo"
        self.out_fifo = self.dir / "out.fifo"
        self.asoundrc = self.dir / "asoundrc"
        self.asoundrc.write_text(self._asoundrc_text())
        self.env = {"ALSA_CONFIG_PATH": f"{SYSTEM_ALSA_CONF}:{self.asoundrc}"}
        if self.patch_env:
            self._saved_env = os.environ.get("ALSA_CONFIG_PATH")
            os.environ.update(self.env)
        self.t0 = time.monotonic()
        ctx = multiprocessing.get_context("fork")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_feeder_main, args=(self, child_conn),
                                 name=f"fifo-mic-{self.device}", daemon=True)
        self._proc.start()
        child_conn.close()
        self._expect("ready", 5.0)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the feeder (bounded), restore the environment, remove the files."""
        if getattr(self, "_proc", None) is None:
            return
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        self._proc.join(3.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2.0)
        self._proc = None
        self._conn.close()
        if self.patch_env:
            if self._saved_env is None:
                os.environ.pop("ALSA_CONFIG_PATH", None)
            else:
                os.environ["ALSA_CONFIG_PATH"] = self._saved_env
        shutil.rmtree(self.dir, ignore_errors=True)

    def _asoundrc_text(self) -> str:
        return (f'pcm.{self.device} {{\n'
                f'    type file\n'
                f'    slave.pcm {{ type null }}\n'
                f'    infile "{self.in_fifo}"\n'
                f'    file "{self.out_fifo}"\n'
                f'    format raw\n'
                f'}}\n')

    # --- control -----------------------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """Deliver nothing for ``seconds`` from now; the frames of that span are lost."""
        self._command("stall", seconds)

    def vanish(self) -> None:
        """The device disappears: the open reader fails, new opens fail, until ``restore()``."""
        self._command("vanish")

    def restore(self) -> None:
        """The device is back: the next open succeeds."""
        self._command("restore")

    def wait_connected(self, count: int = 1, timeout: float = 5.0) -> Connection:
        """Wait (bounded) until ``count`` reader opens have happened; returns the last one."""
        deadline = time.monotonic() + timeout
        while len(self.connections) < count:
            if not self._pump(deadline - time.monotonic()):
                raise TimeoutError(f"no reader opened {self.device} "
                                   f"(connections: {len(self.connections)})")
        return self.connections[count - 1]

    def wait_disconnected(self, count: int = 1, timeout: float = 5.0) -> float:
        """Wait (bounded) for the ``count``-th reader close; returns when the feeder saw it."""
        deadline = time.monotonic() + timeout
        while len(self.disconnects) < count:
            if not self._pump(deadline - time.monotonic()):
                raise TimeoutError(f"the reader of {self.device} did not close")
        return self.disconnects[count - 1]

    def poll_events(self) -> None:
        """Take in whatever the feeder reported (connections, disconnects), without waiting."""
        while self._pump(0.0):
            pass

    def frame_at(self, t: float) -> int:
        """The world frame index at monotonic time ``t`` (clock="world")."""
        return int(round((t - self.t0) * self.rate))

    def world(self, start: int, n: int) -> np.ndarray:
        """What the mic hears for frames [start, start+n), as (n, channels) of the format."""
        return _render(self.signal, start, n, self.channels, DTYPES[self.format])

    def _command(self, *cmd) -> None:
        self._conn.send(cmd)
        self._expect(f"ack-{cmd[0]}", 5.0)

    def _expect(self, kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._want, self._got = kind, False
        while not self._got:
            if not self._pump(deadline - time.monotonic()):
                raise TimeoutError(f"fifo feeder did not answer {kind!r}")

    def _pump(self, timeout: float) -> bool:
        """Handle one message from the feeder; False if none came within ``timeout``."""
        if timeout < 0 or not self._conn.poll(max(0.0, timeout)):
            return False
        try:
            msg = self._conn.recv()
        except EOFError:
            raise RuntimeError("the fifo feeder process died") from None
        kind = msg[0]
        if kind == "connected":
            self.connections.append(Connection(msg[1], msg[2]))
        elif kind == "disconnected":
            self.disconnects.append(msg[1])
        elif kind == "dropped":
            self.dropped_periods += msg[1]
        elif kind == "error":
            raise RuntimeError(f"fifo feeder failed: {msg[1]}")
        if kind == getattr(self, "_want", None):
            self._got = True
        return True


# --- the feeder (runs in the forked child) -------------------------------------------------------

def _render(signal: Signal, start: int, n: int, channels: int, dtype: np.dtype) -> np.ndarray:
    if signal is None:
        block = np.zeros((n, channels), dtype=dtype)
    elif callable(signal):
        block = np.asarray(signal(start, n))
    elif isinstance(signal, np.ndarray):
        block = np.zeros((n,) + signal.shape[1:], dtype=signal.dtype)
        part = signal[max(0, start):max(0, start + n)]
        block[max(0, -start):max(0, -start) + len(part)] = part
    else:
        block = _from_iterator(signal, n)
    if block.ndim == 1:
        block = np.repeat(block[:, None], channels, axis=1)
    if block.shape != (n, channels):
        raise ValueError(f"signal gave shape {block.shape}, expected {(n, channels)}")
    return block.astype(dtype, copy=False)


_ITER_REST: dict[int, np.ndarray] = {}


def _from_iterator(it: Iterator[np.ndarray], n: int) -> np.ndarray:
    """Cut ``n`` frames from an iterator of arrays (silence once it is exhausted)."""
    parts, have = [], 0
    rest = _ITER_REST.pop(id(it), None)
    while have < n:
        chunk = rest if rest is not None else next(it, None)
        rest = None
        if chunk is None:
            break
        chunk = np.asarray(chunk)
        parts.append(chunk[:n - have])
        if len(chunk) > n - have:
            _ITER_REST[id(it)] = chunk[n - have:]
        have += len(parts[-1])
    if have < n:
        shape = (n - have,) + (parts[0].shape[1:] if parts else ())
        parts.append(np.zeros(shape, dtype=parts[0].dtype if parts else np.int16))
    return np.concatenate(parts)


class _Feeder:
    """The child's single loop: wait for a reader, write periods on deadlines, obey commands."""

    def __init__(self, mic: FifoMic, conn):
        self.mic = mic
        self.conn = conn
        self.dtype = DTYPES[mic.format]
        self.period_s = mic.period_frames / mic.rate
        self.period_bytes = mic.period_frames * mic.channels * self.dtype.itemsize
        self.fd: int | None = None
        self.drain_fd: int | None = None
        self.present = False
        self.stall_until = 0.0
        self.t0 = mic.t0
        self.clock_started = mic.clock == "world"

    def run(self) -> None:
        self._create()
        self.conn.send(("ready",))
        try:
            while True:
                if self.fd is None:
                    timeout = CONNECT_POLL_S if self.present else None
                    if self._commands(timeout) or (self.present and self._try_connect()):
                        continue
                else:
                    self._stream()
        except _Stop:
            pass
        finally:
            self._close_writer()
            self._remove()

    # devices appearing and disappearing

    def _create(self) -> None:
        for p in (self.mic.in_fifo, self.mic.out_fifo):
            if not p.exists():
                os.mkfifo(p, 0o600)
        self.drain_fd = os.open(self.mic.out_fifo, os.O_RDONLY | os.O_NONBLOCK)
        _set_pipe_size(self.drain_fd)
        self.present = True

    def _remove(self) -> None:
        for p in (self.mic.in_fifo, self.mic.out_fifo):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if self.drain_fd is not None:
            os.close(self.drain_fd)
            self.drain_fd = None
        self.present = False

    def _try_connect(self) -> bool:
        try:
            fd = os.open(self.mic.in_fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                return False
            raise
        self.pipe_size = _set_pipe_size(fd)
        self.fd = fd
        self.t_open = time.monotonic()
        if not self.clock_started:
            self.t0, self.clock_started = self.t_open, True
        self.first_frame = int(round((self.t_open - self.t0) * self.mic.rate))
        self.k = 0
        self.conn.send(("connected", self.t_open, self.first_frame))
        return True

    def _close_writer(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.conn.send(("disconnected", time.monotonic()))

    # streaming

    def _stream(self) -> None:
        deadline = self.t_open + (self.k + 1) * self.period_s
        if self._commands(max(0.0, deadline - time.monotonic())) or self.fd is None:
            return
        if time.monotonic() < deadline:
            return
        self._drain()
        frame = self.first_frame + self.k * self.mic.period_frames
        self.k += 1
        if deadline < self.stall_until:
            return
        block = _render(self.mic.signal, frame, self.mic.period_frames, self.mic.channels,
                        self.dtype)
        self._write(block.tobytes())

    def _write(self, data: bytes) -> None:
        """Write a whole period or nothing (a full pipe drops it, like a device overrun)."""
        queued = int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4), "little")
        if self.pipe_size - queued < len(data):
            self.conn.send(("dropped", 1))
            return
        try:
            os.write(self.fd, data)
        except BrokenPipeError:
            self._close_writer()

    def _drain(self) -> None:
        if self.drain_fd is None:
            return
        try:
            while os.read(self.drain_fd, PIPE_SIZE):
                pass
        except BlockingIOError:
            pass

    # commands

    def _commands(self, timeout: float | None) -> bool:
        """Handle commands arriving within ``timeout``; True if one was handled."""
        if not self.conn.poll(timeout):
            return False
        cmd = self.conn.recv()
        getattr(self, f"_cmd_{cmd[0]}")(*cmd[1:])
        self.conn.send((f"ack-{cmd[0]}",))
        return True

    def _cmd_stall(self, seconds: float) -> None:
        self.stall_until = time.monotonic() + seconds

    def _cmd_vanish(self) -> None:
        # Closing the out.fifo reader makes the plugin's next write fail, so read() raises;
        # the open reader is still fed until it closes (EPIPE).
        self._remove()

    def _cmd_restore(self) -> None:
        if not self.present:
            self._create()

    def _cmd_stop(self) -> None:
        raise _Stop


class _Stop(Exception):
    pass


def _set_pipe_size(fd: int) -> int:
    """Grow the pipe so a whole period always fits (writes stay atomic); returns its size."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB still holds a 100 ms period of S32 stereo 48 kHz
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def _feeder_main(mic: FifoMic, conn) -> None:
    mic._conn.close()  # the parent's end: without this the child never sees the parent go
    try:
        _Feeder(mic, conn).run()
    except Exception as exc:  # report, never hang the parent
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (a bounded wait for tests)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        select.select([], [], [], interval)


# --- analysis helpers for audio tests ------------------------------------------------------------

def pcm16(data: bytes) -> np.ndarray:
    """PCM16 bytes → float64 samples."""
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def sine_fit(y: np.ndarray, freq: float, rate: int) -> tuple[float, float]:
    """Least-squares fit of a sine (any phase) plus DC; returns (amplitude, SNR in dB).

    Everything that is not that sine or DC counts as noise: aliases, leakage from another
    channel, filter ripple, rounding.
    """
    n = np.arange(len(y))
    w = 2 * np.pi * freq / rate
    basis = np.stack([np.cos(w * n), np.sin(w * n), np.ones(len(y))], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    sine = basis[:, :2] @ coef[:2]
    noise = y - basis @ coef
    snr = 10 * np.log10(np.mean(sine ** 2) / max(np.mean(noise ** 2), 1e-30))
    return float(np.hypot(coef[0], coef[1])), float(snr)


def tone_amplitude(y: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the component at ``freq`` (projection; y should span many periods)."""
    amp, _ = sine_fit(y, freq, rate)
    return amp


def sine(freq: float, rate: int, start: int, n: int, amplitude: float) -> np.ndarray:
    """``amplitude``·sin(2π·freq·t) for frames [start, start+n), float64."""
    return amplitude * np.sin(2 * np.pi * freq * (start + np.arange(n)) / rate)
