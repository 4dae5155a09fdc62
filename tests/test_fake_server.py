"""Conformance tests of the local v3 server (pttd.local.server + tests/fakes/fake_v3.py).

They use a tiny raw client built on ``websockets.sync.client`` (not the daemon's client), so a
bug in the daemon cannot hide a bug in the fake. Every message a session sends is validated
against AssemblyAI's AsyncAPI specs (tests/fakes/schemas.py).
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from pttd.local.options import ServerOptions
from pttd.local.query import QueryError, build_session_config, parse_query
from pttd.local.recognizer import Hypothesis, HypWord, SessionConfig, SpeechOnset
from pttd.local.server import ServerThread
from pttd.local.wire import AUTH_ERROR, LONG_REASON
from tests.fakes.fake_server import INPUT_DURATION_ERROR_PREFIX
from tests.fakes.fake_v3 import FakeV3Server, ScriptCursor, ScriptedRecognizer
from tests.fakes.faults import Faults
from tests.fakes.schemas import (
    UnknownMessageType,
    validate_client_message,
    validate_server_message,
    validate_session,
    validator,
)

RATE = 16000
US = "universal-streaming-english"
U3 = "u3-rt-pro"
FAST_TURNS = {"max_turn_silence": 400, "min_turn_silence": 200}


# ------------------------------------------------------------------------------------------------
# audio
# ------------------------------------------------------------------------------------------------

def tone(ms: int, rate: int = RATE, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def silence(ms: int, rate: int = RATE) -> np.ndarray:
    return np.zeros(rate * ms // 1000, dtype=np.int16)


def pcm(*parts: np.ndarray) -> bytes:
    return np.concatenate(parts).astype("<i2").tobytes()


def mulaw_encode(samples: np.ndarray) -> bytes:
    """G.711 mu-law, written independently of the server's decoder."""
    x = samples.astype(np.int32)
    sign = (x < 0).astype(np.int32)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~((sign << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


# ------------------------------------------------------------------------------------------------
# an independent raw client
# ------------------------------------------------------------------------------------------------

class RawClient:
    """A minimal v3 client: a reader thread records every message and the close."""

    def __init__(self, url: str, params: dict | None = None, *, key: str | None = "test-key",
                 headers: dict | None = None) -> None:
        # a careful client: JSON's lowercase booleans (the server takes nothing else)
        query = urllib.parse.urlencode({k: (str(v).lower() if isinstance(v, bool) else v)
                                        for k, v in (params or {}).items()})
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = key
        self.connected_at = time.monotonic()
        self.ws = connect(f"{url}?{query}" if query else url, additional_headers=all_headers,
                          open_timeout=5, close_timeout=2, legacy=True)
        self.messages: list[dict] = []
        self.arrivals: list[float] = []
        self.close_rcvd: Any = None
        self.closed = threading.Event()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self.ws.recv())
                with self._cond:
                    self.messages.append(message)
                    self.arrivals.append(time.monotonic())
                    self._cond.notify_all()
        except ConnectionClosed as exc:
            self.close_rcvd = exc.rcvd
        finally:
            with self._cond:
                self.closed.set()
                self._cond.notify_all()

    # --- waiting ---------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 5.0,
                 start: int = 0) -> dict | None:
        """First message from index ``start`` matching ``predicate``; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages[start:]:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed.is_set():
                    return None
                self._cond.wait(remaining)

    def wait_type(self, message_type: str, timeout: float = 5.0) -> dict:
        message = self.wait_for(lambda m: m.get("type") == message_type, timeout)
        assert message is not None, f"no {message_type} within {timeout}s: {self.messages}"
        return message

    def wait_final(self, timeout: float = 5.0, start: int = 0) -> dict:
        message = self.wait_for(lambda m: m.get("type") == "Turn" and m["end_of_turn"],
                                timeout, start)
        assert message is not None, f"no final Turn within {timeout}s: {self.messages}"
        return message

    def wait_closed(self, timeout: float = 5.0) -> tuple[int, str] | None:
        """(code, reason) of the server's close frame, or None if the TCP just dropped."""
        assert self.closed.wait(timeout), f"still open after {timeout}s: {self.messages}"
        if self.close_rcvd is None:
            return None
        return self.close_rcvd.code, self.close_rcvd.reason

    def arrival_of(self, message: dict) -> float:
        with self._cond:
            return self.arrivals[next(i for i, m in enumerate(self.messages) if m is message)]

    # --- sending ---------------------------------------------------------------------------------

    def send_json(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def send_text(self, text: str) -> None:
        self.ws.send(text)

    def send_audio(self, audio: bytes, frame_bytes: int = 1600, paced: bool = False,
                   frame_s: float = 0.05) -> None:
        """Send in frames; ``paced`` keeps real-time pace against a monotonic schedule."""
        start = time.monotonic()
        for index, offset in enumerate(range(0, len(audio), frame_bytes)):
            if paced:
                delay = start + index * frame_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.ws.send(audio[offset:offset + frame_bytes])

    def terminate(self) -> tuple[int, str] | None:
        self.send_json({"type": "Terminate"})
        return self.wait_closed()

    def close(self) -> None:
        self.ws.close()
        self._reader.join(5)

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def v3_server(fake_v3):
    """The server factory for the recognizer-independent conformance tests (those taking
    ``v3_server``). tests/test_local_engine.py imports them and overrides this fixture, so the
    same tests also run against the pocketsphinx engine."""
    return fake_v3


def finals(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("type") == "Turn" and m["end_of_turn"]]


def session_record(server: FakeV3Server, index: int = 0):
    record = server.wait_for_connections(index + 1, timeout=5)[index]
    assert record.wait_done(5), "server did not finish the session"
    return record


def assert_error_close(client: RawClient, code: int, text: str | re.Pattern) -> None:
    """An Error frame with error_code == close code, immediately before the close (§3.5)."""
    closing = client.wait_closed()
    assert closing is not None and closing[0] == code, (closing, client.messages)
    error = client.messages[-1]
    assert error["type"] == "Error" and error["error_code"] == code, client.messages
    validate_server_message(error)
    if isinstance(text, re.Pattern):
        assert text.fullmatch(error["error"]), error["error"]
    else:
        assert error["error"] == text
    expected_reason = error["error"] if len(error["error"].encode()) <= 123 else LONG_REASON
    assert closing[1] == expected_reason


# ------------------------------------------------------------------------------------------------
# auth and the upgrade
# ------------------------------------------------------------------------------------------------

def test_authorization_header_with_raw_key_gets_begin(fake_v3):
    server = fake_v3(api_keys={"secret"})
    with RawClient(server.url, {"speech_model": US}, key="secret") as client:
        begin = client.wait_type("Begin")
    record = session_record(server)
    assert record.headers["authorization"] == "secret"
    assert record.begin == begin


def test_token_query_param_is_accepted_once(fake_v3):
    server = fake_v3(api_keys={"secret"}, tokens={"temp-token"})
    with RawClient(server.url, {"speech_model": US, "token": "temp-token"}, key=None) as client:
        client.wait_type("Begin")
    with RawClient(server.url, {"speech_model": US, "token": "temp-token"}, key=None) as client:
        assert_error_close(client, 1008, AUTH_ERROR)  # temporary tokens are single-use


@pytest.mark.parametrize("key, params", [
    (None, {}),                          # nothing at all
    ("wrong", {}),                       # unknown key
    ("Bearer secret", {}),               # v3 wants the raw key, no Bearer
    (None, {"token": "secret"}),         # an API key is not a temporary token
])
def test_bad_auth_closes_1008_after_upgrade_before_begin(fake_v3, key, params):
    server = fake_v3(api_keys={"secret"})
    with RawClient(server.url, {"speech_model": US, **params}, key=key) as client:
        assert_error_close(client, 1008, AUTH_ERROR)
        assert [m["type"] for m in client.messages] == ["Error"]
    assert session_record(server).begin is None


def test_any_non_empty_credential_when_no_keys_configured(fake_v3):
    server = fake_v3()
    with RawClient(server.url, key="anything") as client:
        client.wait_type("Begin")
    with RawClient(server.url, key=None) as client:
        assert_error_close(client, 1008, AUTH_ERROR)


def test_http_reject_fault_and_wrong_path(fake_v3):
    server = fake_v3(faults=[Faults(http_reject_status=401)])
    with pytest.raises(InvalidStatus) as rejected:
        RawClient(server.url)
    assert rejected.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as not_found:
        RawClient(server.url.replace("/v3/ws", "/v2/realtime/ws"))
    assert not_found.value.response.status_code == 404
    assert server.connection_attempts == 2
    assert [r.http_status for r in server.connections] == [401, 404]
    assert server.sessions == []


# ------------------------------------------------------------------------------------------------
# Begin and query parsing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, family, mode", [
    (US, "us", None), (U3, "u3", "balanced"), (None, "u3", "balanced")])
