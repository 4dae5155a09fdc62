"""install.sh and uninstall.sh, run for real into a throwaway root directory.

``install.sh --no-apt --no-systemctl`` with ``DESTDIR=<tmp>`` runs the real systemd-sysusers and
systemd-tmpfiles (``--root=``), creates a real venv with /usr/bin/python3 and pip-installs this
checkout into it (dependencies from the package index pip is configured with). The files it
writes are then checked one by one; a second run (``--root``, with ``systemctl --root enable``)
must keep a modified config and the key; uninstall.sh must remove everything but /etc/pttd, and
``--purge`` that too. Needs root (users, root-owned files); skipped otherwise.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from pttd import __version__
from pttd.config import SECTIONS, load_config

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "install.sh"
UNINSTALL = REPO / "uninstall.sh"
EXAMPLE = REPO / "systemd" / "pttd.toml.example"
SYSTEM_PYTHON = "/usr/bin/python3"
RUN_TIMEOUT = 300          # one install.sh run: venv + pip install (about 10 s here)
TEST_TIMEOUT = 900         # the pytest-timeout bound for a test that runs install.sh (1-3 times)
COMMENTED_KEY = re.compile(r"(?m)^#(\w+ = )")


def _system_python_has_venv() -> bool:
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import venv, ensurepip"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="install.sh creates users (systemd-sysusers) and root-owned files: run as root")
needs_tools = pytest.mark.skipif(
    not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
    reason="systemd-sysusers / systemd-tmpfiles not installed (apt: systemd)")
needs_venv = pytest.mark.skipif(
    not _system_python_has_venv(), reason=f"{SYSTEM_PYTHON} cannot create venvs (apt: python3-venv)")


def installer_test(func):
    """Runs install.sh for real: root, systemd's tools, a venv-capable system Python."""
    for mark in (needs_root, needs_tools, needs_venv, pytest.mark.timeout(TEST_TIMEOUT)):
        func = mark(func)
    return func


SYSTEMCTL = shutil.which("systemctl")


