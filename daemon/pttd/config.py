"""The TOML configuration of the interface contract, loaded into frozen dataclasses.

Every key is optional and has the contract's default. Unknown sections or keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key, so ``pttd run -c bad.toml`` can
exit 2 with one readable line instead of a traceback or a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
import tomllib
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pttd.errors import ConfigError

__all__ = ["ConfigError", "Config", "Secret", "load_config", "from_dict"]

DEFAULT_PATH = "/etc/pttd/pttd.toml"
CLOUD_URL = "wss://streaming.assemblyai.com/v3/ws"
CREDENTIAL_NAME = "assemblyai-api-key"
DEFAULT_KEY_FILE = "/etc/pttd/api-key"  # what the shipped unit loads as that credential


class Secret:
    """Holds the API key so that no repr, log line, exception text or event can show it."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str = "", origin: str = ""):
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret(<set>)" if self._value else "Secret(<empty>)"

    __str__ = __repr__


# --- value checks: each returns an error text or None -------------------------------------------


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _one_of(*choices: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "must be one of " + ", ".join(map(repr, choices))


def _url(v: str) -> str | None:
    """ "local", or a ws:// / wss:// URL websocket-client can connect to (a host, a valid port):
    caught at start-up, not at the first press."""
    if v == "local":
        return None
    bad = 'must be a ws:// or wss:// URL with a host, or "local"'
    try:
        parts = urllib.parse.urlsplit(v)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        return f"{bad} ({exc})"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return bad
    if port == 0:
        return f"{bad} (port 0)"
    if any(c.isspace() for c in v):
        return f"{bad} (no spaces)"
    return None


def _token_url(v: str) -> str | None:
    """ "" (off), an https:// URL, or http:// to a loopback host (never a secret in clear)."""
    if v == "":
        return None
    try:
        parts = urllib.parse.urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        return f"must be an https:// URL ({exc})"
    if parts.scheme not in ("https", "http") or not parts.hostname or any(c.isspace() for c in v):
        return "must be an https:// URL with a host"
    if parts.scheme == "http":
        from pttd.stt.assemblyai.tokens import is_loopback_host

        if not is_loopback_host(parts.hostname):
            return (
                "must be https:// (http:// only to a loopback host: the secret and the token "
                "would cross the network in clear)"
            )
    return None


def _str_list(v: list) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"


def _pin_list(v: list) -> str | None:
    if all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 53 for x in v):
        return None
    return "must be a list of GPIO numbers (0-53)"


