"""The files the configuration comes from: the TOML file, and the secrets it names.

Every way a file can fail to be read (missing, no permission, a directory, a FIFO, too big, not
UTF-8) is one :class:`ConfigError` naming the file, never a traceback; a secret's content is
never quoted. The API key is found in the contract's order and held in a :class:`Secret`.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pttd.errors import ConfigError

if TYPE_CHECKING:
    from pttd.config import Config, SttConfig

DEFAULT_PATH = "/etc/pttd/pttd.toml"
CREDENTIAL_NAME = "assemblyai-api-key"
DEFAULT_KEY_FILE = "/etc/pttd/api-key"  # what the shipped unit loads as that credential

MAX_FILE_BYTES = 1 << 20
"""The largest config or secret file read (a bigger one is a mistake: -c /var/log/syslog)."""


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


def config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The contract's order: ``-c``, else ``$PTTD_CONFIG``, else /etc/pttd/pttd.toml."""
    env = os.environ if environ is None else environ
    return explicit or env.get("PTTD_CONFIG") or DEFAULT_PATH


def read_toml(path: str, require_file: bool) -> dict:
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


def resolve_api_key(stt: SttConfig, environ: Mapping[str, str], path: str = "") -> Secret:
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


def check_token_mode(stt: SttConfig) -> None:
    """Fleet mode: the key stays on the token broker, and this device's secret is readable."""
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
