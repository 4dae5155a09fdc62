"""The adaptive post-roll's judge: never cuts speech it has seen, and saves the wait on silence.

The judge runs on the real ring buffer, fed capture period by capture period as the mic would.
Hypothesis draws the audio (speech and silence of any lengths, a noise floor, the release's
place, the settings); the invariants are what the user is promised:

* the stream ends between the release and the full post-roll, and the decision never changes;
* it is made by the time the full post-roll is captured (the streamer never waits on it longer);
* speech at the release (within EDGE_MS) gets the full post-roll;
* an early end is only ever taken after ``postroll_silence_ms`` of silence: no speech in the
  ``silence_ms`` before it, nor between the release and it;
* a silent tail with a floor to learn from ends at the release (the saving is real).

Then the same on the bundled espeak-ng speech, clean and under noise at 10 dB SNR.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pttd.audio.ring import RingBuffer
from pttd.core.postroll import (
    EDGE_MS,
    FLOOR_MS,
    FRAME_MS,
    MIN_FLOOR_FRAMES,
    PostrollJudge,
    frame_levels,
    speech_threshold,
)

RATE = 16000
MS = RATE // 1000
DATA = Path(__file__).resolve().parent.parent / "daemon" / "pttd" / "data"


def feed(samples: np.ndarray, release: int, postroll: int, silence: int, period: int):
    """Run a judge the way the streamer does: an update after each capture period. Returns the
    end, the ring position when it was decided, and every answer seen after that."""
    ring = RingBuffer(len(samples) + RATE, RATE)
    judge = PostrollJudge(ring, release, postroll, silence, RATE)
    decided_at, answers = None, []
    for pos in range(0, len(samples), period):
        ring.append(samples[pos : pos + period].tobytes())
        end = judge.update()
        if end is not None:
            decided_at = ring.end if decided_at is None else decided_at
            answers.append(end)
        assert judge.needed() <= release + postroll
    return judge, decided_at, answers


# words of 20-700 ms, each followed by a gap of 40-400 ms (speech is never 4 s without a gap:
# the judge's floor rests on that)
words = st.lists(
    st.tuples(st.integers(min_value=20, max_value=700), st.integers(min_value=40, max_value=400)),
    min_size=1,
    max_size=8,
)
TOLERANCE = 3 * MS  # speech that overlaps a 20 ms frame by less is too little energy to judge


def audible(speech: np.ndarray) -> np.ndarray:
    """The speech mask less TOLERANCE at each end of each stretch (a syllable fades in and out
    over tens of ms; a stretch switched on and off is a test's artefact)."""
    width = 2 * TOLERANCE + 1
    padded = np.concatenate([np.zeros(TOLERANCE), speech, np.zeros(TOLERANCE)])
    return np.convolve(padded, np.ones(width), "valid") >= width


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    idle_ms=st.integers(0, 3000),
    layout=words,
    release_ms=st.integers(0, 3000),
    postroll_ms=st.sampled_from([40, 100, 300, 600]),
    silence_ms=st.sampled_from([40, 100, 250, 400]),
    period_ms=st.sampled_from([10, 20, 100, 500]),
    floor_dbfs=st.floats(-75, -45),
    above_db=st.floats(25, 50),
    seed=st.integers(0, 2**16),
)
def test_the_judge_keeps_its_promises(
    idle_ms, layout, release_ms, postroll_ms, silence_ms, period_ms, floor_dbfs, above_db, seed
):
    rng = np.random.default_rng(seed)
    stretches = [np.zeros(idle_ms * MS, bool)]
    for word_ms, gap_ms in layout:
        stretches += [np.ones(word_ms * MS, bool), np.zeros(gap_ms * MS, bool)]
    speech = np.concatenate(stretches)
    release = min(idle_ms * MS + release_ms * MS, len(speech))
    postroll, silence = postroll_ms * MS, silence_ms * MS
    total = release + postroll + 600 * MS
    speech = np.concatenate([speech, np.zeros(max(0, total - len(speech)), bool)])[:total]
    floor = 32768 * 10 ** (floor_dbfs / 20)
    loud = 32768 * 10 ** (min(-3.0, floor_dbfs + above_db) / 20)
    t = np.arange(total) / RATE
    audio = rng.normal(0, floor, total) + speech * loud * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)
    samples = np.clip(audio, -32768, 32767).astype("<i2")

    judge, decided_at, answers = feed(samples, release, postroll, silence, period_ms * MS)
    full_end = release + postroll
    assert answers, "never decided"
    end = answers[0]
    assert set(answers) == {end}, "the decision changed"
    assert release <= end <= full_end
    assert decided_at is not None and decided_at <= full_end + period_ms * MS
    frame, edge = FRAME_MS * MS, EDGE_MS * MS
    judged_silence = silence // frame * frame or frame
    heard = audible(speech)
    if heard[max(0, release - edge) : release].any():
        assert end == full_end, "speech at the release must keep the whole post-roll"
    if end < full_end:
        quiet_from = max(0, min(end - judged_silence, release - edge))
        assert not heard[quiet_from:end].any(), (judge.reason, quiet_from, end)
    tail = max(judged_silence, -(-edge // frame) * frame)
    learnable = release - tail >= MIN_FLOOR_FRAMES * frame
    if learnable and not speech[max(0, release - tail) : release].any():
        assert end == release, judge.reason


def test_too_little_audio_to_learn_from_keeps_the_full_postroll():
    samples = np.zeros(RATE, "<i2")
    judge, _, answers = feed(samples, 100 * MS, 300 * MS, 250 * MS, 100 * MS)
    assert answers[0] == 400 * MS and "noise floor" in judge.reason


def test_lost_audio_at_the_release_keeps_the_full_postroll():
    ring = RingBuffer(RATE, RATE)  # one second: the audio before the release is overwritten
    ring.append(np.zeros(3 * RATE, "<i2").tobytes())
    judge = PostrollJudge(ring, RATE // 2, 300 * MS, 250 * MS, RATE)
    assert judge.update() == RATE // 2 + 300 * MS


@settings(max_examples=100, deadline=None)
@given(
    before_ms=st.integers(0, 6000),
    release_ms=st.integers(300, 6000),
    capacity_s=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_the_floor_read_in_pieces_is_the_floor_of_the_whole_window(
    before_ms, release_ms, capacity_s, seed
):
    """The judge reads the FLOOR_MS window a piece at a time (memory); the threshold it learns
    is the one the whole window gives, whatever the ring holds of it (wrapped, clipped, short)."""
    rng = np.random.default_rng(seed)
    total = (before_ms + release_ms) * MS
    samples = (rng.standard_normal(total) * rng.uniform(10, 3000)).astype("<i2")
    ring = RingBuffer(capacity_s * RATE, RATE)
    ring.append(samples.tobytes())
    release = max(0, total - 200 * MS)
    judge = PostrollJudge(ring, release, 300 * MS, 250 * MS, RATE)
    start = judge._judged
    assume(start <= ring.end)
    first = max(ring.start, start - FLOOR_MS * MS)
    whole = speech_threshold(frame_levels(ring.read(first, start - first).data, FRAME_MS * MS))
    assert judge._learn_floor() == whole


def clips() -> list[tuple[str, np.ndarray]]:
    demo = json.loads((DATA / "demo.json").read_text())
    out = []
    for clip in demo["clips"]:
        with wave.open(str(DATA / clip["file"])) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)
        out.append((clip["text"], pcm[RATE // 2 : -RATE // 2]))  # the files' own silence off
    return out


def spoken(speech: np.ndarray, snr_db: float | None, seed: int) -> tuple[np.ndarray, int]:
    """2 s of mic noise, the phrase, 1 s of noise; and where the phrase's last word ends."""
    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(speech**2)))
    noise = 32768 * 10 ** (-62 / 20) if snr_db is None else rms / 10 ** (snr_db / 20)
    audio = rng.normal(0, noise, 2 * RATE + len(speech) + RATE)
    audio[2 * RATE : 2 * RATE + len(speech)] += speech
    return np.clip(audio, -32768, 32767).astype("<i2"), 2 * RATE + len(speech)


def test_real_speech_a_release_after_the_last_word_ends_at_the_release():
    for snr in (None, 10.0, 5.0):
        for i, (text, speech) in enumerate(clips()):
            samples, last = spoken(speech, snr, i)
            release = last + 400 * MS
            judge, _, answers = feed(samples, release, 300 * MS, 250 * MS, 100 * MS)
            assert answers[0] == release, (text, snr, judge.reason)


def test_real_speech_a_release_during_the_last_word_keeps_the_whole_postroll():
    for snr in (None, 10.0, 5.0):
        for i, (text, speech) in enumerate(clips()):
            samples, last = spoken(speech, snr, i)
            release = last - 120 * MS
            judge, _, answers = feed(samples, release, 300 * MS, 250 * MS, 100 * MS)
            assert answers[0] == release + 300 * MS, (text, snr, judge.reason)


def test_real_speech_a_release_shortly_after_the_last_word_waits_out_the_silence():
    for i, (text, speech) in enumerate(clips()):
        samples, last = spoken(speech, None, i)
        release = last + 200 * MS  # past the edge (150 ms), within the silence (250 ms)
        judge, _, answers = feed(samples, release, 300 * MS, 250 * MS, 100 * MS)
        # 250 ms of silence after the phrase's last audible frame (its last few ms fade out)
        assert abs(answers[0] - (last + 250 * MS)) <= FRAME_MS * MS, judge.reason
