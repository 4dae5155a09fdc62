"""The checks a configuration must pass: each key's value alone, then the keys together.

A value check is called with a value already of the key's type and returns an error text, or
None when the value is fine. Its ``allowed`` text is what the config reference (docs/config.md,
written by scripts/gen_config_ref.py) shows, so the page and the check cannot disagree.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pttd.errors import ConfigError

if TYPE_CHECKING:
    from pttd.config import Config, LedsConfig


@dataclass(frozen=True)
class Check:
    """A value test and the words for what passes it."""

    test: Callable[[Any], str | None]
    allowed: str

    def __call__(self, value: Any) -> str | None:
        return self.test(value)


def toml_literal(value: Any) -> str:
    """How a value is written in the TOML file (``"alsa"``, ``true``, ``[27]``, ``{}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        return json.dumps(value, ensure_ascii=False).replace(": ", " = ")
    return repr(value)


def between(lo: float, hi: float) -> Check:
    return Check(
        lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}", f"{lo} … {hi}"
    )


def one_of(*choices: Any) -> Check:
    return Check(
        lambda v: None if v in choices else "must be one of " + ", ".join(map(repr, choices)),
        ", ".join(f"`{toml_literal(c)}`" for c in choices),
    )


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


not_empty = Check(_not_empty, "any non-empty string")


def _ws_url(v: str) -> str | None:
    """A URL websocket-client can connect to (a host, a valid port): caught at start-up, not at
    the first press."""
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


ws_url = Check(_ws_url, '`"local"`, or a `ws://` or `wss://` URL with a host')


def _token_url(v: str) -> str | None:
    """Never http:// across the network: the device's secret and the token would go in clear."""
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


token_url = Check(_token_url, '`""` (off), an `https://` URL, or `http://` to a loopback host')


def _str_list(v: list) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"


str_list = Check(_str_list, "a list of strings")


def _pin_list(v: list) -> str | None:
    if all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 53 for x in v):
        return None
    return "must be a list of GPIO numbers (0-53)"


pin_list = Check(_pin_list, "a list of BCM GPIO numbers (0 … 53)")


def _listen(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if v == "" or (sep and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return 'must be HOST:PORT, e.g. "127.0.0.1:8766" (or "" for off)'


listen_address = Check(_listen, '`""` (off) or `"HOST:PORT"`')


def _origin_list(v: list) -> str | None:
    if all(
        isinstance(x, str) and x.startswith(("http://", "https://")) and x.count("/") == 2
        for x in v
    ):
        return None
    return 'must list origins like "http://localhost:3000" (scheme://host[:port], no path)'


origin_list = Check(_origin_list, 'a list of origins, `"scheme://host[:port]"` without a path')


def _mqtt_url(v: str) -> str | None:
    """What the MQTT frontend's URL parser accepts (it imports no MQTT library)."""
    if v == "" or "@" in v:
        return None  # credentials in the URL: the daemon refuses it without echoing them
    from pttd.frontends.mqtt import MqttError, parse_url

    try:
        parse_url(v)
    except MqttError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


mqtt_url = Check(_mqtt_url, '`""` (off), `"mqtt://host[:port]"` or `"mqtts://host[:port]"`')


def _topic_level(v: str) -> str | None:
    return "must not contain '/', '+' or '#'" if any(c in v for c in "/+#\0") else None


topic_level = Check(_topic_level, "a string without `/`, `+` or `#`")


def _abs_dir(v: str) -> str | None:
    return None if v == "" or v.startswith("/") else 'must be an absolute path, or "" (off)'


absolute_dir = Check(_abs_dir, '`""` (off) or an absolute path')


# --- checks across keys ---------------------------------------------------------------------

# Query parameters that pttd sets itself; passing them through [stt] params would fight it.
_OWN_PARAMS = {
    "speech_model": "stt.speech_model",
    "format_turns": "stt.format_turns",
    "sample_rate": "audio.sample_rate",
    "encoding": "(always pcm_s16le)",
    "token": "(use stt.token_url)",
}


def check_across_keys(cfg: Config) -> None:
    """What no single key can check: keys that must agree with each other."""
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
    if cfg.kiosk.listen and not is_loopback_listen(cfg.kiosk.listen) and not cfg.kiosk.token:
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


def is_loopback_listen(listen: str) -> bool:
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
