"""The WebSocket under one AssemblyAI session: opening it, writing to it, waiting on it.

``open`` runs on the session's receiver thread: the URL (fleet mode: a callable that fetches a
one-use token) is resolved there, and a refusal is raised as :class:`Refused`, which says what
it means. Audio is written on the caller's thread (``write_frames``), control texts on the
session's sender thread (``send_text``), and the receiver reads; websocket-client's send lock
orders the writers. Nothing here knows what a message means; no secret leaves in a text
(``scrub``).
"""

from __future__ import annotations

import select
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Sequence

import websocket

from pttd.config_files import Secret
from pttd.errors import PttdError
from pttd.stt.assemblyai import protocol
from pttd.stt.assemblyai.close_policy import CANNOT_OPEN, http_close_code, http_refusal_policy
from pttd.stt.base import ClosePolicy

OP_TEXT = websocket.ABNF.OPCODE_TEXT
OP_BINARY = websocket.ABNF.OPCODE_BINARY
OP_CLOSE = websocket.ABNF.OPCODE_CLOSE


class UrlError(PttdError):
    """Raised by a URL provider (fleet mode: fetching a temporary token) when it cannot give a
    URL: ``code`` is reported as the close code, ``policy`` says what it means."""

    def __init__(self, code: int | None, reason: str, policy: ClosePolicy):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.policy = policy


class Refused(PttdError):
    """The link could not be opened; ``policy`` None leaves it to the close-code table."""

    def __init__(self, code: int | None, reason: str, policy: ClosePolicy | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.policy = policy


class Link:
    """One WebSocket connection; ``ws`` is None until :meth:`open` succeeds.

    ``url`` is the connect URL or a callable returning it; a ``token`` in it is a secret, like
    the API key. ``on_sent(opcode, nbytes)`` is told of every frame written (benchmarks).
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        api_key: Secret,
        *,
        connect_timeout: float,
        send_timeout: float,
        on_sent: Callable[[int, int], None] | None = None,
    ):
        self._url_source = url
        self._key = api_key
        self._secrets: list[str] = []
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._on_sent = on_sent
        self.ws: websocket.WebSocket | None = None
        self.frames_sent = 0
        self.audio_bytes_sent = 0

    def scrub(self, text: str) -> str:
        """``text`` with the key and any token replaced by ``***``."""
        key = self._key.reveal()
        if key:
            text = text.replace(key, "***")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # --- opening --------------------------------------------------------------------------------

    def open(self) -> None:
        """Resolve the URL and connect (blocking, bounded); raises :class:`Refused`."""
        self.ws = self._connect(self._resolve_url())

    def _resolve_url(self) -> str:
        if isinstance(self._url_source, str):
            return self._url_source
        try:
            url = self._url_source()
        except UrlError as exc:
            raise Refused(exc.code, self.scrub(exc.reason), policy=exc.policy) from None
        except Exception as exc:  # noqa: BLE001 - a provider bug is one refused session
            raise Refused(
                None,
                self.scrub(f"cannot get a URL: {type(exc).__name__}: {exc}"),
                policy=CANNOT_OPEN,
            ) from None
        for name, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query):
            if name == "token" and value:
                self._secrets.append(value)
        return url

    def _connect(self, url: str) -> websocket.WebSocket:
        headers = [
            f"AssemblyAI-Version: {protocol.API_VERSION}",
            f"User-Agent: {protocol.USER_AGENT}",
        ]
        if self._key.reveal():  # fleet mode has no key: the token is in the URL
            headers.insert(0, f"Authorization: {self._key.reveal()}")
        try:
            ws = websocket.create_connection(
                url,
                header=headers,
                timeout=self._connect_timeout,
                enable_multithread=True,
                sslopt={"cert_reqs": ssl.CERT_REQUIRED},
                # websocket-client checks UTF-8 in pure Python (~0.2 ms per 1 KB Turn here, on
                # the Turn -> final path); parse_message decodes strictly in C instead
                skip_utf8_validation=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            status = exc.status_code
            code = http_close_code(status)
            raise Refused(
                status if code is None else code,
                f"HTTP {status} at upgrade",
                policy=http_refusal_policy(status),
            ) from None
        except (OSError, websocket.WebSocketException) as exc:  # refused, unreachable, TLS
            raise Refused(None, self.scrub(f"{type(exc).__name__}: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - a URL or option websocket-client cannot use
            raise Refused(
                None, self.scrub(f"{type(exc).__name__}: {exc}"), policy=CANNOT_OPEN
            ) from None
        ws.settimeout(self._send_timeout)
        return ws

    # --- writing --------------------------------------------------------------------------------

    def write_frames(self, frames: Sequence[bytes], force_endpoint: bool) -> None:
        """Audio (and ForceEndpoint) in one write, under websocket-client's own send lock, which
        every other frame it sends (control texts, pongs, the close) also takes."""
        ws = self.ws
        if ws is None:
            raise websocket.WebSocketConnectionClosedException("not connected")
        parts = [websocket.ABNF.create_frame(pcm, OP_BINARY).format() for pcm in frames]
        if force_endpoint:
            parts.append(websocket.ABNF.create_frame(protocol.FORCE_ENDPOINT, OP_TEXT).format())
        with ws.lock:
            sock = ws.sock
            if sock is None:
                raise websocket.WebSocketConnectionClosedException("socket is already closed")
            sock.sendall(b"".join(parts) if len(parts) > 1 else parts[0])
        for pcm in frames:
            self.frames_sent += 1
            self.audio_bytes_sent += len(pcm)
            if self._on_sent:
                self._on_sent(OP_BINARY, len(pcm))
        if force_endpoint and self._on_sent:
            self._on_sent(OP_TEXT, len(protocol.FORCE_ENDPOINT))

    def send_text(self, text: str) -> None:
        """A control text (websocket-client locks each send)."""
        if self.ws is None:
            raise websocket.WebSocketConnectionClosedException("not connected")
        self.ws.send(text, OP_TEXT)
        if self._on_sent:
            self._on_sent(OP_TEXT, len(text))

    # --- reading and closing --------------------------------------------------------------------

    def readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for something to read (TLS may hold a record already)."""
        sock = self.ws.sock if self.ws is not None else None
        if sock is None:
            raise websocket.WebSocketConnectionClosedException("socket closed")
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        return bool(ready)

    def shutdown(self) -> None:
        """Any thread: end the connection under whoever waits on it (a read, a write)."""
        ws = self.ws
        sock = ws.sock if ws is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """The receiver's last act: close the WebSocket (briefly, it may be dead already)."""
        ws = self.ws
        if ws is not None:
            try:
                ws.close(timeout=0.2)
            except Exception:  # closing a dead socket can raise anything websocket-client likes
                pass
