"""``[mqtt] url``: pttd's events to an MQTT broker and commands from it, for fleets of devices.

Topics (docs/typing-and-mqtt.md): ``pttd/<device_id>/state`` (retained, QoS 1; the broker
publishes the will, state ``offline``, when the link dies), ``.../partial`` (QoS 0, with
``publish_partials``), ``.../final`` (QoS 1), ``.../error`` (QoS 1), ``.../warning`` (QoS 1,
server Warnings); commands arrive on ``.../cmd`` as ``{"cmd": ...}``.

paho's loop thread connects, reconnects with back-off and runs the callbacks. The callbacks
only enqueue: a command goes to ``Controller.command``, which posts to the controller queue;
publishing only queues into paho. Finals emitted while the broker is unreachable wait in a
bounded queue (``FINAL_QUEUE``; overflow drops the oldest, logged) and are handed to paho when
it reconnects; one handed over just before a link died stays in paho's QoS 1 queue and is
re-sent on reconnect. paho is imported only when an MQTT URL is configured.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pttd import events
from pttd.errors import ConfigError
from pttd.events import PRESS_COMMANDS, Command, EventKind, State

log = logging.getLogger(__name__)

FINAL_QUEUE = 100  # finals kept while the broker is down; overflow drops the oldest
CLOSE_WAIT_S = 1.0  # at stop: wait this long for queued finals and the offline state
LOOP_JOIN_S = 1.5  # then this long for paho's thread
RECONNECT_DELAY_S = (1, 10)  # paho's back-off: 1 s doubling up to 10 s
COMMANDS = tuple(c.value for c in PRESS_COMMANDS)
MAX_COMMAND_BYTES = 1024
HA_PREFIX = "homeassistant"
HA_STATE_MAX = 255  # Home Assistant rejects longer sensor states


class MqttError(ConfigError):
    """An MQTT setting the user must fix (the daemon turns it into a start-up error)."""


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> Broker:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``; credentials never go in the URL."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise MqttError(
            "mqtt.url: put no credentials in the URL; use mqtt.username and mqtt.password_file"
        )
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttError(f"mqtt.url = {url!r}: must start with mqtt:// or mqtts://")
    if parts.path not in ("", "/") or parts.query:
        raise MqttError(f"mqtt.url = {url!r}: only a host and port are allowed")
    try:
        port = parts.port
    except ValueError:
        raise MqttError(f"mqtt.url = {url!r}: bad port") from None
    if not parts.hostname:
        raise MqttError(f"mqtt.url = {url!r}: no host")
    tls = parts.scheme == "mqtts"
    return Broker(parts.hostname, port or (8883 if tls else 1883), tls)


def check_topic_level(value: str) -> str | None:
    """A device_id is one topic level: no '/', no wildcards, nothing that breaks topics."""
    if any(c in value for c in "/+#\0"):
        return "must not contain '/', '+', '#'"
    return None


def device_id_or_hostname(device_id: str) -> str:
    value = device_id or socket.gethostname()
    problem = check_topic_level(value) if value else "is empty"
    if problem:
        raise MqttError(f"mqtt.device_id {value!r} {problem}")
    return value


def topic(device_id: str, name: str) -> str:
    return f"pttd/{device_id}/{name}"


def read_password(path: str) -> str:
    """The broker password from ``password_file`` (first line, stripped); never logged."""
    from pttd.config_files import read_text_file

    try:
        value = read_text_file(path, "mqtt.password_file:").strip()
    except FileNotFoundError:
        raise MqttError(f"mqtt.password_file: {path} not found") from None
    except ConfigError as exc:  # a directory, a FIFO, no permission, not UTF-8, too large
        raise MqttError(str(exc)) from None
    if not value:
        raise MqttError(f"mqtt.password_file: {path} is empty")
    return value


def parse_command(payload: bytes) -> str:
    """``{"cmd": "press"}`` → ``"press"``; ValueError (with a reason) for anything else."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes is too long")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cmd"), str):
        raise ValueError('expected {"cmd": "<command>"}')
    if doc["cmd"] not in COMMANDS:
        raise ValueError(f"unknown command {doc['cmd'][:40]!r} (accepted: {', '.join(COMMANDS)})")
    return doc["cmd"]


