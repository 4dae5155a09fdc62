"""The offline engine (pttd.local.engine): real pocketsphinx behind the real v3 WebSocket server.

Speech is the bundled espeak-ng demo WAVs (daemon/pttd/data, see scripts/make_demo_wavs.sh),
sent by the independent raw client of tests/test_fake_server.py. The recognizer-independent
conformance tests of that module are imported below and run here against the local engine
through the ``v3_server`` fixture.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import wave
from importlib import resources

import numpy as np
import pytest

from pttd.config import ConfigError
from pttd.local.decoders import UnknownWordsError, normalize_phrase, normalize_phrases
from pttd.local.engine import LocalEngine, PocketsphinxFactory, make_factory
from pttd.local.wire import AUTH_ERROR
from tests.fakes.fake_server import FakeOptions
from tests.fakes.local_engine import RecordedLocalEngine
from tests.fakes.schemas import validate_session
from tests.test_fake_server import (  # noqa: F401  (imported tests run here against the engine)
    U3,
    US,
    RawClient,
    assert_error_close,
    finals,
    pcm,
    session_record,
    silence,
    test_bad_client_messages_are_3006_or_legacy_3005,
    test_begin_shape,
    test_force_endpoint_without_speech,
    test_frame_outside_50_to_1000_ms_is_3007,
    test_frames_of_exactly_50_and_1000_ms_are_fine,
    test_heartbeats,
    test_inactivity_timeout_and_keepalive,
    test_invalid_query_parameter_is_an_error_after_begin_would_be,
    test_long_error_text_gets_the_generic_close_reason,
    test_records_capture_headers_query_frames_and_close,
    test_sending_faster_than_real_time_is_3007,
    test_session_expiry,
)

DATA = resources.files("pttd") / "data"
DEMO = json.loads((DATA / "demo.json").read_text())
COMMANDS = [clip for clip in DEMO["clips"] if clip["kind"] == "command"]
DICTATION = next(clip for clip in DEMO["clips"] if clip["kind"] == "dictation")
RATE = 16000


def whole_frames(audio: bytes, frame_bytes: int = 1600) -> bytes:
    """Zero-pad to whole 50 ms frames: the server refuses frames under 50 ms (3007)."""
    return audio + bytes(-len(audio) % frame_bytes)


def clip_pcm(clip: dict) -> bytes:
    with wave.open(str(DATA / clip["file"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
        return whole_frames(wav.readframes(wav.getnframes()))


def clip_by_text(text: str) -> dict:
    return next(clip for clip in DEMO["clips"] if clip["text"] == text)


# ------------------------------------------------------------------------------------------------
# engines (decoders load once per module: factories hold the decoder pool)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def free_factory() -> PocketsphinxFactory:
    return PocketsphinxFactory()


@pytest.fixture(scope="module")
def grammar_factory() -> PocketsphinxFactory:
    return PocketsphinxFactory(DEMO["phrases"])


@pytest.fixture(scope="module")
def grammar_engine(grammar_factory):
    with RecordedLocalEngine(factory=grammar_factory) as engine:
        yield engine


@pytest.fixture(scope="module")
def free_engine(free_factory):
    with LocalEngine(factory=free_factory) as engine:
        yield engine


@pytest.fixture
def v3_server(free_factory):
    """The conformance tests' server factory: a free-dictation local engine per call."""
    engines: list[LocalEngine] = []

    def make(faults=None, **option_fields) -> LocalEngine:
        engine = RecordedLocalEngine(options=FakeOptions(**option_fields), faults=faults,
                                     factory=free_factory, prewarm=False).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def force_final(client: RawClient, timeout: float = 3.0) -> tuple[dict, float]:
    """ForceEndpoint, then the final Turn and how long it took to arrive."""
    forced_at = time.monotonic()
    client.send_json({"type": "ForceEndpoint"})
    final = client.wait_final(timeout=timeout)
    return final, client.arrival_of(final) - forced_at


