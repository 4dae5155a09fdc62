"""The in-process offline engine, for the commands that run it: checked for, then started.

pocketsphinx is the ``[local]`` extra, not a default dependency (docs/install.md, "The offline
engine is an extra", has the measurements), and the engine only imports it when a decoder loads:
without the check first, the first session would fail deep inside the engine instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pttd.config import Config
from pttd.errors import StartupError

if TYPE_CHECKING:
    from pttd.local.engine import LocalEngine


def require_pocketsphinx(what: str) -> None:
    """StartupError (exit 2, one line) naming ``what`` needs the engine when it is missing."""
    try:
        import pocketsphinx  # noqa: F401  (the engine loads it right after this anyway)
    except ImportError as exc:
        raise StartupError(
            f"{what} needs the offline engine, which is not installed "
            f"({exc}): pip install 'pttd[local]'"
        ) from None


def start_offline_engine(cfg: Config, what: str) -> LocalEngine:
    """The engine with the config's phrases, on an ephemeral loopback port (``engine.url``)."""
    require_pocketsphinx(what)
    from pttd.local.engine import LocalEngine

    engine = LocalEngine(phrases=list(cfg.local.phrases))
    engine.start()
    return engine