def encode(event: dict) -> bytes:
    """The contract's event JSON, as on stdout and the control socket."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def discovery_messages(device_id: str) -> list[tuple[str, dict]]:
    """Home Assistant MQTT discovery: a "last transcript" sensor and a "talk" button.

    The button sends ``toggle``: a Home Assistant button has no release, so one tap starts
    listening and the next tap ends the turn.
    """
    node = "pttd_" + "".join(c if c.isalnum() or c in "_-" else "_" for c in device_id)
    state = topic(device_id, EventKind.STATE)
    common = {
        "availability_topic": state,
        "availability_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        "device": {
            "identifiers": [node],
            "name": f"pttd {device_id}",
            "model": "pttd",
            "manufacturer": "pttd",
        },
    }
    sensor = {
        **common,
        "name": "Last transcript",
        "unique_id": f"{node}_last_transcript",
        "state_topic": topic(device_id, EventKind.FINAL),
        "value_template": "{{ value_json.text[:" + str(HA_STATE_MAX) + "] }}",
        "json_attributes_topic": topic(device_id, EventKind.FINAL),
        "icon": "mdi:text-to-speech",
    }
    button = {
        **common,
        "name": "Talk",
        "unique_id": f"{node}_talk",
        "command_topic": topic(device_id, "cmd"),
        "payload_press": json.dumps({"cmd": Command.TOGGLE.value}, separators=(",", ":")),
        "icon": "mdi:microphone",
    }
    return [
        (f"{HA_PREFIX}/sensor/{node}/last_transcript/config", sensor),
        (f"{HA_PREFIX}/button/{node}/talk/config", button),
    ]


def _guarded(method):
    """paho re-raises callback errors in its loop thread (killing it): log them instead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a bad message must not stop the MQTT link
            log.exception("MQTT: %s failed", method.__name__)

    return wrapper


