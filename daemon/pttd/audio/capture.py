"""Capture sources that feed the ring buffer: an ALSA mic, or a WAV file played in real time.

Both run one dedicated thread that never touches the network: read → convert → ``ring.append``.
Both expose the same small surface the daemon wires up: ``start()``, ``stop()``,
``first_audio`` (READY=1), ``progress`` (systemd watchdog) and ``stats()``. ``record`` and
``measure_levels`` serve ``pttd record`` and ``pttd check``; the latter alone switches the level
meter on (``meter_levels``, ``take_levels``). Nothing here imports numpy: a converter does, and
only when it has real work (see convert.py).
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path

from pttd.audio.convert import AudioError, ChannelLevel, Converter, LevelReport
from pttd.audio.ring import ReadResult, RingBuffer

__all__ = [
    "AudioError",
    "AlsaSource",
    "Converter",
    "LevelReport",
    "ReadResult",
    "RingBuffer",
    "WavSource",
    "level_warnings",
    "measure_levels",
    "record",
]

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, str], None]


class _Source:
    """The thread, stop event and counters both sources share."""

    name = "capture"

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


class WavSource(_Source):
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
        try:
            k = 0
            while True:
                k += 1
                wait = max(0.0, t0 + k * self.period_s - time.monotonic())
                if self._asleep.acquire(timeout=wait):
                    return
                due = int(round(k * self.period_s * self.wav_rate))
                self._deliver(self._conv.process(self._next_block(due - self.frames_played)))
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


def _open_wav(path: Path):
    """Open and check a WAV now, so the CLI can exit 2 before anything starts."""
    if not path.is_file():
        raise AudioError(f"WAV file not found: {path} (set audio.wav to an existing file)")
    hint = f"convert it: `sox {path} -b 16 -e signed-integer out.wav`"
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise AudioError(f"cannot read WAV file {path}: {exc.strerror or exc}") from None
    try:
        wav = wave.open(f, "rb")  # a file object: wave leaves it open, at the first sample
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


# --- ALSA ----------------------------------------------------------------------------------------


class _DeviceLost(Exception):
    """The open device stopped working; the capture loop reopens it with backoff."""


class AlsaSource(_Source):
    """Captures from an ALSA PCM in a dedicated thread; survives the mic going away.

    The device is opened once and kept open (opening on a button press loses the first words
    and the first ~150 ms after an open are a transient, so ``warmup_ms`` of every open is
    run through the converter and dropped). Reads are non-blocking and wait in ``poll()`` on the
    PCM's descriptors plus a wake-up pipe:

    * a blocking open (``PCM_NORMAL``) of a device another program holds sleeps in the kernel
      until it is released, and pyalsaaudio keeps the GIL during the open: the whole daemon
      would freeze. ``PCM_NONBLOCK`` turns that into "Device or resource busy" and a retry;
    * ``stop()`` writes to the wake-up pipe, so a stop never waits for a period. Closing the
      PCM from the stopping thread instead would free it under a read running in this thread
      (pyalsaaudio releases the GIL around ``snd_pcm_readi``);
    * a device that delivers nothing for ``stall_timeout_s`` is treated as gone and reopened.

    A read can still block inside a plugin that itself blocks (the ``file`` plugin's ``infile``
    does): ``stop()`` then returns after its timeout, the daemon thread ends with the process,
    and ``progress`` stops advancing, so the systemd watchdog notices.

    Errors (open failure, read error, stall, repeated overruns) close the device, report
    ``on_status("offline", "mic not found: <device>: <reason>")`` once, and retry with capped
    exponential backoff. While offline, and for whatever an overrun or reopen lost, the ring is
    filled with silence marked as a gap, computed from the monotonic clock, so ring positions
    keep pace with wall time. Recovery reports ``on_status("online", ...)``. ``on_status`` is
    called from this thread and must only enqueue.
    """

    name = "alsa-capture"
    BACKOFF_START_S = 0.25
    BACKOFF_MAX_S = 5.0
    HEALTHY_S = 5.0  # a device that worked this long resets the backoff
    MAX_XRUN_STREAK = 10  # this many overruns without audio in between: treat as lost
    XRUN_REPORT_EVERY_S = 10.0

    def __init__(
        self,
        device: str,
        capture_format: str,
        capture_channels: int,
        capture_rate: int,
        channel: int,
        gain_db: float,
        warmup_ms: int,
        sample_rate: int,
        ring: RingBuffer,
        period_ms: int = CAPTURE_PERIOD_MS,
        on_status: StatusCallback | None = None,
        highpass_hz: float | None = 80.0,
        stall_timeout_s: float = 2.0,
        periods: int = 4,
    ):
        super().__init__(ring, sample_rate)
        self.device = device
        self.capture_format = capture_format
        self.capture_channels = capture_channels
        self.capture_rate = capture_rate
        self.channel = channel
        self.gain_db = gain_db
        self.warmup_ms = warmup_ms
        self.highpass_hz = highpass_hz
        self.period_frames = max(1, capture_rate * period_ms // 1000)
        self.periods = periods
        self.stall_timeout_s = stall_timeout_s
        self.on_status = on_status
        self._new_converter()  # validates the parameters now, before start()
        self.state = "starting"
        self.status_message = ""
        self.xruns = 0
        self.gaps = 0
        self.gap_samples = 0
        self.opens = 0
        self.open_failures = 0
        self._anchor: tuple[float, int] | None = None  # (time, ring end) of the last real audio
        self._lost_pending = False
        self._in_gap = False
        self._xrun_streak = 0
        self._last_xrun_report = float("-inf")
        self._wake_lock = threading.Lock()
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    def _new_converter(self) -> Converter:
        try:
            conv = Converter(
                self.capture_format,
                self.capture_channels,
                self.capture_rate,
                self.channel,
                self.gain_db,
                self.sample_rate,
                self.highpass_hz,
            )
        except ValueError as exc:
            raise AudioError(f"audio settings: {exc}") from None
        return self._use_converter(conv)

    # --- thread ----------------------------------------------------------------------------

    def _interrupt(self) -> None:
        with self._wake_lock:  # the thread closes the pipe on exit: never write to a stale fd
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass

    def _run(self) -> None:
        backoff = self.BACKOFF_START_S
        with self._wake_lock:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
        try:
            while not self._stop.is_set():
                opened_at = time.monotonic()
                try:
                    self._session()
                except _DeviceLost as exc:
                    self._went_offline(str(exc))
                if self._stop.is_set():
                    break
                if time.monotonic() - opened_at >= self.HEALTHY_S:
                    backoff = self.BACKOFF_START_S
                self._offline_wait(backoff)
                backoff = min(self.BACKOFF_MAX_S, backoff * 2)
        finally:
            self.state = "stopped"
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = None

    def _session(self) -> None:
        """One open → capture → close cycle; returns on stop, raises _DeviceLost on failure."""
        pcm = self._open()
        try:
            self.opens += 1
            if self.opens > 1:
                self._lost_pending = True  # whatever happened since the last audio is a gap
            self._went_online()
            self._capture(pcm)
        finally:
            pcm.close()

    def _open(self):
        import alsaaudio  # lazily: the WAV path and the tests of it need no ALSA

        fmt = {"S16_LE": alsaaudio.PCM_FORMAT_S16_LE, "S32_LE": alsaaudio.PCM_FORMAT_S32_LE}
        try:
            pcm = alsaaudio.PCM(
                type=alsaaudio.PCM_CAPTURE,
                mode=alsaaudio.PCM_NONBLOCK,
                device=self.device,
                channels=self.capture_channels,
                rate=self.capture_rate,
                format=fmt[self.capture_format],
                periodsize=self.period_frames,
                periods=self.periods,
            )
        except alsaaudio.ALSAAudioError as exc:
            self.open_failures += 1
            raise _DeviceLost(_open_problem(self.device, exc)) from None
        self._check_params(pcm)
        return pcm

    def _check_params(self, pcm) -> None:
        """pyalsaaudio ignores a refused format/rate/channel count: check what we got."""
        info = pcm.info()
        want = (self.capture_channels, self.capture_rate, self.capture_format)
        got = (info.get("channels"), info.get("rate"), info.get("format_name"))
        if got != want:
            pcm.close()
            self.open_failures += 1
            raise _DeviceLost(
                f"mic not usable: {self.device}: it gives {got[2]}, {got[0]} ch, {got[1]} Hz, "
                f"not {want[2]}, {want[0]} ch, {want[1]} Hz; set audio.capture_format/"
                f"capture_channels/capture_rate to match or use a plughw: device"
            )

    def _capture(self, pcm) -> None:
        conv = self._new_converter()
        warmup = self.capture_rate * self.warmup_ms // 1000 * conv.frame_bytes
        descriptors = pcm.polldescriptors()
        poller = select.poll()
        for fd, mask in descriptors:
            poller.register(fd, mask)
        poller.register(self._wake_r, select.POLLIN)
        last_audio = time.monotonic()
        while not self._stop.is_set():
            events = poller.poll(self.stall_timeout_s * 250)
            if self._stop.is_set():
                return
            data = self._read(pcm) if self._readable(pcm, descriptors, events) else None
            now = time.monotonic()  # after the read: a plugin may block inside it
            if data:
                last_audio = now
                warmup = self._convert(conv, data, warmup, now)
            elif now - last_audio > self.stall_timeout_s:
                raise _DeviceLost(
                    f"mic not found: {self.device}: no audio for {now - last_audio:.1f} s"
                )

    def _readable(
        self, pcm, descriptors: list[tuple[int, int]], events: list[tuple[int, int]]
    ) -> bool:
        """Ask alsa-lib what the poll events mean: dsnoop/dmix descriptors (timers) must be
        demangled, or they would read as ready forever (and be cleared by this call)."""
        import alsaaudio

        got = dict(events)
        got.pop(self._wake_r, None)
        if not got:
            return False
        try:
            revents = pcm.polldescriptors_revents([(fd, got.get(fd, 0)) for fd, _ in descriptors])
        except alsaaudio.ALSAAudioError as exc:
            raise _DeviceLost(f"mic not found: {self.device}: {_alsa_reason(exc)}") from None
        return bool(revents & (select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL))

    def _read(self, pcm) -> bytes | None:
        import alsaaudio

        try:
            n, data = pcm.read()
        except alsaaudio.ALSAAudioError as exc:
            raise _DeviceLost(f"mic not found: {self.device}: {_alsa_reason(exc)}") from None
        if n < 0:
            self._note_xrun(time.monotonic())
            return None
        if n == 0:  # EAGAIN: a plugin's descriptor woke us early; don't spin on it
            self._stop.wait(0.005)
            return None
        self._xrun_streak = 0
        return data

    def _convert(self, conv: Converter, data: bytes, warmup: int, now: float) -> int:
        """Drop the first ``warmup`` bytes after an open (still converted, to settle filters)."""
        if warmup > 0:
            head = data[:warmup]
            conv.process(head)
            warmup -= len(head)
            data = data[len(head) :]
        if data:
            self._deliver_at(conv.process(data), now)
        else:
            self.progress += 1
        return warmup

    # --- ring bookkeeping ------------------------------------------------------------------

    def _note_xrun(self, now: float) -> None:
        """An overrun: the device dropped audio. Counted; the gap is marked on the next block."""
        self.xruns += 1
        self._xrun_streak += 1
        self._lost_pending = True
        if self._xrun_streak >= self.MAX_XRUN_STREAK:
            raise _DeviceLost(
                f"mic not found: {self.device}: {self._xrun_streak} overruns in a row"
            )
        if now - self._last_xrun_report >= self.XRUN_REPORT_EVERY_S:
            self._last_xrun_report = now
            log.warning("capture overrun on %s (%d so far)", self.device, self.xruns)
            self._status("xrun", f"capture overrun on {self.device} ({self.xruns} so far)")

    def _deliver_at(self, pcm: bytes, now: float) -> None:
        """Append real audio; first mark as a gap whatever wall time it cannot account for.

        Normally a block covers the time since the previous one. After an overrun or a reopen
        (``_lost_pending``) any shortfall over half a block is lost audio. Without one, only a
        shortfall beyond the device buffer is (less may still be sitting in the buffer).
        """
        behind = self._expected_end(now) - (self.ring.end + len(pcm) // 2)
        limit = (
            len(pcm) // 4
            if self._lost_pending
            else (self.periods + 1) * self.period_frames * self.sample_rate // self.capture_rate
        )
        if self._anchor is not None and behind > limit:
            self._mark_gap(behind)
        self._lost_pending = False
        self._in_gap = False
        self._deliver(pcm)
        self._anchor = (now, self.ring.end)

    def _expected_end(self, now: float) -> int:
        if self._anchor is None:
            return self.ring.end
        t, pos = self._anchor
        return pos + int(round((now - t) * self.sample_rate))

    def _fill_gap(self, now: float) -> None:
        """While offline: keep the ring in step with wall time (silence, marked as a gap)."""
        behind = self._expected_end(now) - self.ring.end
        if behind > 0:
            self._mark_gap(behind)

    def _mark_gap(self, n: int) -> None:
        if not self._in_gap:
            self.gaps += 1  # one outage filled in ticks counts once
        self._in_gap = True
        self.gap_samples += n
        self.ring.append_gap(n)

    def _offline_wait(self, delay: float) -> None:
        """Back off before the next open, filling the ring with gap silence meanwhile."""
        deadline = time.monotonic() + delay
        tick = self.period_frames / self.capture_rate
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.wait(min(remaining, tick)):
                return
            self._fill_gap(time.monotonic())
            self.progress += 1  # alive and retrying, not stalled

    # --- status ----------------------------------------------------------------------------

    def _went_offline(self, message: str) -> None:
        if self.state != "offline":
            log.warning("%s", message)
            self.state = "offline"
            self.status_message = message
            self._status("offline", message)
        else:
            log.debug("still offline: %s", message)

    def _went_online(self) -> None:
        was_offline = self.state == "offline"
        self.state = "online"
        self.status_message = f"mic ready: {self.device}"
        if was_offline:
            log.info("mic back: %s", self.device)
            self._status("online", f"mic back: {self.device}")

    def _status(self, kind: str, message: str) -> None:
        if self.on_status is None:
            return
        try:
            self.on_status(kind, message)
        except Exception:
            log.exception("on_status callback failed")

    def stats(self) -> dict:
        return {
            "state": self.state,
            "xruns": self.xruns,
            "clipped": self.clipped,
            "gaps": self.gaps,
            "gap_ms": self.gap_samples * 1000 // self.sample_rate,
            "reopens": max(0, self.opens - 1),
            "open_failures": self.open_failures,
            "periods": self.progress,
        }


def _alsa_reason(exc: Exception) -> str:
    """'No such device [hw:1]' → 'No such device'."""
    text = str(exc.args[0] if exc.args else exc)
    return text.rsplit(" [", 1)[0] if text.endswith("]") else text


def _open_problem(device: str, exc: Exception) -> str:
    reason = _alsa_reason(exc)
    if "busy" in reason.lower():
        return (
            f"mic busy: {device}: {reason} (another program holds it; share it through "
            f"dsnoop, see hardware/asound.conf)"
        )
    if "Invalid argument" in reason:
        return (
            f"mic not usable: {device}: {reason} (check audio.capture_format, "
            f"capture_channels and capture_rate, or use a plughw: device)"
        )
    return f"mic not found: {device}: {reason}"


# --- pttd record / pttd check --------------------------------------------------------------------


def record(
    source: _Source,
    ring: RingBuffer,
    seconds: float,
    out_path: str | os.PathLike,
    start_timeout: float = 10.0,
) -> dict:
    """Start ``source``, write ``seconds`` of exactly what would be sent to a WAV, stop it.

    The WAV is 16-bit mono at the ring's rate: post warm-up, post conversion, gaps as the
    silence that would be streamed. Raises AudioError when no audio arrives in time.
    """
    total = int(round(seconds * ring.sample_rate))
    if not source.running:
        source.start()
    try:
        pos = _wait_first_audio(source, ring, start_timeout)
        with wave.open(str(out_path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(ring.sample_rate)
            written = _copy_ring(source, ring, pos, total, out)
    finally:
        source.stop()
    return {"samples": written, **source.stats()}


def _wait_first_audio(source: _Source, ring: RingBuffer, timeout: float) -> int:
    if not source.first_audio.wait(timeout):
        why = getattr(source, "status_message", "") or "no audio"
        raise AudioError(f"no audio within {timeout:.0f} s: {why}")
    return ring.start


def _copy_ring(source: _Source, ring: RingBuffer, pos: int, total: int, out) -> int:
    written = 0
    chunk = ring.sample_rate // 10
    while written < total:
        if not ring.wait_for(pos, 2.0):
            if not source.running:
                raise AudioError("capture stopped while recording")
            continue
        res = ring.read(pos, min(chunk, total - written))
        if res.lost:
            log.warning("recording fell behind: %d samples lost", res.lost)
        out.writeframes(res.data)
        written += res.next_pos - res.pos
        pos = res.next_pos
    return written


def level_warnings(report: LevelReport, channel: int) -> list[str]:
    """What ``pttd check`` should tell the user about these levels."""
    chans = report.channels
    warnings = []
    if chans and all(c.all_zeros for c in chans):
        warnings.append(
            "every capture channel is all zeros: check the wiring (mic DOUT to "
            "GPIO20, BCLK GPIO18, LRCLK GPIO19, L/R tied to GND or 3V3) and "
            "the dtoverlay"
        )
    elif 0 <= channel < len(chans) and chans[channel].all_zeros:
        live = [i for i, c in enumerate(chans) if not c.all_zeros]
        warnings.append(f"channel {channel} is all zeros; try channel = {live[0]}")
    if report.clipped:
        warnings.append(f"{report.clipped} samples clipped after gain: lower audio.gain_db")
    if any(c.peak_dbfs > -0.1 for c in chans):
        warnings.append(
            "the mic itself reaches full scale (input clipping): speak further "
            "away or lower the capture level"
        )
    elif report.frames and report.out_peak_dbfs < -45.0 and not warnings:
        warnings.append(
            f"very quiet (peak {report.out_peak_dbfs:.0f} dBFS sent): speak during "
            f"the check, or raise audio.gain_db (I2S MEMS mics need ~+20…30 dB)"
        )
    return warnings


def measure_levels(
    source: _Source,
    seconds: float = 5.0,
    interval: float = 0.5,
    on_update: Callable[[LevelReport], None] | None = None,
    start_timeout: float = 10.0,
) -> LevelReport:
    """Run ``source`` for ``seconds``; call ``on_update`` with a meter reading every ``interval``.

    Returns the levels over the whole run with ``warnings`` filled in. The level meter is on
    only while this runs. Starts and stops the source; raises AudioError when no audio arrives
    within ``start_timeout``.
    """
    source.meter_levels(True)
    if not source.running:
        source.start()
    try:
        _wait_first_audio(source, source.ring, start_timeout)
        source.take_levels()  # drop the partial first reading
        readings = []
        deadline = time.monotonic() + seconds
        while not source._stop.wait(min(interval, max(0.0, deadline - time.monotonic()))):
            report = source.take_levels()
            if report is not None and report.frames:
                readings.append(report)
                if on_update is not None:
                    on_update(report)
            if time.monotonic() >= deadline:
                break
    finally:
        source.stop()
        source.meter_levels(False)
    total = _combine(readings)
    total.warnings = level_warnings(total, getattr(source, "channel", 0))
    return total


def _combine(readings: list[LevelReport]) -> LevelReport:
    """Peak = max of peaks; RMS = power mean weighted by frames."""
    if not readings:
        return LevelReport([], float("-inf"), float("-inf"), 0, 0)
    n = len(readings[0].channels)
    frames = sum(r.frames for r in readings)
    chans = [
        _combine_channel([r.channels[c] for r in readings], [r.frames for r in readings])
        for c in range(n)
    ]
    out_peak = max(r.out_peak_dbfs for r in readings)
    out_rms = _power_mean([r.out_rms_dbfs for r in readings], [r.frames for r in readings])
    return LevelReport(chans, out_peak, out_rms, sum(r.clipped for r in readings), frames)


def _combine_channel(levels: list[ChannelLevel], weights: list[int]) -> ChannelLevel:
    return ChannelLevel(
        max(c.peak_dbfs for c in levels),
        _power_mean([c.rms_dbfs for c in levels], weights),
        _power_mean([c.dc_dbfs for c in levels], weights),
    )


def _power_mean(levels_db: list[float], weights: list[int]) -> float:
    power = sum(w * 10 ** (d / 10) for d, w in zip(levels_db, weights) if d != float("-inf"))
    mean = power / max(1, sum(weights))
    return 10 * math.log10(mean) if mean > 0 else float("-inf")
