"""One AssemblyAI v3 streaming session, an :class:`~pttd.stt.base.SttSession`.

The owner (the controller) never blocks on the network: ``start()`` returns at once, the
receiver thread connects, waits for ``Begin`` and reports everything through ``on_event``
(which must only enqueue). Audio goes out on the caller's thread (``send_audio_now``, then
``force_endpoint_now``): the caller is a press's streamer, which already runs on a thread of its
own, so a frame costs one thread wake-up from ring to wire and a ForceEndpoint can never overtake
the audio before it. ``send_frames_now`` puts several frames (a capture period's worth, and the
ForceEndpoint after a press's last one) on the wire in one socket write. Control messages the
owner sends (``keep_alive``, ``update``, ``terminate``) go through a FIFO drained by the sender
thread, so the owner never waits on the network. The socket is a
:class:`~pttd.stt.assemblyai.link.Link`; what the receiver thread does is in receiver.py.

Every session ends with exactly one :class:`SessionClosed`, after any final it still held.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence

import websocket

from pttd.config_files import Secret
from pttd.stt.assemblyai import close_policy, protocol
from pttd.stt.assemblyai.link import Link
from pttd.stt.assemblyai.receiver import SessionReceiver
from pttd.stt.assemblyai.turns import TurnAssembler
from pttd.stt.base import Begin, ConnectError, ErrorMessage, SessionClosed, Termination

log = logging.getLogger(__name__)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Session(SessionReceiver):
    """A v3 session. Thread-safe for one owner calling the public methods.

    ``url`` is the full connect URL, or a callable returning it, called on the receiver thread
    right before connecting (fleet mode: it fetches a one-use temporary token, so the owner's
    thread never waits on it); it may raise :class:`~pttd.stt.assemblyai.link.UrlError`. A
    ``token`` in the URL is never logged or reported. ``credential_id`` names the credential for
    the 1008 rule (default: the key's fingerprint).
    """

    opened_at: float | None = None  # when start() was called (monotonic)
    _terminate_deadline: float | None = None
    _last_termination: Termination | None = None
    _local_close = False

    def __init__(
        self,
        url: str | Callable[[], str],
        api_key: Secret,
        *,
        on_event: Callable[[Session, object], None],
        sample_rate: int = 16000,
        format_turns: bool = True,
        connect_timeout: float = 10.0,
        begin_timeout: float = 10.0,
        send_timeout: float = 10.0,
        format_grace_s: float = 1.5,
        error_close_grace_s: float = 2.0,
        on_sent: Callable[[int, int], None] | None = None,
        name: str = "session",
        credential_id: str | None = None,
    ):
        self.url = url if isinstance(url, str) else "(a temporary-token URL)"
        self._link = Link(
            url,
            api_key,
            connect_timeout=connect_timeout,
            send_timeout=send_timeout,
            on_sent=on_sent,
        )
        self._scrub = self._link.scrub
        self._credential = credential_id or ("key:" + _fingerprint(api_key.reveal()))
        self._on_event = on_event
        self.sample_rate = sample_rate
        self._connect_timeout = connect_timeout
        self._begin_timeout = begin_timeout
        self._error_close_grace_s = error_close_grace_s
        self.name = name
        self._assembler = TurnAssembler(format_turns, format_grace_s)
        self._out: collections.deque[str] = collections.deque()  # a few control messages at most
        self._out_cond = threading.Condition()
        self._stopping = threading.Event()
        self._begun = threading.Event()
        self._closed_event = threading.Event()
        self._closed: SessionClosed | None = None
        self._report_lock = threading.Lock()
        self._error: ErrorMessage | None = None
        self._error_deadline: float | None = None
        self._receiver = threading.Thread(
            target=self._receive_main, name=f"{name}-recv", daemon=True
        )
        self._sender = threading.Thread(target=self._send_main, name=f"{name}-send", daemon=True)
        self.begin: Begin | None = None

    # --- owner API ------------------------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self.begin.id if self.begin else None

    @property
    def is_open(self) -> bool:
        return self._begun.is_set() and not self._closed_event.is_set()

    @property
    def closed(self) -> SessionClosed | None:
        return self._closed

    @property
    def audio_bytes_sent(self) -> int:
        return self._link.audio_bytes_sent

    @property
    def frames_sent(self) -> int:
        return self._link.frames_sent

    @property
    def pending_error(self) -> ErrorMessage | None:
        """An Error frame whose close has not come yet (the session is as good as gone)."""
        return self._error if self._closed is None else None

    def start(self) -> None:
        """Connect in the background; ``on_event`` gets Begin or a SessionClosed."""
        self.opened_at = time.monotonic()
        self._receiver.start()

    def connect(self, timeout: float | None = None) -> Begin:
        """Blocking convenience for tools and tests: start, then wait for Begin."""
        self.start()
        limit = timeout if timeout is not None else self._connect_timeout + self._begin_timeout + 1
        deadline = time.monotonic() + limit
        while not self._begun.is_set() and not self._closed_event.is_set():
            self._closed_event.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                self.close()
                break
        if self.begin is not None and self._begun.is_set():
            return self.begin
        raise ConnectError(
            self._closed
            or SessionClosed(None, "no Begin", close_policy.policy_for(None), before_begin=True)
        )

    def send_frames_now(self, frames: Sequence[bytes], force_endpoint: bool = False) -> bool:
        """Send audio frames, each its own WebSocket frame, then optionally ForceEndpoint, on the
        caller's thread in one socket write; blocks at most ``send_timeout``.

        One write per capture period instead of one per frame: the frames on the wire are the
        same, the system calls fewer. False when the session is not open or the link just
        failed: the receiver then reports the close as usual, so the caller only has to stop.
        Raises ValueError for frames outside the server's 50-1000 ms rule (a 3007 otherwise).
        """
        for pcm in frames:
            self._check_frame(pcm)
        if not self._begun.is_set() or self._stopping.is_set():
            return False
        try:
            self._link.write_frames(frames, force_endpoint)
        except (OSError, websocket.WebSocketException) as exc:
            self._send_failed(exc)
            return False
        return True

    def send_audio_now(self, pcm: bytes) -> bool:
        """One frame; see :meth:`send_frames_now`."""
        return self.send_frames_now((pcm,))

    def force_endpoint_now(self) -> bool:
        """ForceEndpoint on the caller's thread, after the audio it sent itself (see above)."""
        return self.send_frames_now((), force_endpoint=True)

    def keep_alive(self) -> None:
        self._queue_text(protocol.KEEP_ALIVE)

    def update(self, **fields) -> None:
        self._queue_text(protocol.update_configuration(**fields))

    def terminate(self, timeout: float = 5.0) -> Termination | None:
        """Send Terminate, wait (bounded) for Termination, then close. Returns it if it came."""
        if self._begun.is_set() and not self._closed_event.is_set():
            self._queue_text(protocol.TERMINATE)
            deadline = time.monotonic() + timeout
            while not self._closed_event.is_set() and time.monotonic() < deadline:
                self._closed_event.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        self.close()
        return self._last_termination

    def terminate_async(self, timeout: float = 5.0) -> None:
        """Send Terminate without waiting; the session closes itself on Termination or timeout."""
        if not self._begun.is_set() or self._closed_event.is_set():
            self.close(0)
            return
        if self._terminate_deadline is not None:
            return  # already terminating: Terminate goes out once
        self._terminate_deadline = time.monotonic() + timeout
        self._queue_text(protocol.TERMINATE)

    def wait_closed(self, timeout: float) -> bool:
        return self._closed_event.wait(max(0.0, timeout))

    def close(self, timeout: float = 2.0) -> None:
        """Stop both threads and the socket; safe to call more than once, from any thread.

        ``timeout=0`` does not join (the controller must not wait on a connect in progress).
        """
        self._local_close = True
        self._stopping.set()
        with self._out_cond:
            self._out_cond.notify_all()
        self._link.shutdown()
        me = threading.current_thread()
        for thread in (self._sender, self._receiver):
            if timeout and thread.is_alive() and thread is not me:
                thread.join(timeout)
        self._report_closed(None, "closed by pttd", local=True)

    # --- sending --------------------------------------------------------------------------------

    def _queue_text(self, text: str) -> None:
        with self._out_cond:
            self._out.append(text)
            self._out_cond.notify()

    def _check_frame(self, pcm: bytes) -> None:
        ms = protocol.frame_ms(len(pcm), self.sample_rate)
        if len(pcm) % 2 or not protocol.MIN_FRAME_MS <= ms <= protocol.MAX_FRAME_MS:
            raise ValueError(
                f"audio frame of {ms:.1f} ms ({len(pcm)} bytes): the server accepts "
                f"{protocol.MIN_FRAME_MS}-{protocol.MAX_FRAME_MS} ms of pcm_s16le"
            )

    def _send_failed(self, exc: Exception) -> None:
        if not self._stopping.is_set():
            log.info("%s: send failed: %s", self.name, self._scrub(str(exc)))
            self._link.shutdown()  # the receiver sees the dead link and reports it

    def _send_main(self) -> None:
        try:
            while True:
                with self._out_cond:
                    while not self._out and not self._stopping.is_set():
                        self._out_cond.wait()
                    if self._stopping.is_set():
                        return
                    batch = list(self._out)
                    self._out.clear()
                for text in batch:
                    self._link.send_text(text)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the receiver reports the close
            self._send_failed(exc)
