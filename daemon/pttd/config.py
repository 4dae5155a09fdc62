"""The TOML configuration of the interface contract, loaded into frozen dataclasses.

Every key is optional and has the contract's default. Unknown sections or keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key, so ``pttd run -c bad.toml`` can
exit 2 with one readable line instead of a traceback or a silently ignored typo.

Each key's docstring, right under it, is its documentation: scripts/gen_config_ref.py turns
them, the defaults and the checks into docs/config.md. This module is the one import for users
of the configuration; reading the files (config_files.py) and the value checks
(config_checks.py) live apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pttd import config_checks as checks
from pttd.config_checks import Check, between, check_across_keys, one_of
from pttd.config_files import (
    CREDENTIAL_NAME,
    DEFAULT_PATH,
    Secret,
    check_token_mode,
    config_path,
    read_text_file,
    read_toml,
    require_api_key,
    resolve_api_key,
)
from pttd.errors import ConfigError

__all__ = [
    "CLOUD_URL",
    "CREDENTIAL_NAME",
    "DEFAULT_PATH",
    "SECTIONS",
    "Config",
    "ConfigError",
    "Secret",
    "config_path",
    "from_dict",
    "load_config",
    "read_text_file",
    "require_api_key",
    "resolve_api_key",
]

CLOUD_URL = "wss://streaming.assemblyai.com/v3/ws"
_is_loopback = checks.is_loopback_listen  # its name in tests/test_config_files.py


def _key(default: Any, check: Check | None = None) -> Any:
    """A key's default, and the check its value must pass."""
    meta = {"check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- sections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SttConfig:
    """The speech-to-text service: where it is, how pttd proves who it is, what it asks for."""

    url: str = _key(CLOUD_URL, checks.ws_url)
    """The v3 endpoint (`wss://streaming.eu.assemblyai.com/v3/ws` for the EU data zone), or
    `"local"` for the offline engine started in-process (`install.sh --with-local`). A URL that
    can never work (no host, a port outside 1-65535, a scheme other than `ws`/`wss`) stops
    start-up with exit 2."""
    api_key: Secret = field(default_factory=Secret, metadata={"check": None})
    """The key inline (prefer `api_key_file` or the credential). Wins over every other source."""
    api_key_file: str = _key("")
    """A file holding the key. Without `api_key` or `api_key_file` the key comes from
    `$ASSEMBLYAI_API_KEY`, else the systemd credential `assemblyai-api-key` (`/etc/pttd/api-key`
    with the shipped unit). The key is never logged, printed or put in an event."""
    speech_model: str = _key("universal-streaming-english", checks.not_empty)
    """Always sent: the server's default changed four times in 2026."""
    format_turns: bool = _key(True)
    """Punctuation and casing on finals (Universal-3 Pro models always format and are not sent
    it)."""
    keep_warm_s: float = _key(0.0, between(0, 3600))
    """Keep the session open this long after a turn for the next press (billed while open)."""
    fallback: str = _key("", one_of("", "local"))
    """`"local"`: when the cloud is unreachable or refuses (not on a rejected key), turns go to
    the offline engine, and their finals carry `"engine": "local"`."""
    fallback_retry_s: float = _key(30.0, between(1, 3600))
    """After such a failure, presses use the offline engine this long, then the cloud is tried
    again."""
    params: dict = _key({})
    """Any other v3 query parameter, passed through: lists/objects as JSON, booleans lowercase
    (e.g. `keyterms_prompt = ["Raspberry Pi", "pttd"]`, `max_turn_silence = 800`);
    `speech_model`, `format_turns`, `sample_rate`, `encoding`, `token` are refused here."""
    token_url: str = _key("", checks.token_url)
    """Fleet mode (docs/fleet-tokens.md): each session connects with a fresh one-use token from
    this URL (GET → `{"token": "...", "expires_in_seconds": N}`, sent as `?token=`), typically
    from `pttd serve-tokens`; no API key on the device (`api_key`/`api_key_file` are then
    refused, the environment's key ignored). `https://` (verified against the system CAs;
    `SSL_CERT_FILE` names another bundle), `http://` only to a loopback host."""
    token_auth_file: str = _key("")
    """This device's secret for `token_url`: the file's content goes there as
    `Authorization: Bearer <content>` (checked readable and non-empty at start-up)."""
    sessions_per_minute: int = _key(0, between(0, 100000))
    """The account's new-session limit (AssemblyAI limits new sessions per minute per account:
    free accounts 5, paid 100+). pttd counts the sessions it opened in the last 60 s; once that
    reaches the limit, a press's session is kept open after its final until the window has room
    again (so the next presses reuse it: no new session, no wait), and a press that would still
    need one more waits for the window, its audio kept (never a lost press). `0` = learn it:
    presses are never held back until the service refuses one (3009), sessions are kept warm
    from 5 a minute on (the least any account has), and after a 3009 the number pttd had opened
    in the minute is the limit for the next 10 minutes. **Free tier: leave it at 0 or set 5.
    Paid: set your limit** (e.g. 100), or busy minutes keep sessions open (billed) they would
    not need. Ignored with `url = "local"`."""


@dataclass(frozen=True)
class AudioConfig:
    """The microphone, how its samples become what is sent, and the ring buffer."""

    source: str = _key("alsa", one_of("alsa", "wav"))
    """Where audio comes from: an ALSA device, or a WAV file standing in for a mic."""
    device: str = _key("default")
    """ALSA PCM name, e.g. `"hw:CARD=sndrpigooglevoi,DEV=0"` (by name: card numbers move) or
    `"mic"` from asound.conf."""
    wav: str = _key("")
    """With `source = "wav"`: the file, played in real time, then silence (a mic that never
    ends)."""
    capture_format: str = _key("S16_LE", one_of("S16_LE", "S32_LE"))
    """The device's sample format (I2S MEMS mics: `S32_LE`)."""
    capture_channels: int = _key(1, one_of(1, 2))
    """Channels captured from the device."""
    capture_rate: int = _key(16000, one_of(16000, 32000, 44100, 48000))
    """The device's sample rate, in Hz."""
    channel: int = _key(0, between(0, 1))
    """Which capture channel is the mic (an I2S mic: 0 with its L/R pin tied to GND, 1 with it
    tied to 3V3)."""
    sample_rate: int = _key(16000, one_of(8000, 16000, 22050, 24000, 32000, 44100, 48000))
    """What is sent to the server (pcm_s16le mono), in Hz."""
    gain_db: float = _key(0.0, between(-20.0, 60.0))
    """Gain in dB; clipping is counted, never wrapped."""
    warmup_ms: int = _key(150, between(0, 5000))
    """Discarded after every device open (the MEMS start-up transient)."""
    ring_seconds: int = _key(30, between(5, 600))
    """Ring buffer capacity, in seconds."""
    chunk_ms: int = _key(50, between(50, 1000))
    """Frame size sent (the server accepts 50-1000 ms per frame), rounded up to whole samples
    (at 22050 Hz a 50 ms frame is 1103 samples, 50.02 ms: the server refuses frames under
    50 ms)."""
    period_ms: int = _key(100, between(10, 1000))
    """Capture period (an addition to the contract): the capture thread, and the streamer it
    wakes, run once per period. Shorter sends audio sooner (a frame waits for its period to
    end); longer costs less CPU. A press and a release are placed at their own moment (to
    10 ms), not at the end of the last period, so no post-roll is lost either way."""
    highpass_hz: float = _key(80.0, between(0.0, 1000.0))
    """DC-blocking high-pass for ALSA mics, in Hz (`0` = off; an addition to the contract). I2S
    MEMS mics need it (a large DC offset). Off, a 16-bit mono mic at `sample_rate` with
    `gain_db = 0` is sent exactly as captured and the daemon never loads numpy: ~13 MB less
    memory and ~1.9 ms less CPU per audio second (`bench/mic_daemon.py`: 30.2 MB and 5.9 ms/s
    against 43.1 MB and 7.8 ms/s)."""
    preroll_ms: int = _key(500, between(0, 5000))
    """Audio from before the press."""
    postroll_ms: int = _key(300, between(0, 5000))
    """Audio after the release (at most: see `postroll`)."""
    postroll: str = _key("adaptive", one_of("adaptive", "fixed"))
    """`"adaptive"` (an addition to the contract): at the release pttd looks at the audio just
    before it. Silence for `postroll_silence_ms` (below a noise floor learned from the seconds
    before, plus 6 dB): the speaker had stopped, the stream ends at the release and the final
    comes about `postroll_ms` sooner. Speech within 150 ms of the release, or after it: the full
    `postroll_ms`, always. Speech that stopped shortly before: the post-roll ends once
    `postroll_silence_ms` of silence follows the last word. `"fixed"`: always `postroll_ms`."""
    postroll_silence_ms: int = _key(250, between(40, 2000))
    """How much silence means the speaker has stopped, for the adaptive post-roll."""


@dataclass(frozen=True)
class ButtonConfig:
    """The push button (docs/button-and-leds.md)."""

    pin: int = _key(17, between(0, 53))
    """BCM GPIO number of the push button."""
    pull_up: bool = _key(True)
    """Button to GND with the internal pull-up; `false` for a button wired to 3.3 V."""
    bounce_ms: int = _key(30, between(0, 1000))
    """Debounce (`0` = off)."""
    mode: str = _key("hold", one_of("hold", "toggle"))
    """`"hold"` (push-to-talk) or `"toggle"` (press to start, press to stop)."""


@dataclass(frozen=True)
class LedsConfig:
    """The status LED(s) (docs/button-and-leds.md)."""

    kind: str = _key("led", one_of("led", "pwm", "rgb", "none"))
    """A plain LED, a dimmable one, an RGB LED, or no pins at all."""
    pins: list = _key([27], checks.pin_list)
    """One pin for `led`/`pwm`, three (r, g, b) for `rgb`."""
    active_high: bool = _key(True)
    """`false` for LEDs wired to 3.3 V / common-anode RGB."""
    patterns: dict = _key({})
    """State → pattern overrides, e.g. `patterns = { listening = "on", error = "blink:0.5,0.5" }`;
    the defaults and the pattern grammar: docs/button-and-leds.md#leds-what-they-say."""


@dataclass(frozen=True)
class GpioConfig:
    """How gpiozero reaches the pins."""

    pin_factory: str = _key("", one_of("", "mock", "lgpio", "rpigpio", "pigpio", "native"))
    """`""` = gpiozero's default (lgpio on Bookworm); `"mock"` where there is no GPIO (demo,
    tests)."""


@dataclass(frozen=True)
class ControlConfig:
    """The local control socket (docs/contract.md#control-socket)."""

    socket: str = _key("/run/pttd/control.sock", checks.not_empty)
    """The control socket's path."""


@dataclass(frozen=True)
class OutputConfig:
    """Where finals go besides the control socket: stdout, journald, a hook, typing."""

    stdout: str = _key("text", one_of("text", "jsonl", "none"))
    """What is printed on stdout (under systemd stdout goes to the journal)."""
    journal: bool = _key(True)
    """Structured journald records."""
    hook: list = _key([], checks.str_list)
    """Argv run for each final, no shell: transcript on stdin, fields in `PTTD_*` variables, and
    of pttd's environment only `PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `LANGUAGE`, `LC_*`,
    `TZ`, `TMPDIR`; output read through a pipe (last 2 KB logged on failure, at most 1 MiB
    read); no core dumps, files up to 64 MiB (docs/hook.md)."""
    hook_timeout_s: float = _key(10.0, between(0.1, 3600))
    """The hook is killed after this long."""
    hook_retries: int = _key(2, between(0, 10))
    """A failing hook is retried this many times."""
    type: bool = _key(False)
    """Type finals into the focused app through a virtual keyboard (uinput;
    docs/typing-and-mqtt.md)."""
    type_layout: str = _key("us", one_of("us", "gb", "de"))
    """The system's keyboard layout."""
    type_trailing: str = _key("space", one_of("space", "newline", "none"))
    """Typed after each final."""
    type_partials: bool = _key(False)
    """Type partials' stable words as they firm up, corrected by the final."""
    type_delay_ms: int = _key(10, between(0, 100))
    """Pause between keystrokes; raise it if an app drops keys."""


@dataclass(frozen=True)
class KioskConfig:
    """The kiosk page and its WebSocket (docs/kiosk.md)."""

    listen: str = _key("", checks.listen_address)
    """E.g. `"127.0.0.1:8766"` (`[::1]:8766` for IPv6; `0.0.0.0:8766` = all interfaces): the
    kiosk page at `/` and its WebSocket at `/ws`; `""` = off."""
    token: str = _key("")
    """When set, every `/ws` client must present it; required when `listen` is not loopback: an
    IP address in `127.0.0.0/8` or `::1`, or `localhost` (any other host name is not loopback).
    Without it a loopback kiosk is open to every local program and user."""
    allowed_origins: list = _key([], checks.origin_list)
    """Extra browser origins allowed on `/ws`, e.g. `["http://localhost:3000"]`."""


@dataclass(frozen=True)
class MqttConfig:
    """An MQTT broker pttd publishes to and takes commands from (docs/typing-and-mqtt.md)."""

    url: str = _key("", checks.mqtt_url)
    """E.g. `"mqtt://broker:1883"` (`mqtts://` for TLS); `""` = off. Credentials never go in the
    URL (pttd refuses that)."""
    device_id: str = _key("", checks.topic_level)
    """Topic prefix `pttd/<device_id>/`; `""` = the hostname."""
    username: str = _key("")
    """Broker login (the password only from `password_file`)."""
    password_file: str = _key("")
    """A file holding the broker password (needs `username`); never logged."""
    publish_partials: bool = _key(False)
    """Also publish partials (QoS 0)."""
    ha_discovery: bool = _key(False)
    """Home Assistant discovery: a "Last transcript" sensor and a "Talk" button."""
    keepalive_s: int = _key(30, between(5, 3600))
    """MQTT keep-alive: the broker declares pttd gone after 1.5 × this without traffic."""


@dataclass(frozen=True)
class LocalConfig:
    """The offline engine (docs/offline-engine.md)."""

    phrases: list = _key([], checks.str_list)
    """Constrain the offline engine to these phrases (a grammar)."""


@dataclass(frozen=True)
class SpoolConfig:
    """Presses waiting for the network, kept on disk: how and when,
    docs/architecture.md#the-spool-nothing-lost-across-restarts."""

    dir: str = _key("/var/lib/pttd/spool", checks.absolute_dir)
    """Presses waiting for the network are kept here and survive a restart or a power cut;
    `""` = memory only. The default is used where `/var/lib/pttd` exists (the unit's
    `StateDirectory=`); elsewhere (`pttd run` by hand) waiting presses stay in memory. A
    directory set here that cannot be made or written is exit 2 naming `spool.dir`."""
    max_mb: float = _key(64.0, between(0.01, 1048576))
    """The spool's size; past it the oldest waiting press is dropped: an `error` event with its
    `press_id`, naming its file."""
    max_age_h: float = _key(24.0, between(0.01, 8760))
    """A press that has waited longer is dropped (an `error` event with its `press_id`)."""


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

# --- loading -------------------------------------------------------------------------------------


def load_config(
    path: str | None, environ: dict | None = None, *, require_file: bool = True
) -> Config:
    """Read and validate a TOML file; ``path=None`` gives the defaults."""
    if path is None:
        return from_dict({}, environ=environ)
    data = read_toml(path, require_file)
    try:
        return from_dict(data, path=path, environ=environ)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def from_dict(data: dict, path: str = "", environ: dict | None = None) -> Config:
    """Validate a parsed TOML document (also used by ``pttd demo`` for its embedded config)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
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
    check_across_keys(cfg)
    if cfg.stt.token_url:  # fleet mode: no key on the device, ever
        check_token_mode(cfg.stt)
        return cfg
    stt = dataclasses.replace(cfg.stt, api_key=resolve_api_key(cfg.stt, env, path))
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
    expected = _TYPE_NAMES[str(f.type)]
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
