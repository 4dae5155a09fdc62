"""One control-socket client: its socket, its input buffer and its queue of lines to send.

All of its I/O is non-blocking and runs on the server's one thread, so a client that stops
reading or sends garbage fills only its own bounded buffers. ``out`` is the one field another
thread touches: ``publish`` (the controller's thread) appends to a subscriber's under the
server's lock.
"""

from __future__ import annotations

import collections
import select
import selectors
import socket

from pttd.frontends.control.protocol import MAX_LINE

_RECV_SIZE = 65536


class Connection:
    """One client's socket and buffers; the server decides what to answer and when to drop it."""

    __slots__ = (
        "sock",
        "inbuf",
        "out",
        "offset",
        "subscribed",
        "eof",
        "closing",
        "overflow",
        "mask",
        "fd",
        "deadline",
    )

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.out: collections.deque[bytes] = collections.deque()
        self.offset = 0  # bytes of out[0] already sent
        self.subscribed = False
        self.eof = False  # peer shut down its sending side
        self.closing = False  # close once ``out`` is flushed
        self.overflow = False  # set by publish: fell behind, drop it
        self.mask = 0  # selector events currently registered
        self.deadline = deadline  # monotonic time by which the next request must be complete

    def read(self) -> None:
        """Take what the peer sent; after ``subscribe`` its input is ignored."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            # A subscriber may only have shut its sending side (socat does on stdin EOF):
            # keep streaming to it unless the peer is gone entirely.
            if self.subscribed and _peer_gone(self.sock):
                self.closing = True
        elif not self.subscribed:
            self.inbuf += data

    def next_line(self) -> bytes | None:
        """The next request line without its newline; None when none is complete yet.

        At EOF the unterminated rest is the last line. A partial line already longer than
        ``MAX_LINE`` is returned as it is, for the caller to refuse.
        """
        end = self.inbuf.find(b"\n")
        if end < 0:
            if not self.inbuf or (len(self.inbuf) <= MAX_LINE and not self.eof):
                return None
            end = len(self.inbuf)
        line = bytes(self.inbuf[:end])
        del self.inbuf[: end + 1]
        return line

    def flush(self) -> None:
        """Send queued lines until the kernel buffer is full; keep partial-send progress.

        The caller holds the server's lock (``publish`` may be appending to ``out``).
        """
        while self.out:
            head = self.out[0]
            try:
                sent = self.sock.send(memoryview(head)[self.offset :], socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            self.offset += sent
            if self.offset < len(head):
                return
            self.out.popleft()
            self.offset = 0

    def watch(self, sel: selectors.BaseSelector) -> None:
        """Register for what it needs now: reading only until a request line is complete (so a
        chatty client waits for its answers), writing while lines are queued."""
        want = 0
        if not self.eof and not self.closing and b"\n" not in self.inbuf:
            want |= selectors.EVENT_READ
        if self.out:
            want |= selectors.EVENT_WRITE
        if want == self.mask:
            return
        if self.mask == 0:
            sel.register(self.sock, want, self)
        elif want == 0:
            sel.unregister(self.sock)
        else:
            sel.modify(self.sock, want, self)
        self.mask = want

    def tell(self, data: bytes) -> None:
        """A last word before closing, best effort: the client may not be reading."""
        try:
            self.sock.send(data, socket.MSG_NOSIGNAL)
        except OSError:
            pass

    def close(self, sel: selectors.BaseSelector) -> None:
        if self.mask:
            sel.unregister(self.sock)
            self.mask = 0
        self.sock.close()


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer closed both directions (POLLHUP), not just shut down its writes."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
