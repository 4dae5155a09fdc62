"""Protocol rules without a network: parsing, query building, close-code policy, turn assembly."""
import json
import random
import urllib.parse

import pytest

from pttd.stt.assemblyai import protocol as p
from pttd.stt.assemblyai.close_policy import policy_for
from pttd.stt.assemblyai.turns import TurnAssembler


def test_begin_with_and_without_configuration():
    b = p.parse_message(json.dumps({"type": "Begin", "id": "abc", "expires_at": 1772570132,
                                    "configuration": {"model": "universal-3-5-pro", "mode": None,
                                                      "api_version": "2025-05-12",
                                                      "speaker_labels": False}}))
    assert b.id == "abc" and b.expires_at == 1772570132
    assert b.configuration.model == "universal-3-5-pro" and b.configuration.mode is None
    assert b.configuration.extra == {"speaker_labels": False}
    bare = p.parse_message('{"type":"Begin","id":"x","expires_at":1}')
    assert bare.configuration is None


def test_turn_us_partial_text_includes_non_final_words():
    t = p.parse_message(json.dumps({
        "type": "Turn", "turn_order": 0, "turn_is_formatted": False, "end_of_turn": False,
        "transcript": "", "end_of_turn_confidence": 0.1, "utterance": "",
        "words": [{"text": "hi", "start": 10, "end": 20, "confidence": 0.9, "word_is_final": False}]}))
    assert isinstance(t, p.Turn) and t.transcript == "" and t.text == "hi"
    assert t.words[0] == p.Word("hi", 10, 20, 0.9, False)


def test_turn_word_without_word_is_final_is_tolerated():
    t = p.parse_message('{"type":"Turn","turn_order":2,"end_of_turn":true,"transcript":"a",'
                        '"words":[{"text":"a","start":1,"end":2,"confidence":1}],"new_field":1}')
    assert t.words[0].word_is_final is True and t.turn_order == 2


@pytest.mark.parametrize("a,s", [(7, 7), (7.5, 2.25)])
def test_termination_int_or_float(a, s):
    t = p.parse_message(json.dumps({"type": "Termination", "audio_duration_seconds": a,
                                    "session_duration_seconds": s}))
    assert t.audio_duration_seconds == a and t.session_duration_seconds == s


def test_error_typed_and_legacy():
    e = p.parse_message('{"type":"Error","error_code":3008,"error":"Session Expired: x"}')
    assert e == p.ErrorMessage(3008, "Session Expired: x")
    legacy = p.parse_message('{"error":"Unauthorized"}')
    assert legacy == p.ErrorMessage(None, "Unauthorized")


def test_other_messages():
    assert p.parse_message('{"type":"SpeechStarted","timestamp":1216,"confidence":0.98}') == \
        p.SpeechStarted(1216, 0.98)
    assert p.parse_message('{"type":"Warning","warning_code":1234,"warning":"soon"}') == \
        p.WarningMessage(1234, "soon")
    hb = p.parse_message('{"type":"Heartbeat","total_audio_received_ms":10,"total_duration_ms":11,'
                         '"realtime_factor":1.2}')
    assert hb.realtime_factor == 1.2 and hb.max_speech_probability is None
    sr = p.parse_message('{"type":"SpeakerRevision","revisions":[{"turn_order":3,"speaker_label":"B"}]}')
    assert sr.revisions[0]["turn_order"] == 3
    llm = p.parse_message('{"type":"LLMGatewayResponse","turn_order":0,"transcript":"t","data":{}}')
    assert llm.turn_order == 0


def test_unknown_type_tolerated_and_garbage_rejected():
    u = p.parse_message('{"type":"FutureThing","x":1}')
    assert isinstance(u, p.UnknownMessage) and u.type == "FutureThing"
    with pytest.raises(p.ProtocolError):
        p.parse_message("not json")
    with pytest.raises(p.ProtocolError):
        p.parse_message("[1,2]")
    with pytest.raises(p.ProtocolError):
        p.parse_message('{"type":"Turn"}')


