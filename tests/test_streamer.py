"""pttd.core.streamer with a real RingBuffer and a real Session against the fake v3 server.

What the server receives is checked, not what the streamer meant to send: the frames are the
ring's audio from the start to exactly the end (the last frame takes the remainder), every frame
is legal (the fake closes 3007 otherwise), and ForceEndpoint comes after the last one.
"""
from __future__ import annotations

import queue

import numpy as np
import pytest

from pttd.audio.ring import RingBuffer
from pttd.core.streamer import StreamDone, Streamer
from tests.test_session import KEY, RATE, Recorder, open_session, quiet, speech


def filled_ring(*parts, block=RATE // 10):
    """A ring holding ``parts`` (appended in 100 ms capture blocks, as a mic would)."""
    pcm = np.concatenate(parts).tobytes()
    ring = RingBuffer(RATE * 30, RATE)
    for i in range(0, len(pcm), block * 2):
        ring.append(pcm[i:i + block * 2])
    return ring, pcm


def stream(srv, ring, start, end, chunk_ms=50, live=None):
    """Stream ``[start, end)`` of ``ring``; ``live`` (optional) appends more audio meanwhile.
    Returns (what the server received, StreamDone, the streamer's end)."""
    session = open_session(srv, Recorder())
    session.connect(timeout=5)
    posted: queue.Queue = queue.Queue()
    streamer = Streamer(ring, session, start, chunk_ms * RATE // 1000, post=posted.put,
                        sample_rate=RATE)
    actual_end = streamer.finish(end) if live is None else None
    streamer.start()
    if live is not None:
        actual_end = live(streamer)
    done = posted.get(timeout=10)
    streamer.stop(2)
    session.terminate(timeout=5)
    assert isinstance(done, StreamDone), done
    rec = srv.sessions[-1]
    rec.wait_done(5)
    return rec, done, actual_end


def received_audio(rec):
    kinds = [("audio" if r.kind == "binary" else r.data.get("type")) for r in rec.received]
    fe = kinds.index("ForceEndpoint")
    assert set(kinds[:fe]) == {"audio"} and "audio" not in kinds[fe:]
    assert rec.close_sent is None or rec.close_sent[0] == 1000  # no 3007: every frame legal
    return [r.data for r in rec.audio_frames()]


def test_the_turn_ends_exactly_at_the_end_and_the_last_frame_takes_the_remainder(fake_v3):
    srv = fake_v3(script=["exact end"], api_keys={KEY})
    ring, pcm = filled_ring(quiet(300), speech(900), quiet(600))
    start, end = 1600, 1600 + 800 * 20 + 530   # 20 whole chunks and 530 samples (33 ms)
    rec, done, actual = stream(srv, ring, start, end)
    assert actual == end
    frames = received_audio(rec)
    assert [len(f) // 2 for f in frames] == [800] * 19 + [800 + 530]
    assert b"".join(frames) == pcm[start * 2:end * 2]
    assert done.streamer.samples_sent == end - start and done.streamer.lost_samples == 0


def test_a_whole_number_of_chunks_needs_no_longer_last_frame(fake_v3):
    srv = fake_v3(script=["whole chunks"], api_keys={KEY})
    ring, pcm = filled_ring(quiet(300), speech(900), quiet(600))
    rec, _, actual = stream(srv, ring, 0, 800 * 12)
    frames = received_audio(rec)
    assert actual == 800 * 12 and [len(f) // 2 for f in frames] == [800] * 12
    assert b"".join(frames) == pcm[:800 * 12 * 2]


def test_a_tail_past_the_servers_1000_ms_is_split_in_two_legal_frames(fake_v3):
    srv = fake_v3(script=["long frames"], api_keys={KEY})
    ring, pcm = filled_ring(quiet(300), speech(1500), quiet(1200))
    chunk = 600 * RATE // 1000                   # chunk_ms = 600
    end = 17 * RATE // 10                        # 1700 ms: one chunk, then a 1100 ms tail
    rec, _, actual = stream(srv, ring, 0, end, chunk_ms=600)
    frames = received_audio(rec)
    tail = end - chunk
    assert actual == end and [len(f) // 2 for f in frames] == [chunk, tail // 2, tail - tail // 2]
    assert all(50 <= len(f) // 2 * 1000 / RATE <= 1000 for f in frames)
    assert b"".join(frames) == pcm[:end * 2]


def test_live_audio_then_an_end_set_while_streaming(fake_v3):
    """The end arrives while the streamer follows live audio (a release): the audio up to it,
    and nothing past it, reaches the server."""
    srv = fake_v3(script=["live"], api_keys={KEY})
    ring, _ = filled_ring(quiet(500))
    more = np.concatenate([speech(700), quiet(800)]).tobytes()
    whole = None

    def live(streamer):
        nonlocal whole
        block = RATE // 10 * 2
        for i in range(0, 6 * block, block):   # 600 ms, appended as fast as possible
            ring.append(more[i:i + block])
        end = streamer.finish(ring.end + 1234)  # mid-chunk, past what is captured
        for i in range(6 * block, len(more), block):
            ring.append(more[i:i + block])
        whole = ring.read(0, ring.end).data
        return end

    rec, done, actual = stream(srv, ring, 0, None, live=live)
    frames = received_audio(rec)
    assert actual == RATE // 2 + 6 * RATE // 10 + 1234
    assert b"".join(frames) == whole[:actual * 2]
    assert all(len(f) == 1600 for f in frames[:-1]) and 1600 <= len(frames[-1]) < 3200
    assert done.streamer.samples_sent == actual


@pytest.mark.parametrize("end_pos", [0, 400])
def test_an_end_less_than_a_chunk_from_the_start_still_sends_one_legal_frame(fake_v3, end_pos):
    srv = fake_v3(script=["short"], api_keys={KEY})
    ring, pcm = filled_ring(quiet(300))
    rec, _, actual = stream(srv, ring, 0, end_pos)
    frames = received_audio(rec)
    assert actual == 800 and frames == [pcm[:1600]]


def _released(srv, after_release: np.ndarray, before=np.concatenate([quiet(1500), speech(700)])):
    """A press streaming live audio is released at the end of ``before``; the adaptive judge
    decides the end while ``after_release`` arrives period by period (only what it waits for)."""
    from pttd.core.postroll import PostrollJudge

    ring, _ = filled_ring(quiet(100))
    postroll = 300 * RATE // 1000

    def live(streamer):
        block = RATE // 10
        pcm = before[RATE // 10:]  # the first 100 ms are in the ring already
        for i in range(0, len(pcm), block):
            ring.append(pcm[i:i + block].tobytes())
        release = ring.end
        judge = PostrollJudge(ring, release, postroll, 250 * RATE // 1000, RATE)
        streamer.finish(release + postroll, judge)
        for i in range(0, len(after_release), block):
            if streamer.end is not None and ring.end >= streamer.end:
                break  # never more audio than the streamer waits for
            ring.append(after_release[i:i + block].tobytes())
        live.release, live.ring = release, ring
        return None

    rec, done, _ = stream(srv, ring, 0, None, live=live)
    frames = received_audio(rec)
    whole = live.ring.read(0, live.ring.end).data
    assert b"".join(frames) == whole[:done.streamer.end * 2]
    return live.release, postroll, done.streamer


def test_adaptive_a_silent_tail_ends_the_stream_at_the_release(fake_v3):
    srv = fake_v3(script=["silent tail"], api_keys={KEY})
    before = np.concatenate([quiet(1500), speech(700), quiet(400)])
    release, postroll, streamer = _released(srv, quiet(1000), before)
    assert release <= streamer.end <= release + 800  # the release, or one legal 50 ms frame on
    assert streamer.postroll_reason == "silence before the release"


def test_adaptive_speech_at_the_release_keeps_the_whole_postroll(fake_v3):
    srv = fake_v3(script=["speech at the release"], api_keys={KEY})
    release, postroll, streamer = _released(srv, np.concatenate([speech(100), quiet(900)]))
    assert streamer.end == release + postroll
    assert streamer.postroll_reason == "speech at the release"
