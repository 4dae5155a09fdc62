"""Fault injection for the tests' fake v3 server: what a connection does wrong, on purpose.

Why: the daemon must survive what the real service (or the network in between) does on a bad
day: drops, silences, late or missing messages, hostile frames. A test picks the faults of each
connection attempt (``FakeV3Server(faults=...)``, ``queue_faults``, ``set_default_faults``);
tests/fakes/fake_session.py applies them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    """Per-connection fault injection. Everything is off by default."""

    #: Abort the TCP connection (no close frame) right after receiving this many audio frames.
    drop_after_frames: int | None = None
    #: Abort the TCP connection when ForceEndpoint arrives.
    drop_on_force_endpoint: bool = False
    #: On Terminate: None = normal; "ignore" = do nothing at all; "close" = flush turns, then
    #: close 1000 without sending Termination.
    no_termination: str | None = None
    #: Wait this long after the upgrade before sending Begin.
    begin_delay_s: float = 0.0
    #: Close with (code, reason) right after the upgrade, before Begin, with no Error frame.
    close_before_begin: tuple[int, str] | None = None
    #: Reject the HTTP upgrade with this status (e.g. 401).
    http_reject_status: int | None = None
    #: Inject an unknown message type after Begin and before each final Turn, and an unknown
    #: extra field into every message.
    unknown_messages: bool = False
    #: Delay end-of-turn Turns (and everything queued behind them) by this long.
    turn_delay_s: float = 0.0
    #: After this many audio frames send Error 3005, then go silent forever (never close).
    error_without_close: int | None = None
    #: (code, after_frames): send Error ``code`` + close ``code`` after that many frames.
    error_mid_turn: tuple[int, int] | None = None
    #: ForceEndpoint with no speech pending: "none" = send nothing, "empty_turn" = send an
    #: end_of_turn Turn with an empty transcript (the real behaviour is unverified).
    empty_force_endpoint: str = "none"
    #: (after_frames, texts): send these text frames exactly as given (hostile or malformed
    #: messages: a real server's bug or a man in the middle) after that many audio frames.
    raw_after_frames: tuple[int, tuple[str, ...]] | None = None
    #: (seconds, texts): the same, that long after Begin, whatever the client is doing (a Turn
    #: that arrives while a kept-warm session is idle, say).
    raw_after_s: tuple[float, tuple[str, ...]] | None = None
    #: After an Error frame, close with this (code, reason) instead of the Error's own: a close
    #: that disagrees with the Error frame before it (the Error frame is the one to believe).
    mismatched_close: tuple[int, str] | None = None
    #: Send ``Warning{warning_code, warning}`` after this many audio frames.
    warning_after_frames: int | None = None
    warning_code: int = 1234
    warning_text: str = "Session ending soon"
    #: Send Heartbeat messages even if the client did not ask (``session_heartbeat``).
    heartbeat: bool = False
    #: Send SpeakerRevision (relabelling every final turn to "B") right before Termination.
    speaker_revision: bool = False
    #: Send LLMGatewayResponse after each final turn even without ``llm_gateway``.
    llm_gateway_response: bool = False