class MqttBridge:
    """An output sink (``emit``/``close``) that also feeds MQTT commands to the controller.

    ``on_command(name) -> dict`` must not block (``Controller.command`` only enqueues).
    Everything published goes through paho, which is thread-safe; ``_lock`` keeps the state
    topic and the final queue in order between the output worker and paho's thread.
    """

    def __init__(
        self,
        *,
        url: str,
        device_id: str = "",
        username: str = "",
        password_file: str = "",
        publish_partials: bool = False,
        ha_discovery: bool = False,
        keepalive_s: int = 30,
        on_command: Callable[[str], dict] | None = None,
    ):
        self.broker = parse_url(url)
        self.device_id = device_id_or_hostname(device_id)
        if password_file and not username:
            raise MqttError("mqtt.password_file needs mqtt.username")
        self.publish_partials = publish_partials
        self.skips = frozenset() if publish_partials else frozenset({EventKind.PARTIAL})
        self.ha_discovery = ha_discovery
        self.keepalive_s = keepalive_s
        self._on_command = on_command
        self._lock = threading.Lock()
        self._finals: collections.deque[dict] = collections.deque()
        self._handed: collections.deque = collections.deque(maxlen=FINAL_QUEUE)
        self._state = events.state_event(State.IDLE)
        self._connected = False
        self._started = False
        self._closing = False
        self._outage_logged = False
        self.dropped_finals = 0
        self._paho = _import_paho()
        password = read_password(password_file) if password_file else None
        self._client = self._make_client(username, password)

    @classmethod
    def from_config(cls, cfg, on_command: Callable[[str], dict] | None = None) -> MqttBridge:
        return cls(
            url=cfg.url,
            device_id=cfg.device_id,
            username=cfg.username,
            password_file=cfg.password_file,
            publish_partials=cfg.publish_partials,
            ha_discovery=cfg.ha_discovery,
            keepalive_s=cfg.keepalive_s,
            on_command=on_command,
        )

    def topic(self, name: str) -> str:
        return topic(self.device_id, name)

    # --- lifecycle -------------------------------------------------------------------------------

    def _make_client(self, username: str, password: str | None):
        mqtt = self._paho
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"pttd-{self.device_id}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.enable_logger(_paho_logger())
        if username:
            client.username_pw_set(username, password)
        if self.broker.tls:
            client.tls_set()  # the system's CAs; certificate and host name are verified
        offline = encode(events.state_event(State.OFFLINE))
        client.will_set(self.topic(EventKind.STATE), offline, qos=1, retain=True)
        client.reconnect_delay_set(*RECONNECT_DELAY_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Connect in the background (paho's thread retries until the broker answers)."""
        b = self.broker
        log.info(
            "MQTT: connecting to %s://%s:%d as device %s",
            "mqtts" if b.tls else "mqtt",
            b.host,
            b.port,
            self.device_id,
        )
        self._client.connect_async(b.host, b.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        self._started = True

    def stop_commands(self) -> None:
        """No more commands to the controller (it is stopping); events still go out."""
        self._on_command = None

    def close(self) -> None:
        """Publish what is queued and the retained ``offline`` state (bounded), then disconnect."""
        self._on_command = None
        self._closing = True
        if not self._started:
            return
        deadline = time.monotonic() + CLOSE_WAIT_S
        with self._lock:
            if self._connected:
                self._handed.append(
                    self._client.publish(
                        self.topic(EventKind.STATE),
                        encode(events.state_event(State.OFFLINE)),
                        qos=1,
                        retain=True,
                    )
                )
        _wait_published(list(self._handed), deadline)
        left = len(self._finals) + sum(1 for i in self._handed if not i.is_published())
        if left:
            log.warning("MQTT: %d messages not delivered at shutdown (broker unreachable)", left)
        self._client.disconnect()
        _join_loop(self._client, LOOP_JOIN_S)

    # --- the sink side (the output worker thread) ------------------------------------------------

    def emit(self, event: dict) -> None:
        kind = event.get("event")
        if kind == EventKind.FINAL:
            self._queue_final(event)
            self._flush_finals()
        elif kind == EventKind.STATE:
            with self._lock:
                self._state = event
                self._publish_state()
        elif kind == EventKind.PARTIAL and self.publish_partials:
            self._publish_live(EventKind.PARTIAL, event, qos=0)
        elif kind == EventKind.ERROR:
            self._publish_live(EventKind.ERROR, event, qos=1)
        elif kind == EventKind.WARNING:
            self._publish_live(EventKind.WARNING, event, qos=1)

    def _queue_final(self, event: dict) -> None:
        with self._lock:
            if len(self._finals) >= FINAL_QUEUE:
                oldest = self._finals.popleft()
                self.dropped_finals += 1
                log.warning(
                    "MQTT: %d finals wait for the broker; dropped the oldest (press %s, "
                    "%d dropped so far)",
                    FINAL_QUEUE,
                    oldest.get("press_id"),
                    self.dropped_finals,
                )
            self._finals.append(event)

    def _flush_finals(self) -> None:
        """Hand queued finals to paho while connected (paho keeps QoS 1 ones until PUBACK)."""
        with self._lock:
            while self._finals and self._connected:
                info = self._client.publish(
                    self.topic(EventKind.FINAL), encode(self._finals[0]), qos=1
                )
                if info.rc not in (self._paho.MQTT_ERR_SUCCESS, self._paho.MQTT_ERR_NO_CONN):
                    log.warning(
                        "MQTT: publishing a final failed (%s); kept queued",
                        self._paho.error_string(info.rc),
                    )
                    return
                self._finals.popleft()
                self._handed.append(info)

    def _publish_state(self) -> None:
        """Caller holds ``_lock``: the newest state, retained, so late subscribers see it."""
        if self._connected:
            self._client.publish(
                self.topic(EventKind.STATE), encode(self._state), qos=1, retain=True
            )

    def _publish_live(self, name: str, event: dict, qos: int) -> None:
        """Partials and errors only matter live: not queued while the broker is down."""
        if self._connected:
            self._client.publish(self.topic(name), encode(event), qos=qos)
        else:
            log.debug("MQTT: not connected; %s event not published", name)

    # --- paho callbacks (paho's loop thread) -----------------------------------------------------

    @_guarded
    def _on_connect(self, client, _userdata, _flags, reason, _properties) -> None:
        if reason.is_failure:
            self._log_outage(f"broker refused the connection: {reason}")
            return
        log.info("MQTT: connected to %s:%d", self.broker.host, self.broker.port)
        self._outage_logged = False
        client.subscribe(self.topic("cmd"), qos=1)
        with self._lock:
            self._connected = True
            if self.ha_discovery:
                for name, config in discovery_messages(self.device_id):
                    client.publish(name, encode(config), qos=1, retain=True)
            self._publish_state()
        self._flush_finals()

    @_guarded
    def _on_connect_fail(self, _client, _userdata) -> None:
        exc = sys.exc_info()[1]  # paho calls this from its ``except OSError`` (refused, TLS, DNS)
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        self._log_outage(f"cannot reach {self.broker.host}:{self.broker.port}{why}")

    @_guarded
    def _on_disconnect(self, _client, _userdata, _flags, reason, _properties) -> None:
        self._connected = False
        if not self._closing:
            self._log_outage(f"connection lost ({reason})")

    @_guarded
    def _on_message(self, _client, _userdata, msg) -> None:
        if msg.retain:
            log.warning(
                "MQTT: ignoring a retained command on %s (clear it with an empty retained message)",
                msg.topic,
            )
            return
        try:
            name = parse_command(msg.payload)
        except ValueError as exc:
            log.warning("MQTT: ignoring command on %s: %s", msg.topic, exc)
            return
        handler = self._on_command
        if handler is None:
            return
        reply = handler(name)
        if not reply.get("ok"):
            log.warning("MQTT: command %s refused: %s", name, reply.get("error"))

    def _log_outage(self, why: str) -> None:
        """One warning per outage, not one per retry; finals are queued meanwhile."""
        if not self._outage_logged:
            self._outage_logged = True
            log.warning(
                "MQTT: %s; retrying in the background, finals are queued (up to %d)",
                why,
                FINAL_QUEUE,
            )


class _PahoAsDebug(logging.Filter):
    """paho logs routine conditions as errors (e.g. "Client is not connected" while it retries);
    pttd reports outages itself, so paho's lines are debug detail (shown with ``pttd -v``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _paho_logger() -> logging.Logger:
    logger = logging.getLogger(__name__ + ".paho")
    if not any(isinstance(f, _PahoAsDebug) for f in logger.filters):
        logger.addFilter(_PahoAsDebug())
    return logger


def _wait_published(infos: list, deadline: float) -> None:
    for info in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            info.wait_for_publish(remaining)
        except (RuntimeError, ValueError):
            continue


def _join_loop(client, timeout: float) -> None:
    """``loop_stop()`` joins paho's thread without a timeout: bound it from a helper thread."""
    stopper = threading.Thread(target=client.loop_stop, name="pttd-mqtt-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        log.warning("MQTT: network thread did not stop within %.1f s", timeout)


def _import_paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise MqttError(
            "mqtt.url is set but paho-mqtt is not installed: pip install "
            f"'pttd[mqtt]', or 'paho-mqtt>=2,<3' into pttd's venv ({exc})"
        ) from None
    return mqtt
