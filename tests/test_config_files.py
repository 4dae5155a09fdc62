"""Config and secret files that cannot be read, and the kiosk's loopback decision (issue 23).

Each unreadable file must end ``pttd`` with exit 2 and one line naming the file (or the key that
names it), never ``internal error`` or a traceback: checked on the real CLI, in a subprocess.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pttd import config as c

KEY = "sk_files_0123456789abcdef"
CLI_TIMEOUT = 30


def pttd(*args: str, env: dict | None = None, obey_modes: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "pttd.cli", *args]
    if obey_modes:
        # root reads every file: drop the two capabilities that let it, so a file's mode bits
        # apply. Still uid 0, so the checkout and its venv stay readable wherever they are
        # (as user nobody, a clone in a 0700 temp folder could not even import pttd)
        argv = [shutil.which("setpriv"), "--bounding-set=-dac_override,-dac_read_search",
                "--inh-caps=-dac_override,-dac_read_search", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          env=dict(os.environ, **(env or {})), cwd="/")


def assert_exit_2_naming(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pttd: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


def _invalid_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[output]\nhook = ["/usr/bin/caf\xe9"]\n'.encode("latin-1"))
    return path


def _directory(tmp_path: Path) -> Path:
    path = tmp_path / "conf.d"
    path.mkdir()
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)  # opening it for reading would block until a writer comes: never
    return path


def _too_big(tmp_path: Path) -> Path:
    path = tmp_path / "big.toml"
    path.write_text("# padding\n" * 200_000)  # 2 MB of comments
    return path


def _dangling_dir(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "pttd.toml"  # a path through a file: ENOTDIR


@pytest.mark.parametrize("make, needle", [
    (_invalid_utf8, "is not valid UTF-8 (at byte"),
    (_directory, "is a directory"),
    (_fifo, "is not a regular file"),
    (_too_big, "is larger than 1024 KiB"),
    (_dangling_dir, "not a directory"),
], ids=["invalid-utf8", "directory", "fifo", "too-big", "enotdir"])
@pytest.mark.parametrize("command", ["run", "check", "status", "record"])
def test_unreadable_config_exits_2_naming_the_file(tmp_path, make, needle, command):
    path = make(tmp_path)
    extra = ["--seconds", "1", str(tmp_path / "out.wav")] if command == "record" else []
    result = pttd(command, "-c", str(path), *extra)
    assert_exit_2_naming(result, f"config file {path}", needle)


def test_unreadable_config_via_environment(tmp_path):
    path = _invalid_utf8(tmp_path)
    assert_exit_2_naming(pttd("run", env={"PTTD_CONFIG": str(path)}), f"config file {path}")


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="needs setpriv as root")
def test_config_without_read_permission_exits_2(tmp_path):
    path = tmp_path / "secret.toml"
    path.write_text('[stt]\nurl = "local"\n')
    path.chmod(0o000)  # not even its owner may read it
    result = pttd("run", "-c", str(path), obey_modes=os.geteuid() == 0)
    assert_exit_2_naming(result, f"config file {path}: permission denied")


def test_missing_config_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    assert_exit_2_naming(pttd("run", "-c", str(path)), f"config file {path} not found")


def test_a_missing_default_file_is_still_fine_for_control_commands(tmp_path):
    """``pttd status --socket`` needs no config; neither does status without -c when the
    default file is absent (require_file=False keeps working)."""
    cfg = c.load_config(str(tmp_path / "absent.toml"), environ={}, require_file=False)
    assert cfg.control.socket == "/run/pttd/control.sock" and cfg.stt.url == c.CLOUD_URL


def test_unreadable_toml_is_a_config_error_in_process(tmp_path):
    path = _invalid_utf8(tmp_path)
    with pytest.raises(c.ConfigError, match="is not valid UTF-8"):
        c.load_config(str(path), environ={})
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.load_config(str(deep), environ={})


def test_fifo_config_does_not_block(tmp_path):
    """Bounded: a blocking open would hang this thread; the check is that it returns."""
    path = _fifo(tmp_path)
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(outcome, path), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "load_config blocked on a FIFO"
    assert isinstance(outcome[0], c.ConfigError) and "not a regular file" in str(outcome[0])


def _capture(outcome: list, path: Path) -> None:
    try:
        c.load_config(str(path), environ={})
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        outcome.append(exc)


# --- secret files: stt.api_key_file, the credential ------------------------------------------------

@pytest.mark.parametrize("make, needle", [
    (_invalid_utf8, "is not valid UTF-8"),
    (_directory, "is a directory"),
    (_fifo, "is not a regular file"),
    (_too_big, "is larger than"),
], ids=["invalid-utf8", "directory", "fifo", "too-big"])
def test_unreadable_api_key_file_exits_2_naming_the_key(tmp_path, make, needle):
    key_path = make(tmp_path)
    cfg = tmp_path / "pttd.toml"
    cfg.write_text(f'[stt]\napi_key_file = "{key_path}"\n')
    result = pttd("run", "-c", str(cfg))
    assert_exit_2_naming(result, f"stt.api_key_file: {key_path}", needle)


def test_unreadable_credential_exits_2_naming_it(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / c.CREDENTIAL_NAME).write_bytes(b"sk_\xff\xfe")
    cfg = tmp_path / "pttd.toml"
    cfg.write_text("")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "ASSEMBLYAI_API_KEY": ""}
    result = pttd("run", "-c", str(cfg), env=env)
    assert_exit_2_naming(result, f"credential {c.CREDENTIAL_NAME}", "is not valid UTF-8")


def test_secret_file_content_is_never_quoted(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(KEY.encode() + b"\xff")
    with pytest.raises(c.ConfigError) as err:
        c.resolve_api_key(c.SttConfig(api_key_file=str(path)), environ={})
    assert KEY not in str(err.value) and "stt.api_key_file" in str(err.value)


# --- kiosk.listen: loopback decided on the parsed address ------------------------------------------

@pytest.mark.parametrize("listen", [
    "127.0.0.1:8766", "127.1.2.3:8766", "localhost:8766", "LocalHost:8766", "[::1]:8766",
    "::1:8766", "[::ffff:127.0.0.1]:8766",
])
def test_loopback_listen_needs_no_token(listen):
    assert c._is_loopback(listen)
    assert c.from_dict({"kiosk": {"listen": listen}}, environ={}).kiosk.listen == listen


@pytest.mark.parametrize("listen", [
    "127.attacker.invalid:8766", "127.0.0.1.nip.io:8766", "localhost.attacker.invalid:8766",
    "0.0.0.0:8766", ":8766", "[::]:8766", "10.0.0.5:8766", "[::ffff:10.0.0.5]:8766",
    "128.0.0.1:8766", "pi.local:8766",
])
def test_other_listen_addresses_need_the_token(listen):
    assert not c._is_loopback(listen)
    with pytest.raises(c.ConfigError, match="kiosk.token is required"):
        c.from_dict({"kiosk": {"listen": listen}}, environ={})
    assert c.from_dict({"kiosk": {"listen": listen, "token": "t0ken"}}, environ={})


def test_daemon_refuses_a_host_name_that_looks_like_loopback(tmp_path):
    cfg = tmp_path / "pttd.toml"
    cfg.write_text('[kiosk]\nlisten = "127.attacker.invalid:8766"\n')
    assert_exit_2_naming(pttd("run", "-c", str(cfg)), "kiosk.token is required")
