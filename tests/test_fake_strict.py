"""The stricter fake v3 server (issue 24, part 6): its own constants (nothing from pttd's client),
strict query values, HTTP rejections at the upgrade, ``/v3/token`` with one-use tokens whose
expiry and ``max_session_duration_seconds`` are enforced, the optional new-session limit."""
from __future__ import annotations

import ast
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

import pttd.local
import tests.fakes
from pttd.local.wire import AUTH_ERROR
from tests.fakes.faults import Faults
from tests.alsa_fifo import wait_until
from tests.test_fake_server import RawClient, assert_error_close, pcm, session_record, tone

US = "universal-streaming-english"
KEY = "strict-key"


SERVER_MODULES = [*sorted(Path(pttd.local.__file__).parent.glob("*.py")),
                  *sorted(Path(tests.fakes.__file__).parent.glob("*.py"))]


@pytest.mark.parametrize("path", SERVER_MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_server_imports_nothing_from_the_client(path):
    """The runtime server (pttd/local/) and the fake built on it (tests/fakes/) import only
    each other and pttd.errors: nothing of pttd's client (pttd.stt, pttd.core, pttd.config)."""
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = ("pttd.local.", "tests.fakes.")
    assert not {m for m in imported if m.startswith(".") or (
        m.startswith(("pttd", "tests")) and not m.startswith(ours) and m != "pttd.errors")}, imported


@pytest.mark.parametrize("query", [
    "format_turns=True", "format_turns=1", "speaker_labels=False",
    "keyterms_prompt=pttd%2Cpi", "keyterms_prompt=%22pttd%22"])
def test_non_lowercase_booleans_and_non_json_lists_are_refused(fake_v3, query):
    srv = fake_v3(api_keys={KEY})
    name, value = query.split("=")
    with RawClient(srv.url, {"speech_model": US, name: urllib.parse.unquote(value)},
                   key=KEY) as client:
        assert_error_close(client, 3005, __import__("re").compile(
            rf"Session Cancelled: Invalid query parameter {name}: .*"))
    assert srv.sessions == []


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500])
def test_http_rejection_mode(fake_v3, status):
    srv = fake_v3(api_keys={KEY}, faults=Faults(http_reject_status=status))
    with pytest.raises(InvalidStatus) as rejected:
        RawClient(srv.url, {"speech_model": US}, key=KEY)
    response = rejected.value.response
    assert response.status_code == status
    assert "error" in json.loads(response.body)           # the documented error shape
    assert response.headers["Content-Type"] == "application/json"
    assert srv.connections[0].http_status == status and srv.sessions == []


def mint(srv, key: str | None = KEY, **params) -> tuple[int, dict]:
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(f"{srv.token_url}?{query}",
                                     headers={"Authorization": key} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_token_endpoint_validates_like_the_spec(fake_v3):
    srv = fake_v3(api_keys={KEY})
    status, body = mint(srv, expires_in_seconds=60, max_session_duration_seconds=600)
    assert status == 200 and set(body) == {"token", "expires_in_seconds"}
    assert body["expires_in_seconds"] == 60
    for params in ({}, {"expires_in_seconds": 0}, {"expires_in_seconds": 601},
                   {"expires_in_seconds": "60.0"}, {"expires_in_seconds": 60,
                                                    "max_session_duration_seconds": 59},
                   {"expires_in_seconds": 60, "max_session_duration_seconds": 10801}):
        assert mint(srv, **params)[0] == 400, params
    assert mint(srv, key="wrong", expires_in_seconds=60)[0] == 401
    assert mint(srv, key=f"Bearer {KEY}", expires_in_seconds=60)[0] == 401
    assert mint(srv, key=body["token"], expires_in_seconds=60)[0] == 401  # a token is no key
    assert srv.connection_attempts == 0   # token requests are not WebSocket attempts


def test_minted_token_opens_one_session(fake_v3):
    srv = fake_v3(api_keys={KEY})
    token = mint(srv, expires_in_seconds=60)[1]["token"]
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        client.wait_type("Begin")
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        assert_error_close(client, 1008, AUTH_ERROR)
    header_token = mint(srv, expires_in_seconds=60)[1]["token"]   # in the header, as the SDK does
    with RawClient(srv.url, {"speech_model": US}, key=header_token) as client:
        client.wait_type("Begin")


def test_keyless_server_still_refuses_a_spent_token(fake_v3):
    srv = fake_v3()   # no api_keys: any credential is accepted, but not a spent token
    token = mint(srv, expires_in_seconds=60)[1]["token"]
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        client.wait_type("Begin")
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        assert_error_close(client, 1008, AUTH_ERROR)


def test_expired_token_is_refused(fake_v3):
    srv = fake_v3(api_keys={KEY})
    minted_at = time.monotonic()
    token = mint(srv, expires_in_seconds=1)[1]["token"]
    assert wait_until(lambda: time.monotonic() > minted_at + 1.2, 3)
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        assert_error_close(client, 1008, AUTH_ERROR)


def test_max_session_duration_is_enforced_with_3008(fake_v3):
    srv = fake_v3(api_keys={KEY}, token_min_session_s=1)
    token = mint(srv, expires_in_seconds=60, max_session_duration_seconds=2)[1]["token"]
    with RawClient(srv.url, {"speech_model": US, "token": token}, key=None) as client:
        begin = client.wait_type("Begin")
        assert abs(begin["expires_at"] - (time.time() + 2)) <= 1
        client.send_audio(pcm(tone(500)), paced=True)
        assert_error_close(client, 3008, "Session Expired: Maximum session duration exceeded")
    assert client.arrival_of(client.messages[-1]) - client.connected_at < 4
    # the same server's key sessions keep the long lifetime
    with RawClient(srv.url, {"speech_model": US}, key=KEY) as client:
        assert client.wait_type("Begin")["expires_at"] > time.time() + 3600


def test_new_session_limit_is_an_option_off_by_default(fake_v3):
    free = fake_v3(api_keys={KEY})
    for _ in range(6):
        with RawClient(free.url, {"speech_model": US}, key=KEY) as client:
            client.wait_type("Begin")
    limited = fake_v3(api_keys={KEY}, sessions_per_minute=5)
    for _ in range(5):
        with RawClient(limited.url, {"speech_model": US}, key=KEY) as client:
            client.wait_type("Begin")
    with RawClient(limited.url, {"speech_model": US}, key=KEY) as client:
        assert_error_close(client, 3009, "Unauthorized Connection: Too many concurrent sessions")
    assert session_record(limited, 5).begin is None
