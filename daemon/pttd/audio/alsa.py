"""The ALSA mic: a capture source that survives the mic going away.

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
called from the capture thread and must only enqueue.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

from pttd.audio.capture import CAPTURE_PERIOD_MS, CaptureSource
from pttd.audio.convert import AudioError, Converter
from pttd.audio.ring import RingBuffer
from pttd.errors import PttdError

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, str], None]


class _DeviceLost(PttdError):
    """The open device stopped working; the capture loop reopens it with backoff."""


class AlsaSource(CaptureSource):
    """Captures from an ALSA PCM in a dedicated thread; reopens it when it goes away (see the
    module's docstring for how it never blocks the daemon and how it accounts for lost audio).
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
        try:
            return _open_pcm(
                self.device,
                self.capture_format,
                self.capture_channels,
                self.capture_rate,
                self.period_frames,
                self.periods,
            )
        except _DeviceLost:
            self.open_failures += 1
            raise

    def _capture(self, pcm) -> None:
        conv = self._new_converter()
        warmup = self.capture_rate * self.warmup_ms // 1000 * conv.frame_bytes
        descriptors = pcm.polldescriptors()
        poller = select.poll()
        for fd, mask in descriptors:
            poller.register(fd, mask)
        wake_r = self._wake_r
        assert wake_r is not None  # open while the thread runs
        poller.register(wake_r, select.POLLIN)
        last_audio = time.monotonic()
        while not self._stop.is_set():
            events = poller.poll(self.stall_timeout_s * 250)
            if self._stop.is_set():
                return
            ready = _pcm_ready(pcm, descriptors, events, wake_r, self.device)
            data = self._read(pcm) if ready else None
            now = time.monotonic()  # after the read: a plugin may block inside it
            if data:
                last_audio = now
                warmup = self._convert(conv, data, warmup, now)
            elif now - last_audio > self.stall_timeout_s:
                raise _DeviceLost(
                    f"mic not found: {self.device}: no audio for {now - last_audio:.1f} s"
                )

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


def _open_pcm(device: str, fmt: str, channels: int, rate: int, period_frames: int, periods: int):
    """Open ``device`` for capture, non-blocking, and check it gives what was asked for
    (pyalsaaudio ignores a refused format, rate or channel count)."""
    import alsaaudio  # lazily: the WAV path and the tests of it need no ALSA

    formats = {"S16_LE": alsaaudio.PCM_FORMAT_S16_LE, "S32_LE": alsaaudio.PCM_FORMAT_S32_LE}
    try:
        pcm = alsaaudio.PCM(
            type=alsaaudio.PCM_CAPTURE,
            mode=alsaaudio.PCM_NONBLOCK,
            device=device,
            channels=channels,
            rate=rate,
            format=formats[fmt],
            periodsize=period_frames,
            periods=periods,
        )
    except alsaaudio.ALSAAudioError as exc:
        raise _DeviceLost(_open_problem(device, exc)) from None
    info = pcm.info()
    want = (channels, rate, fmt)
    got = (info.get("channels"), info.get("rate"), info.get("format_name"))
    if got != want:
        pcm.close()
        raise _DeviceLost(
            f"mic not usable: {device}: it gives {got[2]}, {got[0]} ch, {got[1]} Hz, "
            f"not {want[2]}, {want[0]} ch, {want[1]} Hz; set audio.capture_format/"
            f"capture_channels/capture_rate to match or use a plughw: device"
        )
    return pcm


def _pcm_ready(
    pcm,
    descriptors: list[tuple[int, int]],
    events: list[tuple[int, int]],
    wake_fd: int,
    device: str,
) -> bool:
    """Ask alsa-lib what the poll events mean: dsnoop/dmix descriptors (timers) must be
    demangled, or they would read as ready forever (and be cleared by this call)."""
    import alsaaudio

    got = dict(events)
    got.pop(wake_fd, None)
    if not got:
        return False
    try:
        revents = pcm.polldescriptors_revents([(fd, got.get(fd, 0)) for fd, _ in descriptors])
    except alsaaudio.ALSAAudioError as exc:
        raise _DeviceLost(f"mic not found: {device}: {_alsa_reason(exc)}") from None
    return bool(revents & (select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL))
