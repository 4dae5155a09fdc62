"""The offline engine: a v3-compatible endpoint backed by pocketsphinx (``pttd serve-local``).

Why: with no key and no internet (``pttd demo``, ``url = "local"``, ``fallback = "local"``) pttd
still needs real speech recognition behind the same wire protocol, so the daemon cannot tell the
difference. :mod:`pttd.local.server` does the protocol; this module wires it to the pocketsphinx
recognizer (:mod:`pttd.local.sphinx_recognizer`) and its decoder pool
(:mod:`pttd.local.decoders`), and serves it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any, Self

from pttd.errors import ConfigError
from pttd.local.decoders import DecoderPool, UnknownWordsError, normalize_phrases
from pttd.local.options import ServerOptions
from pttd.local.recognizer import RecognizerFactory, SessionConfig
from pttd.local.server import ServerThread
from pttd.local.sphinx_recognizer import PocketsphinxRecognizer

log = logging.getLogger(__name__)

#: Closing handshake wait: loopback answers in ms, and an in-process engine's stop must be quick.
CLOSE_TIMEOUT_S = 1.0
#: Loopback is open; any other address needs this key (the Authorization header).
API_KEY_ENV = "PTTD_LOCAL_API_KEY"


class PocketsphinxFactory:
    """A :data:`RecognizerFactory` with its decoder pool. Configured phrases are checked now."""

    def __init__(self, phrases: Iterable[Any] | None = None) -> None:
        self.phrases = normalize_phrases(phrases or ())
        self.pool = DecoderPool(with_lm=not self.phrases)
        if self.phrases:
            unknown = self.pool.unknown_words(self.phrases)  # also loads the first decoder
            if unknown:
                raise UnknownWordsError(unknown)

    def __call__(self, config: SessionConfig) -> PocketsphinxRecognizer:
        return PocketsphinxRecognizer(config, self.pool, self.phrases)

    @property
    def mode(self) -> str:
        return "grammar" if self.phrases else "free"


def make_factory(phrases: list[str] | None = None) -> RecognizerFactory:
    """Recognizers for a v3 server: free dictation, or only ``phrases`` when given.

    Raises :class:`UnknownWordsError` (a ConfigError) if a phrase has a word pocketsphinx cannot
    pronounce.
    """
    return PocketsphinxFactory(phrases)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalEngine(ServerThread):
    """The pocketsphinx v3 server in a background thread: ``with LocalEngine() as e: e.url``.

    On loopback it accepts any connection (the daemon sends whatever key it has, maybe none).
    ``api_key`` makes it check the ``Authorization`` header instead (required off loopback).
    ``options`` sets the rest of the server's behaviour; ``factory`` shares a loaded pool
    between engines.
    """

    def __init__(
        self,
        phrases: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        options: ServerOptions | None = None,
        factory: PocketsphinxFactory | None = None,
        prewarm: bool = True,
    ) -> None:
        if not is_loopback(host) and not api_key:
            raise ConfigError(
                f"the local engine has no authentication of its own: refusing to "
                f"listen on {host} (not loopback) without a key; set "
                f"{API_KEY_ENV} or use 127.0.0.1"
            )
        self.factory = factory or PocketsphinxFactory(phrases)
        self._prewarm = prewarm
        base = options or ServerOptions()
        options = dataclasses.replace(
            base,
            host=host,
            port=port,
            recognizer_in_thread=True,
            close_timeout_s=min(base.close_timeout_s, CLOSE_TIMEOUT_S),
            require_auth=bool(api_key),
            api_keys=frozenset({api_key}) if api_key else base.api_keys,
        )
        super().__init__(options, self.factory)

    def start(self, timeout: float = 10.0) -> Self:
        if self._prewarm:
            self.factory.pool.prewarm()
        super().start(timeout)
        return self

    @property
    def mode(self) -> str:
        """ "grammar" (phrases configured) or "free" (dictation; keyterms may still constrain)."""
        return self.factory.mode


def serve(host: str = "127.0.0.1", port: int = 8765, phrases: list[str] | None = None) -> int:
    """``pttd serve-local``: print the URL, serve until SIGINT/SIGTERM, return 0.

    Off loopback a key from ``$PTTD_LOCAL_API_KEY`` is required (a ConfigError otherwise), as
    for the kiosk listener: free, CPU-heavy speech recognition should not be open to a LAN.
    """
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    api_key = os.environ.get(API_KEY_ENV) or None
    try:
        with LocalEngine(phrases, host, port, api_key=api_key) as engine:
            log.info("local engine (%s) listening on %s", engine.mode, engine.url)
            print(engine.url, flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
