"""The kiosk endpoint: a real websockets server, real clients, and ``pttd run`` end to end.

In-process tests drive ``KioskServer`` directly (``emit`` as the Outputs worker would, a small
recording ``handle`` as the controller); the end-to-end ones run ``pttd run`` with the fake server.
"""
from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from pttd.frontends.control.protocol import MAX_LINE
from pttd.frontends.kiosk import KioskServer
from tests.daemon_proc import DaemonProcess, speech_wav, write_config

KEY = "kiosk-key-0123456789"
TOKEN = "s3cret-token"


# --- helpers --------------------------------------------------------------------------------------

class Recorder:
    """Stands in for Controller.command: records commands, answers like it does."""

    def __init__(self):
        self.commands: "queue.Queue[str]" = queue.Queue()

    def __call__(self, cmd: str) -> dict:
        self.commands.put(cmd)
        return {"ok": True, "state": "idle"} if cmd == "status" else {"ok": True}

    def next(self, timeout: float = 5.0) -> str:
        return self.commands.get(timeout=timeout)


@pytest.fixture
def kiosk_factory():
    servers = []

    def make(listen="127.0.0.1:0", **kwargs) -> tuple[KioskServer, Recorder]:
        rec = Recorder()
        server = KioskServer(listen, rec, **kwargs)
        server.start()
        servers.append(server)
        return server, rec

    yield make
    for server in servers:
        server.close()


def ws_url(server: KioskServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/ws{query}"


def open_ws(url: str, **kwargs):
    return connect(url, proxy=None, open_timeout=5, close_timeout=2, **kwargs)


def recv_json(ws, timeout: float = 5.0) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def recv_until(ws, pred, timeout: float = 10.0) -> list[dict]:
    """Messages up to and including the first that matches ``pred`` (bounded)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching message; saw {seen}")
        msg = recv_json(ws, remaining)
        seen.append(msg)
        if pred(msg):
            return seen


def via_host(server: KioskServer, host: str, query: str = "") -> dict:
    """connect() arguments for a URL naming ``host`` (the Host header) that reaches ``server``."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return {"url": f"ws://{host}/ws{query}", "sock": sock}


def refused_status(url: str, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as info:
        open_ws(url, **kwargs)
    return info.value.response.status_code


def wait_for(pred, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling server-side counters with a deadline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on port {port}")
            time.sleep(0.05)  # waiting for the daemon to bind, with a deadline


def start_daemon(tmp_path: Path, srv, *, port: int, layout, kiosk_extra: str = "") -> DaemonProcess:
    """``pttd run`` with a WAV mic, mock GPIO, the fake server and ``[kiosk] listen`` on ``port``."""
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=layout)
    sock = tmp_path / "ctl.sock"
    extra = f'\n[kiosk]\nlisten = "127.0.0.1:{port}"\n{kiosk_extra}\n'
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock,
                       extra=extra)
    d = DaemonProcess(cfg, sock)
    try:
        d.wait_ready()
        wait_port(port)
    except BaseException:
        d.kill()
        raise
    return d


# --- snapshot, commands, events -----------------------------------------------------------------

def test_snapshot_first_then_events(kiosk_factory):
    server, _ = kiosk_factory()
    server.emit({"event": "state", "state": "listening", "ts": 1.0})
    final = {"event": "final", "text": "Earlier.", "press_id": 1, "ts": 2.0}
    server.emit(final)
    with open_ws(ws_url(server)) as ws:
        snap = recv_json(ws)
        assert snap["event"] == "snapshot"
        assert snap["state"] == "listening" and snap["last_final"] == final
        server.emit({"event": "partial", "text": "hel", "turn_order": 1, "ts": 3.0})
        server.emit({"event": "state", "state": "finalizing", "ts": 4.0})
        assert recv_json(ws)["text"] == "hel"
        assert recv_json(ws)["state"] == "finalizing"


def test_commands_round_trip(kiosk_factory):
    server, rec = kiosk_factory()
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)  # snapshot
        for cmd in ("press", "release", "toggle", "cancel"):
            ws.send(json.dumps({"cmd": cmd}))
            assert recv_json(ws) == {"ok": True}
            assert rec.next() == cmd
        ws.send('{"cmd": "status"}')
        assert recv_json(ws) == {"ok": True, "state": "idle"}
        ws.send(b'{"cmd": "subscribe"}')  # binary frames work too; already subscribed
        assert recv_json(ws) == {"ok": True}


