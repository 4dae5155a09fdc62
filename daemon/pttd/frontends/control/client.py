"""The CLI's side of the control socket: one command and its reply, or the stream of events.

Every failure is a :class:`ControlError` whose message says what to do (start pttd, join the
socket's group, ...): the CLI prints it as one line.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator

from pttd.frontends.control.protocol import MAX_LINE, SUBSCRIBE, ControlError, encode


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    """Send one command and return the daemon's reply dict (``ok`` may be false)."""
    path = os.fspath(path)
    with _connect(path, timeout) as sock, sock.makefile("rb") as reader:
        _send(sock, path, {"cmd": cmd}, timeout)
        return _read_reply(reader, path, timeout)


def subscribe(path: str, timeout: float | None = None) -> Iterator[dict]:
    """Subscribe and return an iterator of events; it ends when the daemon closes the connection.

    Connection problems raise :class:`ControlError` here, before iterating. ``timeout`` bounds the
    connect and each wait for an event (``None``: wait for events forever).
    """
    path = os.fspath(path)
    sock = _connect(path, 5.0 if timeout is None else timeout)
    reader = sock.makefile("rb")
    try:
        sock.settimeout(timeout)
        _send(sock, path, {"cmd": SUBSCRIBE}, timeout)
        reply = _read_reply(reader, path, timeout)
        if not reply.get("ok"):
            raise ControlError(f"pttd refused to subscribe: {reply.get('error', reply)}")
    except BaseException:
        reader.close()
        sock.close()
        raise
    return _events(sock, reader, path, timeout)


def _events(sock: socket.socket, reader, path: str, timeout: float | None) -> Iterator[dict]:
    try:
        while True:
            try:
                yield _read_reply(reader, path, timeout)
            except _Closed:
                return
    finally:
        reader.close()
        sock.close()


class _Closed(ControlError):
    """The daemon closed the connection at a line boundary."""


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect within ``timeout``; a full accept backlog (EAGAIN on a Unix socket) is retried."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise ControlError(
                    f"timed out after {timeout:g} s connecting to pttd on {path} "
                    f"(its connection queue stayed full)"
                ) from exc
            time.sleep(0.01)  # the daemon is accepting a burst; a new attempt has room soon
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise _connect_error(path, exc, timeout) from exc
            raise


def _connect_error(path: str, exc: OSError, timeout: float) -> ControlError:
    if isinstance(exc, FileNotFoundError):
        return ControlError(f"no pttd running? socket {path} not found")
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path} (add your user to the socket's group, "
            f"e.g. pttd, or use sudo)"
        )
    if isinstance(exc, ConnectionRefusedError):
        return ControlError(f"no pttd running? socket {path} refuses connections (stale file)")
    if isinstance(exc, socket.timeout):
        return ControlError(f"timed out after {timeout:g} s connecting to pttd on {path}")
    if exc.errno == errno.ENOTSOCK or exc.errno == errno.ECONNREFUSED:
        return ControlError(f"{path} is not a pttd control socket")
    return ControlError(f"cannot connect to pttd on {path}: {exc.strerror or exc}")


def _send(sock: socket.socket, path: str, obj: dict, timeout: float | None) -> None:
    try:
        sock.sendall(encode(obj))
    except TimeoutError:
        raise ControlError(f"timed out after {timeout:g} s sending to pttd on {path}") from None
    except OSError as exc:
        raise ControlError(f"pttd on {path} closed the connection: {exc.strerror or exc}") from exc


def _read_reply(reader, path: str, timeout: float | None) -> dict:
    try:
        line = reader.readline(16 * MAX_LINE)
    except TimeoutError:
        raise ControlError(f"timed out after {timeout:g} s waiting for pttd on {path}") from None
    except OSError as exc:
        raise ControlError(f"connection to pttd on {path} failed: {exc.strerror or exc}") from exc
    if not line:
        raise _Closed(f"pttd on {path} closed the connection without a reply")
    if not line.endswith(b"\n"):  # cut mid-line: a subscriber that fell behind is dropped so
        raise ControlError(
            f"pttd on {path} closed the connection mid-line "
            f"(a subscriber that reads too slowly is dropped)"
        )
    try:
        obj = json.loads(line)
    except ValueError:
        raise ControlError(
            f"pttd on {path} sent something that is not JSON: {line[:80]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise ControlError(f"pttd on {path} sent a non-object reply: {line[:80]!r}")
    return obj
