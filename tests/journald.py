"""Run commands against a real, private ``systemd-journald`` and read their records back.

How it works (root only; no systemd as PID 1 needed):

1. ``unshare --mount --propagation private`` starts a shell in a new mount namespace, so
   the mounts below are invisible to the rest of the machine. It mounts tmpfs on
   ``/run/systemd`` (journald's sockets), ``/run/log`` (the volatile journal) and, if it
   exists, ``/var/log/journal`` (so neither the host's journal nor its disk is touched),
   bind-mounts a test ``journald.conf`` (Storage=volatile, no forwarding, no kernel log, no
   rate limit) over ``/etc/systemd/journald.conf``, then execs
   ``/lib/systemd/systemd-journald``. Without socket activation journald binds
   ``/run/systemd/journal/{socket,stdout,dev-log}`` itself. It logs to its stderr
   (``SYSTEMD_LOG_TARGET=console``), so a journald that fails says why.
2. Start-up is awaited (bounded) by polling ``/proc/<pid>/root/run/systemd/journal/``, which
   shows that namespace's view of the path.
3. Commands run in the namespace via ``nsenter --target <pid> --mount --root``: libsystemd
   there finds the private ``/run/systemd/journal/socket``. ``--root`` keeps them in journald's
   root directory: entering a mount namespace resets the root to the namespace's own, which
   in a chroot (CI's Debian 13 run) is the host's, not the chroot's. nsenter execs (no fork),
   so a Popen's pid is the command's own pid and signals reach it directly. Anything else —
   the test's own sockets, files in /tmp — is shared as usual.
4. ``journalctl --sync`` (inside) makes journald write everything received so far, then
   ``journalctl -o json --all [MATCH...]`` reads the records back as dicts of strings.
5. Stopping sends SIGTERM to journald; the namespace and its tmpfs vanish with it. journald
   also gets PR_SET_PDEATHSIG, so it dies with the test process.

Works in a chroot too, if the chroot's root is a mount point (``mount --bind DIR DIR``:
``unshare --propagation private`` cannot make a plain directory private) and /proc, /sys and
/dev are mounted in it; ``/run/systemd`` and ``/run/log`` are created when missing.

Use:

    from tests.journald import run_in_journald, run_python_in_journald, Journald, unavailable_reason

    run = run_in_journald(["pttd", "run", "-c", cfg], timeout=30)       # one command
    run.records  # [{"MESSAGE": ..., "PTTD_EVENT": "final", "PRIORITY": "6", ...}]

    with Journald() as jd:                                              # drive it yourself
        proc = jd.popen(["pttd", "run", "-c", cfg], stdout=subprocess.PIPE, text=True)
        ...press/release over the control socket...
        finals = jd.wait_for_records(lambda rs: len(rs) >= 1, "PTTD_EVENT=final", timeout=20)
        proc.terminate(); proc.wait(5)

``journal_stream=True`` connects the command's stdout and stderr to journald's stream socket
and sets ``$JOURNAL_STREAM``, as systemd does for a service (stdout is then not captured).
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

JOURNALD_PATHS = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
DEFAULT_MATCHES = ("SYSLOG_IDENTIFIER=pttd",)
JOURNALD_CONF = """\
[Journal]
Storage=volatile
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
RateLimitIntervalSec=0
"""
_SETUP = r"""
set -e
mkdir -p /run/systemd /run/log
# journald wants its cgroup; a chroot may have /sys without the cgroup2 mount (private here)
if [ -d /sys/fs/cgroup ] && ! mountpoint -q /sys/fs/cgroup 2>/dev/null; then
  mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || true
fi
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/journal
mount -t tmpfs -o mode=0755 tmpfs /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=2755 tmpfs /var/log/journal; fi
if [ -f /etc/systemd/journald.conf ]; then mount --bind "$1" /etc/systemd/journald.conf; fi
exec "$2"
"""


@dataclass
class JournaldRun:
    """What ``run_in_journald`` saw: the command's outcome and the matching journal records."""

    returncode: int
    stdout: str
    stderr: str
    records: list[dict] = field(default_factory=list)
    timed_out: bool = False
    journald_log: str = ""