def transcribe(url: str, audio: bytes, params: dict | None = None, paced: bool = True) -> tuple:
    """One press: stream, ForceEndpoint, final, Terminate. Returns (final, messages)."""
    with RawClient(url, {"speech_model": US, **(params or {})}) as client:
        client.wait_type("Begin")
        client.send_audio(audio, paced=paced)
        final, _ = force_final(client)
        assert client.terminate() == (1000, "")
    validate_session(client.messages, "us")
    return final, client.messages


# ------------------------------------------------------------------------------------------------
# recognition
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", COMMANDS, ids=[c["file"] for c in COMMANDS])
def test_grammar_mode_transcribes_each_command_exactly(grammar_engine, clip):
    audio = clip_pcm(clip)
    final, messages = transcribe(grammar_engine.url, audio)
    assert final["transcript"] == clip["text"]
    duration_ms = len(audio) * 1000 // (2 * RATE)
    assert [w["text"] for w in final["words"]] == clip["text"].split()
    starts = [w["start"] for w in final["words"]]
    assert starts == sorted(starts) and 0 < starts[0] and final["words"][-1]["end"] <= duration_ms
    partials = [m for m in messages if m["type"] == "Turn" and not m["end_of_turn"]]
    assert partials, "partial Turns while the hypothesis grows"


def test_free_dictation_returns_text(free_engine):
    final, messages = transcribe(free_engine.url, clip_pcm(DICTATION))
    assert final["transcript"].strip(), messages
    assert all(0 <= w["start"] <= w["end"] for w in final["words"])


def test_keyterms_prompt_constrains_a_free_engine_and_skips_unknown_words(free_engine, caplog):
    keyterms = ["Remind me to buy MILK tomorrow!", "play some music", "open the pttd"]
    with caplog.at_level(logging.WARNING, logger="pttd.local.engine"):
        final, _ = transcribe(free_engine.url, clip_pcm(DICTATION),
                              {"keyterms_prompt": json.dumps(keyterms)}, paced=False)
    assert final["transcript"] == DICTATION["text"]
    assert any("open the pttd" in r.getMessage() and "pttd" in r.getMessage()
               for r in caplog.records)


