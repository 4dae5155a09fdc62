"""MQTT: the bridge against a real mosquitto started here, and ``pttd run`` end to end.

Each test starts its own mosquitto on 127.0.0.1 at a free port with a temporary config (no
persistence) and subscribes with paho. Every wait is bounded.
"""
from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pttd import config as c
from pttd import events
from pttd.frontends import mqtt as m
from tests.daemon_proc import DaemonProcess, speech_wav, wait_queue, write_config

mqtt = pytest.importorskip("paho.mqtt.client")

MOSQUITTO = shutil.which("mosquitto", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd", path=os.environ.get("PATH", "") + ":/usr/sbin")
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (apt: mosquitto)")

KEY = "mqtt-e2e-key-0123456789"
CYCLE_MS, QUIET_MS = 3000, 1000  # the test mic: 1 s quiet, then 2 s of "speech", repeated


# --- a real broker and a real subscriber ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """mosquitto on 127.0.0.1:``port`` with a temp config; ``stop()``/``start()`` keep the port."""

    def __init__(self, workdir: Path, port: int | None = None, *, password_file: Path | None = None,
                 tls: tuple[Path, Path, Path] | None = None):
        self.port = port or free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice",
                 f"user {getpass.getuser()}",
                 f"allow_anonymous {'false' if password_file else 'true'}"]
        if password_file:
            lines.append(f"password_file {password_file}")
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)  # polling for the listener, with a deadline
        raise AssertionError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    """``broker(**kwargs)`` starts a Mosquitto; all are stopped at teardown."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (apt: mosquitto)")
    started: list[Mosquitto] = []

    def make(**kwargs) -> Mosquitto:
        b = Mosquitto(tmp_path, **kwargs)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


class Subscriber:
    """A paho client in the test: (re)subscribes on every connect, collects messages."""

    def __init__(self, port: int, topics: list[str], *, username=None, password=None, ca=None):
        self.topics = topics
        self.messages: "queue.Queue[tuple[str, object, bool]]" = queue.Queue()
        self.seen: list[tuple[str, object, bool]] = []
        self.subscribed = __import__("threading").Event()
        self.refused: list = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{uuid.uuid4().hex[:8]}")
        if username:
            self.client.username_pw_set(username, password)
        if ca:
            self.client.tls_set(ca_certs=str(ca))
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_disconnect = lambda *a: self.subscribed.clear()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, _u, _f, reason, _p):
        if reason.is_failure:
            self.refused.append(str(reason))
            return
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, _c, _u, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload
        item = (msg.topic, payload, bool(msg.retain))
        self.seen.append(item)
        self.messages.put(item)

    def wait_subscribed(self, timeout: float = 15.0) -> "Subscriber":
        assert self.subscribed.wait(timeout), f"not subscribed (refused: {self.refused})"
        return self

    def wait(self, pred, timeout: float = 15.0):
        return wait_queue(self.messages, lambda item: pred(*item), timeout,
                          lambda: f"no matching MQTT message; saw {self.seen}")

    def publish(self, topic: str, payload, retain=False):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribers():
    made: list[Subscriber] = []

    def make(*args, **kwargs) -> Subscriber:
        s = Subscriber(*args, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def is_state(state):
    return lambda t, p, r: t.endswith("/state") and isinstance(p, dict) and p["state"] == state


# --- pure parts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url,broker", [
    ("mqtt://broker:1883", m.Broker("broker", 1883, False)),
    ("mqtt://broker", m.Broker("broker", 1883, False)),
    ("mqtts://broker.example", m.Broker("broker.example", 8883, True)),
    ("mqtts://10.0.0.5:9999/", m.Broker("10.0.0.5", 9999, True)),
    ("mqtt://[::1]:1884", m.Broker("::1", 1884, False)),
])
def test_parse_url(url, broker):
    assert m.parse_url(url) == broker


@pytest.mark.parametrize("url,needle", [
    ("tcp://broker", "mqtt:// or mqtts://"), ("mqtt://", "no host"), ("mqtt://h:0x", "bad port"),
    ("mqtt://h/topic", "only a host"), ("mqtt://user:hunter2@h", "no credentials"),
])
def test_parse_url_errors(url, needle):
    with pytest.raises(m.MqttError, match=needle) as exc:
        m.parse_url(url)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("payload,name", [
    (b'{"cmd":"press"}', "press"), (b'{"cmd": "release"}', "release"),
    (b'{"cmd":"toggle","from":"ha"}', "toggle"), (b'{"cmd":"cancel"}', "cancel"),
])
def test_parse_command(payload, name):
    assert m.parse_command(payload) == name


@pytest.mark.parametrize("payload,needle", [
    (b"press", "not JSON"), (b"\xff\xfe", "not JSON"), (b'["press"]', "expected"),
    (b'{"cmd": 1}', "expected"), (b'{"cmd":"status"}', "unknown command"),
    (b'{"cmd":"subscribe"}', "unknown command"), (b" " * 2000, "too long"),
])
def test_parse_command_rejects(payload, needle):
    with pytest.raises(ValueError, match=needle):
        m.parse_command(payload)


def test_discovery_messages():
    (sensor_topic, sensor), (button_topic, button) = m.discovery_messages("pi.kitchen")
    assert sensor_topic == "homeassistant/sensor/pttd_pi_kitchen/last_transcript/config"
    assert button_topic == "homeassistant/button/pttd_pi_kitchen/talk/config"
    assert sensor["state_topic"] == "pttd/pi.kitchen/final"
    assert sensor["value_template"] == "{{ value_json.text[:255] }}"
    assert button["command_topic"] == "pttd/pi.kitchen/cmd"
    assert m.parse_command(button["payload_press"].encode()) == "toggle"
    assert sensor["unique_id"] != button["unique_id"]
    assert sensor["device"] == button["device"] and sensor["availability_topic"] == "pttd/pi.kitchen/state"


def test_device_id_defaults_to_the_hostname():
    assert m.device_id_or_hostname("") == socket.gethostname()
    assert m.device_id_or_hostname("desk-3") == "desk-3"
    with pytest.raises(m.MqttError, match="device_id"):
        m.device_id_or_hostname("a/b")


def test_mqtt_config_keys_and_checks(tmp_path):
    cfg = c.from_dict({"mqtt": {"url": "mqtts://b:8884", "device_id": "d1", "username": "u",
                                "password_file": "/x", "publish_partials": True,
                                "ha_discovery": True, "keepalive_s": 60}}, environ={})
    assert cfg.mqtt.publish_partials and cfg.mqtt.ha_discovery and cfg.mqtt.keepalive_s == 60
    d = c.from_dict({}, environ={}).mqtt
    assert (d.url, d.publish_partials, d.ha_discovery, d.keepalive_s) == ("", False, False, 30)
    for key, value in [("url", "http://b"), ("url", "mqtt://b/x"), ("device_id", "a+b"),
                       ("keepalive_s", 1), ("ha_discovery", 1)]:
        with pytest.raises(c.ConfigError, match=f"mqtt.{key}"):
            c.from_dict({"mqtt": {key: value}}, environ={})


def test_bridge_settings_errors(tmp_path):
    with pytest.raises(m.MqttError, match="needs mqtt.username"):
        m.MqttBridge(url="mqtt://h", password_file=str(tmp_path / "pw"))
    with pytest.raises(m.MqttError, match="not found"):
        m.MqttBridge(url="mqtt://h", username="u", password_file=str(tmp_path / "pw"))
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(m.MqttError, match="is empty"):
        m.MqttBridge(url="mqtt://h", username="u", password_file=str(tmp_path / "pw"))
    os.mkfifo(tmp_path / "fifo")  # refused at once, never blocked on
    with pytest.raises(m.MqttError, match="mqtt.password_file: .*fifo is not a regular file"):
        m.MqttBridge(url="mqtt://h", username="u", password_file=str(tmp_path / "fifo"))
    (tmp_path / "latin1").write_bytes(b"caf\xe9\n")
    with pytest.raises(m.MqttError, match="not valid UTF-8"):
        m.MqttBridge(url="mqtt://h", username="u", password_file=str(tmp_path / "latin1"))


def test_without_paho_the_error_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("paho")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "paho", None)
    with pytest.raises(m.MqttError, match=r"pip install 'pttd\[mqtt\]'"):
        m.MqttBridge(url="mqtt://h")


# --- the bridge in-process against a real broker ------------------------------------------------

def final(i: int) -> dict:
    return events.final_event(f"turn {i}", turn_order=0, session_id=f"s{i}", press_id=i,
                              audio_ms=1000, latency_ms=100)


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)  # polling with a deadline


def test_finals_queue_bounded_oldest_dropped_then_all_published_in_order(broker, subscribers,
                                                                         caplog):
    port = free_port()
    bridge = m.MqttBridge(url=f"mqtt://127.0.0.1:{port}", device_id="q")
    with caplog.at_level("WARNING", logger="pttd.frontends.mqtt"):
        for i in range(m.FINAL_QUEUE + 5):   # no broker yet: all wait in the queue
            bridge.emit(final(i))
    assert bridge.dropped_finals == 5
    assert "dropped the oldest (press 0" in caplog.text and "press 4," in caplog.text
    broker(port=port)
    sub = subscribers(port, ["pttd/q/#"]).wait_subscribed()
    bridge.start()
    try:
        for i in range(5, m.FINAL_QUEUE + 5):
            topic, payload, _ = sub.wait(lambda t, p, r: t == "pttd/q/final")
            assert payload == final(i) | {"ts": payload["ts"]}
    finally:
        bridge.close()
    sub.wait(lambda t, p, r: t == "pttd/q/state" and p["state"] == "offline")


def test_commands_reach_the_controller_and_bad_ones_are_ignored(broker, subscribers, caplog):
    b = broker()
    got: list[str] = []
    pub = subscribers(b.port, ["pttd/dev/state"]).wait_subscribed()
    pub.publish("pttd/dev/cmd", {"cmd": "toggle"}, retain=True)  # stale: must not fire
    bridge = m.MqttBridge(url=f"mqtt://127.0.0.1:{b.port}", device_id="dev",
                          on_command=lambda name: got.append(name) or {"ok": True})
    bridge.start()
    try:
        with caplog.at_level("WARNING", logger="pttd.frontends.mqtt"):
            pub.wait(is_state("idle"))  # the bridge is connected and subscribed
            for payload in [b"press", b'{"cmd":"status"}', b'{"nope":1}', b"\x00" * 4096]:
                pub.publish("pttd/dev/cmd", payload)
            pub.publish("pttd/dev/cmd", {"cmd": "press"})
            pub.publish("pttd/dev/cmd", {"cmd": "release"})
            wait_for(lambda: len(got) >= 2)
        assert got == ["press", "release"]
        assert caplog.text.count("ignoring command") == 4 and "retained command" in caplog.text
        bridge.stop_commands()
        pub.publish("pttd/dev/cmd", {"cmd": "press"})
        pub.publish("pttd/dev/cmd", b"", retain=True)  # clears the retained command
    finally:
        bridge.close()
    assert got == ["press", "release"]
    assert not bridge._client.is_connected()


# --- pttd run end to end ---------------------------------------------------------------------------

def cycle_times(d: DaemonProcess) -> tuple[int, int]:
    """Press/release positions (mic ms) of the next speech segment that is still ahead."""
    now = d.command("status")["audio_ms"]
    k = max(0, (now + 200 - (QUIET_MS - 200)) // CYCLE_MS + 1)
    return k * CYCLE_MS + QUIET_MS - 200, k * CYCLE_MS + CYCLE_MS


def start_daemon(tmp_path, srv, mqtt_toml: str, env=None, verbose=False) -> DaemonProcess:
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=((QUIET_MS, False), (CYCLE_MS - QUIET_MS, True)) * 12)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock)
    cfg.write_text(cfg.read_text() + "[mqtt]\n" + mqtt_toml)
    argv = [sys.executable, "-m", "pttd.cli"] + (["-v"] if verbose else []) + ["run", "-c", str(cfg)]
    d = DaemonProcess(cfg, sock, env=env, argv=argv)
    d.wait_ready()
    return d


def speak(d: DaemonProcess, press, release) -> None:
    """One press over the next speech segment, driven by ``press``/``release`` callables."""
    at, until = cycle_times(d)
    d.wait_audio_ms(at)
    press()
    d.wait_audio_ms(until)
    release()


@needs_mosquitto
def test_pttd_run_publishes_takes_commands_survives_broker_restart_and_leaves_a_will(
        broker, subscribers, fake_v3, tmp_path):
    srv = fake_v3(script=["first words", "while down one", "while down two", "after restart"],
                  api_keys={KEY})
    b = broker()
    dev = "pi-kitchen"
    d = start_daemon(tmp_path, srv, f'url = "mqtt://127.0.0.1:{b.port}"\ndevice_id = "{dev}"\n'
                     "publish_partials = true\nha_discovery = true\n")
    try:
        sub = subscribers(b.port, [f"pttd/{dev}/#"]).wait_subscribed()
        sub.wait(is_state("idle"))  # the daemon is connected
        # state and discovery are retained: a later subscriber gets them, flagged retained
        late = subscribers(b.port, [f"pttd/{dev}/state", "homeassistant/#"]).wait_subscribed()
        assert late.wait(is_state("idle"))[2] is True
        disc = [late.wait(lambda t, p, r: t.startswith("homeassistant/")) for _ in range(2)]
        assert {t.split("/")[1] for t, _, _ in disc} == {"sensor", "button"}
        assert all(r for *_, r in disc) and disc[0][1]["device"]["identifiers"] == [f"pttd_{dev}"]

        # commands on pttd/<id>/cmd drive a press; the final arrives as the contract's event
        sub.publish(f"pttd/{dev}/cmd", b"not json")
        speak(d, lambda: sub.publish(f"pttd/{dev}/cmd", {"cmd": "press"}),
              lambda: sub.publish(f"pttd/{dev}/cmd", {"cmd": "release"}))
        _, mqtt_final, retained = sub.wait(lambda t, p, r: t == f"pttd/{dev}/final")
        stdout_final = d.wait_event(lambda e: e["event"] == "final")
        assert mqtt_final == stdout_final and mqtt_final["text"] == "First words." and not retained
        assert any(t == f"pttd/{dev}/partial" for t, _, _ in sub.seen)
        assert {p["state"] for t, p, _ in sub.seen if t.endswith("/state")} >= {
            "connecting", "listening", "finalizing", "idle"}

        # the broker goes away; two finals are made meanwhile (through the control socket)
        b.stop()
        for _ in range(2):
            speak(d, lambda: d.command("press"), lambda: d.command("release"))
            d.wait_event(lambda e: e["event"] == "final")
        made_while_down = [e for e in d.all_events if e["event"] == "final"][1:]
        assert [e["text"] for e in made_while_down] == ["While down one.", "While down two."]
        # hold the daemon until the test's subscriber is back, so it can see what is re-sent
        d.proc.send_signal(signal.SIGSTOP)
        try:
            b.start()
            sub.wait_subscribed()
            back = len(sub.seen)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        resent = [sub.wait(lambda t, p, r: t == f"pttd/{dev}/final", timeout=30)[1]
                  for _ in range(2)]
        assert resent == made_while_down
        assert any(is_state("idle")(*x) for x in sub.seen[back:])  # state re-published too

        # SIGKILL: the broker publishes the will, retained
        d.proc.kill()
        d.proc.wait(5)
        _, will, _ = sub.wait(is_state("offline"))
        assert will["event"] == "state"
        after = subscribers(b.port, [f"pttd/{dev}/state"]).wait_subscribed()
        assert after.wait(is_state("offline"))[2] is True
    finally:
        d.kill()
    finals = [p for t, p, _ in sub.seen if t.endswith("/final")]
    assert len(finals) == 3, "each final exactly once"
    stderr = "".join(d.stderr_lines)
    assert "ignoring command" in stderr and "connection lost" in stderr


def make_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl)."""
    ca, ca_key, cert, key = (tmp_path / n for n in ("ca.pem", "ca.key", "server.pem", "server.key"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=30)
    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=pttd test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    csr = tmp_path / "server.csr"
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "2", "-extfile", ext)
    key.chmod(0o644)  # mosquitto may drop privileges before reading it
    return ca, cert, key


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None or MOSQUITTO_PASSWD is None,
                    reason="needs openssl and mosquitto_passwd")
