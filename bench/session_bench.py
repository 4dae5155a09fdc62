"""Client cost of one v3 session: CPU per audio second, peak RSS, send lateness (30 s paced).

    python bench/session_bench.py [--seconds 30] [--chunk-ms 50]

The fake server runs in its own process; only this process's CPU is counted. Lateness is the
time from a frame's real-time deadline to websocket-client finishing its send.
"""
from __future__ import annotations

import argparse
import queue
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import KEY, cpu_seconds, fake_server_process, pacer, peak_rss_mb, percentile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--chunk-ms", type=int, default=50)
    args = ap.parse_args()

    t_import = time.perf_counter()
    from pttd.stt.assemblyai import protocol
    from pttd.config import Secret
    from pttd.stt.assemblyai.session import Session
    import_s = time.perf_counter() - t_import

    rate, chunk = 16000, 16 * args.chunk_ms
    frame = bytes(chunk * 2)
    n_frames = int(args.seconds * 1000 / args.chunk_ms)
    sent_at: list[float] = []
    events: queue.Queue = queue.Queue()

    with fake_server_process() as base:
        url = protocol.build_url(base, "universal-streaming-english", rate, False)
        session = Session(url, Secret(KEY), on_event=lambda s, e: events.put(e), sample_rate=rate,
                          format_turns=False,
                          on_sent=lambda op, n: sent_at.append(time.monotonic()) if n == len(frame) else None)
        t_connect = time.perf_counter()
        session.connect(timeout=10)
        connect_s = time.perf_counter() - t_connect
        cpu0 = cpu_seconds()
        deadlines = []
        for i, deadline in pacer(args.chunk_ms / 1000):
            if i >= n_frames:
                break
            deadlines.append(deadline)
            session.send_audio_now(frame)  # as the daemon's streamer does: no hand-off
        wait_until = time.monotonic() + 2
        while len(sent_at) < n_frames and time.monotonic() < wait_until:
            time.sleep(0.01)
        cpu = cpu_seconds() - cpu0
        session.terminate(timeout=5)

    lateness_ms = [(s - d) * 1000 for s, d in zip(sent_at, deadlines)]
    print(f"session_bench: {args.seconds:g} s of {args.chunk_ms} ms frames, {len(sent_at)}/{n_frames} sent")
    print(f"  import pttd.stt.assemblyai.session      {import_s * 1000:7.1f} ms")
    print(f"  connect -> Begin         {connect_s * 1000:7.1f} ms")
    print(f"  CPU per audio second     {cpu / args.seconds * 1000:7.2f} ms/s")
    print(f"  peak RSS                 {peak_rss_mb():7.1f} MB")
    print(f"  send lateness p50/p99/max {percentile(lateness_ms, 50):.2f} / "
          f"{percentile(lateness_ms, 99):.2f} / {max(lateness_ms):.2f} ms")


if __name__ == "__main__":
    main()