def _opt(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- sections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SttConfig:
    url: str = _opt(CLOUD_URL, _url, 'v3 endpoint, or "local" for the offline engine')
    api_key: Secret = field(default_factory=Secret, metadata={"check": None, "doc": "inline key"})
    api_key_file: str = _opt("", None, "file holding the key")
    speech_model: str = _opt(
        "universal-streaming-english",
        lambda v: None if v.strip() else "must not be empty",
        "always sent: the server default changed several times in 2026",
    )
    format_turns: bool = _opt(True)
    keep_warm_s: float = _opt(0.0, _between(0, 3600), "keep the session this long after a turn")
    fallback: str = _opt("", _one_of("", "local"))
    fallback_retry_s: float = _opt(
        30.0, _between(1, 3600), "after a cloud failure, use the local engine this long"
    )
    params: dict = _opt({}, None, "other v3 query parameters, passed through")
    # fleet mode (issue 24): a one-use temporary token per session from this URL, no key here
    token_url: str = _opt("", lambda v: _token_url(v), "GET -> {token, expires_in_seconds}")
    token_auth_file: str = _opt("", None, "sent to token_url as Authorization: Bearer <content>")
    sessions_per_minute: int = _opt(
        0, _between(0, 100000), "the account's new-session limit; 0 = learn it (3009)"
    )


@dataclass(frozen=True)
class AudioConfig:
    source: str = _opt("alsa", _one_of("alsa", "wav"))
    device: str = _opt("default")
    wav: str = _opt("")
    capture_format: str = _opt("S16_LE", _one_of("S16_LE", "S32_LE"))
    capture_channels: int = _opt(1, _one_of(1, 2))
    capture_rate: int = _opt(16000, _one_of(16000, 32000, 44100, 48000))
    channel: int = _opt(0, _between(0, 1))
    sample_rate: int = _opt(16000, _one_of(8000, 16000, 22050, 24000, 32000, 44100, 48000))
    gain_db: float = _opt(0.0, _between(-20.0, 60.0))
    warmup_ms: int = _opt(150, _between(0, 5000))
    ring_seconds: int = _opt(30, _between(5, 600))
    chunk_ms: int = _opt(50, _between(50, 1000), "the server accepts 50-1000 ms per frame")
    # capture period: the capture thread (and the streamer it wakes) runs once per period;
    # shorter sends audio sooner, longer costs less CPU
    period_ms: int = _opt(100, _between(10, 1000))
    # DC-blocking high-pass for ALSA mics (0 = off): on, every block goes through numpy; off, a
    # 16-bit mono mic at sample_rate with gain_db 0 is sent as captured, without numpy
    highpass_hz: float = _opt(80.0, _between(0.0, 1000.0))
    preroll_ms: int = _opt(500, _between(0, 5000))
    postroll_ms: int = _opt(300, _between(0, 5000))


@dataclass(frozen=True)
class ButtonConfig:
    pin: int = _opt(17, _between(0, 53))
    pull_up: bool = _opt(True)
    bounce_ms: int = _opt(30, _between(0, 1000))
    mode: str = _opt("hold", _one_of("hold", "toggle"))


@dataclass(frozen=True)
class LedsConfig:
    kind: str = _opt("led", _one_of("led", "pwm", "rgb", "none"))
    pins: list = _opt([27], _pin_list)
    active_high: bool = _opt(True)
    patterns: dict = _opt({}, None, "state -> pattern")


@dataclass(frozen=True)
class GpioConfig:
    pin_factory: str = _opt("", _one_of("", "mock", "lgpio", "rpigpio", "pigpio", "native"))


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _opt(
        "/run/pttd/control.sock", lambda v: None if v.strip() else "must not be empty"
    )


@dataclass(frozen=True)
class OutputConfig:
    stdout: str = _opt("text", _one_of("text", "jsonl", "none"))
    journal: bool = _opt(True)
    hook: list = _opt([], _str_list)
    type: bool = _opt(False, None, "type finals into the focused app (uinput keyboard)")
    type_layout: str = _opt("us", _one_of("us", "gb", "de"), "the system's keyboard layout")
    type_trailing: str = _opt("space", _one_of("space", "newline", "none"), "typed after a final")
    type_partials: bool = _opt(False, None, "type partials' stable words as they firm up")
    type_delay_ms: int = _opt(10, _between(0, 100), "pause between keystrokes")
    hook_timeout_s: float = _opt(10.0, _between(0.1, 3600), "a hook run longer than this is killed")
    hook_retries: int = _opt(2, _between(0, 10), "extra runs after a failed one")


def _listen(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if v == "" or (sep and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return 'must be HOST:PORT, e.g. "127.0.0.1:8766" (or "" for off)'


def _origin_list(v: list) -> str | None:
    if all(
        isinstance(x, str) and x.startswith(("http://", "https://")) and x.count("/") == 2
        for x in v
    ):
        return None
    return 'must list origins like "http://localhost:3000" (scheme://host[:port], no path)'


@dataclass(frozen=True)
class KioskConfig:
    listen: str = _opt("", _listen, 'HOST:PORT of the kiosk page and WebSocket; "" = off')
    token: str = _opt("", None, "required from clients when set; required for non-loopback listen")
    allowed_origins: list = _opt([], _origin_list, "extra browser origins allowed on /ws")


def _mqtt_url(v: str) -> str | None:
    """ "" (off) or a URL mqtt.parse_url accepts (it imports no MQTT library)."""
    if v == "" or "@" in v:
        return None  # credentials in the URL: the daemon refuses it without echoing them
    from pttd.frontends.mqtt import MqttError, parse_url

    try:
        parse_url(v)
    except MqttError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _topic_level(v: str) -> str | None:
    return "must not contain '/', '+' or '#'" if any(c in v for c in "/+#\0") else None


@dataclass(frozen=True)
class MqttConfig:
    url: str = _opt("", _mqtt_url, 'mqtt://host[:1883] or mqtts://host[:8883]; "" = off')
    device_id: str = _opt("", _topic_level, 'topic level pttd/<device_id>/...; "" = hostname')
    username: str = _opt("")
    password_file: str = _opt("", None, "file holding the broker password (needs username)")
    publish_partials: bool = _opt(False, None, "also publish partials (QoS 0)")
    ha_discovery: bool = _opt(False, None, "Home Assistant discovery: sensor + button")
    keepalive_s: int = _opt(30, _between(5, 3600), "the broker sends the will after 1.5x this")


@dataclass(frozen=True)
class LocalConfig:
    phrases: list = _opt([], _str_list)


def _abs_dir(v: str) -> str | None:
    return None if v == "" or v.startswith("/") else 'must be an absolute path, or "" (off)'


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = _opt(
        "/var/lib/pttd/spool",
        _abs_dir,
        'presses waiting for the network survive restarts; "" = memory only',
    )
    max_mb: float = _opt(
        64.0, _between(0.01, 1048576), "the oldest waiting press is dropped past it"
    )
    max_age_h: float = _opt(24.0, _between(0.01, 8760), "older waiting presses are dropped")


@dataclass(frozen=True)
class Config:
    stt: SttConfig = field(default_factory=SttConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    button: ButtonConfig = field(default_factory=ButtonConfig)
    leds: LedsConfig = field(default_factory=LedsConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    kiosk: KioskConfig = field(default_factory=KioskConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    path: str = ""

    @property
    def is_local(self) -> bool:
        return self.stt.url == "local"


SECTIONS: dict[str, type] = {
    "stt": SttConfig,
    "audio": AudioConfig,
    "button": ButtonConfig,
    "leds": LedsConfig,
    "gpio": GpioConfig,
    "control": ControlConfig,
    "output": OutputConfig,
    "kiosk": KioskConfig,
    "mqtt": MqttConfig,
    "local": LocalConfig,
    "spool": SpoolConfig,
}

# Query parameters that pttd sets itself; passing them through [stt] params would fight it.
_OWN_PARAMS = {
    "speech_model": "stt.speech_model",
    "format_turns": "stt.format_turns",
    "sample_rate": "audio.sample_rate",
    "encoding": "(always pcm_s16le)",
    "token": "(use stt.token_url)",
}


# --- loading -------------------------------------------------------------------------------------


def config_path(explicit: str | None, environ: dict | None = None) -> str:
    """The contract's order: ``-c``, else ``$PTTD_CONFIG``, else /etc/pttd/pttd.toml."""
    environ = os.environ if environ is None else environ
    return explicit or environ.get("PTTD_CONFIG") or DEFAULT_PATH


def load_config(
    path: str | None, environ: dict | None = None, *, require_file: bool = True
) -> Config:
    """Read and validate a TOML file; ``path=None`` gives the defaults."""
    if path is None:
        return from_dict({}, environ=environ)
    data = _read_toml(path, require_file)
    try:
        return from_dict(data, path=path, environ=environ)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


MAX_FILE_BYTES = 1 << 20
"""The largest config or secret file read (a bigger one is a mistake: -c /var/log/syslog)."""


def _read_toml(path: str, require_file: bool) -> dict:
    """The parsed file; any problem reading it is a ConfigError naming it (``{}`` for a missing
    file that is not required)."""
    try:
        text = read_text_file(path, "config file")
    except FileNotFoundError:
        if require_file:
            raise ConfigError(
                f"config file {path} not found (pass -c FILE or set PTTD_CONFIG)"
            ) from None
        return {}
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None


def read_text_file(path: str | os.PathLike, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a small regular file. Every way of failing is a :class:`ConfigError`
    reading ``"<what> <path> ..."`` (``what``: "config file", "stt.api_key_file:", ...), except
    a missing file, which raises FileNotFoundError for the caller to word. A FIFO or a device
    is refused without blocking on it or reading it forever; the content is never quoted (it
    may be a secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {_os_reason(exc)}") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        if stat.S_ISDIR(kind):
            raise ConfigError(f"{what} {path} is a directory, not a file")
        raise ConfigError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot read it: {_os_reason(exc)}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not valid UTF-8 (at byte {exc.start}); save it as UTF-8"
        ) from None


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def from_dict(data: dict, path: str = "", environ: dict | None = None) -> Config:
    """Validate a parsed TOML document (also used by ``pttd demo`` for its embedded config)."""
    environ = os.environ if environ is None else environ
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    sections = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name} must be a table ([{name}])")
        sections[name] = _build_section(name, cls, table)
    cfg = Config(**sections, path=path)
    _cross_checks(cfg)
    if cfg.stt.token_url:  # fleet mode: no key on the device, ever
        _check_token_mode(cfg.stt)
        return cfg
    stt = dataclasses.replace(cfg.stt, api_key=resolve_api_key(cfg.stt, environ, path))
    return dataclasses.replace(cfg, stt=stt)


def _build_section(name: str, cls: type, table: dict) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key} (known: {', '.join(fields)})")
        f = fields[key]
        values[key] = _coerce(f"{name}.{key}", f, value)
    return cls(**values)


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    expected = _TYPE_NAMES[f.type]
    if expected is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return Secret(value.strip(), origin=key)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key} must be {_ARTICLE[expected]}, not {type(value).__name__} {value!r}"
        )
    check = f.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key} = {value!r}: {problem}")
    return value


_TYPE_NAMES = {
    "str": str,
    "bool": bool,
    "int": int,
    "float": float,
    "list": list,
    "dict": dict,
    "Secret": Secret,
}
_ARTICLE = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "a list",
    dict: "a table",
    Secret: "a string",
}


def _cross_checks(cfg: Config) -> None:
    a = cfg.audio
    if a.channel >= a.capture_channels:
        raise ConfigError(
            f"audio.channel = {a.channel}: capture_channels is {a.capture_channels}, "
            f"so channel must be 0{' or 1' if a.capture_channels == 2 else ''}"
        )
    if a.source == "wav" and not a.wav:
        raise ConfigError('audio.wav must name a WAV file when audio.source = "wav"')
    if a.preroll_ms + a.postroll_ms >= a.ring_seconds * 1000 // 2:
        raise ConfigError("audio.preroll_ms + postroll_ms must be under half of ring_seconds")
    want = {"led": 1, "pwm": 1, "rgb": 3}.get(cfg.leds.kind)
    if want is not None and len(cfg.leds.pins) != want:
        raise ConfigError(
            f"leds.pins must list {want} pin{'s' if want > 1 else ''} "
            f"for kind = {cfg.leds.kind!r}, got {cfg.leds.pins}"
        )
    _check_led_patterns(cfg.leds)
    for p, owner in _OWN_PARAMS.items():
        if p in cfg.stt.params:
            raise ConfigError(f"stt.params.{p}: set {owner} instead")
    for p, v in cfg.stt.params.items():
        if not isinstance(v, (str, int, float, bool, list, dict)):
            raise ConfigError(f"stt.params.{p} has an unsupported type {type(v).__name__}")
    if cfg.kiosk.listen and not _is_loopback(cfg.kiosk.listen) and not cfg.kiosk.token:
        raise ConfigError("kiosk.token is required when kiosk.listen is not a loopback address")


def _check_led_patterns(leds: LedsConfig) -> None:
    from pttd.events import State

    states = {s.value for s in State}
    for state, pattern in leds.patterns.items():
        if state not in states:
            raise ConfigError(
                f"leds.patterns.{state}: unknown state (known: {', '.join(sorted(states))})"
            )
        if not isinstance(pattern, str):
            raise ConfigError(f"leds.patterns.{state} must be a string")
        try:
            from pttd.frontends.peripherals import parse_pattern
        except ImportError:  # pragma: no cover - peripherals always ships with the package
            return
        try:
            parse_pattern(leds.kind, pattern)
        except ValueError as exc:
            raise ConfigError(f"leds.patterns.{state} = {pattern!r}: {exc}") from None


def _is_loopback(listen: str) -> bool:
    """Whether HOST of ``HOST:PORT`` is a loopback address, decided on the parsed address: a
    host name is not loopback (whatever it resolves to), except ``localhost``."""
    host = listen.rpartition(":")[0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name, "" (every interface) or garbage
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _check_token_mode(stt: SttConfig) -> None:
    if stt.api_key or stt.api_key_file:
        raise ConfigError(
            "stt.token_url is set: remove stt.api_key / stt.api_key_file "
            "(in fleet mode the key stays on the token broker)"
        )
    if stt.url == "local":
        raise ConfigError('stt.token_url needs a cloud stt.url, not "local"')
    if stt.token_auth_file:
        try:
            secret = read_text_file(stt.token_auth_file, "stt.token_auth_file").strip()
        except FileNotFoundError:
            raise ConfigError(f"stt.token_auth_file: {stt.token_auth_file} not found") from None
        if not secret:
            raise ConfigError(f"stt.token_auth_file: {stt.token_auth_file} is empty")


def resolve_api_key(stt: SttConfig, environ: dict, path: str = "") -> Secret:
    """The key from api_key, api_key_file, $ASSEMBLYAI_API_KEY or the systemd credential."""
    if stt.api_key:
        return stt.api_key
    if stt.api_key_file:
        return _read_key(Path(stt.api_key_file), "stt.api_key_file")
    if environ.get("ASSEMBLYAI_API_KEY", "").strip():
        return Secret(environ["ASSEMBLYAI_API_KEY"].strip(), origin="$ASSEMBLYAI_API_KEY")
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).exists():
        # the shipped tmpfiles snippet creates /etc/pttd/api-key empty: that means "no key yet"
        return _read_key(
            Path(cred_dir) / CREDENTIAL_NAME, f"credential {CREDENTIAL_NAME}", allow_empty=True
        )
    # `pttd check` run by hand (outside the unit) finds the key where the installer put it
    if os.access(DEFAULT_KEY_FILE, os.R_OK):
        return _read_key(Path(DEFAULT_KEY_FILE), DEFAULT_KEY_FILE, allow_empty=True)
    return Secret("", origin="")


def _read_key(path: Path, origin: str, allow_empty: bool = False) -> Secret:
    try:
        value = read_text_file(path, f"{origin}:").strip()
    except FileNotFoundError:
        raise ConfigError(f"{origin}: {path} not found") from None
    if not value and not allow_empty:
        raise ConfigError(f"{origin}: {path} is empty")
    return Secret(value, origin=origin)


def require_api_key(cfg: Config) -> None:
    """A cloud URL needs a key; say where one can go (without ever showing one)."""
    if cfg.is_local or cfg.stt.api_key or cfg.stt.token_url:
        return
    raise ConfigError(
        "no AssemblyAI API key: set stt.api_key_file (or stt.api_key), "
        "$ASSEMBLYAI_API_KEY, or the systemd credential "
        f"{CREDENTIAL_NAME} (/etc/pttd/api-key with the shipped unit); "
        'or use url = "local" for the offline engine'
    )
