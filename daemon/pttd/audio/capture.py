"""Capture sources feed the ring buffer: the base they share, and the WAV file played in real time.

A source runs one dedicated thread that never touches the network: read → convert →
``ring.append``. Every source exposes the same small surface the daemon wires up: ``start()``,
``stop()``, ``first_audio`` (READY=1), ``progress`` (systemd watchdog) and ``stats()``; only
``pttd check`` switches the level meter on (``meter_levels``, ``take_levels``). The ALSA mic is
alsa.py. Nothing here imports numpy: a converter does, and only when it has real work (see
convert.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import wave
from pathlib import Path
from typing import BinaryIO

from pttd.audio.convert import AudioError, Converter, LevelReport
from pttd.audio.ring import RingBuffer

log = logging.getLogger(__name__)


class CaptureSource:
    """The thread, stop event and counters every source shares."""

    name = "capture"
    status_message = ""  # why there is no audio, where a source can tell

    def __init__(self, ring: RingBuffer, sample_rate: int):
        self.ring = ring
        self.sample_rate = sample_rate
        self.first_audio = threading.Event()
        self.progress = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conv: Converter | None = None
        self._clipped_before = 0
        self._metering = False
        self._conv_lock = threading.Lock()  # the meter switch vs. a converter swap on reopen

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a capture source can only be started once")
        self._thread = threading.Thread(target=self._run_logged, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop and join the thread (bounded); True if it has ended."""
        self._stop.set()
        self._interrupt()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning(
                "%s thread did not stop within %.1f s (left to exit with the process)",
                self.name,
                timeout,
            )
            return False
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_first_audio(self, timeout: float) -> None:
        """Wait for the first block; AudioError (saying why, if the source knows) if none comes."""
        if not self.first_audio.wait(timeout):
            why = self.status_message or "no audio"
            raise AudioError(f"no audio within {timeout:.0f} s: {why}")

    def wait_stop(self, timeout: float) -> bool:
        """Sleep up to ``timeout``, less if ``stop()`` is called; True once it has been."""
        return self._stop.wait(timeout)

    def stats(self) -> dict:
        """Counters for ``pttd status`` and the record/check commands."""
        raise NotImplementedError

    def _interrupt(self) -> None:
        """Wake the thread from whatever it waits on (overridden where there is more to do)."""

    def _run_logged(self) -> None:
        try:
            self._run()
        except Exception:  # a dead capture thread must be loud: the watchdog then fires
            log.exception("%s thread failed", self.name)

    def _run(self) -> None:
        raise NotImplementedError

    def _deliver(self, pcm: bytes) -> None:
        if pcm:
            self.ring.append(pcm)
            if not self.first_audio.is_set():  # set() takes a lock and notifies: once is enough
                self.first_audio.set()
        self.progress += 1

    def _use_converter(self, conv: Converter) -> Converter:
        """Make ``conv`` the current converter, keeping the meter switch and the clip count."""
        with self._conv_lock:
            conv.meter_levels(self._metering)
            if self._conv is not None:
                self._clipped_before += self._conv.clipped_samples
            self._conv = conv
        return conv

    @property
    def clipped(self) -> int:
        conv = self._conv
        return self._clipped_before + (conv.clipped_samples if conv is not None else 0)

    def meter_levels(self, on: bool) -> None:
        """Level metering on or off, for this and every later converter (off by default: it
        costs most of a block's conversion and only ``pttd check`` reads it). Any thread."""
        with self._conv_lock:
            self._metering = on
            if self._conv is not None:
                self._conv.meter_levels(on)

    def take_levels(self) -> LevelReport | None:
        """Levels since the last call; None while metering is off."""
        conv = self._conv
        return conv.take_levels() if conv is not None else None


# --- WAV -----------------------------------------------------------------------------------------

# One capture block per wake-up: each wake-up of the capture thread (and of the streamer it
# wakes) costs far more than the block's work, and 100 ms is still short next to the post-roll.
CAPTURE_PERIOD_MS = 100