def test_begin_shape(v3_server, model, family, mode):
    server = v3_server(expires_in_s=600)
    params = {"speech_model": model} if model else {}
    with RawClient(server.url, params, headers={"AssemblyAI-Version": "2025-05-12"}) as client:
        begin = client.wait_type("Begin")
    validate_server_message(begin, family)
    assert uuid.UUID(begin["id"]).version == 4
    assert isinstance(begin["expires_at"], int)
    assert abs(begin["expires_at"] - (time.time() + 600)) <= 2
    config = begin["configuration"]
    assert config["model"] == (model or "universal-3-5-pro")
    assert config["mode"] == mode
    assert config["api_version"] == "2025-05-12"
    assert (config["speaker_labels"], config["redact_pii"], config["filter_profanity"]) == (
        False, False, False)
    assert config["domain"] is None and config["voice_focus"] is None


def test_query_parsing_types():
    query = parse_query("format_turns=true&speaker_labels=false&sample_rate=8000"
                        "&keyterms_prompt=%5B%22pttd%22%2C%22Raspberry%20Pi%22%5D"
                        "&llm_gateway=%7B%22model%22%3A%22x%22%7D&vad_threshold=0.5"
                        "&speech_model=u3-rt-pro")
    assert query == {"format_turns": True, "speaker_labels": False, "sample_rate": 8000,
                     "keyterms_prompt": ["pttd", "Raspberry Pi"], "llm_gateway": {"model": "x"},
                     "vad_threshold": 0.5, "speech_model": "u3-rt-pro"}
    for strict in ("format_turns=True", "format_turns=TRUE", "format_turns=1",
                   "format_turns=yes", "speaker_labels=False", "speaker_labels=0",
                   "keyterms_prompt=pttd,pi", 'keyterms_prompt="pttd"',
                   "keyterms_prompt=%7B%7D"):
        with pytest.raises(QueryError):  # JSON's lowercase booleans and JSON arrays only
            parse_query(strict)
    with pytest.raises(QueryError):
        parse_query("format_turns=yes")
    with pytest.raises(QueryError):
        parse_query("sample_rate=16k")


