"""Soak: minutes of press/release cycles against the fake server with random faults injected.

    python bench/soak.py [--minutes 10] [--seed 1]

``pttd run`` runs as a subprocess (WAV mic of speech bursts, mock GPIO, jsonl stdout); the fake
server (in this process) gets a random fault for about a third of its connections. Prints turns
pressed / delivered / duplicated / missing, and the daemon's RSS and thread count at the start
and the end (from /proc), so leaks and stuck threads show.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.faults import Faults  # noqa: E402
from tests.daemon_proc import DaemonProcess, speech_wav, write_config  # noqa: E402
from tests.fakes.fake_v3 import FakeV3Server  # noqa: E402

KEY = "soak-key"
CYCLE_MS, SPEECH_MS = 4000, 1500


def random_fault(rng: random.Random) -> Faults:
    if rng.random() > 0.35:
        return Faults()
    return rng.choice([
        Faults(drop_after_frames=rng.randint(3, 30)),
        Faults(drop_on_force_endpoint=True),
        Faults(turn_delay_s=rng.uniform(0.2, 2.0)),
        Faults(close_before_begin=(3005, "Session Cancelled: An error occurred")),
        Faults(error_without_close=rng.randint(3, 30)),
        Faults(unknown_messages=True),
        Faults(begin_delay_s=rng.uniform(0.5, 3.0)),
        Faults(no_termination="ignore"),
    ])


def proc_stats(pid: int) -> tuple[float, int]:
    rss_kb, threads = 0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss_kb / 1024, threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dump", metavar="DIR", help="write the daemon's events and debug log here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    presses = int(args.minutes * 60_000 // CYCLE_MS)
    tmp = Path(tempfile.mkdtemp(prefix="pttd-soak-"))
    layout = [(1000, False)] + [(SPEECH_MS, True), (CYCLE_MS - SPEECH_MS, False)] * presses
    speech_wav(tmp / "mic.wav", layout=tuple(layout) + ((10_000, False),))
    srv = FakeV3Server(script=["hello world"], api_keys={KEY}, expires_in_s=3600)
    srv.start()
    srv.queue_faults(*[random_fault(rng) for _ in range(presses * 3)])
    cfg = write_config(tmp / "pttd.toml", url=srv.url, key=KEY, wav=tmp / "mic.wav",
                       socket=tmp / "ctl.sock")
    argv = [sys.executable, "-m", "pttd.cli"] + (["-v"] if args.dump else []) + ["run", "-c", str(cfg)]
    d = DaemonProcess(cfg, tmp / "ctl.sock", argv=argv)
    try:
        d.wait_ready()
        start_stats = proc_stats(d.proc.pid)
        t0 = time.monotonic()
        for k in range(presses):
            speech = 1000 + k * CYCLE_MS
            d.wait_audio_ms(speech - 300, timeout=60)
            d.command("press")
            d.wait_audio_ms(speech + SPEECH_MS + 200, timeout=60)
            d.command("release")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len({e["press_id"] for e in d.all_events if e["event"] == "final"}) >= presses:
                break
            time.sleep(0.2)  # waiting for stragglers, bounded by the deadline
        end_stats = proc_stats(d.proc.pid)
        code, took = d.stop()
    finally:
        d.kill()
        srv.stop()
    if args.dump:
        import json
        out = Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in d.all_events))
        (out / "stderr.log").write_text("".join(d.stderr_lines))
        (out / "faults.txt").write_text("".join(f"{c.index} {c.faults}\n" for c in srv.connections))
    finals = [e for e in d.all_events if e["event"] == "final"]
    per_press = collections.Counter(e["press_id"] for e in finals)
    errors = collections.Counter(e["code"] for e in d.all_events if e["event"] == "error")
    print(f"soak: {time.monotonic() - t0:.0f} s, seed {args.seed}, "
          f"{srv.connection_attempts} connection attempts")
    print(f"  turns pressed    {presses}")
    print(f"  turns delivered  {len(per_press)}")
    print(f"  duplicated       {sum(n - 1 for n in per_press.values() if n > 1)}")
    print(f"  missing          {presses - len(per_press)}")
    print(f"  error events     {dict(errors)}")
    print(f"  RSS start/end    {start_stats[0]:.1f} / {end_stats[0]:.1f} MB")
    print(f"  threads start/end {start_stats[1]} / {end_stats[1]}")
    print(f"  exit code {code}, stop took {took:.2f} s, tracebacks: "
          f"{sum('Traceback' in line for line in d.stderr_lines)}")
    missing = sorted(set(range(1, presses + 1)) - set(per_press))
    if missing:
        print(f"  missing press ids: {missing}")
        for line in d.stderr_lines:
            if "WARNING" in line or "ERROR" in line or "dropping" in line:
                print("   ", line.rstrip())


if __name__ == "__main__":
    main()
