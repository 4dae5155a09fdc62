"""The control socket's path: bound with mode 0660 from the start, a stale file replaced, a live
daemon's socket or any other file never touched, and on stop only our own socket removed."""

from __future__ import annotations

import logging
import os
import socket
import stat

from pttd.frontends.control.protocol import ControlError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class SocketInUseError(ControlError):
    """Another live daemon answers on the socket path (the CLI exits 2)."""


def bind_listener(path: str, backlog: int) -> socket.socket:
    """Bind at ``path`` with mode 0660; the socket never exists with looser permissions."""
    _check_parent(path)
    _clear_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # process-wide for a moment; only ever more restrictive
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create control socket {path}: {exc.strerror or exc}") from exc
    return sock


def identity(path: str) -> tuple[int, int]:
    """What tells our socket file from one a later daemon bound at the same path."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def remove_if_ours(path: str, ours: tuple[int, int] | None) -> None:
    """Unlink the path only if it is still the socket we bound (never another daemon's)."""
    try:
        if identity(path) == ours:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("control: cannot remove %s: %s", path, exc)


def _check_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ControlError(
            f"control socket directory {parent} does not exist "
            f"(create it, e.g. RuntimeDirectory=pttd, or set [control] socket)"
        )


def _clear_path(path: str) -> None:
    """Remove a stale socket; refuse a live one or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(
            f"control socket path {path} exists and is not a socket; "
            f"not removing it (choose another [control] socket)"
        )
    if _is_live(path):
        raise SocketInUseError(f"control socket {path} in use by a running pttd")
    log.info("control: replacing stale socket %s", path)
    os.unlink(path)


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # accept queue full: somebody is listening
    except PermissionError as exc:
        raise ControlError(
            f"control socket {path} exists and we may not connect to it "
            f"(permission denied); is another pttd running as another user?"
        ) from exc
    finally:
        probe.close()