def test_session_config_defaults_per_family():
    options = ServerOptions()
    us = build_session_config("id", {"speech_model": US}, options)
    u3 = build_session_config("id", {"speech_model": U3}, options)
    assert (us.family, us.max_turn_silence_ms, us.min_turn_silence_ms) == ("us", 1280, 400)
    assert (u3.family, u3.max_turn_silence_ms, u3.min_turn_silence_ms) == ("u3", 1000, 100)
    with pytest.raises(QueryError):
        build_session_config("id", {"inactivity_timeout": 2}, options)
    with pytest.raises(QueryError):
        build_session_config("id", {"encoding": "opus"}, options)


def test_invalid_query_parameter_is_an_error_after_begin_would_be(v3_server):
    server = v3_server()
    with RawClient(server.url, {"speech_model": US, "inactivity_timeout": 2}) as client:
        assert_error_close(client, 3005, re.compile(r"Session Cancelled: Invalid query .*"))


def test_records_capture_headers_query_frames_and_close(v3_server):
    server = v3_server()
    params = {"speech_model": US, "format_turns": "true", "keyterms_prompt": '["pttd"]'}
    with RawClient(server.url, params, headers={"User-Agent": "raw-test"}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        client.send_json({"type": "KeepAlive"})
        assert client.terminate() == (1000, "")
    record = session_record(server)
    assert record.headers["user-agent"] == "raw-test"
    assert record.query["format_turns"] is True and record.query["keyterms_prompt"] == ["pttd"]
    frames = record.audio_frames()
    assert [len(f.data) for f in frames] == [1600] * 6
    times = [r.t for r in record.received]
    assert times == sorted(times) and all(t >= record.started for t in times)
    assert record.text_messages() == [{"type": "KeepAlive"}, {"type": "Terminate"}]
    assert record.audio_ms == pytest.approx(300)
    assert record.close_sent == (1000, "") and record.close_received == (1000, "")
    assert [m["type"] for m in record.messages][-1] == "Termination"


# ------------------------------------------------------------------------------------------------
# turns
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, format_turns, pattern", [
    (US, False, "A"), (US, True, "A"), (US, True, "B"), (U3, False, "A")])
