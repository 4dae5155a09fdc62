"""Makes the v3 sessions: to the configured engine (the cloud, or the in-process offline engine
for ``url = "local"``) or, for a press that falls back, to the offline engine.

The controller calls the factory on its own thread; it only builds the ``Session``, which
connects on its own thread. In fleet mode the one-use token is fetched there too, so the
controller never waits on the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pttd.config import Config
from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.session import Session

if TYPE_CHECKING:
    from pttd.stt.assemblyai.tokens import TokenSource


class SessionFactory:
    """``factory(on_event, engine)`` → a new, unconnected ``Session``.

    ``url`` is the configured engine's; ``fallback_url`` is set once the offline fallback
    engine runs. Fleet mode (``stt.token_url``) puts a fresh token into each cloud URL."""

    def __init__(self, cfg: Config, url: str, *, prefetch_tokens: bool = True):
        self._cfg = cfg
        self.url = url
        self.fallback_url: str | None = None
        self._tokens: TokenSource | None = None
        if cfg.stt.token_url:
            from pttd.stt.assemblyai.tokens import TokenSource

            self._tokens = TokenSource(
                cfg.stt.token_url, cfg.stt.token_auth_file, prefetch=prefetch_tokens
            )

    def __call__(
        self, on_event: Callable[[Session, object], None], engine: str = "cloud"
    ) -> Session:
        stt, rate = self._cfg.stt, self._cfg.audio.sample_rate
        u3 = protocol.is_u3(stt.speech_model)
        # U3 Pro models always format and the migration guide says not to send format_turns
        url = protocol.build_url(
            self._base_url(engine),
            stt.speech_model,
            rate,
            None if u3 else stt.format_turns,
            stt.params,
        )
        format_turns = stt.format_turns and not u3
        if engine == "local" or self._tokens is None:
            return Session(
                url, stt.api_key, on_event=on_event, sample_rate=rate, format_turns=format_turns
            )
        return Session(
            self._tokens.provider(url),
            stt.api_key,
            on_event=on_event,
            sample_rate=rate,
            format_turns=format_turns,
            credential_id=self._tokens.credential_id,
        )

    def _base_url(self, engine: str) -> str:
        if engine != "local":
            return self.url
        if self.fallback_url is None:
            raise RuntimeError("a press fell back to the offline engine, but none is running")
        return self.fallback_url
