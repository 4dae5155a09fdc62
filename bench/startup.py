"""Process start -> READY=1: how long ``pttd run`` takes until systemd would call it started.

    python bench/startup.py [--runs 10] [--journal] [--importtime]

Binds its own ``NOTIFY_SOCKET`` (a datagram socket in a temp dir, as systemd does for
``Type=notify``), runs the installed console script ``pttd run`` (the one beside this Python,
not a shell shim) with a WAV source and mock GPIO, and times from just before ``Popen`` to the
``READY=1`` datagram. READY comes once the WAV source has delivered its first 50 ms block, so
~50 ms of every figure is that block's real-time wait. Each daemon is then stopped with SIGTERM.
No server is needed: pttd opens no session until the first press.

``--importtime`` runs it once more under ``python -X importtime`` and prints the imports that
cost the most (cumulative, top level), i.e. what READY waits for.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pttd_argv() -> list[str]:
    script = Path(sys.executable).parent / "pttd"
    if script.is_file():
        return [sys.executable, str(script)]  # the console script's own code, no pyenv shim
    return [sys.executable, "-m", "pttd.cli"]


def make_config(tmp: Path, journal: bool) -> Path:
    from tests.daemon_proc import speech_wav, write_config

    wav = tmp / "mic.wav"
    speech_wav(wav, layout=((5000, False),))
    return write_config(tmp / "pttd.toml", url="ws://127.0.0.1:9/v3/ws", key="bench-key",
                        wav=wav, socket=tmp / "ctl.sock", stdout="text", journal=journal)


def one_run(argv: list[str], cfg: Path, tmp: Path, extra_env: dict | None = None,
            timeout: float = 15.0) -> tuple[float, subprocess.Popen]:
    """Seconds from Popen to READY=1; returns the still-running process too."""
    path = tmp / f"notify-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(timeout)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), PYTHONPATH=str(ROOT), **(extra_env or {}))
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv + ["run", "-c", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while True:
            data = sock.recv(4096)
            if b"READY=1" in data.split(b"\n"):
                return time.monotonic() - t0, proc
    except socket.timeout:
        proc.kill()
        raise SystemExit(f"no READY=1 within {timeout} s: {proc.stderr.read().decode()[-2000:]}")
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


def importtime_report(argv: list[str], cfg: Path, tmp: Path, top: int = 15) -> None:
    """Imports done before READY=1, by cumulative time (top-level entries only)."""
    ready_s, proc = one_run([argv[0], "-X", "importtime"] + argv[1:], cfg, tmp)
    err = stop(proc)
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line[len("import time:"):].split("|")
        self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2]
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((depth, cum_us, self_us, name.strip()))
    total = sum(cum for depth, cum, _, _ in rows if depth == 0)
    print(f"\nimports before READY (under -X importtime, READY at {ready_s * 1000:.0f} ms): "
          f"{total / 1000:.0f} ms in all, top level by cumulative time:")
    for depth, cum, self_us, name in sorted((r for r in rows if r[0] <= 1), key=lambda r: -r[1])[:top]:
        print(f"  {cum / 1000:7.1f} ms  {'  ' * depth}{name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--journal", action="store_true", help="output.journal = true (imports systemd.journal)")
    ap.add_argument("--importtime", action="store_true", help="also break down the imports")
    args = ap.parse_args()
    argv = pttd_argv()
    tmp = Path(tempfile.mkdtemp(prefix="pttd-startup-"))
    cfg = make_config(tmp, args.journal)
    one_run(argv, cfg, tmp)[1].kill()  # warm the page cache and .pyc files; not counted
    times = []
    for _ in range(args.runs):
        ready_s, proc = one_run(argv, cfg, tmp)
        times.append(ready_s)
        stop(proc)
    print(f"startup: {' '.join(argv)} run -c ... (WAV source, mock GPIO, journal={args.journal})")
    print(f"  process start -> READY=1  median {statistics.median(times) * 1000:6.0f} ms  "
          f"min {min(times) * 1000:.0f}  max {max(times) * 1000:.0f} ms  ({args.runs} runs)")
    if args.importtime:
        importtime_report(argv, cfg, tmp)


if __name__ == "__main__":
    main()