def test_paced_stream_yields_scripted_text_as_one_final(fake_v3, model, format_turns, pattern):
    server = fake_v3(script=["hello world"], format_pattern=pattern)
    params = {"speech_model": model, "format_turns": str(format_turns).lower(), **FAST_TURNS}
    with RawClient(server.url, params) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(600), silence(500)), paced=True)
        client.wait_final()
        assert client.terminate() == (1000, "")
        messages = client.messages
    family = "u3" if model == U3 else "us"
    validate_session(messages, family)
    assert messages == session_record(server).messages
    turns = [m for m in messages if m["type"] == "Turn"]
    assert {t["turn_order"] for t in turns} == {0}
    for word in (w for t in turns for w in t["words"]):
        assert 0 <= word["start"] <= word["end"] <= 1100
    if family == "u3":
        check_u3_turns(messages)
    else:
        check_us_turns(turns, format_turns, pattern)


def check_u3_turns(messages: list[dict]) -> None:
    types = [m["type"] for m in messages]
    assert types.index("SpeechStarted") < types.index("Turn")
    partials = [m for m in messages if m["type"] == "Turn" and not m["end_of_turn"]]
    assert partials, "U3 sends a partial at the pause"
    for partial in partials:
        assert not partial["turn_is_formatted"] and partial["end_of_turn_confidence"] == 0
        assert not any(w["word_is_final"] for w in partial["words"])
        assert partial["utterance"] == ""
    (final,) = finals(messages)
    assert final["transcript"] == final["utterance"] == "Hello world."
    assert final["turn_is_formatted"] and final["end_of_turn_confidence"] == 1
    assert all(w["word_is_final"] for w in final["words"])


def check_us_turns(turns: list[dict], format_turns: bool, pattern: str) -> None:
    partials = [t for t in turns if not t["end_of_turn"]]
    assert any(not w["word_is_final"] for t in partials for w in t["words"]), "non-final tail"
    for turn in partials:
        final_words = [w["text"] for w in turn["words"] if w["word_is_final"]]
        assert turn["transcript"] == " ".join(final_words)
    assert sum(1 for t in turns if t["utterance"]) == 1
    eots = [t for t in turns if t["end_of_turn"]]
    if not format_turns:
        assert [(t["transcript"], t["turn_is_formatted"]) for t in eots] == [("hello world", False)]
    elif pattern == "A":
        assert [(t["transcript"], t["turn_is_formatted"]) for t in eots] == [
            ("hello world", False), ("Hello world.", True)]
        assert eots[1]["utterance"] == ""
        assert eots[0]["end_of_turn_confidence"] == eots[1]["end_of_turn_confidence"]
    else:
        assert all(t["turn_is_formatted"] for t in turns)
        assert [t["transcript"] for t in eots] == ["Hello world."]


def test_script_lines_are_used_in_order_and_cycle(fake_v3):
    server = fake_v3(script=["one two", "three"])
    params = {"speech_model": US, **FAST_TURNS}
    audio = pcm(tone(400), silence(450), tone(400), silence(450), tone(300), silence(450))
    with RawClient(server.url, params) as client:
        client.wait_type("Begin")
        client.send_audio(audio)
        client.wait_for(lambda m: m.get("turn_order") == 2 and m.get("end_of_turn", False))
        client.terminate()
        texts = [(t["turn_order"], t["transcript"]) for t in finals(client.messages)]
    assert texts == [(0, "one two"), (1, "three"), (2, "one two")]
    with RawClient(server.url, params) as client:  # the script cursor is server-wide
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        client.terminate()
        assert [(t["turn_order"], t["transcript"]) for t in finals(client.messages)] == [
            (0, "three")]


def test_mulaw_8k_audio_is_decoded_and_timed(fake_v3):
    server = fake_v3(script=["mu law"])
    params = {"speech_model": US, "encoding": "pcm_mulaw", "sample_rate": 8000, **FAST_TURNS}
    audio = mulaw_encode(np.concatenate([tone(500, rate=8000), silence(450, rate=8000)]))
    with RawClient(server.url, params) as client:
        client.wait_type("Begin")
        client.send_audio(audio, frame_bytes=400)  # 400 B of mu-law at 8 kHz = 50 ms
        final = client.wait_final()
        client.terminate()
    assert final["transcript"] == "mu law"
    assert final["words"][0]["start"] == 0 and final["words"][-1]["end"] == 500
    assert session_record(server).audio_ms == pytest.approx(950)