def test_build_url_encoding_rules():
    url = p.build_url("wss://h/v3/ws", "universal-streaming-english", 16000, True,
                      {"keyterms_prompt": ["foo", "bar baz"], "llm_gateway": {"model": "m"},
                       "speaker_labels": False, "vad_threshold": 0.5, "unset": None})
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert q["speech_model"] == "universal-streaming-english"
    assert q["format_turns"] == "true" and q["speaker_labels"] == "false"
    assert json.loads(q["keyterms_prompt"]) == ["foo", "bar baz"]
    assert json.loads(q["llm_gateway"]) == {"model": "m"}
    assert q["encoding"] == "pcm_s16le" and q["sample_rate"] == "16000"
    assert "unset" not in q and q["vad_threshold"] == "0.5"
    with pytest.raises(ValueError):
        p.build_url("wss://h/v3/ws", "", 16000)


def test_client_messages():
    assert json.loads(p.FORCE_ENDPOINT) == {"type": "ForceEndpoint"}
    assert json.loads(p.TERMINATE) == {"type": "Terminate"}
    assert json.loads(p.update_configuration(max_turn_silence=500, prompt=None)) == \
        {"type": "UpdateConfiguration", "max_turn_silence": 500}


@pytest.mark.parametrize("code,reason,kind,retry", [
    (1000, "", "normal", False),
    (1008, "Unauthorized Connection: Missing Authorization header", "auth", False),
    (1008, "Unauthorized connection: Too many concurrent sessions", "rate_limited", True),
    (3005, "Session Cancelled: An error occurred", "server", True),
    (3005, "Session Expired: Maximum session duration exceeded", "expired", True),
    (3005, "Input duration violation: 20 ms. Expected between 50 and 1000 ms", "client_bug", True),
    (3006, "Invalid Message Type: x", "client_bug", False),
    (3007, "Audio Transmission Rate Exceeded: Received 9 sec. audio in 1 sec", "client_bug", True),
    (3008, "Session Expired: Maximum session duration exceeded", "expired", True),
    (3009, "Unauthorized Connection: Too many concurrent sessions", "rate_limited", True),
    (4001, "Not Authorized", "auth", False),
    (4031, "idle", "idle", True),
    (4999, "", "server", True),
    (None, "", "transport", True),
    (1006, "", "transport", True),
])
def test_close_policy_table(code, reason, kind, retry):
    pol = policy_for(code, reason)
    assert (pol.kind, pol.retry) == (kind, retry)
    assert pol.message


def test_rate_limit_backoff_at_least_five_seconds_with_jitter():
    pol = policy_for(3009)
    delays = [pol.delay(0, random.Random(i)) for i in range(50)]
    assert min(delays) >= 5.0 * 0.75 and max(delays) <= 5.0 * 1.25 and len(set(delays)) > 10
    assert pol.delay(10) <= pol.max_backoff_s * 1.25
    assert policy_for(1008).delay(0) == 0.0


def _turn(order, eot, text, formatted=False):
    return p.Turn(turn_order=order, end_of_turn=eot, transcript=text, turn_is_formatted=formatted)


def test_assembler_pattern_a_replaces_unformatted_final():
    a = TurnAssembler(format_turns=True, grace_s=1.0)
    assert a.feed(_turn(0, False, "hi"), 0.0) == []
    assert a.feed(_turn(0, True, "hi there"), 0.1) == []
    assert a.deadline() == pytest.approx(1.1)
    out = a.feed(_turn(0, True, "Hi there.", True), 0.2)
    assert [f.turn.transcript for f in out] == ["Hi there."]
    assert a.feed(_turn(0, True, "Hi there.", True), 0.3) == []  # never twice


def test_assembler_pattern_b_and_u3_deliver_at_once():
    a = TurnAssembler(format_turns=True)
    assert [f.turn.transcript for f in a.feed(_turn(0, True, "Hi.", True), 0)] == ["Hi."]


def test_assembler_grace_expiry_higher_turn_and_flush():
    a = TurnAssembler(format_turns=True, grace_s=1.0)
    a.feed(_turn(0, True, "zero"), 0.0)
    assert a.expire(0.5) == []
    assert [f.turn.transcript for f in a.expire(1.0)] == ["zero"]
    a.feed(_turn(1, True, "one"), 2.0)
    out = a.feed(_turn(2, False, "two"), 2.1)
    assert [f.turn.transcript for f in out] == ["one"]
    a.feed(_turn(2, True, "two"), 2.2)
    assert [f.turn.transcript for f in a.flush()] == ["two"]
    assert a.flush() == []


def test_assembler_format_off_delivers_first_final():
    a = TurnAssembler(format_turns=False)
    assert len(a.feed(_turn(0, True, "x"), 0)) == 1
    assert a.feed(_turn(0, True, "X.", True), 0) == []