@pytest.mark.parametrize("garbage", ["not json", "[]", '{"cmd": "dance"}', '{"no": "cmd"}',
                                     b"\xff\xfe", '{"cmd": 7}', ""])
def test_garbage_gets_ok_false_and_the_connection_stays(kiosk_factory, garbage):
    server, rec = kiosk_factory()
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        ws.send(garbage)
        reply = recv_json(ws)
        assert reply["ok"] is False and reply["error"]
        ws.send('{"cmd": "press"}')
        assert recv_json(ws) == {"ok": True} and rec.next() == "press"


def test_oversized_message_closes_the_connection(kiosk_factory):
    server, _ = kiosk_factory()
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        ws.send("x" * (MAX_LINE + 1))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1009


def test_a_client_that_leaves_while_holding_releases(kiosk_factory):
    server, rec = kiosk_factory()
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        ws.send('{"cmd": "press"}')
        recv_json(ws)
    assert rec.next() == "press" and rec.next() == "release"


def test_stopping_refuses_commands_but_delivers_events_until_closed(kiosk_factory):
    server, rec = kiosk_factory()
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        server.stop_commands()
        ws.send('{"cmd": "press"}')
        assert recv_json(ws) == {"ok": False, "error": "pttd is stopping"}
        server.emit({"event": "final", "text": "Last words.", "ts": 1.0})
        server.close()
        assert recv_json(ws)["text"] == "Last words."
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd.code == 1001
    assert rec.commands.empty()


# --- slow clients ---------------------------------------------------------------------------------

