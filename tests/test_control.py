"""The control socket over real Unix sockets in temporary directories."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from pttd.frontends.control.client import request, subscribe
from pttd.frontends.control.protocol import COMMANDS, MAX_LINE, ControlError
from pttd.frontends.control.server import ControlServer
from pttd.frontends.control.socket_file import SocketInUseError

IO_TIMEOUT = 3.0


class Handler:
    """The controller's side of ``handle``: records commands, answers status from a snapshot."""

    def __init__(self):
        self.state = "idle"
        self.cmds: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, cmd: str) -> dict:
        with self.lock:
            self.cmds.append(cmd)
        return {"ok": True, "state": self.state} if cmd == "status" else {"ok": True}


class Conn:
    """A raw client connection, for speaking (and mis-speaking) the protocol by hand."""

    def __init__(self, path: str):
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(IO_TIMEOUT)
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:  # the accept backlog is full for a moment: bounded retry
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict | None:
        raw = self.reader.readline()
        return json.loads(raw) if raw else None

    def ask(self, obj: dict) -> dict:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.line()

    def at_eof(self) -> bool:
        """True when the server closed the connection (after any lines still queued)."""
        return self.reader.read() == b""

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def wait_for(predicate, timeout: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "c.sock")


@pytest.fixture
def handler():
    return Handler()


@pytest.fixture
def server(path, handler):
    srv = ControlServer(path, handler)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def conns():
    opened: list[Conn] = []

    def open_conn(p: str) -> Conn:
        opened.append(Conn(p))
        return opened[-1]

    try:
        yield open_conn
    finally:
        for c in opened:
            c.close()


# --- commands -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "status"])
def test_command_round_trip(server, path, handler, cmd):
    assert request(path, cmd) == {"ok": True}
    assert handler.cmds == [cmd]


def test_status_returns_state(server, path, handler):
    handler.state = "listening"
    assert request(path, "status") == {"ok": True, "state": "listening"}


def test_pipelined_requests_answered_in_order(server, path, handler, conns):
    c = conns(path)
    c.send(b'{"cmd": "press"}\n{"cmd": "status"}\r\n\n{"cmd": "release"}\n')
    assert [c.line(), c.line(), c.line()] == [{"ok": True}, {"ok": True, "state": "idle"},
                                              {"ok": True}]
    assert handler.cmds == ["press", "status", "release"]


def test_last_line_without_newline_then_half_close(server, path, conns):
    """What ``printf '{"cmd":"status"}' | socat - UNIX-CONNECT:...`` does."""
    c = conns(path)
    c.send(b'{"cmd": "status"}')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.line() == {"ok": True, "state": "idle"}
    assert c.at_eof()


def test_handler_failure_is_an_error_reply(path, conns):
    def handle(cmd):
        if cmd == "press":
            raise RuntimeError("queue full")
        return "not a dict"

    with ControlServer(path, handle):
        c = conns(path)
        reply = c.ask({"cmd": "press"})
        assert reply["ok"] is False and "queue full" in reply["error"]
        assert c.ask({"cmd": "release"})["ok"] is False
        assert c.ask({"cmd": "press"})["ok"] is False  # still serving


# --- subscribe ------------------------------------------------------------------------------------

def test_subscribe_receives_events_in_order(server, path):
    server.publish({"event": "state", "state": "connecting"})  # before subscribing: not received
    events = subscribe(path, timeout=IO_TIMEOUT)
    assert server.subscriber_count == 1
    sent = [{"event": "partial", "text": f"w{i} grüße", "n": i} for i in range(100)]
    for ev in sent:
        server.publish(ev)
    assert [next(events) for _ in sent] == sent
    events.close()


def test_subscriber_input_is_ignored(server, path, conns):
    c = conns(path)
    assert c.ask({"cmd": "subscribe"}) == {"ok": True}
    c.send(b'garbage\n{"cmd": "press"}\n')
    server.publish({"event": "state", "state": "idle"})
    assert c.line() == {"event": "state", "state": "idle"}


def test_half_closed_subscriber_keeps_receiving(server, path, conns):
    """socat shuts down its sending side at stdin EOF but still reads."""
    c = conns(path)
    assert c.ask({"cmd": "subscribe"}) == {"ok": True}
    c.sock.shutdown(socket.SHUT_WR)
    assert not wait_for(lambda: server.subscriber_count == 0, timeout=0.2)
    server.publish({"event": "state", "state": "listening"})
    assert c.line() == {"event": "state", "state": "listening"}


