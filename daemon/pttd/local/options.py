"""How the local v3 server behaves, server-wide (:class:`ServerOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

from pttd.local.wire import DEFAULT_PATH, DEFAULT_SPEECH_MODEL


@dataclass(frozen=True)
class ServerOptions:
    """Server-wide behaviour. Defaults mimic the real service as of late 2026."""

    #: Accepted API keys (``Authorization`` header). Empty = accept any non-empty credential.
    api_keys: frozenset[str] = frozenset()
    #: False = accept every connection, even with no or an empty credential (loopback engine).
    require_auth: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    path: str = DEFAULT_PATH
    #: Session lifetime; at expiry Error 3008 + close 3008. ``Begin.expires_at`` reflects it.
    expires_in_s: float = 10800.0
    #: How far received audio may run ahead of wall time since the first frame before 3007.
    max_lead_s: float = 3.0
    #: Inactivity close; the real code and text are unverified. Code 1000 sends no Error.
    inactivity_close_code: int = 3005
    inactivity_error: str = "Session Cancelled: Inactivity timeout exceeded"
    #: Accepted ``inactivity_timeout`` range in seconds (real: 5-3600).
    inactivity_min_s: float = 5.0
    inactivity_max_s: float = 3600.0
    #: ``format_turns=true`` on US models: "A" = unformatted final + formatted copy with the same
    #: ``turn_order``; "B" = every Turn formatted, one final (the service has been seen doing both).
    format_pattern: str = "A"
    default_speech_model: str = DEFAULT_SPEECH_MODEL
    #: Heartbeat cadence when ``session_heartbeat=true`` (the real cadence is unverified).
    heartbeat_interval_s: float = 1.0
    #: Run recognizer calls in a worker thread (for CPU-heavy decoders such as pocketsphinx).
    recognizer_in_thread: bool = False
    close_timeout_s: float = 5.0
    ping_interval_s: float | None = 20.0
    max_message_bytes: int = 1 << 24

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        if self.format_pattern not in ("A", "B"):
            raise ValueError(f"format_pattern must be 'A' or 'B', not {self.format_pattern!r}")