def raw_ws_client(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_slow_client_is_dropped_while_others_continue(kiosk_factory, caplog):
    server, _ = kiosk_factory(client_queue=8)
    slow = raw_ws_client(server.port)
    try:
        with open_ws(ws_url(server), max_size=None) as good:
            recv_json(good)
            wait_for(lambda: server.client_count == 2, what="both clients registered")
            text = "w" * 60000
            emitted = 0
            slowest_emit = 0.0
            while server.client_count == 2:
                assert emitted < 1000, "the slow client was never dropped"
                t0 = time.monotonic()
                server.emit({"event": "partial", "text": text, "turn_order": emitted, "ts": 0.0})
                slowest_emit = max(slowest_emit, time.monotonic() - t0)
                assert recv_json(good)["turn_order"] == emitted  # the good one gets every event
                emitted += 1
            server.emit({"event": "final", "text": "still here", "ts": 0.0})
            assert recv_json(good)["text"] == "still here"
        assert slowest_emit < 0.1  # emit never waited for a client
        assert "dropping client" in caplog.text
    finally:
        slow.close()


# --- who may connect ------------------------------------------------------------------------------

def test_token_required_when_set(kiosk_factory):
    server, _ = kiosk_factory(token=TOKEN)
    assert refused_status(ws_url(server)) == 401
    assert refused_status(ws_url(server, "?token=wrong")) == 403
    assert refused_status(ws_url(server), additional_headers={"Authorization": "Bearer nope"}) == 403
    with open_ws(ws_url(server, f"?token={TOKEN}")) as ws:
        assert recv_json(ws)["event"] == "snapshot"
    with open_ws(ws_url(server), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert recv_json(ws)["event"] == "snapshot"


def test_origin_rules_on_loopback(kiosk_factory):
    server, _ = kiosk_factory(allowed_origins=["http://localhost:3000"])
    p = server.port
    for bad in ("http://evil.example", f"http://evil.example:{p}", "null",
                f"http://127.0.0.1:{p + 1}", f"https://127.0.0.1:{p}"):
        assert refused_status(ws_url(server), origin=bad) == 403, bad
    # a DNS-rebinding page: its Origin matches the Host it used, but without a token that is no pass
    assert refused_status(**via_host(server, f"evil.example:{p}"), origin=f"http://evil.example:{p}") == 403
    for good in (f"http://127.0.0.1:{p}", f"http://LOCALHOST:{p}", f"http://[::1]:{p}",
                 "http://localhost:3000", None):
        with open_ws(ws_url(server), origin=good) as ws:
            assert recv_json(ws)["event"] == "snapshot", good


def test_origin_same_host_allowed_only_with_token(kiosk_factory):
    server, _ = kiosk_factory("0.0.0.0:0", token=TOKEN)
    host, q = f"kiosk.lan:{server.port}", f"?token={TOKEN}"
    with open_ws(**via_host(server, host, q), origin=f"http://{host}") as ws:
        assert recv_json(ws)["event"] == "snapshot"
    assert refused_status(**via_host(server, host, q), origin="http://other.lan") == 403
    assert refused_status(**via_host(server, host), origin=f"http://{host}") == 401
    assert refused_status(ws_url(server, q), additional_headers={"Origin": "http://a",
                                                                 "origin": "http://b"}) == 400


def test_too_many_clients_get_503(kiosk_factory):
    server, _ = kiosk_factory(max_clients=1)
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        assert refused_status(ws_url(server)) == 503


# --- the page over plain HTTP ---------------------------------------------------------------------

def http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_page_served_over_http(kiosk_factory):
    server, _ = kiosk_factory(token=TOKEN)  # the page itself is public: it holds no secret
    status, headers, body = http_get(server.port, f"/?token={TOKEN}")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="mic"' in body and b"kiosk.js" in body
    status, headers, body = http_get(server.port, "/kiosk.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert http_get(server.port, "/kiosk.css")[0] == 200
    assert http_get(server.port, "/../setup.cfg")[0] == 404
    assert http_get(server.port, "/nope")[0] == 404
    assert http_get(server.port, f"/ws?token={TOKEN}")[0] == 426  # not an upgrade


# --- pttd run end to end --------------------------------------------------------------------------

def run_pttd(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)


def test_non_loopback_listen_without_token_exits_2(tmp_path):
    cfg = tmp_path / "pttd.toml"
    cfg.write_text('[kiosk]\nlisten = "0.0.0.0:8766"\n')
    result = run_pttd(cfg)
    assert result.returncode == 2
    assert "kiosk.token is required" in result.stderr


def test_kiosk_port_in_use_exits_2(tmp_path, fake_v3):
    srv = fake_v3(script=["unused"], api_keys={KEY})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        wav = tmp_path / "mic.wav"
        speech_wav(wav)
        cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav,
                           socket=tmp_path / "ctl.sock",
                           extra=f'\n[kiosk]\nlisten = "127.0.0.1:{port}"\n')
        result = run_pttd(cfg)
    assert result.returncode == 2
    assert "kiosk" in result.stderr and str(port) in result.stderr


LONG_SPEECH = ((1000, False), (30000, True))


def test_daemon_turn_over_the_websocket(tmp_path, fake_v3):
    srv = fake_v3(script=["turn on the lights"], api_keys={KEY})
    port = free_port()
    d = start_daemon(tmp_path, srv, port=port, layout=LONG_SPEECH)
    try:
        with open_ws(f"ws://127.0.0.1:{port}/ws") as ws:
            snap = recv_json(ws)
            assert (snap["event"], snap["state"], snap["last_final"]) == ("snapshot", "idle", None)
            d.wait_audio_ms(1500)
            ws.send('{"cmd": "press"}')
            recv_until(ws, lambda m: m == {"ok": True})
            seen = recv_until(ws, lambda m: m.get("event") == "partial")
            ws.send('{"cmd": "status"}')
            status = recv_until(ws, lambda m: "ok" in m)[-1]
            assert status["ok"] and status["state"] in ("connecting", "listening")
            ws.send('{"cmd": "release"}')
            seen += recv_until(ws, lambda m: m.get("event") == "final", timeout=15)
            final = seen[-1]
            assert final["text"] == "Turn on the lights." and final["press_id"] == 1
            states = [m["state"] for m in seen if m.get("event") == "state"]
            assert "listening" in states
        with open_ws(f"ws://127.0.0.1:{port}/ws") as ws:  # a new client's snapshot has the final
            snap = recv_json(ws)
            assert snap["last_final"]["text"] == "Turn on the lights."
        code, took = d.stop()
        assert code == 0 and took < 5.0
    finally:
        d.kill()


def test_sigterm_mid_turn_the_final_still_reaches_the_page(tmp_path, fake_v3):
    srv = fake_v3(script=["cut short"], api_keys={KEY})
    port = free_port()
    d = start_daemon(tmp_path, srv, port=port, layout=LONG_SPEECH)
    try:
        with open_ws(f"ws://127.0.0.1:{port}/ws") as ws:
            recv_json(ws)
            d.wait_audio_ms(1500)
            ws.send('{"cmd": "press"}')
            recv_until(ws, lambda m: m.get("event") == "partial")
            result: dict = {}
            stopper = threading.Thread(target=lambda: result.update(code=d.stop()))
            stopper.start()
            seen = recv_until(ws, lambda m: m.get("event") == "final", timeout=10)
            assert seen[-1]["text"] == "Cut short."
            with pytest.raises(ConnectionClosed) as info:
                recv_until(ws, lambda m: False, timeout=10)
            assert info.value.rcvd.code == 1001
            stopper.join(10)
        code, took = result["code"]
        assert code == 0 and took < 5.0
    finally:
        d.kill()


# --- issue 23: connection floods, and who can reach a kiosk without a token ----------------------

def test_connection_flood_cannot_starve_the_daemon(tmp_path, fake_v3):
    """Hundreds of TCP connections to the kiosk that never speak, against a daemon limited to 256
    file descriptors: ``pttd status`` still answers, and a real kiosk client still gets in."""
    import shutil

    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) not installed")
    srv = fake_v3(script=["flooded"], api_keys={KEY})
    port = free_port()
    wav = tmp_path / "mic.wav"
    speech_wav(wav, layout=LONG_SPEECH)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock,
                       extra=f'\n[kiosk]\nlisten = "127.0.0.1:{port}"\n')
    argv = [prlimit, "--nofile=256:256", sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)]
    d = DaemonProcess(cfg, sock, argv=argv)
    flood: list[socket.socket] = []
    try:
        d.wait_ready()
        wait_port(port)
        for _ in range(400):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break  # the daemon stopped accepting: what the status check below catches
        status = subprocess.run([sys.executable, "-m", "pttd.cli", "status", "--socket", str(sock)],
                                capture_output=True, text=True, timeout=15)
        assert status.returncode == 0, status.stderr
        assert len(flood) == 400
        with open_ws(f"ws://127.0.0.1:{port}/ws") as ws:
            assert recv_json(ws)["event"] == "snapshot"
            ws.send('{"cmd": "status"}')
            assert recv_until(ws, lambda m: "ok" in m)[-1]["ok"]
        for s in flood:  # closed by the daemon: the oldest at once, the rest after 5 s of silence
            s.settimeout(10)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass  # aborted: an RST instead of a FIN
        assert d.stop()[0] == 0
        logged = "".join(d.stderr_lines)
        assert "closing the oldest that has not finished its handshake" in logged
        assert "every program on this machine" in logged  # no token: the documented exposure
    finally:
        for s in flood:
            s.close()
        d.kill()


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_silent_connection_is_closed_after_the_handshake_timeout(kiosk_factory):
    from pttd.frontends.kiosk import HANDSHAKE_TIMEOUT_S

    server, _ = kiosk_factory()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent, \
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as half:
        half.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        assert _closed_by_server(silent, HANDSHAKE_TIMEOUT_S + 3)
        assert _closed_by_server(half, 3)
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 3


