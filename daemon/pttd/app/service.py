"""systemd integration that works with or without systemd: sd_notify, watchdog, stop signals.

Everything here is a no-op when the process was not started by systemd (no ``$NOTIFY_SOCKET``),
so ``pttd run`` behaves the same in a terminal, in tests and under the unit.

sd_notify is written with the socket module rather than ``systemd.daemon.notify``: it is a
dozen lines, it reports send errors instead of a bare False, it lets us honour ``$WATCHDOG_PID``
ourselves, and tests can point ``$NOTIFY_SOCKET`` at their own datagram socket per Notifier.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from pttd.events import State

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify(3) datagrams to ``$NOTIFY_SOCKET`` (path or ``@abstract`` name)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """READY=1: systemd considers the start finished (Type=notify)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=: the line `systemctl status pttd` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False (logged once) when it cannot."""
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    # never block the caller (the controller): a receiver that does not read
                    # its queue makes a blocking sendto hang; drop the message instead
                    self._sock.setblocking(False)
                self._sock.sendto(data, self._address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "sd_notify to %r failed: %s (further failures not logged)", self._address, exc
                )
            return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _notify_address(value: str) -> str | bytes | None:
    """``@name`` → abstract socket (leading NUL), ``/path`` → path, anything else → disabled."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when no watchdog is meant for this process.

    Like sd_watchdog_enabled(3): a ``$WATCHDOG_PID`` naming another process (a child that
    inherited the environment) means the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class Watchdog:
    """Pings WATCHDOG=1 every interval, but only if ``progress()`` advanced since the last ping.

    ``progress`` is the capture source's period counter: when the mic read stalls the pings
    stop and systemd kills and restarts the service after WatchdogSec.
    """

    def __init__(
        self,
        notifier: Notifier,
        progress: Callable[[], int],
        interval_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self._notifier = notifier
        self._progress = progress
        self.interval_s = interval_s if interval_s is not None else watchdog_interval(environ)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled and bool(self.interval_s)

    def start(self) -> Watchdog:
        """A thread only when systemd watches this process (else nothing to stop)."""
        interval = self.interval_s
        if self._notifier.enabled and interval and self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(interval,), name="pttd-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self, interval: float) -> None:
        last = self._read_progress()
        while not self._stop.wait(interval):
            now = self._read_progress()
            if now is not None and now != last:
                self._notifier.watchdog()
                self.pings += 1
                last = now
            else:
                self.skipped += 1
                if self.skipped == 1 or self.skipped % 10 == 0:
                    log.warning(
                        "capture made no progress for %.1f s; watchdog not fed",
                        interval * self.skipped,
                    )
                continue
            self.skipped = 0

    def _read_progress(self) -> int | None:
        """A raising progress callback counts as no progress (the watchdog then fires)."""
        try:
            return self._progress()
        except Exception:  # noqa: BLE001 - must not kill the watchdog thread
            log.exception("watchdog progress callback failed")
            return None


def status_text(state: State | str, detail: str | None = None) -> str:
    """The STATUS= line for a state: ``listening``, ``offline: mic not found``."""
    name = state.value if isinstance(state, State) else str(state)
    return _one_line(f"{name}: {detail}" if detail else name)


def _one_line(text: str) -> str:
    """sd_notify is newline-separated: a newline in a value would start a bogus assignment."""
    return " ".join(str(text).split())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_signals(callback: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to ``callback(signum)``; returns a function that restores them.

    Python runs signal handlers on the main thread between bytecodes, so the callback must
    not block: it should only note the request (``StopRequest.request``). And the main thread
    must not wait for it in a lock or queue without a timeout: see ``StopRequest``. Call from the
    main thread.
    """

    def handler(signum, _frame):
        try:
            callback(signum)
        except Exception:  # noqa: BLE001 - a raising handler would surface at a random line
            log.exception("stop callback failed for signal %d", signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


class StopRequest:
    """A stop request that the main thread, asleep in ``wait()``, cannot miss.

    Why not a queue or an Event: ``kill``/``systemctl stop`` send a process-wide
    signal, and the kernel hands it to any thread that does not block it. When that is not the
    main thread, CPython's C-level handler only flags it for the main thread, which runs the
    Python handler the next time it executes bytecode: never, while it sleeps in a lock, queue
    or Event wait without a timeout. ``pttd run`` waited so (``SimpleQueue.get()``), and on
    Debian 13 (glibc 2.41; with Python 3.13 and 3.11 alike) about one stop in ten hung until
    systemd's SIGKILL; blocking the signal in every other thread made it go away, which shows
    where it went.

    So the main thread sleeps in ``poll()`` on a pipe, and ``watching_signals()`` has the C-level
    handler itself write each signal's number into that pipe (``signal.set_wakeup_fd``), on
    whatever thread it runs: the byte of a stop signal is the request, whether or not the Python
    handler has run yet. ``request()`` (the Python handler, or any thread) sets a flag and writes a
    byte too: a store and a non-blocking write, both safe in a signal handler and in any thread.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)
        self._signals = frozenset(int(s) for s in signals)
        self._requested = False

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self, *_args) -> None:
        """Ask ``wait()`` to return True: from any thread, or as a signal handler."""
        self._requested = True
        w = self._w
        if w >= 0:
            try:
                os.write(w, b"\0")
            except OSError:  # full: wait() wakes anyway; closed: nobody waits any more
                pass

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a stop is requested (True) or ``timeout`` seconds pass (False).

        ``None`` sleeps without a limit: nothing can be missed (see the class docstring), and
        an idle daemon's main thread then never wakes up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._requested:
            if self._r < 0:
                raise RuntimeError("StopRequest.wait() after close()")
            if deadline is None:
                ms = None
            else:
                ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            if self._poll.poll(ms):
                try:
                    data = os.read(self._r, 512)
                except BlockingIOError:
                    data = b""
                if self._signals.intersection(data):
                    self._requested = True
            elif deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    @contextlib.contextmanager
    def watching_signals(self) -> Iterator[None]:
        """Within the block, every signal with a Python handler also writes its number into the
        pipe (``signal.set_wakeup_fd``; restored after). Only the main thread can set it, and only
        the main thread gets Python handlers: elsewhere this does nothing."""
        try:
            previous = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (or already closed)
            yield
            return
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous)

    def close(self) -> None:
        """Close the pipe; later ``request()`` calls only set the flag. Idempotent."""
        r, w = self._r, self._w
        self._r = self._w = -1
        for fd in (r, w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
