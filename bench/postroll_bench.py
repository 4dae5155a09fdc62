"""Release -> words on screen, on speech: the post-roll modes side by side.

Builds one mic recording per run out of the bundled espeak-ng phrases (daemon/pttd/data: speech
trimmed, 0.5 s of silence each side), each phrase in its own stretch of mic noise, and plays it
through ``pttd run`` (WAV mic, mock GPIO, control socket). Each phrase is pressed 400 ms before
its first word and released, depending on the case,

    a   400 ms after its last word          (the usual dictation release: done talking)
    b   150 ms after its last word
    c   during its last word (120 ms before its end)
    d   400 ms after, over white noise at 10 dB and 5 dB SNR (speech RMS over noise RMS)
    c10 during its last word, over white noise at 10 dB SNR

against the fake v3 server (tests/fakes, a separate process) and the offline engine in grammar
mode (``url = "local"`` with the phrases: its recognition is reliable there, so a lost last word
shows). For each case x mode x server it prints release -> ForceEndpoint and release -> final
(p50/p95; ForceEndpoint from pttd's own debug line, timed from the release command's arrival;
the final's ``latency_ms``), the post-roll sent (least and most), how many finals recognised the
phrase's last word, and how many adaptive transcripts differ from the fixed one of the same
press. Releases are placed on the mic's clock to ~10 ms. The modes run side by side (the same
presses on the same mic at the same moments), one server after the other.

    .venv/bin/python bench/postroll_bench.py [--reps 3] [--servers fake,local] [--modes fixed,adaptive]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from common import KEY, fake_server_process, percentile  # noqa: E402

DATA = ROOT / "daemon" / "pttd" / "data"
RATE = 16000
CASES = {  # name: (release relative to the last word's end in ms, SNR in dB or None)
    "a": (400, None),
    "b": (150, None),
    "c": (-120, None),
    "d10": (400, 10.0),
    "d5": (400, 5.0),
    "c10": (-120, 10.0),
}
LEAD_MS, IDLE_MS, TAIL_MS = 400, 1600, 2600
FLOOR_DBFS = -62.0  # a quiet MEMS mic's own noise in the clean cases


def load_clips() -> list[tuple[str, np.ndarray]]:
    demo = json.loads((DATA / "demo.json").read_text())
    clips = []
    for clip in demo["clips"]:
        with wave.open(str(DATA / clip["file"])) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        pad = RATE // 2  # the files' own silence: speech is exactly what lies between
        clips.append((clip["text"], pcm[pad:-pad]))
    return clips


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def build(clips, cases: list[str], reps: int, seed: int = 7):
    """The mic recording and the presses: (wav samples, [(text, case, press_ms, release_ms)])."""
    rng = np.random.default_rng(seed)
    parts, plan, at = [], [], 0
    floor = 32768 * 10 ** (FLOOR_DBFS / 20)
    for _ in range(reps):
        for case in cases:
            offset_ms, snr = CASES[case]
            for text, speech in clips:
                noise_rms = floor if snr is None else rms(speech) / 10 ** (snr / 20)
                n = (IDLE_MS + TAIL_MS) * RATE // 1000 + len(speech)
                seg = rng.normal(0.0, noise_rms, n)
                start = IDLE_MS * RATE // 1000
                seg[start : start + len(speech)] += speech
                end_ms = at + IDLE_MS + len(speech) * 1000 // RATE
                plan.append((text, case, at + IDLE_MS - LEAD_MS, end_ms + offset_ms))
                parts.append(seg)
                at += n * 1000 // RATE
    samples = np.clip(np.concatenate(parts), -32768, 32767).astype("<i2")
    return samples, plan


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())


def config(path: Path, url: str, wav: Path, sock: Path, mode: str, phrases: list[str]) -> Path:
    local = "[local]\nphrases = " + json.dumps(phrases) + "\n" if url == "local" else ""
    path.write_text(f"""
