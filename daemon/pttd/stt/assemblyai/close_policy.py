"""What an AssemblyAI session's end means: close codes, HTTP refusals, the 1008 retry rule.

Each code maps to a :class:`~pttd.stt.base.ClosePolicy` (retry or not, the backoff, the user's
message); the reason text refines the codes whose meaning moved on 2026-02-25 (3005, 1008).
Pure data and functions, apart from the per-process record of which credentials have worked.
"""

from __future__ import annotations

import logging
import threading

from pttd.stt.base import LINK_LOST, CloseKind, ClosePolicy

log = logging.getLogger(__name__)

_NORMAL = ClosePolicy(CloseKind.NORMAL, False, 0.0, 0.0, "session ended normally")
_AUTH = ClosePolicy(
    CloseKind.AUTH,
    False,
    0.0,
    0.0,
    "AssemblyAI refused the API key or account (1008): check /etc/pttd/api-key "
    "and the account balance; pttd will not retry until the config changes or "
    "the button is pressed again",
)
_RATE = ClosePolicy(
    CloseKind.RATE_LIMITED,
    True,
    5.0,
    60.0,
    "too many new sessions per minute for this account; retrying with backoff",
)
_EXPIRED = ClosePolicy(
    CloseKind.EXPIRED, True, 0.0, 0.0, "session reached its maximum duration; opening a new one"
)
_BAD_MESSAGE = ClosePolicy(
    CloseKind.CLIENT_BUG,
    False,
    0.0,
    0.0,
    "the server rejected a message from pttd (3006): this is a pttd bug, "
    "please report it with the journal lines around it",
    bug=True,
)
_BAD_AUDIO = ClosePolicy(
    CloseKind.CLIENT_BUG,
    True,
    1.0,
    30.0,
    "the server rejected pttd's audio frames or pacing (3007): this is a "
    "pttd bug, please report it",
    bug=True,
)
_SERVER = ClosePolicy(
    CloseKind.SERVER, True, 1.0, 30.0, "the server cancelled the session; retrying"
)
_TRANSPORT = LINK_LOST
_IDLE = ClosePolicy(CloseKind.IDLE, True, 0.0, 0.0, "session closed for inactivity")
# not a close code: pttd could not even try (a URL websocket-client refuses, say); retrying
# the same thing cannot help, and it is not the network being down
CANNOT_OPEN = ClosePolicy(
    CloseKind.CONFIG,
    False,
    0.0,
    0.0,
    "pttd cannot open a session with this configuration (check stt.url)",
)

# 1008 on a key that has already opened a session in this process: the node SDK saw sporadic
# ones ("Incorrect padding") that were gone on retry, so it gets one quick retry
AUTH_RETRY_ONCE = ClosePolicy(
    CloseKind.AUTH_RETRY,
    True,
    0.5,
    2.0,
    "AssemblyAI refused a key that worked before (1008); retrying once",
)


def http_refusal_policy(status: int) -> ClosePolicy:
    """An HTTP status other than 101 at the upgrade. 401/403 and 429 are handled as their close
    codes (1008, 3009); 5xx is the server's trouble (retry); any other 4xx means the request
    itself is wrong (a parameter, the path): a configuration error, never retried, never taken
    for the network being down."""
    if status in (401, 403):
        return _AUTH
    if status == 429:
        return _RATE
    if status >= 500:
        return ClosePolicy(
            CloseKind.SERVER,
            True,
            1.0,
            30.0,
            f"the server failed the upgrade (HTTP {status}); retrying",
        )
    cause = {
        400: "the server refused a query parameter: check stt.speech_model, "
        "audio.sample_rate and stt.params",
        404: "no v3 streaming endpoint at this path: check stt.url (it ends in /v3/ws)",
        405: "the server refused the request method: check stt.url",
        410: "this endpoint is gone: check stt.url",
        426: "the server wants another protocol: check stt.url (wss://)",
    }.get(status, "the server refused the request: check stt.url and stt.params")
    return ClosePolicy(
        CloseKind.CONFIG,
        False,
        0.0,
        0.0,
        f"HTTP {status} at the upgrade: {cause}; pttd will not retry until "
        "the button is pressed again",
    )


def http_close_code(status: int) -> int | None:
    """The close code an HTTP refusal at the upgrade stands for, if it has one."""
    return {401: 1008, 403: 1008, 429: 3009}.get(status)


# code -> policy; reason texts refine 3005 and 1008 (their meaning moved on 2026-02-25).
CLOSE_POLICIES: dict[int | None, ClosePolicy] = {
    1000: _NORMAL,
    1001: _TRANSPORT,
    1006: _TRANSPORT,
    1008: _AUTH,
    1011: _SERVER,
    1012: _SERVER,
    1013: _SERVER,
    3005: _SERVER,
    3006: _BAD_MESSAGE,
    3007: _BAD_AUDIO,
    3008: _EXPIRED,
    3009: _RATE,
    # legacy v2 codes, still listed by the SDK
    4001: _AUTH,
    4002: _AUTH,
    4003: _AUTH,
    4008: _EXPIRED,
    4029: _BAD_AUDIO,
    4031: _IDLE,
    4032: _BAD_AUDIO,
    4033: _BAD_AUDIO,
    4100: _BAD_MESSAGE,
    4101: _BAD_MESSAGE,
    4102: _RATE,
    None: _TRANSPORT,  # no close frame at all
}


def policy_for(code: int | None, reason: str = "") -> ClosePolicy:
    """Classify a session end by close/error code, using the text where the code is ambiguous."""
    text = (reason or "").lower()
    if code in (1008, 3005) and "too many concurrent" in text:
        return _RATE
    if code == 3005:
        if "session expired" in text:
            return _EXPIRED
        if "input duration" in text or "transmission rate" in text:
            return _BAD_AUDIO
        if "invalid" in text:
            return _BAD_MESSAGE
    if code in CLOSE_POLICIES:
        return CLOSE_POLICIES[code]
    if code is not None and 4000 <= code < 5000:
        return _SERVER
    return _TRANSPORT


# --- the 1008 retry ------------------------------------------------------------------------------

# Credentials (a fingerprint, never the key) that have opened a session in this process, and
# whether the one retry a later 1008 earns is spent.
_worked: dict[str, bool] = {}
_worked_lock = threading.Lock()


def credential_worked(credential: str) -> None:
    """A session opened with ``credential``: a later 1008 on it earns one retry."""
    with _worked_lock:
        _worked[credential] = False


def auth_retry(credential: str, code: int | None, policy: ClosePolicy) -> ClosePolicy:
    """A 1008 on a credential that has already opened a session in this process gets one
    quick retry (sporadic 1008s are known); a 1008 on one never seen working, or a second
    1008 in a row, is the usual lock-out."""
    if policy.kind != CloseKind.AUTH or code != 1008:
        return policy
    with _worked_lock:
        if _worked.get(credential) is False:
            _worked[credential] = True  # the retry is spent until a Begin
            return AUTH_RETRY_ONCE
    return policy
