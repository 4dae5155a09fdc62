"""``[output] hook``: run a program for each final transcript (docs/hook.md).

The program is started directly from the argv list, never through a shell, so a transcript or an
argument can never become shell syntax. The transcript (UTF-8, then one newline) is its stdin; the
final's fields are ``PTTD_*`` environment variables (``PTTD_TURN_ORDER``, ``PTTD_SESSION_ID``,
``PTTD_PRESS_ID``, ``PTTD_AUDIO_MS``, ``PTTD_LATENCY_MS``, ``PTTD_TS``, ``PTTD_EVENT=final``,
``PTTD_ATTEMPT`` and any extra field such as ``PTTD_LATE``), added to an allow-list of pttd's own
environment (``PATH``, ``HOME``, ``USER``, ``LOGNAME``, ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``,
``TMPDIR``): nothing else is passed on, so neither ``ASSEMBLYAI_API_KEY`` nor
``CREDENTIALS_DIRECTORY`` (where systemd puts the key) reaches the hook.

Its stdout and stderr are not pttd's (they would corrupt jsonl events): they share one pipe that
the hook thread reads, keeping only the last ``OUTPUT_TAIL`` bytes (logged when the run fails),
never a file. Past ``OUTPUT_LIMIT`` bytes in one run the pipe is closed, as ``| head`` would: the
hook's next write gets SIGPIPE/EPIPE, and a flood of output costs pttd neither disk, memory nor
more than a moment of CPU. Right after it starts the hook's ``RLIMIT_CORE`` is set to 0 and its
``RLIMIT_FSIZE`` to ``FILE_SIZE_LIMIT`` (no file it writes grows past that), inherited by its
children.

A run that exits non-zero, or outlives ``timeout_s`` (its whole process group is then sent
SIGTERM, and SIGKILL one second later), is logged with its exit status and retried up to
``retries`` times after a short, growing pause. A program that cannot be started at all is logged
and not retried (it will not appear by itself within seconds).

Threading: ``emit`` only queues finals (bounded: ``queue_size``; when full the newest final is
dropped and logged), so the sink is ``inline``: Outputs calls it on the controller's thread, and a
slow hook never holds the controller up. One hook thread runs the programs one at a time, in
order. ``close`` lets the current run finish for a short grace, then kills it; queued finals left
then are dropped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from pttd.events import EventKind

log = logging.getLogger(__name__)

KILL_GRACE_S = 1.0  # SIGTERM → SIGKILL on timeout
STOP_KILL_GRACE_S = 0.2  # the same when pttd is stopping (its 5 s budget is shared)
BACKOFF_S = 0.5  # first retry pause; doubles each retry
OUTPUT_TAIL = 2000  # bytes of the hook's output logged on failure
OUTPUT_LIMIT = 1 << 20  # bytes of output read per run; then the pipe is closed
FILE_SIZE_LIMIT = 64 << 20  # the hook's RLIMIT_FSIZE: the largest file it may write
ENV_ALLOWED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
"""Variables of pttd's environment passed on to the hook (plus ``LC_*``); nothing else is."""
_CHUNK = 65536  # bytes per pipe read or write
_STOP = object()