def test_closed_subscriber_is_removed(server, path, conns):
    c = conns(path)
    assert c.ask({"cmd": "subscribe"}) == {"ok": True}
    c.close()
    assert wait_for(lambda: server.subscriber_count == 0)


def test_slow_subscriber_dropped_publish_never_blocks(path, handler):
    queue = 8
    payload = "x" * 65536  # fills the slow client's kernel buffer in a few events
    with ControlServer(path, handler, subscriber_queue=queue) as srv:
        slow = Conn(path)
        assert slow.ask({"cmd": "subscribe"}) == {"ok": True}
        fast = subscribe(path, timeout=IO_TIMEOUT)
        published, slowest_publish = 0, 0.0
        for _ in range(100):  # bounded: the slow one is dropped after ~queue + kernel buffer
            for _ in range(queue // 2):
                t0 = time.monotonic()
                srv.publish({"event": "partial", "n": published, "text": payload})
                slowest_publish = max(slowest_publish, time.monotonic() - t0)
                published += 1
            for _ in range(queue // 2):
                assert next(fast)["n"] == published - queue // 2 + _
            if srv.subscriber_count == 1:
                break
        assert srv.subscriber_count == 1, "slow subscriber was never dropped"
        assert slowest_publish < 0.5  # publish does no I/O; a generous bound, not a benchmark
        got = []
        while (raw := slow.reader.readline()).endswith(b"\n"):  # the last one may be cut off
            got.append(json.loads(raw)["n"])
        assert got == list(range(len(got))) and len(got) < published  # in order, then dropped
        assert slow.at_eof()
        srv.publish({"event": "state", "state": "idle"})
        assert next(fast) == {"event": "state", "state": "idle"}
        slow.close()
        fast.close()


def test_publish_without_subscribers_and_unencodable_event(server, path, caplog):
    server.publish({"event": "state", "state": "idle"})
    events = subscribe(path, timeout=IO_TIMEOUT)
    server.publish({"event": "bad", "obj": object()})
    server.publish({"event": "state", "state": "idle"})
    assert next(events) == {"event": "state", "state": "idle"}
    assert "cannot encode event" in caplog.text
    events.close()


# --- malformed input ----------------------------------------------------------------------------

@pytest.mark.parametrize("junk, error", [
    (b"not json\n", "not valid JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'"status"\n', "JSON object"),
    (b"{}\n", 'no "cmd"'),
    (b'{"cmd": "dance"}\n', "unknown cmd 'dance'"),
    (b'{"cmd": 5}\n', "unknown cmd"),
    (b'{"cmd": ["press"]}\n', "unknown cmd"),
    (b"\xff\xfe\x00\x81binary\n", "not valid UTF-8"),
    (b"[" * 60000 + b"\n", "not valid JSON"),  # deep nesting: RecursionError inside json
])
def test_garbage_gets_error_and_connection_survives(server, path, handler, conns, junk, error):
    c = conns(path)
    c.send(junk)
    reply = c.line()
    assert reply["ok"] is False and error in reply["error"]
    assert c.ask({"cmd": "status"}) == {"ok": True, "state": "idle"}
    assert handler.cmds == ["status"]


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_over_long_line_is_refused_and_closed(server, path, handler, conns, newline):
    c = conns(path)
    try:
        c.send(b'{"cmd": "' + b"a" * (MAX_LINE + 100) + b'"}' + newline)
    except BrokenPipeError:
        pass  # the server may close before taking all of it; the reply is still readable
    reply = c.line()
    assert reply["ok"] is False and "longer than" in reply["error"]
    assert c.at_eof()
    assert request(path, "status") == {"ok": True, "state": "idle"}
    assert handler.cmds == ["status"]


def test_half_line_then_disconnect(server, path, handler, conns):
    c = conns(path)
    c.send(b'{"cmd": "pre')
    c.close()
    assert request(path, "press") == {"ok": True}
    assert handler.cmds == ["press"]


def test_idle_half_line_client_does_not_block_others(server, path, conns):
    stuck = conns(path)
    stuck.send(b'{"cmd": ')
    non_reader = conns(path)
    non_reader.send(b'{"cmd": "status"}\n' * 5000)  # never reads its replies
    assert request(path, "status", timeout=IO_TIMEOUT) == {"ok": True, "state": "idle"}


def test_a_full_server_makes_room_for_a_new_client(path, handler, conns):
    """At max_clients the connection idle longest is closed; the newcomer is served."""
    with ControlServer(path, handler, max_clients=2) as srv:
        first = conns(path)
        second = conns(path)
        assert second.ask({"cmd": "status"})["ok"]  # second is now the more recently active
        assert wait_for(lambda: srv.client_count == 2)
        assert request(path, "status") == {"ok": True, "state": "idle"}
        reply = first.line()
        assert reply["ok"] is False and "idle longest" in reply["error"]
        assert first.at_eof()
        assert second.ask({"cmd": "status"})["ok"]  # the active one was kept


def test_idle_clients_cannot_lock_commands_out(path, handler, conns):
    """The issue's lock-out: max_clients connections that send nothing, then a command."""
    with ControlServer(path, handler):  # the daemon's defaults: 16 clients, 5 s idle limit
        idle = [conns(path) for _ in range(40)]
        idle[-1].send(b'{"cmd": "sta')  # half a request holds no slot either
        started = time.monotonic()
        assert request(path, "status", timeout=IO_TIMEOUT) == {"ok": True, "state": "idle"}
        assert time.monotonic() - started < 1.0  # at once, not after the idle limit
        assert handler.cmds == ["status"]


def test_idle_clients_are_closed_after_the_timeout(path, handler, conns):
    with ControlServer(path, handler, idle_timeout=0.3) as srv:
        silent = conns(path)
        half = conns(path)
        half.send(b'{"cmd": "status"')  # never completed: a slowloris
        garbage = conns(path)
        active = conns(path)
        started = time.monotonic()
        garbage.send(b"nonsense\n")  # an invalid request does not count as one
        assert garbage.line()["ok"] is False
        for _ in range(6):  # valid requests keep a connection open past the limit
            time.sleep(0.1)  # pacing the active client: 0.6 s in all, twice the limit
            assert active.ask({"cmd": "status"})["ok"]
        closed = {"ok": False, "error": "no complete request within 0.3 s; closing"}
        for c in (silent, half, garbage):
            assert c.line() == closed
            assert c.at_eof()
        assert 0.3 <= time.monotonic() - started < IO_TIMEOUT
        assert wait_for(lambda: srv.client_count == 1)
        assert active.ask({"cmd": "status"})["ok"]


def test_a_client_that_never_reads_its_replies_is_closed(path, handler, conns):
    with ControlServer(path, handler, idle_timeout=0.3) as srv:
        stuck = conns(path)
        try:
            stuck.send(b'{"cmd": "status"}\n' * 20000)  # replies pile up unread
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what this test wants
        assert wait_for(lambda: srv.client_count == 0)


def test_subscribers_are_exempt_from_the_idle_limit(path, handler, conns):
    with ControlServer(path, handler, idle_timeout=0.2) as srv:
        sub = conns(path)
        assert sub.ask({"cmd": "subscribe"}) == {"ok": True}
        idle = conns(path)
        assert idle.line()["ok"] is False and idle.at_eof()  # the limit has passed...
        srv.publish({"event": "state", "state": "listening"})
        assert sub.line() == {"event": "state", "state": "listening"}  # ...the subscriber stays
        assert srv.subscriber_count == 1


def test_subscribers_have_their_own_cap(path, handler, conns):
    with ControlServer(path, handler, max_clients=2, max_subscribers=3) as srv:
        subs = []
        for _ in range(3):  # more subscribers than command slots
            subs.append(conns(path))
            assert subs[-1].ask({"cmd": "subscribe"}) == {"ok": True}
        extra = conns(path)
        assert extra.ask({"cmd": "subscribe"}) == {"ok": False, "error": "too many subscribers (3)"}
        assert extra.at_eof()
        # subscribers do not take command slots: both command clients fit next to them
        a, b = conns(path), conns(path)
        assert a.ask({"cmd": "status"})["ok"] and b.ask({"cmd": "press"})["ok"]
        assert srv.subscriber_count == 3
        srv.publish({"event": "state", "state": "idle"})
        assert all(s.line() == {"event": "state", "state": "idle"} for s in subs)
        subs[0].close()
        assert wait_for(lambda: srv.subscriber_count == 2)
        assert subscribe(path, timeout=IO_TIMEOUT) is not None  # a freed place is taken again


def _status_ok(path: str) -> bool:
    try:
        return request(path, "status", timeout=1.0).get("ok") is True
    except ControlError:
        return False


# --- the socket file ------------------------------------------------------------------------------

def test_socket_mode_is_0660_and_umask_restored(path, handler):
    before = os.umask(0o022)
    try:
        with ControlServer(path, handler):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_stale_socket_is_replaced(path, handler):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    with ControlServer(path, handler):
        assert request(path, "status")["state"] == "idle"


def test_live_socket_is_in_use(server, path):
    with pytest.raises(SocketInUseError) as info:
        ControlServer(path, Handler()).start()
    assert str(info.value) == f"control socket {path} in use by a running pttd"
    assert request(path, "status")["ok"]  # the running one is undisturbed


def test_non_socket_file_is_left_alone(path, handler):
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(ControlError, match="is not a socket; not removing it"):
        ControlServer(path, handler).start()
    with open(path) as f:
        assert f.read() == "keep me"


def test_missing_directory_is_a_clear_error(tmp_path, handler):
    with pytest.raises(ControlError, match="directory .*missing.* does not exist"):
        ControlServer(str(tmp_path / "missing" / "c.sock"), handler).start()


def test_stop_joins_closes_and_removes_file(path, handler, conns):
    srv = ControlServer(path, handler)
    srv.start()
    idle = conns(path)
    events = subscribe(path, timeout=IO_TIMEOUT)
    srv.stop(timeout=2.0)
    assert not os.path.exists(path)
    assert not [t for t in threading.enumerate() if t.name == "pttd-control"]
    assert idle.at_eof()
    assert list(events) == []  # the iterator ends when the daemon goes away
    srv.stop()  # idempotent
    srv.publish({"event": "state", "state": "idle"})  # harmless after stop


def test_stop_leaves_a_replaced_socket_alone(path, handler):
    srv = ControlServer(path, handler)
    srv.start()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's socket now lives at the path
    try:
        srv.stop()
        assert os.path.exists(path)
    finally:
        other.close()


# --- client errors --------------------------------------------------------------------------------

def test_client_missing_socket(path):
    with pytest.raises(ControlError, match=f"no pttd running\\? socket {path} not found"):
        request(path, "status")
    with pytest.raises(ControlError, match="not found"):
        subscribe(path)  # raised at the call, not on first iteration


def test_client_stale_socket(path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(ControlError, match="refuses connections"):
        request(path, "status")


def test_client_timeout(path):
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)  # the kernel accepts the connection; nobody ever answers
    try:
        with pytest.raises(ControlError, match="timed out after 0.2 s"):
            request(path, "status", timeout=0.2)
    finally:
        mute.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_client_permission_denied(server, path):
    os.chmod(path, 0o000)
    with pytest.raises(ControlError, match="permission denied"):
        request(path, "status")


def test_client_reports_a_line_cut_off(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve_once():
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(b'{"ok": true}\n{"event": "state"}\n{"event": "par')
        conn.close()

    helper = threading.Thread(target=serve_once, daemon=True)
    helper.start()
    try:
        events = subscribe(path, timeout=IO_TIMEOUT)
        assert next(events) == {"event": "state"}
        with pytest.raises(ControlError, match="mid-line"):
            next(events)
    finally:
        helper.join(IO_TIMEOUT)
        listener.close()
    assert not helper.is_alive()


# --- pttd run: the lock-out from issue 23 ---------------------------------------------------------

def test_daemon_answers_pttd_status_with_idle_clients_connected(tmp_path, fake_v3):
    """40 connections that send nothing, then ``pttd status`` (the CLI) within 10 s."""
    import subprocess
    import sys

    from tests.daemon_proc import E2E_KEY, DaemonProcess, speech_wav, write_config

    srv = fake_v3(script=["hello"], api_keys={E2E_KEY})
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    sock = tmp_path / "ctl.sock"
    d = DaemonProcess(write_config(tmp_path / "pttd.toml", url=srv.url, key=E2E_KEY, wav=wav,
                                   socket=sock), sock)
    idle: list[Conn] = []
    try:
        d.wait_ready()
        idle = [Conn(str(sock)) for _ in range(40)]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pttd.cli", "status", "--socket", str(sock)],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["state"] == "idle"
        assert time.monotonic() - started < 10
        # and the idle ones are closed after the daemon's limit (5 s), not kept forever
        for c in idle:
            c.sock.settimeout(10)
            assert c.line()["ok"] is False  # "... idle longest" or "no complete request ..."
            assert c.at_eof()
        code, _ = d.stop()
        assert code == 0
    finally:
        for c in idle:
            c.close()
        d.kill()