def test_at_the_connection_cap_the_oldest_handshake_makes_room(kiosk_factory):
    server, rec = kiosk_factory(max_clients=2, max_connections=4)
    with open_ws(ws_url(server)) as first:
        assert recv_json(first)["event"] == "snapshot"
        raws = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
        try:
            with open_ws(ws_url(server)) as second:  # the fifth connection
                assert recv_json(second)["event"] == "snapshot"
                assert _closed_by_server(raws[0], 3)  # the oldest silent one made room
                assert not _closed_by_server(raws[2], 0.2)
                second.send('{"cmd": "press"}')
                assert recv_json(second) == {"ok": True} and rec.next() == "press"
            server.emit({"event": "state", "state": "idle"})
            assert recv_json(first) == {"event": "state", "state": "idle"}  # upgraded: never chosen
        finally:
            for r in raws:
                r.close()


def test_without_a_token_loopback_is_open_to_local_programs_and_says_so(kiosk_factory, caplog):
    """The decision for issue 23 point 8: documented and logged, not refused (the contract needs
    a token only off loopback). A program without Origin or token may press."""
    server, rec = kiosk_factory()
    assert "every program on this machine" in caplog.text
    with open_ws(ws_url(server)) as ws:
        recv_json(ws)
        ws.send('{"cmd": "press"}')
        assert recv_json(ws) == {"ok": True} and rec.next() == "press"
    caplog.clear()
    guarded, _ = kiosk_factory(token=TOKEN)
    assert "every program on this machine" not in caplog.text
    assert refused_status(ws_url(guarded)) == 401  # the remedy: a token shuts such programs out
