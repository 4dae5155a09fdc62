"""Capture-format conversion: whatever the mic gives → PCM16 mono at the server's rate.

``Converter`` keeps the frame carry, the clip count and the level-meter switch; the numpy work
(resampler, high-pass, gain, levels) lives in ``dsp`` and is imported only when a converter
needs it. The identity case (S16 mono at the send rate, 0 dB, no high-pass: WAV files, USB mics
at 16 kHz) returns its input without numpy. The level meter costs ~70 % of a converted block
and only ``pttd check`` reads it, so it is off until ``meter_levels(True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pttd.errors import PttdError

if TYPE_CHECKING:  # numpy is loaded only when a converter needs it
    from pttd.audio.dsp import LevelMeter

FORMATS = {"S16_LE": "<i2", "S32_LE": "<i4"}  # numpy dtype strings
SAMPLE_BYTES = {"S16_LE": 2, "S32_LE": 4}
FULL_SCALE = {"S16_LE": 32768.0, "S32_LE": 2147483648.0}

# Served from ``dsp`` on first access (PEP 562), so importing this module loads no numpy.
_DSP_NAMES = frozenset(
    {"FilterBank", "HighPass", "LevelMeter", "MAX_PHASES", "Resampler", "design_filter_bank"}
)


def __getattr__(name: str):
    if name in _DSP_NAMES:
        from pttd.audio import dsp

        return getattr(dsp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AudioError(PttdError):
    """An audio problem the user can act on; the message says what to fix. (Not a UserError:
    each command decides what it means for its exit status.)"""


def dbfs(value: float, full_scale: float = 32768.0) -> float:
    """Level in dB relative to full scale; -inf for exact silence."""
    return 20.0 * math.log10(value / full_scale) if value > 0 else float("-inf")


# --- levels ------------------------------------------------------------------------------------


@dataclass
class ChannelLevel:
    """Peak and RMS of one capture channel in dBFS of the capture format (-inf = all zeros)."""

    peak_dbfs: float
    rms_dbfs: float
    dc_dbfs: float

    @property
    def all_zeros(self) -> bool:
        return self.peak_dbfs == float("-inf")


@dataclass
class LevelReport:
    """Levels over an interval: each input channel, what is sent, and clipped samples."""

    channels: list[ChannelLevel]
    out_peak_dbfs: float
    out_rms_dbfs: float
    clipped: int
    frames: int
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One meter line for ``pttd check``."""
        parts = []
        for i, c in enumerate(self.channels):
            parts.append(
                f"ch{i} all zeros"
                if c.all_zeros
                else f"ch{i} peak {c.peak_dbfs:6.1f} rms {c.rms_dbfs:6.1f}"
            )
        bar = _bar(self.out_rms_dbfs)
        sent = (
            f"sent silence {bar}"
            if self.out_peak_dbfs == float("-inf")
            else f"sent peak {self.out_peak_dbfs:6.1f} rms {self.out_rms_dbfs:6.1f} dBFS {bar}"
        )
        clip = f"  CLIPPED {self.clipped}" if self.clipped else ""
        return " | ".join(parts + [sent]) + clip


def _bar(level_dbfs: float, width: int = 20) -> str:
    filled = 0 if level_dbfs == float("-inf") else int(round((level_dbfs + 60.0) / 60.0 * width))
    filled = max(0, min(width, filled))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


# --- the converter -------------------------------------------------------------------------------


class Converter:
    """Stateful conversion of raw capture blocks to PCM16 mono at ``out_rate``.

    ``channel`` picks the capture channel (−1 = average all, used for stereo WAV files).
    ``highpass_hz`` (default 80; None or 0 = off) removes DC and rumble: on for microphones
    (I2S MEMS and many USB mics have a DC offset), off for WAV input. With S16 mono at
    ``out_rate``, 0 dB gain and no high-pass, ``process`` returns its input unchanged
    (``identity``): a WAV source then delivers exactly the file's samples, without numpy.
    ``levels=True`` starts with the level meter on (see ``meter_levels``).
    """

    def __init__(
        self,
        in_format: str = "S16_LE",
        in_channels: int = 1,
        in_rate: int = 16000,
        channel: int = 0,
        gain_db: float = 0.0,
        out_rate: int = 16000,
        highpass_hz: float | None = 80.0,
        levels: bool = False,
    ):
        _check_params(in_format, in_channels, in_rate, channel, out_rate)
        self.in_format = in_format
        self.in_channels = in_channels
        self.channel = channel
        self.frame_bytes = SAMPLE_BYTES[in_format] * in_channels
        self.gain = 10.0 ** (gain_db / 20.0)
        self.identity = (
            in_format == "S16_LE"
            and in_channels == 1
            and in_rate == out_rate
            and gain_db == 0.0
            and not highpass_hz
        )
        self._chain = None
        if not self.identity:
            from pttd.audio.dsp import Chain

            self._chain = Chain(
                in_format, in_channels, in_rate, channel, self.gain, out_rate, highpass_hz
            )
        self._meter: LevelMeter | None = None  # while metering; set from another thread
        self.clipped_samples = 0
        self._carry = b""
        self.meter_levels(levels)

    def meter_levels(self, on: bool) -> None:
        """Switch the level meter on (a fresh one, unless already on) or off.

        Safe from any thread: ``process`` reads ``_meter`` once per block, so a block is
        metered whole or not at all, and a block in flight when it goes off only feeds a meter
        nobody reads any more.
        """
        if not on:
            self._meter = None
        elif self._meter is None:
            from pttd.audio.dsp import LevelMeter

            self._meter = LevelMeter(self.in_channels, FULL_SCALE[self.in_format])

    def process(self, raw: bytes) -> bytes:
        """Convert one block (any length; a trailing partial frame waits for the next call)."""
        raw = self._whole_frames(raw)
        if not raw:
            return b""
        meter = self._meter
        if self._chain is None:
            if meter is not None:
                meter.add_identity(raw)
            return raw
        pcm, clipped = self._chain.process(raw, meter)
        self.clipped_samples += clipped
        return pcm

    def _whole_frames(self, raw: bytes) -> bytes:
        if self._carry:
            raw = self._carry + bytes(raw)
        cut = len(raw) - len(raw) % self.frame_bytes
        self._carry = bytes(raw[cut:])
        return raw[:cut] if cut != len(raw) else raw

    def take_levels(self) -> LevelReport | None:
        """The levels since the last call, then start over; None while the meter is off."""
        meter = self._meter
        return meter.take() if meter is not None else None


def _check_params(
    in_format: str, in_channels: int, in_rate: int, channel: int, out_rate: int
) -> None:
    if in_format not in FORMATS:
        raise ValueError(f"capture format {in_format!r} is not supported (S16_LE or S32_LE)")
    if in_channels < 1:
        raise ValueError("capture needs at least one channel")
    if not -1 <= channel < in_channels:
        raise ValueError(f"channel {channel} does not exist in {in_channels}-channel audio")
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError("sample rates must be positive")
