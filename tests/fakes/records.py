"""What the tests' fake v3 server saw and did on each connection attempt: a ConnectionRecord.

Why: a test asserts on the wire itself (the headers and query the daemon sent, every frame in
order with its time, every message and close the server sent), not on the daemon's own account
of it. Records are written on the server's thread and safe to read from any other.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from websockets.datastructures import Headers

from pttd.local.recognizer import SessionConfig
from pttd.local.session import Upgrade
from tests.fakes.faults import Faults


@dataclass(frozen=True)
class Received:
    """One frame from the client. ``data``: bytes (binary) or parsed JSON / raw str (text)."""

    t: float
    kind: str
    data: Any


@dataclass(frozen=True)
class Sent:
    """One message the server sent, with ``time.monotonic()`` at send time."""

    t: float
    message: dict


class ConnectionRecord(Upgrade):
    """Everything observable about one connection attempt. Safe to read from any thread."""

    def __init__(
        self,
        index: int,
        path: str,
        headers: Headers,
        faults: Faults,
        query_text: str | None = None,
    ) -> None:
        """Headers are kept raw and lower-cased; the query is parsed even for rejected attempts
        (``query_text``: the query to parse, when not the path's own)."""
        super().__init__(path, headers, query_text)
        self.index = index
        self.header_items: list[tuple[str, str]] = list(headers.raw_items())
        self.faults = faults
        self.http_status: int | None = None
        #: A minted temporary token opened this session: its max_session_duration_seconds.
        self.token_max_session_s: float | None = None
        self.session_id: str | None = None
        self.begin: dict | None = None
        self.config: SessionConfig | None = None
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None
        self.aborted = False
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._sent: list[Sent] = []
        self._audio_ms = 0.0
        self.raw_sent: list[str] = []  # Faults.raw_*: the texts sent as given, in order

    # --- writers (server side) ----------------------------------------------------------------

    def add_received(self, item: Received, audio_ms: float = 0.0) -> None:
        with self._lock:
            self._received.append(item)
            self._audio_ms += audio_ms

    def add_sent(self, message: dict) -> None:
        with self._lock:
            self._sent.append(Sent(time.monotonic(), message))

    # --- readers ---------------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    @property
    def messages(self) -> list[dict]:
        """Messages sent, in order."""
        return [item.message for item in self.sent]

    @property
    def audio_ms(self) -> float:
        """Audio received, in ms, from byte counts."""
        with self._lock:
            return self._audio_ms

    def sent_of_type(self, message_type: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == message_type]

    @property
    def turns(self) -> list[dict]:
        return self.sent_of_type("Turn")

    @property
    def final_turns(self) -> list[dict]:
        return [t for t in self.turns if t.get("end_of_turn")]

    def audio_frames(self) -> list[Received]:
        return [r for r in self.received if r.kind == "binary"]

    def text_messages(self) -> list[Any]:
        return [r.data for r in self.received if r.kind == "text"]

    def wait_done(self, timeout: float) -> bool:
        """Wait until the server has finished with this connection."""
        return self.done.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"ConnectionRecord(index={self.index}, path={self.path!r}, "
            f"http_status={self.http_status}, close_sent={self.close_sent}, "
            f"close_received={self.close_received}, aborted={self.aborted})"
        )