class WavSource(CaptureSource):
    """Plays a 16-bit PCM WAV in real time, then silence forever (a mic that never ends).

    Blocks are scheduled on absolute deadlines from one monotonic start time, so the pace never
    drifts (a late wake-up is caught up at the next deadline). Each block is appended at the
    time its last sample would have been captured; blocks are ``period_ms`` long, as an ALSA
    mic's periods are, so a WAV source costs what the mic does. Any channel count or rate is
    converted to mono ``sample_rate`` (channels averaged, no high-pass); a mono file already at
    ``sample_rate`` is delivered byte for byte.
    """

    name = "wav-source"

    def __init__(
        self,
        path: str | os.PathLike,
        ring: RingBuffer,
        sample_rate: int,
        period_ms: int = CAPTURE_PERIOD_MS,
    ):
        super().__init__(ring, sample_rate)
        self.path = Path(path)
        self.period_s = period_ms / 1000.0
        self._file, self.wav_channels, self.wav_rate, self.wav_frames = _open_wav(self.path)
        try:
            self._use_converter(
                Converter(
                    "S16_LE",
                    self.wav_channels,
                    self.wav_rate,
                    channel=-1,
                    out_rate=sample_rate,
                    highpass_hz=None,
                )
            )
        except ValueError as exc:
            self._file.close()
            raise AudioError(
                f"{self.path}: {exc}; resample it first, e.g. "
                f"`sox {self.path} -r {sample_rate} out.wav`"
            ) from None
        self._frame_bytes = 2 * self.wav_channels
        # ``wave`` checked the header and left the file at the first sample; the PCM is read
        # from there with one pread per block (wave.readframes costs ~5 x that per block)
        self._data_at = self._file.tell()
        self._data_bytes = self.wav_frames * self._frame_bytes
        self.frames_played = 0
        # held until stop(): the pacing wait is a timed acquire of it, which stop() ends at
        # once; it costs less per wake-up than an Event's Condition (a lock and a deque in Python)
        self._asleep = threading.Lock()
        self._asleep.acquire()

    def _interrupt(self) -> None:
        try:
            self._asleep.release()
        except RuntimeError:  # stopped twice
            pass

    def _run(self) -> None:
        t0 = time.monotonic()
        conv = self._conv
        assert conv is not None  # set in __init__
        try:
            k = 0
            while True:
                k += 1
                wait = max(0.0, t0 + k * self.period_s - time.monotonic())
                if self._asleep.acquire(timeout=wait):
                    return
                due = int(round(k * self.period_s * self.wav_rate))
                self._deliver(conv.process(self._next_block(due - self.frames_played)))
        finally:
            self._file.close()

    def _next_block(self, frames: int) -> bytes:
        """The next ``frames`` of the file, padded with silence past its end (or past where a
        truncated file stops)."""
        done, want = self.frames_played * self._frame_bytes, frames * self._frame_bytes
        raw = (
            os.pread(self._file.fileno(), min(want, self._data_bytes - done), self._data_at + done)
            if done < self._data_bytes
            else b""
        )
        self.frames_played += frames
        missing = want - len(raw)
        return raw + bytes(missing) if missing > 0 else raw

    def stats(self) -> dict:
        return {
            "state": "online",
            "xruns": 0,
            "clipped": self.clipped,
            "gaps": 0,
            "gap_ms": 0,
            "reopens": 0,
            "periods": self.progress,
            "wav_done": self.frames_played >= self.wav_frames,
        }


def _open_wav(path: Path) -> tuple[BinaryIO, int, int, int]:
    """Open and check a WAV now, so the CLI can exit 2 before anything starts."""
    if not path.is_file():
        raise AudioError(f"WAV file not found: {path} (set audio.wav to an existing file)")
    hint = f"convert it: `sox {path} -b 16 -e signed-integer out.wav`"
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned open: the source's thread closes it
    except OSError as exc:
        raise AudioError(f"cannot read WAV file {path}: {exc.strerror or exc}") from None
    try:
        with wave.open(f, "rb") as wav:  # given a file object, wave leaves it open (at the
            # first sample) when it closes
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            if width != 2 or channels < 1 or rate <= 0:
                raise AudioError(
                    f"{path} is {8 * width}-bit PCM; pttd plays 16-bit PCM WAV only; {hint}"
                )
            return f, channels, rate, wav.getnframes()
    except (wave.Error, EOFError) as exc:
        f.close()
        raise AudioError(
            f"{path} is not a 16-bit PCM WAV file ({_wave_reason(exc)}); {hint}"
        ) from None
    except OSError as exc:
        f.close()
        raise AudioError(f"cannot read WAV file {path}: {exc.strerror or exc}") from None
    except AudioError:
        f.close()
        raise


def _wave_reason(exc: Exception) -> str:
    text = str(exc)
    if "unknown format: 3" in text:
        return "it holds 32-bit float samples"
    if "unknown format" in text:
        return f"its sample encoding is not plain PCM: {text}"
    return text or "truncated header"