@pytest.mark.parametrize("model", [US, U3])
def test_force_endpoint_ends_the_turn_at_once(fake_v3, model):
    server = fake_v3(script=["press release"])
    with RawClient(server.url, {"speech_model": model}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(500)))          # speech still going: no natural endpoint
        forced_at = time.monotonic()
        client.send_json({"type": "ForceEndpoint"})
        final = client.wait_final(timeout=2)
        assert client.arrival_of(final) - forced_at < 0.5
        client.terminate()
    assert final["transcript"] in ("press release", "Press release.")
    record = session_record(server)
    force_t = next(r.t for r in record.received if r.data == {"type": "ForceEndpoint"})
    assert all(s.t >= force_t for s in record.sent
               if s.message.get("type") == "Turn" and s.message["end_of_turn"])


@pytest.mark.parametrize("policy, expected", [
    ("none", ["Begin", "Termination"]), ("empty_turn", ["Begin", "Turn", "Termination"])])
def test_force_endpoint_without_speech(v3_server, policy, expected):
    server = v3_server(faults=Faults(empty_force_endpoint=policy))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(silence(200)))
        client.send_json({"type": "ForceEndpoint"})
        client.terminate()
    assert [m["type"] for m in client.messages] == expected
    validate_session(client.messages, "us")
    if policy == "empty_turn":
        turn = client.messages[1]
        assert turn["end_of_turn"] and turn["transcript"] == "" and turn["words"] == []


def test_terminate_flushes_turn_then_termination_then_1000(fake_v3):
    server = fake_v3(script=["last words"])
    with RawClient(server.url, {"speech_model": U3}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(1200)))
        assert client.terminate() == (1000, "")
    types = [m["type"] for m in client.messages]
    assert types[-2:] == ["Turn", "Termination"]
    assert client.messages[-2]["transcript"] == "Last words."
    termination = client.messages[-1]
    validate_server_message(termination, "u3")
    assert termination["audio_duration_seconds"] == 1
    assert isinstance(termination["session_duration_seconds"], int)


def test_update_configuration_applies_silently(fake_v3):
    server = fake_v3(script=["quick"])
    with RawClient(server.url, {"speech_model": U3}) as client:   # U3 default: 1000 ms
        client.wait_type("Begin")
        update = {"type": "UpdateConfiguration", "max_turn_silence": 200}
        validate_client_message(update, "u3")
        client.send_json(update)
        client.send_audio(pcm(tone(300), silence(300)))
        final = client.wait_final(timeout=2)
        client.terminate()
    assert final["transcript"] == "Quick."
    assert {m["type"] for m in client.messages} == {"Begin", "SpeechStarted", "Turn",
                                                   "Termination"}


def test_speaker_labels_and_speaker_revision(fake_v3):
    server = fake_v3(script=["who said that"], faults=Faults(speaker_revision=True))
    with RawClient(server.url, {"speech_model": US, "speaker_labels": "true"}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(1100)))
        client.terminate()
    validate_session(client.messages, "us")
    (final,) = finals(client.messages)
    assert final["speaker_label"] == "A" and {w["speaker"] for w in final["words"]} == {"A"}
    assert [m["type"] for m in client.messages][-2:] == ["SpeakerRevision", "Termination"]
    revision = client.messages[-2]["revisions"][0]
    assert revision["turn_order"] == 0 and revision["speaker_label"] == "B"


def test_llm_gateway_response_follows_each_final(fake_v3):
    server = fake_v3(script=["summarise this"])
    params = {"speech_model": US, "llm_gateway": json.dumps({"model": "m", "messages": []})}
    with RawClient(server.url, params) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(500)))
        client.terminate()
    validate_session(client.messages, "us")
    assert [m["type"] for m in client.messages][-3:] == ["Turn", "LLMGatewayResponse",
                                                         "Termination"]
    assert client.messages[-2]["turn_order"] == 0


def test_scripted_recognizer_is_deterministic():
    config = build_session_config("id", {"speech_model": US, **FAST_TURNS}, ServerOptions())
    audio = pcm(tone(700), silence(500), tone(200), silence(450))

    def run() -> list:
        recognizer = ScriptedRecognizer(config, ScriptCursor(["a b c", "d"]))
        events = []
        for offset in range(0, len(audio), 1600):
            events += recognizer.feed(audio[offset:offset + 1600], offset // 32)
        return events + list(recognizer.finish())

    first, second = run(), run()
    assert first == second
    onsets = [e.timestamp_ms for e in first if isinstance(e, SpeechOnset)]
    assert onsets == [0, 1200]
    ends = [e for e in first if isinstance(e, Hypothesis) and e.end_of_turn]
    assert [[w.text for w in e.words] for e in ends] == [["a", "b", "c"], ["d"]]
    assert (ends[0].words[0].start_ms, ends[0].words[-1].end_ms) == (0, 700)


# ------------------------------------------------------------------------------------------------
# errors and limits
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, rate, nbytes, shown", [
    ("pcm_s16le", 16000, 640, "20"), ("pcm_s16le", 16000, 35200, "1100"),
    ("pcm_mulaw", 8000, 320, "40"), ("pcm_s16le", 16000, 1599, "49.97")])
