"""The event vocabulary of the interface contract (docs/contract.md, "Events").

Every output (stdout, journald, control-socket subscribers, kiosk, MQTT) receives the same
plain dicts built here, so the wire shape lives in one place.
"""

from __future__ import annotations

import enum
import time


class Command(enum.StrEnum):
    """What the control socket, the kiosk, MQTT and the CLI may ask (the contract's spelling)."""

    PRESS = "press"
    RELEASE = "release"
    TOGGLE = "toggle"
    CANCEL = "cancel"
    STATUS = "status"
    SUBSCRIBE = "subscribe"


#: the commands that act on presses (the controller's); status and subscribe only read
PRESS_COMMANDS = (Command.PRESS, Command.RELEASE, Command.TOGGLE, Command.CANCEL)


class EventKind(enum.StrEnum):
    """The ``"event"`` field of every event an output receives."""

    STATE = "state"
    PARTIAL = "partial"
    FINAL = "final"
    ERROR = "error"
    WARNING = "warning"
    SNAPSHOT = "snapshot"  # the kiosk's first message: the state as it is


class State(enum.StrEnum):
    """The controller's lifecycle states; the value is the contract's spelling."""

    IDLE = "idle"
    CONNECTING = "connecting"
    LISTENING = "listening"
    FINALIZING = "finalizing"
    ERROR = "error"
    OFFLINE = "offline"


def state_event(state: State, ts: float | None = None) -> dict:
    return {"event": EventKind.STATE.value, "state": State(state).value, "ts": _ts(ts)}


def partial_event(text: str, turn_order: int, session_id: str, ts: float | None = None) -> dict:
    return {
        "event": EventKind.PARTIAL.value,
        "text": text,
        "turn_order": turn_order,
        "session_id": session_id,
        "ts": _ts(ts),
    }


def final_event(
    text: str,
    turn_order: int,
    session_id: str,
    press_id: int,
    audio_ms: int,
    latency_ms: int,
    ts: float | None = None,
    **extra,
) -> dict:
    """A delivered final turn; ``extra`` carries compatible additions (``late``, ``gap_ms``)."""
    event = {
        "event": EventKind.FINAL.value,
        "text": text,
        "turn_order": turn_order,
        "session_id": session_id,
        "press_id": press_id,
        "audio_ms": int(audio_ms),
        "latency_ms": int(latency_ms),
        "ts": _ts(ts),
    }
    event.update(extra)
    return event


def error_event(
    code: int | None,
    message: str,
    retry_in_s: float | None = None,
    ts: float | None = None,
    press_id: int | None = None,
) -> dict:
    """An error. ``press_id`` is given when the error ends that press (it then gets no final)."""
    event = {
        "event": EventKind.ERROR.value,
        "code": code,
        "message": message,
        "retry_in_s": None if retry_in_s is None else float(retry_in_s),
        "ts": _ts(ts),
    }
    if press_id is not None:
        event["press_id"] = press_id
    return event


def warning_event(code: int | None, message: str, ts: float | None = None) -> dict:
    """A server ``Warning`` (the session goes on): shown, published and logged, never acted on."""
    return {"event": EventKind.WARNING.value, "code": code, "message": message, "ts": _ts(ts)}


def _ts(ts: float | None) -> float:
    return time.time() if ts is None else float(ts)
