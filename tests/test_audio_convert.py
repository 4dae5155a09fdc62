"""Converter: channel pick, 32→16 bit, gain/clipping, DC blocking, resampling, levels
(metered on demand only).

References are computed here from the analytic signals (not by re-running the production
formulas): a chirp is compared sample by sample with the ideal chirp at 16 kHz, delayed by the
filter's stated group delay.
"""
import numpy as np
import pytest

from alsa_fifo import pcm16, sine, sine_fit
from pttd.audio.levels import level_warnings
from pttd.audio.convert import Converter, Resampler, design_filter_bank

FS32 = 2.0 ** 31


def stereo_s32(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two float signals (32-bit units) → S32 frames with 24 significant bits, like a MEMS mic."""
    frames = np.stack([left, right], axis=1)
    return (np.rint(frames).astype(np.int64) & ~0xFF).astype("<i4")


def run(conv: Converter, frames: np.ndarray, block: int) -> np.ndarray:
    out = [conv.process(frames[i:i + block].tobytes()) for i in range(0, len(frames), block)]
    return pcm16(b"".join(out))


def chirp(t: np.ndarray, f0: float, f1: float, duration: float) -> np.ndarray:
    return np.sin(2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / duration * t * t))


def test_identity_path_returns_the_bytes_unchanged():
    conv = Converter("S16_LE", 1, 16000, 0, 0.0, 16000, highpass_hz=None)
    assert conv.identity
    data = np.random.default_rng(1).integers(-32768, 32767, 1601, dtype="<i2").tobytes()
    assert conv.process(data[:1001]) + conv.process(data[1001:]) == data  # odd split


@pytest.mark.parametrize("channel", [0, 1])
@pytest.mark.parametrize("rate", [48000, 44100])
def test_chirp_through_the_resampler_matches_the_ideal_16k_chirp(rate, channel):
    duration, amp = 2.0, 0.25 * FS32
    t = np.arange(int(rate * duration)) / rate
    signal = amp * chirp(t, 100, 6500, duration)
    other = 0.5 * FS32 * np.sin(2 * np.pi * 3000 * t)  # must not leak into the output
    frames = stereo_s32(*((signal, other) if channel == 0 else (other, signal)))
    conv = Converter("S32_LE", 2, rate, channel, 0.0, 16000, highpass_hz=None)
    y = run(conv, frames, rate // 10)
    delay = Resampler(rate, 16000).delay_in / rate
    ref = amp / 65536 * chirp(np.arange(len(y)) / 16000 - delay, 100, 6500, duration)
    core = slice(800, len(y) - 800)
    snr = 10 * np.log10(np.mean(ref[core] ** 2) / np.mean((y[core] - ref[core]) ** 2))
    assert snr >= 60.0  # measured ~78 dB; the issue asks for >= 40


@pytest.mark.parametrize("rate", [48000, 44100])
@pytest.mark.parametrize("tone", [8100, 9000, 10000, 12000, 15000, 20000])
def test_out_of_band_tones_do_not_alias(rate, tone):
    """8.1-12 kHz would fold onto 7.9-4 kHz; the design stops them >= 65 dB (test: >= 60)."""
    n = rate
    amp = 0.5 * FS32
    frames = stereo_s32(amp * np.sin(2 * np.pi * tone * np.arange(n) / rate), np.zeros(n))
    y = run(Converter("S32_LE", 2, rate, 0, 0.0, 16000, highpass_hz=None), frames, 4800)[400:]
    rms = np.sqrt(np.mean(y ** 2))
    in_rms = amp / 65536 / np.sqrt(2)
    assert 20 * np.log10(max(rms, 1e-9) / in_rms) <= -60.0


@pytest.mark.parametrize("rate", [44100, 48000, 32000])  # general path; whole-number decimation
def test_streaming_in_odd_blocks_equals_one_shot(rate):
    rng = np.random.default_rng(2)
    frames = stereo_s32(rng.normal(0, 0.1 * FS32, 20000), rng.normal(0, 0.1 * FS32, 20000))
    whole = run(Converter("S32_LE", 2, rate, 1, 6.0, 16000), frames, len(frames))
    conv = Converter("S32_LE", 2, rate, 1, 6.0, 16000)
    raw = frames.tobytes()
    cuts = np.sort(rng.integers(0, len(raw), 40))
    parts = [conv.process(raw[a:b]) for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    pieces = pcm16(b"".join(parts))
    assert len(pieces) == len(whole)
    assert np.max(np.abs(pieces - whole)) <= 1  # float rounding may differ by one LSB


def test_32_bit_input_keeps_its_low_bits_in_float():
    """A -60 dBFS 24-bit sine boosted 40 dB: float keeps ~30 dB more SNR than >>16."""
    n = 48000
    frames = stereo_s32(FS32 * 1e-3 * np.sin(2 * np.pi * 1000 * np.arange(n) / 48000),
                        np.zeros(n))
    y = run(Converter("S32_LE", 2, 48000, 0, 40.0, 16000, highpass_hz=None), frames, 4800)
    truncated = (frames >> 16).astype("<i2")
    y16 = run(Converter("S16_LE", 2, 48000, 0, 40.0, 16000, highpass_hz=None), truncated, 4800)
    amp, snr = sine_fit(y[500:], 1000, 16000)
    _, snr_trunc = sine_fit(y16[500:], 1000, 16000)
    assert amp == pytest.approx(3276.8, rel=0.01)
    assert snr >= 70.0 and snr >= snr_trunc + 20.0


def test_gain_scales_and_clipping_saturates_and_is_counted():
    n = 16000
    x = sine(1000, 16000, 0, n, 16384.0)  # -6 dBFS
    data = np.rint(x).astype("<i2")
    six = pcm16(Converter("S16_LE", 1, 16000, 0, 20 * np.log10(2), 16000,
                          highpass_hz=None).process(data.tobytes()))
    assert np.max(np.abs(six - 2 * data.astype(float))) <= 1
    conv = Converter("S16_LE", 1, 16000, 0, 12.0, 16000, highpass_hz=None)
    y = pcm16(conv.process(data.tobytes()))
    ideal = np.rint(data * 10 ** (12 / 20))
    assert conv.clipped_samples == np.count_nonzero((ideal > 32767) | (ideal < -32768))
    assert conv.clipped_samples > 0
    assert y.max() == 32767 and y.min() == -32768
    loud = np.abs(ideal) > 1000
    assert np.all(np.sign(y[loud]) == np.sign(ideal[loud]))  # saturated, never wrapped


def test_high_pass_removes_dc_and_keeps_speech_band():
    def through(freq):
        n = 32000
        x = sine(freq, 16000, 0, n, 8000.0) - 6000.0  # a big DC offset, as on an SPH0645
        conv = Converter("S16_LE", 1, 16000, 0, 0.0, 16000, highpass_hz=80.0)
        y = pcm16(conv.process(np.rint(x).astype("<i2").tobytes()))[4000:]
        amp, _ = sine_fit(y, freq, 16000)
        return 20 * np.log10(amp / 8000.0), abs(y.mean())

    gain_1k, dc_1k = through(1000)
    assert abs(gain_1k) < 0.1 and dc_1k < 1.0
    assert through(80)[0] == pytest.approx(-3.0, abs=0.3)
    assert through(20)[0] < -10.0


def test_dc_blocked_on_s32_stereo_48k_too():
    n = 48000
    x = 0.05 * FS32 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000) - 0.04 * FS32
    y = run(Converter("S32_LE", 2, 48000, 0, 0.0, 16000), stereo_s32(x, np.zeros(n)), 4800)
    assert abs(y[2000:].mean()) < 1.0


def test_levels_per_channel_and_silent_channel_warning():
    n = 4800
    frames = stereo_s32(np.zeros(n), 0.1 * FS32 * np.sin(2 * np.pi * 1000 * np.arange(n) / 48000))
    conv = Converter("S32_LE", 2, 48000, 0, 0.0, 16000, levels=True)
    conv.process(frames.tobytes())
    report = conv.take_levels()
    assert report.channels[0].all_zeros
    assert report.channels[1].peak_dbfs == pytest.approx(-20.0, abs=0.05)
    assert report.channels[1].rms_dbfs == pytest.approx(-23.01, abs=0.05)
    assert report.frames == n and report.out_peak_dbfs == float("-inf")
    assert "channel 0 is all zeros; try channel = 1" in level_warnings(report, 0)
    assert "ch0 all zeros" in report.line()
    assert conv.take_levels().frames == 0  # take() starts over


def test_meter_is_off_by_default_and_never_changes_what_is_sent():
    """Off: no meter, no readings. On: the same bytes and clip count, plus correct levels."""
    n = 48000
    rng = np.random.default_rng(4)
    frames = stereo_s32(rng.normal(0, 0.01 * FS32, n),
                        0.5 * FS32 * np.sin(2 * np.pi * 440 * np.arange(n) / 48000))
    raw = frames.tobytes()
    quiet = Converter("S32_LE", 2, 48000, 1, 12.0, 16000)
    metered = Converter("S32_LE", 2, 48000, 1, 12.0, 16000)
    metered.meter_levels(True)
    sent = [(quiet.process(raw[i:i + 38400]), metered.process(raw[i:i + 38400]))
            for i in range(0, len(raw), 38400)]
    assert all(a == b for a, b in sent)
    assert quiet.clipped_samples == metered.clipped_samples > 0
    assert quiet.take_levels() is None
    report = metered.take_levels()
    assert report.frames == n and report.clipped == metered.clipped_samples
    assert report.channels[1].peak_dbfs == pytest.approx(-6.02, abs=0.05)
    assert report.channels[0].rms_dbfs == pytest.approx(-40.0, abs=0.2)
    assert report.out_peak_dbfs == pytest.approx(0.0, abs=0.01)  # +12 dB on -6 dBFS: clipped
    metered.meter_levels(False)
    metered.process(raw[:38400])
    assert metered.take_levels() is None


def test_identity_path_meters_on_demand_and_still_sends_the_bytes_unchanged():
    n = 1600
    tone = np.rint(8192 * np.sin(2 * np.pi * 1000 * np.arange(n) / 16000)).astype("<i2")
    data = tone.tobytes()
    conv = Converter("S16_LE", 1, 16000, 0, 0.0, 16000, highpass_hz=None)
    assert conv.identity
    assert conv.process(data) == data and conv.take_levels() is None
    conv.meter_levels(True)
    assert conv.take_levels().frames == 0  # a fresh meter: what went before is not counted
    assert conv.process(data[:1001]) + conv.process(data[1001:]) == data
    report = conv.take_levels()
    assert report.frames == n and report.clipped == 0
    assert report.channels[0].peak_dbfs == pytest.approx(-12.04, abs=0.01)
    assert report.channels[0].rms_dbfs == pytest.approx(-15.05, abs=0.01)
    assert report.out_peak_dbfs == report.channels[0].peak_dbfs
    assert report.out_rms_dbfs == pytest.approx(report.channels[0].rms_dbfs, abs=1e-6)


def test_stereo_wav_style_mix_averages_channels():
    n = 1600
    a = np.full((n, 2), [1000, 3000], dtype="<i2")
    conv = Converter("S16_LE", 2, 16000, -1, 0.0, 16000, highpass_hz=None)
    assert set(pcm16(conv.process(a.tobytes())).tolist()) == {2000.0}


@pytest.mark.parametrize("rates", [(48000, 16000), (44100, 16000), (32000, 16000),
                                   (22050, 16000), (16000, 48000), (8000, 16000)])
def test_filter_banks_have_unity_gain(rates):
    bank = design_filter_bank(*rates)
    # each output phase sums its taps to 1: DC passes unchanged
    assert np.allclose(bank.matrix.sum(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize("rate", [48000, 32000, 44100])
def test_resampler_computes_the_filter_bank_sum(rate):
    """Output n of each super-period is the bank's column r dotted with the input span it reads
    (written out here sample by sample, whatever path the resampler takes)."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3000, rate // 10).astype(np.float32)
    res = Resampler(rate, 16000)
    b = res.bank
    y = np.concatenate([res.process(x[:1234]), res.process(x[1234:])])
    buf = np.concatenate([np.zeros(b.taps_per_phase - 1), x.astype(np.float64)])
    q = (len(buf) - b.span) // b.down + 1
    ref = np.array([[buf[k * b.down:k * b.down + b.span] @ b.matrix[:, r] for r in range(b.up)]
                    for k in range(q)]).reshape(-1)
    assert len(y) == len(ref) and np.max(np.abs(y - ref)) < 0.01  # float32 sums, 16-bit units


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_high_pass_equals_its_recursion_in_any_blocks(rate):
    """The closed form, chunked (up to a⁻ᵏ ≤ e⁶⁴), against y[n] = a·y[n−1] + g·(x[n] − x[n−1])
    run sample by sample, whole and in odd blocks: within 1e-6 of a 16-bit step."""
    from pttd.audio.convert import HighPass

    rng = np.random.default_rng(3)
    x = rng.normal(0, 8000, 3 * rate // 2) - 5000.0   # noise on a large DC offset
    ref_hp = HighPass(80.0, rate)
    a, g = ref_hp.a, ref_hp.g
    ref, y_prev, x_prev = np.empty(len(x)), 0.0, 0.0
    for n, v in enumerate(x):
        y_prev = a * y_prev + g * (v - x_prev)
        x_prev = v
        ref[n] = y_prev
    whole = HighPass(80.0, rate).process(x)
    hp = HighPass(80.0, rate)
    cuts = [0, 1, 777, rate // 10, rate // 10 + 3, len(x)]
    parts = np.concatenate([hp.process(x[i:j]) for i, j in zip(cuts, cuts[1:])])
    assert hp.chunk_len >= min(1024, rate // 8)
    assert np.max(np.abs(whole - ref)) < 1e-6 and np.max(np.abs(parts - ref)) < 1e-6


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError):
        Converter("S24_LE", 2, 48000, 0)
    with pytest.raises(ValueError):
        Converter("S32_LE", 2, 48000, 2)
    with pytest.raises(ValueError, match="too fine"):
        Converter("S16_LE", 1, 16001, 0)
