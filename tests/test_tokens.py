"""Fleet mode (issue 24, part 2): ``pttd serve-tokens`` mints one-use AssemblyAI temporary tokens
with the key; a device with ``[stt] token_url`` and no key connects with them. Real sockets
throughout: the broker's http.server, urllib on the device, the fake v3 server's ``/v3/token``."""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pttd.config import ConfigError, Secret, from_dict
from pttd.stt.assemblyai.broker import TokenBroker, read_devices, token_endpoint
from pttd.stt.assemblyai.link import UrlError
from pttd.stt.assemblyai.tokens import TokenSource
from tests.alsa_fifo import wait_until
from tests.daemon_proc import DaemonProcess, speech_wav, wait_queue, write_config

KEY = "broker-side-key-0123456789abcdef"
SECRET = "kitchen-secret-0123456789"
OTHER = "hallway-secret-9876543210"
LAYOUT = ((2000, False), (2000, True), (2000, False), (2000, True), (8000, False))


def devices_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "devices"
    path.write_text(f"# id secret\npi-kitchen {SECRET}\n\npi-hallway {OTHER}\n")
    path.chmod(mode)
    return path


def get(url: str, secret: str | None, context: ssl.SSLContext | None = None):
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10,
                                    context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# --- pieces ---------------------------------------------------------------------------------------

def test_token_endpoint_is_derived_from_stt_url():
    assert token_endpoint("wss://streaming.assemblyai.com/v3/ws") == \
        "https://streaming.assemblyai.com/v3/token"
    assert token_endpoint("wss://streaming.eu.assemblyai.com/v3/ws") == \
        "https://streaming.eu.assemblyai.com/v3/token"
    assert token_endpoint("ws://127.0.0.1:8080/v3/ws") == "http://127.0.0.1:8080/v3/token"