def test_frame_outside_50_to_1000_ms_is_3007(v3_server, encoding, rate, nbytes, shown):
    server = v3_server()
    with RawClient(server.url, {"speech_model": US, "encoding": encoding,
                                "sample_rate": rate}) as client:
        client.wait_type("Begin")
        client.send_audio(bytes(nbytes), frame_bytes=nbytes)
        assert_error_close(client, 3007, f"Input duration violation: {shown} ms. "
                                         "Expected between 50 and 1000 ms")


@pytest.mark.parametrize("nbytes", [1600, 32000])
def test_frames_of_exactly_50_and_1000_ms_are_fine(v3_server, nbytes):
    server = v3_server()
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(bytes(nbytes), frame_bytes=nbytes)
        assert client.terminate() == (1000, "")


@pytest.mark.parametrize("prefix", ["", INPUT_DURATION_ERROR_PREFIX])
def test_sending_faster_than_real_time_is_3007(v3_server, prefix):
    server = v3_server(max_lead_s=1.0, duration_error_prefix=prefix)
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        try:
            client.send_audio(bytes(32000 * 4), frame_bytes=32000)
        except ConnectionClosed:
            pass
        assert_error_close(client, 3007, re.compile(
            re.escape(prefix) + r"Audio Transmission Rate Exceeded: "
                                r"Received 2\.0 sec\. audio in \d+\.\d{6} sec"))


@pytest.mark.parametrize("text, error", [
    ("not json", "Invalid JSON: not json"),
    ("[]", "Invalid Message: []"),
    ('{"type": "Bogus"}', "Invalid Message Type: Bogus"),
    ('{"terminate_session": true}', 'Invalid Message Type: {"terminate_session": true}'),
])
@pytest.mark.parametrize("legacy", [False, True])
def test_bad_client_messages_are_3006_or_legacy_3005(v3_server, text, error, legacy):
    server = v3_server(legacy_codes=legacy)
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_text(text)
        assert_error_close(client, 3005 if legacy else 3006, error)


def test_long_error_text_gets_the_generic_close_reason(v3_server):
    server = v3_server()
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_text("x" * 200)
        assert_error_close(client, 3006, "Invalid JSON: " + "x" * 200)
        assert client.close_rcvd.reason == LONG_REASON


@pytest.mark.parametrize("legacy, code", [(False, 3008), (True, 3005)])
def test_session_expiry(v3_server, legacy, code):
    server = v3_server(expires_in_s=0.5, legacy_codes=legacy)
    with RawClient(server.url, {"speech_model": US}) as client:
        begin = client.wait_type("Begin")
        assert_error_close(client, code, "Session Expired: Maximum session duration exceeded")
        assert client.arrival_of(client.messages[-1]) - client.connected_at >= 0.4
    assert begin["expires_at"] <= int(time.time()) + 1


@pytest.mark.parametrize("legacy, code, text", [
    (False, 3009, "Unauthorized Connection: Too many concurrent sessions"),
    (True, 1008, "Unauthorized connection: Too many concurrent sessions")])
def test_new_session_limiter(fake_v3, legacy, code, text):
    server = fake_v3(sessions_per_minute=1, legacy_codes=legacy)
    with RawClient(server.url, {"speech_model": US}) as first:
        first.wait_type("Begin")
        with RawClient(server.url, {"speech_model": US}) as second:
            assert_error_close(second, code, text)
    assert server.connection_attempts == 2 and len(server.sessions) == 1


