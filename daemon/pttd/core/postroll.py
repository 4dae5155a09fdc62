"""The adaptive post-roll: how much audio after the release a press needs, judged from the audio.

Most people let go of the button after they have stopped talking; the fixed post-roll then makes
them wait ``postroll_ms`` for silence. At the release the judge looks at the last
``silence_ms`` before it (20 ms frames against a noise floor learned from the seconds before):

* all of it silent: the press was already over; the stream ends at the release (in practice at
  the end of the capture period that holds it, which the streamer waits for anyway);
* speech within ``EDGE_MS`` of the release, or any speech after it: a word may be running past
  the button; the full post-roll, always;
* speech that stopped shortly before the release: the post-roll ends once ``silence_ms`` of
  silence has followed the last word (never later than the full post-roll).

When unsure (too little audio to learn the floor from, audio lost), it keeps the full post-roll.
Speech here is only "louder than the floor by ``MARGIN_DB``": a noise that comes and goes looks
like speech, which costs only the saving, never a word. The floor is the quietest frame of the
seconds before: speech has gaps between its words and syllables that fall to the room's noise,
so even a stretch of continuous talk does not raise it.

The judge runs on the streamer's thread (``Streamer.finish(..., judge=)``): it reads the ring
like the streamer does and never touches the controller's state. Its cost is one pass over
``FLOOR_MS`` of audio at the release (about 0.8 ms per second of audio on a PC, integer sums
over the 16-bit samples: no numpy), then the few frames of the tail.
"""

from __future__ import annotations

import array
import operator
import sys

FRAME_MS = 20
# speech this close before the release is a word that may run on past it: a word's weak ending
# (an s, a t: 100-150 ms) can be lost in the room's noise and look like silence
EDGE_MS = 150
# the noise floor is learned from this much audio before the stretch judged (the idle mic, the
# pre-roll, the press's own words): its quietest frame, a gap between words or syllables at the
# least (minimum statistics: speech does not go on for 4 s without one). A floor too low only
# costs the saving: more frames count as speech
FLOOR_MS = 4000
FLOOR_PIECE_FRAMES = 25  # read 0.5 s of it at a time
MIN_FLOOR_FRAMES = 50  # less than 1 s to learn from (a gap between words is not sure): unsure
MARGIN_DB = 6.0
# mean square of 16-bit samples under which a frame is silence on any mic (-60 dBFS RMS)
MIN_LEVEL = (32768 * 10 ** (-60 / 20)) ** 2


def frame_levels(pcm: bytes, frame_samples: int) -> list[float]:
    """Mean square of each whole frame of little-endian 16-bit samples."""
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) // 2 * 2])
    if sys.byteorder == "big":
        samples.byteswap()
    levels = []
    for i in range(0, len(samples) - frame_samples + 1, frame_samples):
        frame = samples[i : i + frame_samples]
        levels.append(sum(map(operator.mul, frame, frame)) / frame_samples)
    return levels


def speech_threshold(floor_levels: list[float]) -> float | None:
    """The level above which a frame counts as speech; None when there is too little to learn."""
    if len(floor_levels) < MIN_FLOOR_FRAMES:
        return None
    return max(min(floor_levels) * 10 ** (MARGIN_DB / 10), MIN_LEVEL)


class PostrollJudge:
    """Decides a released press's end from its audio; :meth:`update` until it returns one.

    Positions are the ring's. ``release`` is where the release fell; the end it returns lies in
    ``[release, release + postroll]``."""

    def __init__(self, ring, release: int, postroll: int, silence: int, sample_rate: int):
        self.ring = ring
        self.frame = FRAME_MS * sample_rate // 1000
        self.release = release
        self.full_end = release + postroll
        self.silence = max(self.frame, silence // self.frame * self.frame)
        self._edge = EDGE_MS * sample_rate // 1000
        self._floor_samples = FLOOR_MS * sample_rate // 1000
        # the stretch before the release judged: the silence that means "stopped", and at least
        # the edge (whole frames, so the last one ends at the release)
        tail = max(self.silence, -(-self._edge // self.frame) * self.frame)
        self._judged = release - tail  # frames are judged from here on, in order
        self._threshold: float | None = None
        self._last_speech: int | None = None  # where the last speech frame before the release ends
        self.reason = ""  # why it decided as it did (for the log)
        self.end: int | None = None

    def needed(self) -> int:
        """The ring position the next decision waits for."""
        if self.end is not None:
            return self.end
        if self._threshold is None:
            return self._judged
        if self._judged < self.release:
            return self.release
        return min(self._judged + self.frame, self.full_end)

    def update(self) -> int | None:
        """Judge what has been captured since the last call; the end once it is known."""
        if self.end is not None:
            return self.end
        if self._threshold is None:
            if self.ring.end < self._judged:
                return None  # the stretch to learn the floor from is not all captured yet
            self._threshold = self._learn_floor()
            if self._threshold is None:
                return self._decide(self.full_end, "too little audio to learn the noise floor")
        while self.end is None and self._judged + self.frame <= self.ring.end:
            self._judge_frame()
        if self.end is None and self.ring.end >= self.full_end:
            self._decide(self.full_end, "the full post-roll")
        return self.end

    def _learn_floor(self) -> float | None:
        # in pieces of whole frames: the transient copies stay at 0.5 s of audio instead of 4 s
        # (bytes, array and slices); the frames and their levels are the same either way
        start = self._judged
        pos = max(self.ring.start, start - self._floor_samples)
        levels: list[float] = []
        while pos + self.frame <= start:
            result = self.ring.read(pos, min(FLOOR_PIECE_FRAMES * self.frame, start - pos))
            whole = (result.next_pos - result.pos) // self.frame * self.frame
            if whole == 0:
                break  # not captured (cannot happen: update waits for the ring to reach start)
            levels += frame_levels(result.data, self.frame)
            pos = result.pos + whole
        return speech_threshold(levels)

    def _judge_frame(self) -> None:
        pos = self._judged
        result = self.ring.read(pos, self.frame)
        if result.lost or result.next_pos - result.pos < self.frame:
            self._decide(self.full_end, "audio lost at the release")
            return
        assert self._threshold is not None
        speech = frame_levels(result.data, self.frame)[0] > self._threshold
        self._judged = pos + self.frame
        if pos < self.release:
            if speech:
                self._last_speech = self._judged
            if self._judged >= self.release:
                self._decide_at_release()
        elif speech:
            self._decide(self.full_end, "speech after the release")
        elif self._judged >= self._quiet_end():
            self._decide(self._quiet_end(), "the last word ended before the release")

    def _decide_at_release(self) -> None:
        if self._last_speech is None:
            self._decide(self.release, "silence before the release")
        elif self._last_speech > self.release - self._edge:
            self._decide(self.full_end, "speech at the release")
        # else: speech stopped shortly before; the frames after the release decide

    def _quiet_end(self) -> int:
        assert self._last_speech is not None
        return min(self._last_speech + self.silence, self.full_end)

    def _decide(self, end: int, reason: str) -> int:
        self.end, self.reason = max(self.release, min(end, self.full_end)), reason
        return self.end