[stt]
url = "{url}"
api_key = "{KEY}"
[audio]
source = "wav"
wav = "{wav}"
postroll = "{mode}"
[gpio]
pin_factory = "mock"
[control]
socket = "{sock}"
[output]
stdout = "jsonl"
journal = false
{local}""")
    return path


class Daemon:
    """``pttd -v run``: events from stdout, ForceEndpoint times from its debug lines."""

    FE = re.compile(r"press (\d+): ForceEndpoint sent .*?, (-?\d+) ms after the release, "
                    r"post-roll (-?\d+) ms")

    def __init__(self, cfg: Path, sock: Path):
        self.sock = str(sock)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pttd.cli", "-v", "run", "-c", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "daemon")),
        )
        self.events: queue.Queue = queue.Queue()
        self.fe: dict[int, tuple[int, int]] = {}  # press id: (release -> FE ms, post-roll ms)
        threading.Thread(target=self._out, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _out(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def _err(self):
        for line in self.proc.stderr:
            m = self.FE.search(line)
            if m:
                self.fe[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))

    def command(self, cmd: str) -> dict:
        from pttd.frontends.control.client import request

        return request(self.sock, cmd, timeout=5.0)

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pttd exited {self.proc.returncode}")
            try:
                if self.command("status").get("ok"):
                    return
            except Exception:
                pass
            time.sleep(0.05)  # polling for the socket, bounded
        raise RuntimeError("pttd did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def mic_origin(d: Daemon) -> float:
    """time.monotonic() of the mic's sample 0: the lowest (now - audio time) over readings (a
    reading just after a period arrived lags least)."""
    best = float("inf")
    for _ in range(40):
        t = time.monotonic()
        best = min(best, t - d.command("status")["audio_ms"] / 1000)
        time.sleep(0.007)  # spreading the readings over a capture period
    return best


def run(server: str, mode: str, samples, plan, phrases, tmp: Path, fake_url: str | None) -> list:
    work = tmp / f"{server}-{mode}"
    work.mkdir()
    wav = work / "mic.wav"
    write_wav(wav, samples)
    sock = work / "ctl.sock"
    url = "local" if server == "local" else fake_url
    d = Daemon(config(work / "pttd.toml", url, wav, sock, mode, phrases), sock)
    rows = []
    try:
        d.wait_ready()
        origin = mic_origin(d)
        for pid, (text, case, press_ms, release_ms) in enumerate(plan, 1):
            while not d.events.empty():
                d.events.get()  # the last press's closing events: each press reads its own
            for at_ms, cmd in ((press_ms, "press"), (release_ms, "release")):
                delay = origin + at_ms / 1000 - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # placing the press on the mic's clock is the point
                d.command(cmd)
            final = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    e = d.events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if e.get("press_id") == pid and e["event"] in ("final", "error"):
                    final = e
                    break
                if e["event"] == "state" and e["state"] == "idle":
                    break  # ended without a final: nothing recognised (a final comes before)
            time.sleep(0.2)  # the debug line follows the final's hand-off
            fe_ms, postroll_ms = d.fe.get(pid, (None, None))
            last_word = text.split()[-1]
            rows.append({
                "case": case, "text": text, "postroll_ms": postroll_ms,
                "fe_ms": fe_ms,
                "final_ms": final.get("latency_ms") if final and final["event"] == "final" else None,
                "heard": (final or {}).get("text", ""),
                "last_word": bool(final) and last_word in re.findall(r"[a-z]+", final.get("text", "").lower()),
            })
    finally:
        d.stop()
    return rows


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: where is it waiting
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--servers", default="fake,local")
    ap.add_argument("--modes", default="fixed,adaptive")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    clips = load_clips()
    demo = json.loads((DATA / "demo.json").read_text())
    phrases = sorted(set(demo["phrases"]) | {t for t, _ in clips})
    cases = args.cases.split(",")
    samples, plan = build(clips, cases, args.reps)
    servers, modes = args.servers.split(","), args.modes.split(",")
    print(f"{len(plan)} presses per run ({len(samples) / RATE:.0f} s of mic), "
          f"{len(modes)} modes side by side, {len(servers)} server(s) in turn; {os.cpu_count()} CPUs")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, fake_server_process(
            script=[t for t, _ in clips] * (len(plan) * len(modes) // len(clips) + 1)) as fake_url:
        for server in servers:  # one after the other; its modes side by side
            threads = []
            for mode in modes:
                def job(server=server, mode=mode):
                    results[(server, mode)] = run(server, mode, samples, plan, phrases,
                                                  Path(tmp), fake_url)
                threads.append(threading.Thread(target=job))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    print(f"\n| case | server | mode | release->FE p50/p95 ms | release->final p50/p95 ms | "
          f"post-roll sent ms (min-max) | last word recognised | transcript differs from fixed |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        for server in servers:
            fixed = [r for r in results.get((server, "fixed"), [])]
            for mode in modes:
                all_rows = results.get((server, mode), [])
                rows = [r for r in all_rows if r["case"] == case]
                fe = [r["fe_ms"] for r in rows if r["fe_ms"] is not None]
                fin = [r["final_ms"] for r in rows if r["final_ms"] is not None]
                post = [r["postroll_ms"] for r in rows if r["postroll_ms"] is not None]
                local = server == "local"
                words = f"{sum(r['last_word'] for r in rows)}/{len(rows)}" if local else "-"
                differs = "-"
                if local and mode != "fixed" and len(fixed) == len(all_rows):
                    pairs = [(r, f) for r, f in zip(all_rows, fixed) if r["case"] == case]
                    differs = f"{sum(r['heard'] != f['heard'] for r, f in pairs)}/{len(pairs)}"
                print(f"| {case} | {server} | {mode} | {percentile(fe, 50):.0f} / "
                      f"{percentile(fe, 95):.0f} | {percentile(fin, 50):.0f} / "
                      f"{percentile(fin, 95):.0f} | "
                      f"{min(post, default=-1)}-{max(post, default=-1)} | {words} | {differs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