def run(script: Path, *args: str, env: dict | None = None, check: bool = True):
    full_env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    full_env.update(LC_ALL="C.UTF-8", SYSTEMD_COLORS="0", **(env or {}))
    proc = subprocess.run([str(script), *args], env=full_env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, (
            f"{script.name} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def group_entry(root: Path, name: str) -> list[str] | None:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def passwd_lines(root: Path, name: str) -> list[list[str]]:
    return [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
            if line.split(":")[0] == name]


def assert_mode(path: Path, mode: int, uid: int = 0, gid: int | None = None) -> None:
    st = path.lstat()
    assert stat.S_IMODE(st.st_mode) == mode, f"{path}: mode {stat.S_IMODE(st.st_mode):o}, want {mode:o}"
    assert st.st_uid == uid, f"{path}: owner {st.st_uid}, want {uid}"
    if gid is not None:
        assert st.st_gid == gid, f"{path}: group {st.st_gid}, want {gid}"


def venv_pttd(root: Path) -> Path:
    return root / "opt/pttd/venv/bin/pttd"


def wants_links(root: Path) -> list[Path]:
    """Enablement symlinks; they dangle here (absolute targets inside root), so no glob."""
    system = root / "etc/systemd/system"
    if not system.is_dir():
        return []
    return sorted(d / "pttd.service" for d in system.iterdir()
                  if d.name.endswith(".wants") and (d / "pttd.service").is_symlink())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """One install (DESTDIR form) into a fresh root; the tests below share it, in file order."""
    root = tmp_path_factory.mktemp("installroot")
    proc = run(INSTALL, "--no-apt", "--no-systemctl", env={"DESTDIR": str(root)})
    return root, proc


# --------------------------------------------------------------------------- the config template

def test_example_config_loads_and_shows_every_default():
    defaults = load_config(None, environ={})
    # As installed: everything commented out, so it loads to the defaults.
    as_shipped = load_config(str(EXAMPLE), environ={})
    assert dataclasses.replace(as_shipped, path="") == defaults

    # Uncommenting every "#key = value" line must give the defaults again (the values shown are
    # right) and must name every key of every section (nothing missing, nothing unknown).
    text = COMMENTED_KEY.sub(r"\1", EXAMPLE.read_text())
    uncommented = tomllib.loads(text)
    for name, cls in SECTIONS.items():
        assert set(uncommented.get(name, {})) == {f.name for f in dataclasses.fields(cls)}, name
    assert set(uncommented) == set(SECTIONS)
    from pttd.config import from_dict
    assert dataclasses.replace(from_dict(uncommented, environ={}), path="") == defaults


def test_usage_errors_exit_2():
    for script in (INSTALL, UNINSTALL):
        proc = run(script, "--no-such-option", check=False)
        assert proc.returncode == 2, proc.stderr
        assert "unknown option: --no-such-option" in proc.stderr
        assert "usage:" in proc.stderr
        assert run(script, "--help").stdout.startswith("usage:")


# --------------------------------------------------------------------------- install

@installer_test
def test_install_writes_the_files(installed):
    root, proc = installed
    gid = int(group_entry(root, "pttd")[2])

    # The unit, byte for byte, and the snippets where systemd looks for them.
    unit = root / "etc/systemd/system/pttd.service"
    assert unit.read_bytes() == (REPO / "systemd/pttd.service").read_bytes()
    assert_mode(unit, 0o644)
    for kind in ("sysusers.d", "tmpfiles.d"):
        snippet = root / "usr/lib" / kind / "pttd.conf"
        assert snippet.read_bytes() == (REPO / "systemd" / kind / "pttd.conf").read_bytes()
        assert_mode(snippet, 0o644)
    assert wants_links(root) == [], "--no-systemctl must not enable the unit"

    # systemd-sysusers: the user, its group, gpio; member of audio and gpio.
    [user] = passwd_lines(root, "pttd")
    assert user[3] == str(gid) and user[6] == "/usr/sbin/nologin"
    assert group_entry(root, "gpio") is not None
    for group in ("audio", "gpio"):
        assert "pttd" in group_entry(root, group)[3].split(","), group

    # systemd-tmpfiles: /etc/pttd 0750 root:pttd and an empty key file 0640 root:pttd.
    assert_mode(root / "etc/pttd", 0o750, gid=gid)
    key = root / "etc/pttd/api-key"
    assert key.read_bytes() == b""
    assert_mode(key, 0o640, gid=gid)

    # The config from the template, readable by the service only.
    conf = root / "etc/pttd/pttd.toml"
    assert conf.read_bytes() == EXAMPLE.read_bytes()
    assert_mode(conf, 0o640, gid=gid)
    load_config(str(conf), environ={})

    # The venv: system site-packages, pttd installed (not editable) and runnable.
    venv = root / "opt/pttd/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    version = subprocess.run([str(venv_pttd(root)), "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"pttd {__version__}"
    where = subprocess.run([str(venv / "bin/python"), "-c", "import pttd; print(pttd.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv / "lib"), where.stdout
    link = root / "usr/local/bin/pttd"
    assert link.is_symlink() and os.readlink(link) == "/opt/pttd/venv/bin/pttd"
    assert os.stat(venv_pttd(root)).st_mode & 0o005 == 0o005, "the venv must be readable by pttd"

    # The next step, and no start without systemctl.
    assert "/etc/pttd/api-key" in proc.stdout and "systemctl restart pttd" in proc.stdout
    assert "journalctl -u pttd -f" in proc.stdout and "pttd check" in proc.stdout


@installer_test
def test_without_the_local_extra_the_offline_engine_exits_2_naming_it(installed, tmp_path):
    """install.sh without --with-local is a plain ``pip install`` (no [local] extra): ``pttd demo``
    and ``url``/``fallback = "local"`` stop at once with one line naming the extra."""
    import wave

    root, _ = installed
    venv = root / "opt/pttd/venv"
    has = subprocess.run([str(venv / "bin/python"), "-c", "import pocketsphinx"],
                         capture_output=True, timeout=60)
    if has.returncode == 0:
        pytest.skip("pocketsphinx is importable from this system's site-packages")
    wav = tmp_path / "mic.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(bytes(3200))
    common = (f'[audio]\nsource = "wav"\nwav = "{wav}"\n[gpio]\npin_factory = "mock"\n'
              f'[control]\nsocket = "{tmp_path}/ctl.sock"\n[output]\njournal = false\n')
    local = tmp_path / "local.toml"
    local.write_text('[stt]\nurl = "local"\n' + common)
    fallback = tmp_path / "fallback.toml"
    fallback.write_text('[stt]\napi_key = "k"\nfallback = "local"\n' + common)
    for argv, what in ((["demo"], "pttd demo"), (["run", "-c", str(local)], 'stt.url = "local"'),
                       (["run", "-c", str(fallback)], 'stt.fallback = "local"'),
                       (["serve-local", "--port", "0"], "pttd serve-local")):
        proc = subprocess.run([str(venv_pttd(root)), *argv], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert errors == [errors[-1]] and what in errors[0], proc.stderr
        assert "pip install 'pttd[local]'" in errors[0] and "Traceback" not in proc.stderr


@installer_test
def test_rerun_keeps_config_and_key_and_enables(installed):
    root, _ = installed
    conf = root / "etc/pttd/pttd.toml"
    key = root / "etc/pttd/api-key"
    unit = root / "etc/systemd/system/pttd.service"
    gid = int(group_entry(root, "pttd")[2])
    key.write_text("not-a-real-key\n")
    unit.write_text("# changed locally\n")      # install.sh owns the unit: it puts it back

    # An invalid config is kept too, and reported (exit 1, naming the key); the rest is done.
    conf.write_text("[button]\npin = 22\nno_such_key = 1\n")
    bad = run(INSTALL, "--root", str(root), "--no-apt", "--no-systemctl", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "button.no_such_key" in bad.stderr
    assert conf.read_text() == "[button]\npin = 22\nno_such_key = 1\n"
    assert unit.read_bytes() == (REPO / "systemd/pttd.service").read_bytes()

    # Fixed config; this time systemctl is allowed: with a root it only enables (systemctl --root).
    modified = "# mine\n[button]\npin = 22\n"
    conf.write_text(modified)
    args = ["--root", str(root), "--no-apt"] + ([] if SYSTEMCTL else ["--no-systemctl"])
    proc = run(INSTALL, *args)
    assert "exists: kept" in proc.stdout
    assert conf.read_text() == modified
    assert key.read_text() == "not-a-real-key\n"
    assert_mode(key, 0o640, gid=gid)
    assert len(passwd_lines(root, "pttd")) == 1
    assert subprocess.run([str(venv_pttd(root)), "--version"], capture_output=True,
                          timeout=60).returncode == 0
    if SYSTEMCTL:
        [link] = wants_links(root)
        assert link.parent.name == "multi-user.target.wants"
        assert os.readlink(link) == "/etc/systemd/system/pttd.service"


# --------------------------------------------------------------------------- uninstall

@installer_test
def test_uninstall_keeps_etc_pttd_unless_purge(installed):
    root, _ = installed
    args = ["--root", str(root)] + ([] if SYSTEMCTL else ["--no-systemctl"])
    run(UNINSTALL, *args)
    for gone in ("etc/systemd/system/pttd.service", "opt/pttd", "usr/local/bin/pttd",
                 "usr/lib/sysusers.d/pttd.conf", "usr/lib/tmpfiles.d/pttd.conf"):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert wants_links(root) == []
    assert (root / "etc/pttd/pttd.toml").is_file()
    assert (root / "etc/pttd/api-key").is_file()
    assert passwd_lines(root, "pttd"), "the user is kept"

    again = run(UNINSTALL, *args)                 # idempotent
    assert "removed" not in again.stdout

    run(UNINSTALL, "--purge", *args)
    assert not (root / "etc/pttd").exists()
    run(UNINSTALL, "--purge", *args)
