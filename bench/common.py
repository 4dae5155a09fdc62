"""Shared pieces for the benchmarks: a fake server in its own process, and the numbers."""
from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"

_SERVER = """
import sys, signal
from tests.fakes.fake_v3 import FakeV3Server
srv = FakeV3Server(script=sys.argv[1].split("|"), api_keys={sys.argv[2]}, expires_in_s=3600,
                   max_lead_s=float(sys.argv[3]))
srv.start()
print(srv.url, flush=True)
sys.stdin.read()   # runs until the benchmark closes our stdin
import json
out = []
for rec in srv.sessions:
    out.append({"fe": [r.t for r in rec.received if r.kind == "text" and isinstance(r.data, dict)
                       and r.data.get("type") == "ForceEndpoint"],
                "eot": [s.t for s in rec.sent if s.message.get("type") == "Turn"
                        and s.message.get("end_of_turn")]})
print(json.dumps(out), flush=True)
srv.stop()
"""


class ServerHandle(str):
    """The server's URL; after the ``with`` block, ``records`` holds its per-session timings."""

    records: list


@contextlib.contextmanager
def fake_server_process(script=("hello world",), max_lead_s: float = 3.0):
    """The fake v3 server in a separate process, so its CPU is not counted as the client's.

    Server-side times are ``time.monotonic()``, the same clock as ours on one machine.
    """
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, "|".join(script), KEY, str(max_lead_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("ws://"):
            raise RuntimeError("fake server did not start")
        handle = ServerHandle(url)
        yield handle
        proc.stdin.close()
        import json
        handle.records = json.loads(proc.stdout.readline() or "[]")
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_seconds() -> float:
    """This process's user+system CPU time (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def percentile(values, p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def pacer(period_s: float):
    """Yields frame indexes at absolute deadlines (no drift); sleeping is the point here."""
    t0 = time.monotonic()
    i = 0
    while True:
        delay = t0 + i * period_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield i, t0 + i * period_s
        i += 1