@pytest.mark.parametrize("close_code", [3005, 1000])
def test_inactivity_timeout_and_keepalive(v3_server, close_code):
    server = v3_server(inactivity_min_s=0.5, inactivity_close_code=close_code)
    with RawClient(server.url, {"speech_model": US, "inactivity_timeout": 1}) as client:
        client.wait_type("Begin")
        for _ in range(5):   # 1.5 s of KeepAlives every 0.3 s keeps the session open
            assert client.wait_for(lambda m: m.get("type") == "Error", timeout=0.3) is None
            client.send_json({"type": "KeepAlive"})
        assert not client.closed.is_set()
        last_keepalive = time.monotonic()
        closing = client.wait_closed(timeout=3)
        assert time.monotonic() - last_keepalive >= 0.9
    if close_code == 1000:
        assert closing[0] == 1000 and [m["type"] for m in client.messages] == ["Begin"]
    else:
        assert closing[0] == 3005 and client.messages[-1]["error_code"] == 3005
    assert validator("us").schema("KeepAlive", "client")[1] is False  # not in the spec


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------

def test_fault_drop_after_frames_aborts_without_close_frame(fake_v3):
    server = fake_v3(faults=Faults(drop_after_frames=3))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        try:
            client.send_audio(pcm(tone(1000)), paced=True)
        except ConnectionClosed:
            pass
        assert client.wait_closed() is None
    record = session_record(server)
    assert record.aborted and record.close_sent is None
    assert len(record.audio_frames()) == 3


def test_fault_drop_on_force_endpoint(fake_v3):
    server = fake_v3(faults=Faults(drop_on_force_endpoint=True))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        client.send_json({"type": "ForceEndpoint"})
        assert client.wait_closed() is None
        assert not finals(client.messages)


def test_fault_no_termination_ignore(fake_v3):
    server = fake_v3(faults=Faults(no_termination="ignore"))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        client.send_json({"type": "Terminate"})
        assert client.wait_for(lambda m: m["type"] == "Termination", timeout=0.5) is None
        assert not client.closed.is_set()


def test_fault_no_termination_close(fake_v3):
    server = fake_v3(faults=Faults(no_termination="close"))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        assert client.terminate() == (1000, "")
    assert [m["type"] for m in client.messages][-1] == "Turn"


def test_fault_begin_delay(fake_v3):
    server = fake_v3(faults=Faults(begin_delay_s=0.4))
    with RawClient(server.url, {"speech_model": US}) as client:
        begin = client.wait_type("Begin")
        assert client.arrival_of(begin) - client.connected_at >= 0.35


def test_fault_close_before_begin(fake_v3):
    server = fake_v3(faults=Faults(close_before_begin=(1011, "overloaded")))
    with RawClient(server.url, {"speech_model": US}) as client:
        assert client.wait_closed() == (1011, "overloaded")
        assert client.messages == []


def test_fault_unknown_messages_and_fields(fake_v3):
    server = fake_v3(faults=Faults(unknown_messages=True))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        client.terminate()
    types = [m["type"] for m in client.messages]
    assert types[1] == "FutureEventForTesting"
    final_index = next(i for i, m in enumerate(client.messages)
                       if m["type"] == "Turn" and m["end_of_turn"])
    assert types[final_index - 1] == "FutureEventForTesting"
    assert all("x_unrecognized_field" in m for m in client.messages)
    validate_session(client.messages, "us", allow_unknown=True)
    with pytest.raises(UnknownMessageType):
        validate_session(client.messages, "us")


def test_fault_turn_delay(fake_v3):
    server = fake_v3(faults=Faults(turn_delay_s=0.4))
    with RawClient(server.url, {"speech_model": U3}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        forced_at = time.monotonic()
        client.send_json({"type": "ForceEndpoint"})
        final = client.wait_final(timeout=3)
        assert client.arrival_of(final) - forced_at >= 0.35
        assert client.terminate() == (1000, "")
    assert [m["type"] for m in client.messages][-2:] == ["Turn", "Termination"]


def test_fault_error_without_close_goes_silent(fake_v3):
    server = fake_v3(faults=Faults(error_without_close=2))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(tone(300)))
        error = client.wait_type("Error")
        assert error["error_code"] == 3005
        client.send_json({"type": "Terminate"})
        assert client.wait_for(lambda m: m["type"] != "Error", timeout=0.6,
                               start=len(client.messages)) is None
        assert not client.closed.is_set()
    record = session_record(server)
    assert record.close_sent == (1000, "") and record.close_received == (1000, "")
    assert [m["type"] for m in record.messages] == ["Begin", "Error"]


def test_fault_error_mid_turn(fake_v3):
    server = fake_v3(faults=Faults(error_mid_turn=(3005, 4)))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        try:
            client.send_audio(pcm(tone(600)), paced=True)
        except ConnectionClosed:
            pass
        assert_error_close(client, 3005, "Session Cancelled: An error occurred")
    assert len(session_record(server).audio_frames()) >= 4


