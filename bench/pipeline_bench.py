"""The whole daemon in one process (WAV mic, mock GPIO, controller, outputs) against the fake server.

    python bench/pipeline_bench.py [--presses 20]

Prints: release + post-roll -> ForceEndpoint on the wire (raw, and after the last post-roll
sample was captured), end-of-turn Turn sent -> final event written, CPU per audio second of
the daemon process (the fake server runs in its own process), peak RSS.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import KEY, cpu_seconds, fake_server_process, peak_rss_mb, percentile  # noqa: E402

CYCLE_MS, SPEECH_MS, POSTROLL_MS = 3000, 1200, 300


class TimingSink:
    """Records when each final is handed to the outputs."""

    def __init__(self):
        self.finals: list[tuple[float, dict]] = []
        self.got = threading.Condition()

    def emit(self, event):
        if event["event"] == "final":
            with self.got:
                self.finals.append((time.monotonic(), event))
                self.got.notify_all()

    def close(self):
        pass


def make_wav(path: Path, presses: int) -> None:
    from tests.daemon_proc import speech_wav

    layout = [(500, False)] + [(SPEECH_MS, True), (CYCLE_MS - SPEECH_MS, False)] * presses
    speech_wav(path, layout=tuple(layout))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presses", type=int, default=20)
    args = ap.parse_args()
    from pttd.config import from_dict
    from pttd.app.daemon import Daemon

    tmp = Path(tempfile.mkdtemp(prefix="pttd-bench-"))
    make_wav(tmp / "mic.wav", args.presses)
    sink = TimingSink()
    with fake_server_process(script=["hello world"]) as url:
        cfg = from_dict({"stt": {"url": url, "api_key": KEY, "format_turns": False},
                         "audio": {"source": "wav", "wav": str(tmp / "mic.wav"),
                                   "postroll_ms": POSTROLL_MS},
                         "gpio": {"pin_factory": "mock"}, "leds": {"kind": "led"},
                         "control": {"socket": str(tmp / "ctl.sock")},
                         "output": {"stdout": "none", "journal": False}}, environ={})
        daemon = Daemon(cfg, extra_sinks=[sink])
        daemon.build()
        appended: list[tuple[float, int]] = []
        ring_append = daemon.ring.append

        def timed_append(pcm):
            ring_append(pcm)
            appended.append((time.monotonic(), daemon.ring.end))

        daemon.ring.append = timed_append
        daemon.start()
        ctl = daemon.controller
        wall0, cpu0 = time.monotonic(), cpu_seconds()
        releases = []
        for k in range(args.presses):
            speech_start = 500 + k * CYCLE_MS
            wait_audio(daemon, speech_start - 200)
            ctl.command("press")
            wait_audio(daemon, speech_start + SPEECH_MS + 100)
            releases.append((time.monotonic(), daemon.ring.end))
            ctl.command("release")
        deadline = time.monotonic() + 15
        with sink.got:
            while len(sink.finals) < args.presses and time.monotonic() < deadline:
                sink.got.wait(0.5)
        wall, cpu = time.monotonic() - wall0, cpu_seconds() - cpu0
        daemon.request_stop()
        daemon.shutdown()
    records = url.records
    fe_times = sorted(t for r in records for t in r["fe"])
    eot_times = sorted(t for r in records for t in r["eot"])
    raw, own = [], []
    for (t_rel, pos_rel), fe in zip(releases, fe_times):
        raw.append((fe - (t_rel + POSTROLL_MS / 1000)) * 1000)
        end_pos = pos_rel + POSTROLL_MS * 16
        t_avail = next((t for t, end in appended if end >= end_pos), t_rel)
        own.append((fe - max(t_avail, t_rel + POSTROLL_MS / 1000)) * 1000)
    turn_to_final = [(tf - te) * 1000 for te, (tf, _) in zip(eot_times, sink.finals)]
    print(f"pipeline_bench: {args.presses} presses, {len(sink.finals)} finals, {wall:.1f} s of audio")
    print(f"  release+postroll -> ForceEndpoint on wire   p50 {percentile(raw, 50):6.1f}  p99 {percentile(raw, 99):6.1f} ms"
          "  (includes waiting for the post-roll audio to be captured)")
    print(f"  post-roll captured -> ForceEndpoint on wire p50 {percentile(own, 50):6.2f}  p99 {percentile(own, 99):6.2f} ms")
    print(f"  end-of-turn Turn sent -> final written      p50 {percentile(turn_to_final, 50):6.2f}  p99 {percentile(turn_to_final, 99):6.2f} ms")
    print(f"  CPU per audio second (daemon process)     {cpu / wall * 1000:7.2f} ms/s")
    print(f"  peak RSS                                  {peak_rss_mb():7.1f} MB")


def wait_audio(daemon, ms: int) -> None:
    target = ms * 16
    while daemon.ring.end < target:
        daemon.ring.wait_for(target - 1, 0.5)


if __name__ == "__main__":
    main()
