"""``pttd record --seconds N OUT.wav``: exactly what would be sent, for tuning gain and channel."""

from __future__ import annotations

import sys

from pttd.config import Config


def make_source(cfg: Config, ring, on_status=None):
    """The capture source the daemon would use for this config (also used by ``pttd check``)."""
    from pttd.audio.capture import AlsaSource, WavSource

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
    from pttd.audio.capture import AudioError, RingBuffer, record

    a = cfg.audio
    ring = RingBuffer(max(a.ring_seconds, int(seconds) + 5) * a.sample_rate, a.sample_rate)
    try:
        source = make_source(cfg, ring)
        stats = record(source, ring, seconds, out_path)
    except AudioError as exc:
        print(f"pttd: error: {exc}", file=sys.stderr)
        return 2 if "not found" in str(exc) and a.source == "wav" else 1
    except OSError as exc:
        print(f"pttd: error: cannot write {out_path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"wrote {stats['samples'] / a.sample_rate:.2f} s of 16-bit mono {a.sample_rate} Hz "
        f"to {out_path} (clipped samples: {stats.get('clipped', 0)}, overruns: "
        f"{stats.get('xruns', 0)})"
    )
    return 0