def test_devices_file_must_be_0600_and_well_formed(tmp_path):
    with pytest.raises(ConfigError, match="chmod 600"):
        read_devices(str(devices_file(tmp_path, 0o644)))
    assert read_devices(str(devices_file(tmp_path))) == {SECRET: "pi-kitchen",
                                                          OTHER: "pi-hallway"}
    bad = tmp_path / "bad"
    bad.write_text("pi-x short\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="line 1") as info:
        read_devices(str(bad))
    assert "short" not in str(info.value).replace("shorter", "")  # the secret is never quoted


def test_device_config_in_fleet_mode_needs_no_key_and_refuses_one(tmp_path):
    auth = tmp_path / "secret"
    auth.write_text(SECRET + "\n")
    env = {"ASSEMBLYAI_API_KEY": "env-key-must-not-be-used"}
    cfg = from_dict({"stt": {"token_url": "https://broker.example/token",
                             "token_auth_file": str(auth)}}, environ=env)
    assert not cfg.stt.api_key  # not even the environment's
    with pytest.raises(ConfigError, match="stt.token_url"):
        from_dict({"stt": {"token_url": "https://b.example/token", "api_key": "k"}}, environ={})
    with pytest.raises(ConfigError, match="stt.token_url"):
        from_dict({"stt": {"token_url": "http://192.0.2.1/token"}}, environ={})  # secret in clear
    with pytest.raises(ConfigError, match="stt.token_auth_file"):
        from_dict({"stt": {"token_url": "https://b.example/token",
                           "token_auth_file": str(tmp_path / "none")}}, environ={})
    with pytest.raises(ConfigError, match="stt.sessions_per_minute"):
        from_dict({"stt": {"sessions_per_minute": -1}}, environ={})
    assert from_dict({"stt": {"sessions_per_minute": 5}}, environ={}).stt.sessions_per_minute == 5


# --- the broker against the fake's /v3/token -------------------------------------------------------

@pytest.fixture
def broker(fake_v3, tmp_path):
    made = []

    def make(per_minute: int = 30, **kwargs):
        srv = fake_v3(script=["hello world"], api_keys={KEY})
        b = TokenBroker(Secret(KEY), srv.token_url, read_devices(str(devices_file(tmp_path))),
                        per_device_per_minute=per_minute, **kwargs).start()
        made.append(b)
        return b, srv

    yield make
    for b in made:
        b.stop()


def test_broker_mints_for_known_devices_only_and_logs_the_device_not_secrets(broker, caplog):
    b, srv = broker(max_session_s=120, expires_s=30)
    with caplog.at_level(logging.DEBUG):
        status, body = get(b.url, SECRET)
        assert status == 200 and body["expires_in_seconds"] == 30 and body["token"]
        assert get(b.url, "not-a-device-secret-at-all") == (401, {"error": "unknown device"})
        assert get(b.url, None)[0] == 401
        assert get(b.url.replace("/token", "/other"), SECRET)[0] == 404
    assert srv.token_requests[0][0] == 200 and len(srv.token_requests) == 1  # 401s never go up
    assert b.minted["pi-kitchen"] == 1
    # pttd's own log lines (the fake AssemblyAI's websockets debug log shows what it received)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pttd"))
    assert "pi-kitchen" in logged
    for secret in (SECRET, KEY, body["token"]):
        assert secret not in logged


def test_broker_per_device_rate_limit_is_429(broker):
    b, _srv = broker(per_minute=2)
    assert [get(b.url, SECRET)[0] for _ in range(3)] == [200, 200, 429]
    assert get(b.url, OTHER)[0] == 200   # per device


def test_broker_refuses_non_loopback_without_tls():
    with pytest.raises(ConfigError, match="loopback"):
        TokenBroker(Secret(KEY), "http://127.0.0.1:9/v3/token", {SECRET: "a"}, host="0.0.0.0")


def test_token_source_one_token_per_session_prefetched(broker, tmp_path):
    b, srv = broker()
    auth = tmp_path / "auth"
    auth.write_text(SECRET)
    source = TokenSource(b.url, str(auth))
    first = source.connect_url("ws://h/v3/ws?speech_model=x")
    assert wait_until(lambda: source.fetches == 2, 10)   # the next one, fetched ahead
    second = source.connect_url("ws://h/v3/ws?speech_model=x")
    t1, t2 = (re.search(r"token=([^&]+)", u).group(1) for u in (first, second))
    assert t1 != t2 and first.startswith("ws://h/v3/ws?speech_model=x&token=")


def test_token_source_reports_broker_refusals_as_policies(broker, tmp_path):
    b, _srv = broker()
    auth = tmp_path / "auth"
    auth.write_text("wrong-secret-0123456789")
    with pytest.raises(UrlError) as refused:
        TokenSource(b.url, str(auth), prefetch=False).connect_url("ws://h/v3/ws")
    assert (refused.value.code, refused.value.policy.kind) == (401, "auth")
    with pytest.raises(UrlError) as down:
        TokenSource("http://127.0.0.1:9/token", str(auth), prefetch=False).connect_url("ws://h")
    assert down.value.policy.kind == "transport"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_broker_tls_is_verified(fake_v3, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    srv = fake_v3(api_keys={KEY})
    auth = tmp_path / "auth"
    auth.write_text(SECRET)
    with TokenBroker(Secret(KEY), srv.token_url, read_devices(str(devices_file(tmp_path))),
                     tls=(str(cert), str(key))) as b:
        assert b.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        url = TokenSource(b.url, str(auth), prefetch=False, context=trusted).connect_url("ws://h")
        assert "token=" in url
        with pytest.raises(UrlError) as untrusted:  # the system CAs do not know this cert
            TokenSource(b.url, str(auth), prefetch=False).connect_url("ws://h")
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.value.reason


# --- end to end: pttd serve-tokens + pttd run with no key --------------------------------------------

class BrokerProcess:
    def __init__(self, config: Path, devices: Path, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pttd.cli", "serve-tokens", "-c", str(config),
             "--listen", "127.0.0.1:0", "--devices", str(devices), "--max-session-s", "300"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        line = wait_queue(self.lines, lambda l: "serving tokens on" in l, 20,
                          lambda: f"broker did not start: {self.all}")
        self.url = re.search(r"(http://\S+/token)", line).group(1)

    def _read(self):
        for line in self.proc.stderr:
            self.all.append(line)
            self.lines.put(line)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def device_daemon(device: Path, server_url: str, token_url: str, secret: str):
    """A device's ``pttd run`` in ``device``: no key anywhere, ``token_url`` and its secret file;
    returns (its config file, the started DaemonProcess)."""
    wav = device / "mic.wav"
    speech_wav(wav, layout=LAYOUT)
    auth = device / "secret"
    auth.write_text(secret)
    sock = device / "ctl.sock"
    cfg = write_config(device / "pttd.toml", url=server_url, wav=wav, socket=sock,
                       extra=f'token_url = "{token_url}"\ntoken_auth_file = "{auth}"')
    return cfg, DaemonProcess(cfg, sock, env={"ASSEMBLYAI_API_KEY": ""})


def test_device_with_token_url_gets_its_final_with_no_key_anywhere(fake_v3, tmp_path):
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    env = {k: v for k, v in os.environ.items()
           if k not in ("ASSEMBLYAI_API_KEY", "CREDENTIALS_DIRECTORY")}
    broker_cfg = tmp_path / "broker.toml"
    broker_cfg.write_text(f'[stt]\nurl = "{srv.url}"\napi_key = "{KEY}"\n')
    broker = BrokerProcess(broker_cfg, devices_file(tmp_path), env)
    device = tmp_path / "device"
    device.mkdir()
    cfg, d = device_daemon(device, srv.url, broker.url, SECRET + "\n")
    try:
        d.wait_ready(timeout=30)
        for press_id, (at, until) in enumerate(((1500, 4200), (5500, 8200)), 1):
            d.wait_audio_ms(at, timeout=30)
            d.command("press")
            d.wait_audio_ms(until, timeout=30)
            d.command("release")
            final = d.wait_event(lambda e: e["event"] == "final" and e.get("press_id") == press_id,
                                 timeout=20)
            assert final["text"] == "Hello world."
        assert d.stop()[0] == 0
    finally:
        d.kill()
        broker.stop()
    sessions = srv.sessions
    assert len(sessions) == 2
    tokens = [s.raw_query["token"] for s in sessions]
    assert len(set(tokens)) == 2                       # one fresh token per session
    assert all("authorization" not in s.headers for s in sessions)  # no key on the wire
    device_side = cfg.read_text() + "".join(d.stderr_lines) + json.dumps(d.all_events)
    assert KEY not in device_side
    assert all(t not in device_side for t in tokens) and SECRET not in "".join(broker.all)
    assert "pi-kitchen" in "".join(broker.all)         # each mint logged with the device id


def test_unknown_device_secret_is_an_error_and_state_error(fake_v3, tmp_path):
    srv = fake_v3(script=["hello world"], api_keys={KEY})
    b = TokenBroker(Secret(KEY), srv.token_url, read_devices(str(devices_file(tmp_path)))).start()
    try:
        _, d = device_daemon(tmp_path, srv.url, b.url, "stolen-or-revoked-secret-000")
        try:
            d.wait_ready(timeout=30)
            d.wait_audio_ms(1500, timeout=30)
            d.command("press")
            d.wait_audio_ms(4200, timeout=30)
            d.command("release")
            error = d.wait_event(lambda e: e["event"] == "error" and e.get("press_id") == 1)
            assert error["code"] == 401 and "token broker" in error["message"]
            assert wait_until(lambda: d.command("status")["state"] == "error", 5)
        finally:
            d.kill()
    finally:
        b.stop()
    assert srv.connection_attempts == 0 and srv.token_requests == []


def test_serve_tokens_cli_refuses_an_open_devices_file(tmp_path):
    cfg = tmp_path / "broker.toml"
    cfg.write_text(f'[stt]\napi_key = "{KEY}"\n')
    r = subprocess.run([sys.executable, "-m", "pttd.cli", "serve-tokens", "-c", str(cfg),
                        "--listen", "127.0.0.1:0", "--devices",
                        str(devices_file(tmp_path, 0o644))],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert SECRET not in r.stderr and KEY not in r.stderr
