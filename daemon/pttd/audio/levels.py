"""``pttd check``'s mic levels: run a source with its level meter on, then say what is wrong.

The meter itself is in dsp.py (numpy); this module only reads it through the source
(``meter_levels``, ``take_levels``), combines the readings and words the warnings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pttd.audio.capture import CaptureSource
from pttd.audio.convert import ChannelLevel, LevelReport


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
    source: CaptureSource,
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
        source.wait_first_audio(start_timeout)
        source.take_levels()  # drop the partial first reading
        readings = []
        deadline = time.monotonic() + seconds
        while not source.wait_stop(min(interval, max(0.0, deadline - time.monotonic()))):
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
