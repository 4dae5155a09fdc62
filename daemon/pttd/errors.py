"""pttd's exceptions: one root, each also the builtin it behaves as (gpiozero's pattern).

``except PttdError`` catches everything pttd raises on purpose; ``except ValueError`` (or
``OSError``, ...) keeps working where a caller expects the builtin. ``UserError`` is the kind
the user must fix (a config key, a file, the hardware's wiring): the CLI prints its one line
and exits 2, in one place (``cli.main``), never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PttdError(Exception):
    """The root of every exception pttd raises on purpose."""


class UserError(PttdError):
    """Something the user must fix; the message names the key, file or part (exit 2)."""


class ConfigError(UserError, ValueError):
    """A problem in the configuration (a key, a value, a file it names)."""


class StartupError(UserError, RuntimeError):
    """A part cannot start with this configuration (mic, GPIO, socket, spool, extra missing)."""


class UsageError(UserError, ValueError):
    """A bad command line."""


@contextlib.contextmanager
def startup_error(*kinds: type[Exception], prefix: str = "") -> Iterator[None]:
    """Re-raise a part's own errors of ``kinds`` as the StartupError the CLI prints (exit 2):
    the part's module stays free of CLI policy, the wiring says which errors the user must fix."""
    try:
        yield
    except kinds as exc:
        raise StartupError(f"{prefix}{exc}") from None