def test_fault_warning(fake_v3):
    server = fake_v3(faults=Faults(warning_after_frames=2, warning_code=1234,
                                   warning_text="session ending soon"))
    with RawClient(server.url, {"speech_model": US}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(silence(150)))
        warning = client.wait_type("Warning")
        client.terminate()
    assert warning == {"type": "Warning", "warning_code": 1234, "warning": "session ending soon"}
    validate_server_message(warning)


@pytest.mark.parametrize("params, faults", [
    ({"session_heartbeat": "true"}, Faults()), ({}, Faults(heartbeat=True))])
def test_heartbeats(v3_server, params, faults):
    server = v3_server(heartbeat_interval_s=0.1, faults=faults)
    with RawClient(server.url, {"speech_model": "universal-3-5-pro", **params}) as client:
        client.wait_type("Begin")
        client.send_audio(pcm(silence(100)))
        beat = client.wait_type("Heartbeat")
        client.terminate()
    validate_server_message(beat, "u3")
    assert beat["total_duration_ms"] >= 100


def test_faults_are_per_connection_then_default(fake_v3):
    server = fake_v3(faults=[Faults(http_reject_status=503), Faults(close_before_begin=(1013, ""))])
    with pytest.raises(InvalidStatus):
        RawClient(server.url)
    with RawClient(server.url) as client:
        assert client.wait_closed()[0] == 1013
    with RawClient(server.url) as client:
        client.wait_type("Begin")
    server.set_default_faults(Faults(http_reject_status=429))
    with pytest.raises(InvalidStatus) as rejected:
        RawClient(server.url)
    assert rejected.value.response.status_code == 429
    server.queue_faults(Faults())
    with RawClient(server.url) as client:
        client.wait_type("Begin")
    assert server.connection_attempts == 5
    assert [r.faults.http_reject_status for r in server.connections] == [503, None, None, 429,
                                                                        None]


class OneShotRecognizer:
    """A minimal plug-in Recognizer: hears nothing until ForceEndpoint, then says "forced"."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config
        self.fed_ms = 0

    def feed(self, pcm16: bytes, stream_ms: int) -> list:
        if pcm16[:4] == b"boom":
            raise RuntimeError("decoder crashed")
        self.fed_ms = stream_ms + len(pcm16) * 1000 // (2 * self.config.sample_rate)
        return []

    def force_endpoint(self) -> list:
        return [Hypothesis((HypWord("forced", 0, self.fed_ms, 0.5, True),), end_of_turn=True)]

    def finish(self) -> list:
        return []

    def update_config(self, changes: dict) -> None:
        pass


@pytest.mark.parametrize("in_thread", [False, True])
def test_custom_recognizer_plugs_into_the_core(in_thread):
    options = ServerOptions(recognizer_in_thread=in_thread)
    with ServerThread(options, OneShotRecognizer) as server:
        with RawClient(server.url, {"speech_model": U3}) as client:
            client.wait_type("Begin")
            client.send_audio(pcm(silence(100)))
            client.send_json({"type": "ForceEndpoint"})
            final = client.wait_final()
            client.terminate()
        assert final["transcript"] == "Forced." and final["words"][0]["end"] == 100
        with RawClient(server.url, {"speech_model": U3}) as client:   # a crash is a 3005
            client.wait_type("Begin")
            client.send_audio(b"boom" + bytes(1596))
            assert_error_close(client, 3005, "Session Cancelled: An error occurred")


# ------------------------------------------------------------------------------------------------
# server lifecycle and schemas
# ------------------------------------------------------------------------------------------------

def test_stop_closes_open_sessions_and_joins():
    server = FakeV3Server(faults=Faults(error_without_close=1)).start()
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/v3/ws", server.url)
    client = RawClient(server.url)
    client.wait_type("Begin")
    client.send_audio(pcm(silence(50)))
    client.wait_type("Error")
    started = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - started < 5
    assert client.wait_closed()[0] == 1001
    client.close()


def test_client_messages_validate_against_the_spec():
    for family in ("us", "u3"):
        for message in ({"type": "ForceEndpoint"}, {"type": "Terminate"},
                        {"type": "UpdateConfiguration", "max_turn_silence": 500}):
            validate_client_message(message, family)
    assert "SpeechStarted" not in validator("us").server_schemas
    assert "SpeechStarted" in validator("u3").server_schemas
    with pytest.raises(UnknownMessageType):
        validate_server_message({"type": "SpeechStarted", "timestamp": 0, "confidence": 1.0})