def journald_binary() -> str | None:
    return next((p for p in JOURNALD_PATHS if os.access(p, os.X_OK)), None)


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the harness cannot run here (for ``pytest.skip``), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount namespace and tmpfs mounts)"
    missing = [t for t in ("unshare", "nsenter", "journalctl", "mount") if not shutil.which(t)]
    if missing:
        return "missing tools: " + ", ".join(missing)
    if journald_binary() is None:
        return "systemd-journald binary not found in " + " or ".join(JOURNALD_PATHS)
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        hint = ""
        if "propagation" in probe.stderr and not os.path.ismount("/"):
            hint = " (/ is not a mount point: in a chroot, bind-mount its directory onto itself)"
        return "unshare --mount not permitted: " + probe.stderr.strip() + hint
    return None


class Journald:
    """A private systemd-journald; see the module docstring. Use as a context manager."""

    def __init__(self, startup_timeout: float = 10.0):
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self._children: list[subprocess.Popen] = []

    # -- lifecycle
    def __enter__(self) -> "Journald":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Journald":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError("journald harness unavailable: " + reason)
        self._tmp = tempfile.mkdtemp(prefix="pttd-journald-")
        conf = os.path.join(self._tmp, "journald.conf")
        with open(conf, "w") as f:
            f.write(JOURNALD_CONF)
        self._log = open(os.path.join(self._tmp, "journald.log"), "w+")
        self._proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", _SETUP, "setup", conf, journald_binary()],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(_clean_env(), SYSTEMD_LOG_TARGET="console"), preexec_fn=_die_with_parent)
        self.pid = self._proc.pid
        try:
            self._await_sockets()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Kill leftover commands, stop journald, remove the temp dir. Safe to call twice."""
        for child in self._children:
            _terminate(child, timeout)
        self._children.clear()
        if self._proc is not None:
            _terminate(self._proc, timeout)
            self._proc = None
        if self._tmp is not None:
            self._log.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def log(self) -> str:
        """journald's own stdout/stderr (its complaints, if any)."""
        if self._tmp is None:
            return ""
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()

    def path(self, inside: str) -> str:
        """The host-side path of a path inside the namespace (via /proc/<pid>/root)."""
        return f"/proc/{self.pid}/root{inside}"

    def _await_sockets(self) -> None:
        wanted = [self.path("/run/systemd/journal/" + n) for n in ("socket", "stdout", "io.systemd.journal")]
        deadline = time.monotonic() + self.startup_timeout
        while not all(os.path.exists(p) for p in wanted):
            if self._proc.poll() is not None:
                raise RuntimeError(f"journald exited with {self._proc.returncode}: "
                                   f"{self.log.strip() or '(it said nothing)'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"journald sockets not up after {self.startup_timeout}s: {self.log}")
            time.sleep(0.02)

    # -- commands
    def command(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """``argv`` wrapped to run inside the namespace, in ``cwd`` (default: ours)."""
        return ["nsenter", f"--target={self.pid}", "--mount", "--root",
                f"--wd={cwd or os.getcwd()}", "--", *argv]

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str | None] | None = None,
              cwd: str | None = None, journal_stream: bool | str = False,
              **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace (Popen keywords pass through; killed at stop()).

        ``env`` is merged into os.environ (a None value removes a variable).
        ``journal_stream`` (True or an identifier) gives it stdout/stderr on journald like a service.
        """
        argv = list(argv)
        if journal_stream:
            ident = journal_stream if isinstance(journal_stream, str) else os.path.basename(argv[0])
            argv = [sys.executable, os.path.abspath(__file__), "--journal-stream", ident, "--", *argv]
        proc = subprocess.Popen(self.command(argv, cwd), env=_merged_env(env), **popen_kwargs)
        self._children.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 60, input: str | None = None,
            env: Mapping[str, str | None] | None = None, cwd: str | None = None,
            journal_stream: bool | str = False) -> JournaldRun:
        """Run to completion (killed after ``timeout``); ``records`` is left empty (see records())."""
        out = subprocess.DEVNULL if journal_stream else subprocess.PIPE
        proc = self.popen(argv, env=env, cwd=cwd, journal_stream=journal_stream, text=True,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=out, stderr=out)
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate(timeout=10)
            timed_out = True
        self._children.remove(proc)
        return JournaldRun(proc.returncode, stdout or "", stderr or "", timed_out=timed_out)

    # -- records
    def sync(self, timeout: float = 10) -> None:
        """Block until journald has written every record it received before this call."""
        subprocess.run(self.command(["journalctl", "--sync"]), check=True, timeout=timeout,
                       capture_output=True, env=_clean_env())

    def records(self, *matches: str, sync: bool = True, timeout: float = 10) -> list[dict]:
        """Records matching every ``FIELD=value`` (journalctl syntax; none = all), oldest first."""
        if sync:
            self.sync(timeout)
        out = subprocess.run(self.command(["journalctl", "-o", "json", "--all", "--no-pager", *matches]),
                             check=True, timeout=timeout, capture_output=True, text=True,
                             env=_clean_env()).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def wait_for_records(self, predicate: Callable[[list[dict]], bool], *matches: str,
                         timeout: float = 10, poll_s: float = 0.1) -> list[dict]:
        """Poll ``records(*matches)`` until ``predicate(records)``; TimeoutError with the last seen."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.records(*matches)
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching journal records after {timeout}s; last: {found}")
            time.sleep(poll_s)


def run_in_journald(argv: Sequence[str], env: Mapping[str, str | None] | None = None,
                    timeout: float = 60, stdin: str | None = None,
                    matches: Iterable[str] = DEFAULT_MATCHES, cwd: str | None = None,
                    journal_stream: bool | str = False) -> JournaldRun:
    """Start a private journald, run ``argv`` in it to completion, return outcome + records."""
    with Journald() as jd:
        run = jd.run(argv, timeout=timeout, input=stdin, env=env, cwd=cwd, journal_stream=journal_stream)
        run.records = jd.records(*matches)
        run.journald_log = jd.log
        return run


def run_python_in_journald(code: str | Callable[[], object], **kwargs) -> JournaldRun:
    """``run_in_journald`` for Python: source text, or a self-contained function (its
    source is sent and called with no arguments, so it must do its own imports)."""
    if callable(code):
        source = textwrap.dedent(inspect.getsource(code)) + f"\n{code.__name__}()\n"
    else:
        source = textwrap.dedent(code)
    return run_in_journald([sys.executable, "-c", source], **kwargs)


# -- helpers

def _clean_env() -> dict[str, str]:
    """journald and journalctl must not inherit a test's NOTIFY_SOCKET, WATCHDOG_*, ..."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


def _merged_env(extra: Mapping[str, str | None] | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: journald gets SIGTERM if the test process dies first."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _exec_with_journal_stream(identifier: str, argv: list[str]) -> None:
    """Inside the namespace: connect stdout/stderr to journald's stream socket, set
    $JOURNAL_STREAM to its dev:inode (as systemd does for services), then exec argv."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("/run/systemd/journal/stdout")
    sock.shutdown(socket.SHUT_RD)
    # identifier, unit id, priority, level prefix, forward to syslog, kmsg, console
    sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    st = os.fstat(sock.fileno())
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    os.dup2(sock.fileno(), 1)
    os.dup2(sock.fileno(), 2)
    sock.close()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    # Internal entry point for journal_stream=True: journald.py --journal-stream IDENT -- ARGV...
    if len(sys.argv) > 4 and sys.argv[1] == "--journal-stream" and sys.argv[3] == "--":
        _exec_with_journal_stream(sys.argv[2], sys.argv[4:])
    sys.exit("usage: journald.py --journal-stream IDENTIFIER -- ARGV...")
