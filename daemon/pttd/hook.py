"""``[output] hook``: run a program for each final transcript (design.md, "[output]").

The program is started directly from the argv list, never through a shell, so a transcript or an
argument can never become shell syntax. The transcript (UTF-8, then one newline) is its stdin; the
final's fields are ``PTTD_*`` environment variables (``PTTD_TURN_ORDER``, ``PTTD_SESSION_ID``,
``PTTD_PRESS_ID``, ``PTTD_AUDIO_MS``, ``PTTD_LATENCY_MS``, ``PTTD_TS``, ``PTTD_EVENT=final``,
``PTTD_ATTEMPT`` and any extra field such as ``PTTD_LATE``), added to pttd's own environment minus
``ASSEMBLYAI_API_KEY``. Its stdout and stderr are not pttd's (they would corrupt jsonl events):
they go to a temporary file whose tail is logged when the run fails.

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
import signal
import subprocess
import tempfile
import threading
import time
from typing import Sequence

log = logging.getLogger(__name__)

KILL_GRACE_S = 1.0      # SIGTERM → SIGKILL on timeout
STOP_KILL_GRACE_S = 0.2  # the same when pttd is stopping (its 5 s budget is shared)
BACKOFF_S = 0.5         # first retry pause; doubles each retry
OUTPUT_TAIL = 2000      # bytes of the hook's output logged on failure
_HIDDEN_ENV = ("ASSEMBLYAI_API_KEY",)
_STOP = object()


class HookSink:
    """Runs ``argv`` once per final event, on its own thread; see the module docstring."""

    inline = True  # emit only queues (put_nowait): Outputs calls it on the controller's thread

    def __init__(self, argv: Sequence[str], timeout_s: float = 10.0, retries: int = 2,
                 queue_size: int = 32, close_grace_s: float = 1.0):
        if not argv:
            raise ValueError("hook argv must not be empty")
        self.argv = [str(a) for a in argv]
        self.timeout_s = timeout_s
        self.retries = retries
        self.close_grace_s = close_grace_s
        self.runs = 0                      # program starts, for status and tests
        self.delivered = 0                 # finals a run succeeded for
        self.failures = 0                  # finals given up on
        self.abandoned = 0                 # finals never run because pttd stopped
        self._give_up_at = float("inf")
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pttd-hook", daemon=True)
        self._thread.start()

    # --- sink API (the controller's thread) -------------------------------------------------

    def emit(self, event: dict) -> None:
        if event.get("event") != "final" or self._stopping.is_set():
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.warning("hook %s is %d finals behind; dropping press %s", self.argv[0],
                        self._queue.maxsize, event.get("press_id"))

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
            log.warning("hook: pttd stopped with %d final(s) not handed to %s",
                        self.abandoned, self.argv[0])

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
        log.error("hook %s gave up on press %s after %d attempt(s)", self.argv[0],
                  event.get("press_id"), attempt)

    def _attempt(self, event: dict, attempt: int) -> str | None:
        """One run; None on success, else a short description of the failure (already logged)."""
        with tempfile.TemporaryFile() as output:
            try:
                proc = self._spawn(event, attempt, output)
            except OSError as exc:
                log.error("hook %s cannot be started: %s", self.argv[0], exc.strerror or exc)
                return "unstartable"
            code, timed_out = self._wait(proc, _stdin_bytes(event))
            if code == 0 and not timed_out:
                log.debug("hook %s done for press %s", self.argv[0], event.get("press_id"))
                return None
            what = (f"timed out after {self.timeout_s:g} s (process group killed)" if timed_out
                    else _exit_text(code))
            log.warning("hook %s failed for press %s (attempt %d of %d): %s%s", self.argv[0],
                        event.get("press_id"), attempt, self.retries + 1, what, _tail(output))
            return what

    def _spawn(self, event: dict, attempt: int, output) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=output,
                                stderr=subprocess.STDOUT, env=hook_env(event, attempt),
                                start_new_session=True, close_fds=True)
        with self._proc_lock:
            self._proc = proc
        self.runs += 1
        return proc

    def _wait(self, proc: subprocess.Popen, stdin: bytes) -> tuple[int, bool]:
        """Feed stdin and wait up to the timeout; on timeout kill the group. (exit code, timed out)."""
        try:
            proc.communicate(stdin, timeout=self.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            _close_quietly(proc.stdin)
        with self._proc_lock:
            self._proc = None
        return proc.returncode, timed_out

    def _kill_current(self, why: str) -> None:
        with self._proc_lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("hook %s still running; killing it (%s)", self.argv[0], why)
            _kill_group(proc, grace=STOP_KILL_GRACE_S)


def hook_env(event: dict, attempt: int = 1, base: dict | None = None) -> dict:
    """pttd's environment (minus secrets) plus the final's fields as ``PTTD_*`` variables."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _HIDDEN_ENV}
    for key, value in event.items():
        if key in ("text", "event") or value is None:
            continue
        env[env_name(key)] = _env_value(value)
    env["PTTD_EVENT"] = str(event.get("event", "final"))
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
    """SIGTERM the hook's whole process group (it runs in its own session), SIGKILL if it lingers."""
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


def _tail(output) -> str:
    """The end of what the hook printed, for the failure log line."""
    try:
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - OUTPUT_TAIL))
        text = output.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f"; output: {text}" if text else ""

