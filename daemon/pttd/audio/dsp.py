"""The numpy half of capture-format conversion; ``convert`` imports it only when a block needs it.

The chain, per block, all vectorised numpy (no per-sample Python, no scipy at run time):

    raw bytes → int frames → [level stats] → pick channel → float32 in 16-bit units
    → polyphase FIR resampler → DC-blocking high-pass → gain → round, clip (counted) → int16

Working in float keeps the bits an I2S MEMS mic puts below bit 16 of its 32-bit word (18–24 bits
of signal, left-justified): ``x / 65536`` is the same *level* as ``x >> 16`` but keeps the
fraction, so a quiet mic boosted by ``gain_db`` gets real signal rather than amplified
truncation noise. float32 holds 24 significant bits, exactly what the mic delivers.

A converter in identity mode (S16 mono at the send rate, no gain, no high-pass) with the level
meter off never loads this module, so the daemon with a WAV, or a 16 kHz mono mic with
``[audio] highpass_hz = 0``, runs without numpy (~13 MB of RSS and ~55 ms of start-up).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import as_strided

from pttd.audio.convert import FORMATS, ChannelLevel, LevelReport, dbfs

MAX_PHASES = 1000  # L or M above this would need a huge filter bank: resample with sox first

# Resampler design targets (see design_filter_bank): pass 0 … 0.875·f_nyq, stop ≥ f_nyq at 65 dB.
PASS_FRACTION = 0.875
STOP_ATTEN_DB = 65.0


# --- resampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterBank:
    """A polyphase filter bank for out/in = L/M, as one dense matrix.

    Every M input samples ("a super-period") produce L output samples. ``matrix`` (S × L) maps
    the S input samples that a super-period's outputs depend on to those L outputs, so a whole
    block is one ``np.dot`` of a strided (Q × S) view of the input with it: BLAS does the
    multiply-adds and Python runs once per block, not per sample or per phase.
    """

    up: int
    down: int
    taps_per_phase: int
    span: int
    matrix: np.ndarray
    prototype_taps: int


@lru_cache(maxsize=16)
def design_filter_bank(in_rate: int, out_rate: int) -> FilterBank:
    """Windowed-sinc (Kaiser) low-pass, split into polyphase rows; cached per rate pair.

    Why this filter: pass band to 0.875 × the lower Nyquist (7 kHz for 16 kHz output), stop band
    from the lower Nyquist itself (8 kHz) at ≥ 65 dB, so nothing above 8 kHz can alias into the
    output, not even into the 7–8 kHz edge (cheaper designs start the stop band above 8 kHz and
    let the transition band alias). Kaiser's estimate N ≈ (A − 8) / (2.285·Δω) gives 191 taps at
    48 kHz (Δf = 1 kHz, A = 65 dB): ~3 M multiply-adds per second of audio, ~60 µs of numpy
    per 100 ms block on x86. 44.1 kHz → 16 kHz (L/M = 160/441) needs ~175 taps per phase.
    A windowed sinc is designed in a few lines of numpy (no scipy import: 0.7 s, 86 MB);
    Kaiser's β trades ripple for width in closed form, and 65 dB leaves margin over 60.
    """
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    if up > MAX_PHASES or down > MAX_PHASES:
        raise ValueError(
            f"cannot convert {in_rate} Hz to {out_rate} Hz (ratio {up}/{down} is too fine)"
        )
    fs_up = float(in_rate * up)  # the rate of the zero-stuffed signal the prototype runs at
    f_stop = min(in_rate, out_rate) / 2.0
    f_pass = PASS_FRACTION * f_stop
    width = 2.0 * math.pi * (f_stop - f_pass) / fs_up
    beta = 0.1102 * (STOP_ATTEN_DB - 8.7)
    n_est = int(math.ceil((STOP_ATTEN_DB - 8.0) / (2.285 * width))) + 1
    taps = -(-n_est // up)  # taps per phase
    n = taps * up
    fc = (f_pass + f_stop) / 2.0 / fs_up
    t = np.arange(n) - (n - 1) / 2.0
    proto = 2.0 * fc * np.sinc(2.0 * fc * t) * np.kaiser(n, beta)
    proto *= up / proto.sum()  # unity gain after zero-stuffing by `up`
    return _polyphase_matrix(proto, up, down, taps)


def _polyphase_matrix(proto: np.ndarray, up: int, down: int, taps: int) -> FilterBank:
    """Place each output's phase taps at its offset inside the super-period's input span.

    Output r of a super-period (r = 0 … L−1) reads input offset ⌊rM/L⌋ and back, with the taps
    of phase (rM mod L): h[phase + t·L], t = 0 … taps−1.
    """
    r = np.arange(up)
    offset = (r * down) // up
    phase = (r * down) % up
    span = int(offset[-1]) + taps
    t = np.arange(taps)
    matrix = np.zeros((span, up), dtype=np.float32)
    rows = offset[:, None] - t[None, :] + taps - 1  # input index inside the span
    matrix[rows, r[:, None]] = proto[phase[:, None] + t[None, :] * up]
    return FilterBank(up, down, taps, span, matrix, len(proto))


class Resampler:
    """Streaming rational resampler; keeps the input history between calls."""

    def __init__(self, in_rate: int, out_rate: int):
        self.bank = design_filter_bank(int(in_rate), int(out_rate))
        self._hist = np.zeros(self.bank.taps_per_phase - 1, dtype=np.float32)
        # Decimation by a whole number (48 → 16 kHz, the I2S mic's case): output n is
        # Σₛ h[s]·x[Mn + s]; split by input phase p = s mod M, that is M short correlations of
        # x[p::M] with h[p::M], run in C by np.correlate. The general path's strided view
        # overlaps itself, so np.dot first copies it whole (q × span floats: 1.2 MB per 100 ms
        # at 48 kHz); this path reads each input sample once and, after 100 ms asleep, costs
        # about half the CPU (bench/audio_bench.py).
        self._phases = None
        if self.bank.up == 1:
            h = self.bank.matrix[:, 0]
            self._phases = [h[p :: self.bank.down].copy() for p in range(self.bank.down)]

    @property
    def delay_in(self) -> float:
        """Group delay in input samples (the filter is linear-phase)."""
        return (self.bank.prototype_taps - 1) / 2.0 / self.bank.up

    def process(self, x: np.ndarray) -> np.ndarray:
        b = self.bank
        buf = np.concatenate((self._hist, x.astype(np.float32, copy=False)))
        q = (len(buf) - b.span) // b.down + 1 if len(buf) >= b.span else 0
        if q <= 0:
            self._hist = buf
            return np.zeros(0, dtype=np.float32)
        if self._phases is not None:
            out = np.zeros(q, dtype=np.float32)
            for p, taps in enumerate(self._phases):
                out += np.correlate(buf[p :: b.down][: q + len(taps) - 1], taps, "valid")
        else:
            step = buf.strides[0]
            view = as_strided(
                buf, shape=(q, b.span), strides=(b.down * step, step), writeable=False
            )
            out = np.dot(view, b.matrix).reshape(-1)
        self._hist = buf[q * b.down :].copy()
        return out


# --- DC blocking -------------------------------------------------------------------------------


class HighPass:
    """First-order DC-blocking high-pass, y[n] = a·y[n−1] + g·(x[n] − x[n−1]).

    A one-pole IIR is the classic DC blocker: exact zero at DC, −3 dB near ``cutoff_hz``, no
    ripple, one multiply per sample. A recursion has no direct numpy primitive (and
    ``np.frompyfunc(...).accumulate`` is a Python call per sample), so each chunk uses the
    recursion's closed form y[k] = aᵏ⁺¹·(y₋₁ + Σⱼ≤ₖ g·d[j]·a⁻ʲ⁻¹), i.e. one ``cumsum``.
    a⁻ᵏ grows quickly, so a chunk is at most as long as keeps a⁻ᵏ ≤ e⁶⁴ (1024 samples at
    80 Hz / 8 kHz, 2037 at 16 kHz, so one chunk per 100 ms capture period there: each numpy
    call costs tens of µs after the thread has slept) and is computed in float64, which keeps
    the result exact to ~1e-12 of full scale.
    """

    MAX_EXPONENT = 64.0
    MAX_CHUNK = 4096

    def __init__(self, cutoff_hz: float, sample_rate: int):
        per_sample = 2.0 * math.pi * cutoff_hz / sample_rate  # = −ln a
        self.a = math.exp(-per_sample)
        self.g = (1.0 + self.a) / 2.0
        self.chunk_len = max(16, min(self.MAX_CHUNK, int(self.MAX_EXPONENT / per_sample)))
        k = np.arange(1, self.chunk_len + 1, dtype=np.float64)
        self._pow = self.a**k
        self._inv = self.g / self._pow
        self._x_prev = 0.0
        self._y_prev = 0.0

    def process(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.float64)
        for s in range(0, len(x), self.chunk_len):
            out[s : s + self.chunk_len] = self._chunk(x[s : s + self.chunk_len])
        return out

    def _chunk(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        x = x.astype(np.float64)
        d = np.empty(n, dtype=np.float64)
        d[0] = x[0] - self._x_prev
        np.subtract(x[1:], x[:-1], out=d[1:])
        y = self._pow[:n] * (self._y_prev + np.cumsum(d * self._inv[:n]))
        self._x_prev, self._y_prev = float(x[-1]), float(y[-1])
        return y


# --- levels ------------------------------------------------------------------------------------


class LevelMeter:
    """Accumulates peak/RMS/DC per input channel and of the output until ``take()``.

    The capture thread adds; ``pttd check`` takes from another thread, hence the lock.
    """

    def __init__(self, channels: int, full_scale: float):
        self.channels = channels
        self.full_scale = full_scale
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._peak = np.zeros(self.channels)
        self._sumsq = np.zeros(self.channels)
        self._sum = np.zeros(self.channels)
        self._frames = 0
        self._out_peak = 0.0
        self._out_sumsq = 0.0
        self._out_n = 0
        self._clipped = 0

    def add_input(self, frames: np.ndarray) -> None:
        """``frames``: float32 (channels × n, C order) in the capture format's integer units.

        Channel-major so every reduction runs over contiguous memory (~20 µs per 100 ms of
        stereo 48 kHz; the frame-major layout took 15× longer).
        """
        if not frames.shape[1]:
            return
        peak = np.maximum(frames.max(axis=1), -frames.min(axis=1))
        sumsq = np.einsum("ij,ij->i", frames, frames)
        total = frames.sum(axis=1)
        with self._lock:
            np.maximum(self._peak, peak, out=self._peak)
            self._sumsq += sumsq
            self._sum += total
            self._frames += frames.shape[1]

    def add_output(self, y: np.ndarray, clipped: int) -> None:
        """``y``: the int16 output samples."""
        peak = sumsq = 0.0
        if len(y):
            yf = y.astype(np.float32)
            peak, sumsq = float(np.abs(yf).max()), float(np.dot(yf, yf))
        with self._lock:
            self._out_peak = max(self._out_peak, peak)
            self._out_sumsq += sumsq
            self._out_n += len(y)
            self._clipped += clipped

    def add_identity(self, raw: bytes) -> None:
        """An S16 mono block that is sent as it is: it is both the input and the output."""
        y = np.frombuffer(raw, dtype=FORMATS["S16_LE"])
        self.add_input(y.astype(np.float32)[None, :])
        self.add_output(y, 0)

    def take(self) -> LevelReport:
        """The levels since the last call, then start over."""
        with self._lock:
            report = self._report()
            self._reset()
        return report

    def _report(self) -> LevelReport:
        n = max(1, self._frames)
        fs = self.full_scale
        chans = [
            ChannelLevel(
                dbfs(float(self._peak[c]), fs),
                dbfs(math.sqrt(self._sumsq[c] / n), fs),
                dbfs(abs(float(self._sum[c])) / n, fs),
            )
            for c in range(self.channels)
        ]
        out_rms = math.sqrt(self._out_sumsq / self._out_n) if self._out_n else 0.0
        return LevelReport(chans, dbfs(self._out_peak), dbfs(out_rms), self._clipped, self._frames)


# --- the chain -----------------------------------------------------------------------------------


class Chain:
    """One converter's numpy work and filter state, for every case but the unmetered identity."""

    def __init__(
        self,
        in_format: str,
        in_channels: int,
        in_rate: int,
        channel: int,
        gain: float,
        out_rate: int,
        highpass_hz: float | None,
    ):
        self._dtype = np.dtype(FORMATS[in_format])
        self._channels = in_channels
        self._channel = channel
        # Scale to 16-bit units in float: keeps the bits below bit 16 (see module docstring).
        self._scale = np.float32(1.0 / 65536.0 if in_format == "S32_LE" else 1.0)
        self._gain = gain
        self._resampler = Resampler(in_rate, out_rate) if in_rate != out_rate else None
        self._highpass = HighPass(highpass_hz, out_rate) if highpass_hz else None

    def process(self, raw: bytes, meter: LevelMeter | None) -> tuple[bytes, int]:
        """Whole frames → (PCM16 mono bytes, samples clipped); feeds ``meter`` unless None."""
        ints = np.frombuffer(raw, dtype=self._dtype).reshape(-1, self._channels)
        if meter is None and self._channel >= 0:
            x = ints[:, self._channel].astype(np.float32)  # the other channels are never read
        else:
            frames = ints.T.astype(np.float32, order="C")  # channels × n
            if meter is not None:
                meter.add_input(frames)
            x = frames.mean(axis=0) if self._channel < 0 else frames[self._channel]
        if self._scale != 1.0:  # S32 only: a numpy call saved costs ~30 µs after a sleep
            x = x * self._scale
        if self._resampler is not None:
            x = self._resampler.process(x)
        if self._highpass is not None:
            x = self._highpass.process(x)
        return self._to_pcm16(x, meter)

    def _to_pcm16(self, x: np.ndarray, meter: LevelMeter | None) -> tuple[bytes, int]:
        """Gain, round, saturate (never wrap) and count the saturated samples."""
        if self._gain != 1.0:
            x = x * self._gain
        y = np.rint(x)
        clipped = int(np.count_nonzero((y > 32767.0) | (y < -32768.0)))
        if clipped:
            np.clip(y, -32768.0, 32767.0, out=y)
        out = y.astype("<i2")
        if meter is not None:
            meter.add_output(out, clipped)
        return out.tobytes(), clipped
