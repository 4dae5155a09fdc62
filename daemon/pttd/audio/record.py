"""``pttd record --seconds N OUT.wav``: exactly what would be sent, for tuning gain and channel.

Also where a config becomes its capture source (``make_source``, for the daemon and ``pttd
check`` too).
"""

from __future__ import annotations

import logging
import os
import sys
import wave

from pttd.audio.alsa import AlsaSource, StatusCallback
from pttd.audio.capture import CaptureSource, WavSource
from pttd.audio.convert import AudioError
from pttd.audio.ring import RingBuffer
from pttd.config import Config
from pttd.errors import StartupError

log = logging.getLogger(__name__)


def make_source(
    cfg: Config, ring: RingBuffer, on_status: StatusCallback | None = None
) -> WavSource | AlsaSource:
    """The capture source the daemon would use for this config (also used by ``pttd check``)."""
    a = cfg.audio
    if a.source == "wav":
        return WavSource(a.wav, ring, sample_rate=a.sample_rate, period_ms=a.period_ms)
    return AlsaSource(
        device=a.device,
        capture_format=a.capture_format,
        capture_channels=a.capture_channels,
        capture_rate=a.capture_rate,
        channel=a.channel,
        gain_db=a.gain_db,
        warmup_ms=a.warmup_ms,
        sample_rate=a.sample_rate,
        ring=ring,
        period_ms=a.period_ms,
        on_status=on_status,
        highpass_hz=a.highpass_hz or None,
    )


def run_record(cfg: Config, seconds: float, out_path: str) -> int:
    a = cfg.audio
    ring = RingBuffer(max(a.ring_seconds, int(seconds) + 5) * a.sample_rate, a.sample_rate)
    try:
        source = make_source(cfg, ring)
        stats = record(source, ring, seconds, out_path)
    except AudioError as exc:
        if "not found" in str(exc) and a.source == "wav":
            raise StartupError(str(exc)) from None  # a missing input file: exit 2, in cli.main
        print(f"pttd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pttd: error: cannot write {out_path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"wrote {stats['samples'] / a.sample_rate:.2f} s of 16-bit mono {a.sample_rate} Hz "
        f"to {out_path} (clipped samples: {stats.get('clipped', 0)}, overruns: "
        f"{stats.get('xruns', 0)})"
    )
    return 0


def record(
    source: CaptureSource,
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
        source.wait_first_audio(start_timeout)
        pos = ring.start
        with wave.open(str(out_path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(ring.sample_rate)
            written = _copy_ring(source, ring, pos, total, out)
    finally:
        source.stop()
    return {"samples": written, **source.stats()}


def _copy_ring(
    source: CaptureSource, ring: RingBuffer, pos: int, total: int, out: wave.Wave_write
) -> int:
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
