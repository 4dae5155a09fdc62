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


def _pythonpath() -> str:
    """$PYTHONPATH first (e.g. another copy of the package to compare), then the repository."""
    return os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))


def pttd_argv() -> list[str]:
    script = Path(sys.executable).parent / "pttd"
    if script.is_file():
        return [sys.executable, str(script)]  # the console script's own code, no pyenv shim
    return [sys.executable, "-m", "pttd.cli"]


def make_config(tmp: Path, journal: bool) -> Path:
    """Own config and WAV (5 s of silence), so the bench does not lean on the test helpers."""
    import wave

    wav = tmp / "mic.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * 16000 * 5))
    cfg = tmp / "pttd.toml"
    cfg.write_text(f"""
[stt]
url = "ws://127.0.0.1:9/v3/ws"
api_key = "bench-key"
[audio]
source = "wav"
wav = "{wav}"
[gpio]
pin_factory = "mock"
[control]
socket = "{tmp / 'ctl.sock'}"
[output]
stdout = "text"
journal = {"true" if journal else "false"}
""")
    return cfg


def one_run(argv: list[str], cfg: Path, tmp: Path, extra_env: dict | None = None,
            timeout: float = 15.0) -> tuple[float, subprocess.Popen]:
    """Seconds from Popen to READY=1; returns the still-running process too."""
    path = tmp / f"notify-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(timeout)
    env = dict(os.environ, NOTIFY_SOCKET=str(path), PYTHONPATH=_pythonpath(),
               OPENBLAS_NUM_THREADS="1", **(extra_env or {}))   # as systemd/pttd.service sets
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


# Incremental cost of each import, in this order, in one fresh interpreter: each library is
# charged for what it loads that was not loaded before (third-party first, then pttd's modules).
IMPORT_ORDER = ["json", "ssl", "websocket", "numpy", "gpiozero", "gpiozero.pins.mock", "asyncio",
                "websockets.asyncio.server", "systemd.journal", "alsaaudio", "pttd.config",
                "pttd.stt.assemblyai.protocol", "pttd.stt.assemblyai.session",
                "pttd.core.controller", "pttd.app.daemon", "pttd.audio.capture",
                "pttd.outputs.fanout", "pttd.outputs.stdout", "pttd.outputs.journal",
                "pttd.frontends.control.server", "pttd.frontends.peripherals",
                "pttd.app.service", "pttd.frontends.kiosk", "pttd.frontends.mqtt",
                "pttd.outputs.keyboard", "pttd.outputs.hook", "pttd.cli"]
SDK_ORDER = ["json", "ssl", "websockets.sync.client", "pydantic", "httpx", "assemblyai",
             "assemblyai.streaming.v3"]

_COST = r"""
import importlib, sys, time
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
base_rss, base_n = rss(), len(sys.modules)
print(f"  {'ms':>6} {'MB RSS':>7} {'modules':>7}  (interpreter alone: {base_rss:.1f} MB, {base_n} modules)")
for name in sys.argv[1:]:
    r0, n0, t0 = rss(), len(sys.modules), time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception as exc:
        print(f"  {'-':>6} {'-':>7} {'-':>7}  {name}: {type(exc).__name__}")
        continue
    print(f"  {(time.perf_counter() - t0) * 1000:6.1f} {rss() - r0:7.2f} {len(sys.modules) - n0:7d}  {name}")
print(f"  total {rss() - base_rss:.1f} MB RSS over the bare interpreter, {len(sys.modules)} modules")
"""


def import_costs(order: list[str], title: str) -> None:
    print(f"\n{title} (incremental, one fresh interpreter, this order):")
    subprocess.run([sys.executable, "-c", _COST, *order], env=dict(os.environ, PYTHONPATH=_pythonpath()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--journal", action="store_true", help="output.journal = true (imports systemd.journal)")
    ap.add_argument("--importtime", action="store_true", help="also break down the imports")
    ap.add_argument("--import-costs", action="store_true",
                    help="also print time and RSS of each library pttd (and the SDK) imports")
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
    if args.import_costs:
        import_costs(IMPORT_ORDER, "pttd's imports")
        import_costs(SDK_ORDER, "the SDK's imports")


if __name__ == "__main__":
    main()