def test_pttd_run_over_tls_with_username_and_password_file(broker, subscribers, fake_v3, tmp_path):
    password = "s3cret-" + uuid.uuid4().hex
    pw_db = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(pw_db), "pttd", password], check=True,
                   capture_output=True, timeout=30)
    pw_db.chmod(0o644)
    ca, cert, key = make_tls(tmp_path)
    b = broker(password_file=pw_db, tls=(ca, cert, key))
    anonymous = subscribers(b.port, ["#"], ca=ca)
    wait_for(lambda: anonymous.refused)  # the broker really wants credentials
    (tmp_path / "mqtt-password").write_text(password + "\n")
    srv = fake_v3(script=["secure words"], api_keys={KEY})
    sub = subscribers(b.port, ["pttd/sec/#"], username="pttd", password=password, ca=ca).wait_subscribed()
    # SSL_CERT_FILE: the test CA stands in for the system's CA store; verification stays on
    d = start_daemon(tmp_path, srv, f'url = "mqtts://127.0.0.1:{b.port}"\ndevice_id = "sec"\n'
                     f'username = "pttd"\npassword_file = "{tmp_path / "mqtt-password"}"\n',
                     env={"SSL_CERT_FILE": str(ca)}, verbose=True)
    try:
        sub.wait(is_state("idle"))
        speak(d, lambda: sub.publish("pttd/sec/cmd", {"cmd": "press"}),
              lambda: sub.publish("pttd/sec/cmd", {"cmd": "release"}))
        _, got, _ = sub.wait(lambda t, p, r: t == "pttd/sec/final")
        assert got["text"] == "Secure words."
        code, took = d.stop()
        assert code == 0 and took < 5.0
        sub.wait(is_state("offline"))  # a clean stop publishes the retained offline state
    finally:
        d.kill()
    stderr = "".join(d.stderr_lines)
    assert "MQTT: connected" in stderr and password not in stderr