def test_out_of_grammar_speech_gives_no_phrase(grammar_engine):
    with RawClient(grammar_engine.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(clip_pcm(DICTATION))
        client.send_json({"type": "ForceEndpoint"})
        client.terminate()
    assert all(t["transcript"] not in DEMO["phrases"] for t in finals(client.messages))


@pytest.mark.parametrize("rate", [8000, 48000])
def test_other_sample_rates_are_resampled(grammar_engine, rate):
    clip = clip_by_text("what time is it")
    samples = np.frombuffer(clip_pcm(clip), dtype="<i2").astype(np.float64)
    times = np.arange(int(len(samples) * rate / RATE)) / rate
    resampled = np.interp(times, np.arange(len(samples)) / RATE, samples).astype("<i2")
    frame = rate * 2 // 20   # 50 ms
    audio = whole_frames(resampled.tobytes(), frame)
    with RawClient(grammar_engine.url, {"speech_model": US, "sample_rate": rate}) as client:
        client.wait_type("Begin")
        client.send_audio(audio, frame_bytes=frame)
        final, _ = force_final(client)
        client.terminate()
    assert final["transcript"] == clip["text"]


# ------------------------------------------------------------------------------------------------
# turns
# ------------------------------------------------------------------------------------------------

def test_force_endpoint_ends_the_turn_at_once(grammar_engine):
    clip = clip_by_text("turn on the kitchen lights")
    with RawClient(grammar_engine.url, {"speech_model": U3}) as client:   # silence limit 1 s
        client.wait_type("Begin")
        client.send_audio(clip_pcm(clip))                # ends with 0.5 s: no natural endpoint
        assert client.wait_for(lambda m: m.get("type") == "SpeechStarted", 2) is not None
        final, latency = force_final(client)
        assert latency < 0.5
        client.terminate()
    assert final["transcript"] == "Turn on the kitchen lights."
    validate_session(client.messages, "u3")
    record = next(r for r in grammar_engine.sessions if r.begin == client.messages[0])
    assert record.wait_done(5)
    force_t = next(r.t for r in record.received if r.data == {"type": "ForceEndpoint"})
    assert all(s.t >= force_t for s in record.sent
               if s.message.get("type") == "Turn" and s.message["end_of_turn"])


def test_max_turn_silence_ends_turns_without_force_endpoint(grammar_engine):
    first, second = clip_by_text("what time is it"), clip_by_text("play some music")
    audio = clip_pcm(first) + pcm(silence(300)) + clip_pcm(second) + pcm(silence(300))
    params = {"speech_model": US, "max_turn_silence": 500, "min_turn_silence": 300}
    with RawClient(grammar_engine.url, params) as client:
        client.wait_type("Begin")
        client.send_audio(audio, paced=True)
        client.wait_for(lambda m: m.get("type") == "Turn" and m["turn_order"] == 1
                        and m["end_of_turn"], timeout=3)
        client.terminate()
    validate_session(client.messages, "us")
    assert [(t["turn_order"], t["transcript"]) for t in finals(client.messages)] == [
        (0, first["text"]), (1, second["text"])]
    utterances = [t["utterance"] for t in client.messages
                  if t["type"] == "Turn" and not t["end_of_turn"] and t["utterance"]]
    assert utterances == [first["text"], second["text"]]   # one per pause (min_turn_silence)


def test_terminate_flushes_turn_then_termination_then_1000(grammar_engine):
    with RawClient(grammar_engine.url, {"speech_model": U3}) as client:
        client.wait_type("Begin")
        client.send_audio(clip_pcm(clip_by_text("play some music")))
        assert client.terminate() == (1000, "")
    assert [m["type"] for m in client.messages][-2:] == ["Turn", "Termination"]
    assert client.messages[-2]["transcript"] == "Play some music."
    validate_session(client.messages, "u3")


def test_decoders_are_reused_across_sessions(grammar_factory):
    with RecordedLocalEngine(factory=grammar_factory) as engine:
        loaded = grammar_factory.pool.loaded
        for index in range(2):
            transcribe(engine.url, clip_pcm(clip_by_text("what time is it")), paced=False)
            assert session_record(engine, index).wait_done(5)
    assert grammar_factory.pool.loaded == loaded


# ------------------------------------------------------------------------------------------------
# auth, phrases, CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, ""])
def test_loopback_engine_accepts_no_or_empty_authorization(free_engine, key):
    with RawClient(free_engine.url, {"speech_model": US}, key=key) as client:
        client.wait_type("Begin")
        assert client.terminate() == (1000, "")


def test_a_key_is_required_off_loopback(free_factory):
    with pytest.raises(ConfigError, match="not loopback"):
        LocalEngine(host="0.0.0.0", factory=free_factory)
    with LocalEngine(api_key="k3y", factory=free_factory, prewarm=False) as engine:
        with RawClient(engine.url, {"speech_model": US}, key="k3y") as client:
            client.wait_type("Begin")
        with RawClient(engine.url, {"speech_model": US}, key=None) as client:
            assert_error_close(client, 1008, AUTH_ERROR)


def test_phrases_are_normalized_and_unknown_words_named():
    assert normalize_phrase("  Turn ON the Kitchen-Lights!! ") == "turn on the kitchen lights"
    assert normalize_phrase("What's the 'time'?") == "what's the time"
    assert normalize_phrases(["Play music.", "play  music", "", "?"]) == ("play music",)
    with pytest.raises(UnknownWordsError) as raised:
        make_factory(["turn on the kitchen lights", "open the pttd gizmoqx"])
    assert raised.value.unknown == {"open the pttd gizmoqx": ["pttd", "gizmoqx"]}
    assert "pttd, gizmoqx" in str(raised.value)


def read_line(stream, timeout: float) -> str:
    """One line from a pipe within ``timeout`` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return stream.readline()


def test_serve_local_prints_url_serves_and_exits_0_on_sigterm():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "pttd.cli", "serve-local", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = read_line(proc.stdout, 20).strip()
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/v3/ws"), url
        with RawClient(url, {"speech_model": US}, key=None) as client:
            client.wait_type("Begin")
            client.send_audio(clip_pcm(clip_by_text("what time is it")))
            final, _ = force_final(client, timeout=5)
            client.terminate()
        assert final["transcript"].strip()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