class HookSink:
    """Runs ``argv`` once per final event, on its own thread; see the module docstring."""

    inline = True  # emit only queues (put_nowait): Outputs calls it on the controller's thread

    def __init__(
        self,
        argv: Sequence[str],
        timeout_s: float = 10.0,
        retries: int = 2,
        queue_size: int = 32,
        close_grace_s: float = 1.0,
    ):
        if not argv:
            raise ValueError("hook argv must not be empty")
        self.argv = [str(a) for a in argv]
        self.timeout_s = timeout_s
        self.retries = retries
        self.close_grace_s = close_grace_s
        self.runs = 0  # program starts, for status and tests
        self.delivered = 0  # finals a run succeeded for
        self.failures = 0  # finals given up on
        self.abandoned = 0  # finals never run because pttd stopped
        self._give_up_at = float("inf")
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pttd-hook", daemon=True)
        self._thread.start()

    # --- sink API (the controller's thread) -------------------------------------------------

    def emit(self, event: dict) -> None:
        if event.get("event") != EventKind.FINAL or self._stopping.is_set():
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning(
                "hook %s is %d finals behind; dropping press %s",
                self.argv[0],
                self._queue.maxsize,
                event.get("press_id"),
            )

    def close(self) -> None:
        """Queued finals get ``close_grace_s`` in all (no retries), then the run is killed."""
        if self._stopping.is_set():
            return
        self._give_up_at = time.monotonic() + self.close_grace_s
        self._stopping.set()
        queued = self._put_stop(self.close_grace_s)
        self._thread.join(max(0.0, self._give_up_at - time.monotonic()))
        if self._thread.is_alive():
            self._kill_current("pttd is stopping")
            # past the grace the thread skips what is left, so the marker fits soon
            queued = queued or self._put_stop(2 * KILL_GRACE_S)
            self._thread.join(2 * KILL_GRACE_S + 0.5)
        if self._thread.is_alive():
            log.warning("hook thread did not stop in time")
        elif self.abandoned:
            log.warning(
                "hook: pttd stopped with %d final(s) not handed to %s", self.abandoned, self.argv[0]
            )

    def _put_stop(self, timeout: float) -> bool:
        try:
            self._queue.put(_STOP, timeout=timeout)
            return True
        except queue.Full:
            return False

    # --- the hook thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if self._stopping.is_set() and time.monotonic() > self._give_up_at:
                self.abandoned += 1
                continue
            try:
                self._deliver(event)
            except Exception:  # noqa: BLE001 - a hook problem must not end the thread
                log.exception("hook: delivering press %s failed", event.get("press_id"))

    def _deliver(self, event: dict) -> None:
        """Run until success or the retries are used up; pause between attempts."""
        for attempt in range(1, self.retries + 2):
            outcome = self._attempt(event, attempt)
            if outcome is None:
                self.delivered += 1
                return
            if outcome == "unstartable" or attempt > self.retries or self._stopping.is_set():
                break
            if self._stopping.wait(BACKOFF_S * 2 ** (attempt - 1)):
                break
        self.failures += 1
        log.error(
            "hook %s gave up on press %s after %d attempt(s)",
            self.argv[0],
            event.get("press_id"),
            attempt,
        )

    def _attempt(self, event: dict, attempt: int) -> str | None:
        """One run; None on success, else a short description of the failure (already logged)."""
        try:
            proc = self._spawn(event, attempt)
        except OSError as exc:
            log.error("hook %s cannot be started: %s", self.argv[0], exc.strerror or exc)
            return "unstartable"
        output = HookOutput()
        code, timed_out = self._wait(proc, _stdin_bytes(event), output)
        if code == 0 and not timed_out:
            if output.cut:
                log.warning(
                    "hook %s printed more than %d bytes for press %s; the rest was not "
                    "read (its output pipe was closed)%s",
                    self.argv[0],
                    OUTPUT_LIMIT,
                    event.get("press_id"),
                    output.describe(),
                )
            log.debug("hook %s done for press %s", self.argv[0], event.get("press_id"))
            return None
        what = (
            f"timed out after {self.timeout_s:g} s (process group killed)"
            if timed_out
            else _exit_text(code)
        )
        log.warning(
            "hook %s failed for press %s (attempt %d of %d): %s%s",
            self.argv[0],
            event.get("press_id"),
            attempt,
            self.retries + 1,
            what,
            output.describe(),
        )
        return what

    def _spawn(self, event: dict, attempt: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=hook_env(event, attempt),
            start_new_session=True,
            close_fds=True,
        )
        limit_resources(proc.pid)
        with self._proc_lock:
            self._proc = proc
        self.runs += 1
        return proc

    def _wait(self, proc: subprocess.Popen, stdin: bytes, output: HookOutput) -> tuple[int, bool]:
        """Feed stdin, read the output, wait for the exit, all within the timeout; on timeout
        kill the group. Returns (exit code, timed out)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            timed_out = not _pump(proc, stdin, output, deadline)
            if not timed_out:
                proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _close_quietly(proc.stdin)
            _close_quietly(proc.stdout)
        if timed_out:
            _kill_group(proc)
        with self._proc_lock:
            self._proc = None
        return proc.returncode, timed_out

    def _kill_current(self, why: str) -> None:
        with self._proc_lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("hook %s still running; killing it (%s)", self.argv[0], why)
            _kill_group(proc, grace=STOP_KILL_GRACE_S)


class HookOutput:
    """What one run printed: every byte is counted, only the last ``keep`` are kept."""

    def __init__(self, keep: int = OUTPUT_TAIL, limit: int = OUTPUT_LIMIT):
        self.keep = keep
        self.limit = limit
        self.total = 0
        self.cut = False  # the limit was reached and the pipe closed
        self._tail = bytearray()

    def add(self, data: bytes) -> bool:
        """Record a read; False once more than ``limit`` bytes came (stop reading then)."""
        self.total += len(data)
        self._tail += data[-self.keep :]
        del self._tail[: -self.keep]
        if self.total > self.limit:
            self.cut = True
        return not self.cut

    @property
    def tail(self) -> bytes:
        return bytes(self._tail)

    def describe(self) -> str:
        """``"; output: ..."`` for the log line ('' when the hook printed nothing)."""
        text = self._tail.decode("utf-8", "replace").strip()
        if not text:
            return ""
        if self.cut:
            return f"; output (over {self.limit} bytes, pipe closed; the last read): {text}"
        return f"; output: {text}"


def _pump(proc: subprocess.Popen, stdin: bytes, output: HookOutput, deadline: float) -> bool:
    """Write ``stdin`` and read the output until EOF (or ``output`` is full: the read end is then
    closed); False when ``deadline`` passes first."""
    to_hook, from_hook = proc.stdin, proc.stdout
    if to_hook is None or from_hook is None:
        raise ValueError("a hook runs with pipes on its stdin and stdout")
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as sel:
        for pipe, events in ((to_hook, selectors.EVENT_WRITE), (from_hook, selectors.EVENT_READ)):
            os.set_blocking(pipe.fileno(), False)
            sel.register(pipe, events)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(remaining):
                if key.fileobj is to_hook:
                    pending = _feed(to_hook, pending)
                    done = not pending
                else:
                    done = not _drain_into(from_hook, output)
                if done:
                    sel.unregister(key.fileobj)
                    _close_quietly(key.fileobj)
    return True


def _feed(pipe, pending: memoryview) -> memoryview:
    """Write what the pipe takes now; empty when all is written or the hook closed its stdin."""
    try:
        return pending[os.write(pipe.fileno(), pending[:_CHUNK]) :]
    except BlockingIOError:
        return pending
    except OSError:  # EPIPE: the hook does not read its stdin, which is fine
        return pending[:0]


def _drain_into(pipe, output: HookOutput) -> bool:
    """Read what is there; False at EOF or when ``output`` wants no more."""
    try:
        data = os.read(pipe.fileno(), _CHUNK)
    except BlockingIOError:
        return True
    return bool(data) and output.add(data)


def limit_resources(pid: int) -> None:
    """No core dumps, no file over FILE_SIZE_LIMIT, for the hook and what it starts."""
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT)):
        try:
            _soft, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.prlimit(pid, limit, (value, value))
        except ProcessLookupError:
            return  # already gone
        except OSError as exc:  # e.g. a seccomp filter without prlimit64: the run goes on
            log.warning("hook: cannot limit the hook's resources: %s", exc.strerror or exc)
            return


def hook_env(event: dict, attempt: int = 1, base: dict | None = None) -> dict:
    """The allowed part of pttd's environment plus the final's fields as ``PTTD_*`` variables."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k in ENV_ALLOWED or k.startswith("LC_")}
    for key, value in event.items():
        if key in ("text", "event") or value is None:
            continue
        env[env_name(key)] = _env_value(value)
    env["PTTD_EVENT"] = str(event.get("event", EventKind.FINAL.value))
    env["PTTD_ATTEMPT"] = str(attempt)
    return env


def env_name(key: str) -> str:
    """``turn_order`` → ``PTTD_TURN_ORDER``; anything but A-Z, 0-9 and _ becomes _."""
    return "PTTD_" + "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())


def _env_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text.replace("\0", "")  # the one byte an environment cannot hold


def _stdin_bytes(event: dict) -> bytes:
    return (str(event.get("text", "")) + "\n").encode("utf-8")


def _kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the hook's process group (it runs in its own session); SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            if sig == signal.SIGTERM:
                _kill_stragglers(proc.pid)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_stragglers(pgid: int) -> None:
    """The leader obeyed SIGTERM; children that ignored it still go."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _close_quietly(pipe) -> None:
    try:
        if pipe is not None:
            pipe.close()
    except OSError:
        pass  # EPIPE: the hook never read its stdin


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