@needs_mosquitto
def test_pttd_run_keeps_working_when_tls_verification_fails(broker, fake_v3, tmp_path):
    """Without the CA in the trust store the connection is refused; pttd logs it and carries on."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    ca, cert, key = make_tls(tmp_path)
    b = broker(tls=(ca, cert, key))
    srv = fake_v3(script=["x"], api_keys={KEY})
    d = start_daemon(tmp_path, srv, f'url = "mqtts://127.0.0.1:{b.port}"\ndevice_id = "x"\n',
                     env={"SSL_CERT_FILE": str(tmp_path / "no-such-ca.pem")})
    try:
        wait_for(lambda: any("MQTT: cannot reach" in line or "certificate" in line
                             for line in d.stderr_lines))
        assert d.command("status")["ok"]
        code, took = d.stop()
        assert code == 0 and took < 5.0
    finally:
        d.kill()


def test_pttd_run_with_a_missing_password_file_exits_2(tmp_path):
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    cfg = write_config(tmp_path / "pttd.toml", url="ws://127.0.0.1:9", key=KEY, wav=wav,
                       socket=tmp_path / "ctl.sock")
    cfg.write_text(cfg.read_text() + '[mqtt]\nurl = "mqtt://127.0.0.1:1"\nusername = "u"\n'
                   f'password_file = "{tmp_path / "nope"}"\n')
    r = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "mqtt.password_file" in r.stderr and "Traceback" not in r.stderr
