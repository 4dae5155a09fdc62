"""Offline engine benchmark: accuracy and cost of pttd.local.engine on the bundled demo WAVs.

Per mode (grammar = the demo phrase list, free = dictation with the default LM), each in a fresh
child process so peak RSS is its own:

* decoder load time and peak RSS (and the RSS before any decoder, for comparison);
* real-time factor = CPU s per audio s, of the recognizer alone (unpaced), and of the whole
  process while streaming paced 50 ms frames through the real WebSocket server (server +
  recognizer + this client);
* WER against the known texts (grammar mode: the command clips; free mode: every clip);
* ForceEndpoint → final Turn latency, streaming in real time; partial Turns per audio second;
* lateness of another Python thread (a 5 ms ticker) meanwhile: pocketsphinx holds the GIL while
  it decodes, which is what an in-process engine costs the daemon's own threads.

Run from the repository: ``python bench/local_bench.py [--reps N]``. Prints figures, never fails.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
import wave
from importlib import resources
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pttd.local.decoders import normalize_phrase
from pttd.local.engine import LocalEngine, PocketsphinxFactory
from pttd.local.options import ServerOptions
from pttd.local.query import build_session_config

DATA = resources.files("pttd") / "data"
FRAME_BYTES = 1600          # 50 ms at 16 kHz, PCM16
FRAME_S = 0.05


def load_demo() -> tuple[dict, dict[str, bytes]]:
    demo = json.loads((DATA / "demo.json").read_text())
    audio = {}
    for clip in demo["clips"]:
        with wave.open(str(DATA / clip["file"])) as wav:
            pcm = wav.readframes(wav.getnframes())
        audio[clip["file"]] = pcm + bytes(-len(pcm) % FRAME_BYTES)
    return demo, audio


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length), both texts normalized."""
    ref, hyp = normalize_phrase(reference).split(), normalize_phrase(hypothesis).split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[len(hyp)], len(ref)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------

def decode_direct(factory: PocketsphinxFactory, pcm: bytes) -> tuple[str, float]:
    """Recognizer only, as fast as it goes: (final text, CPU seconds)."""
    config = build_session_config("bench", {"speech_model": "universal-streaming-english"},
                                  ServerOptions())
    recognizer = factory(config)
    started = time.process_time()
    events = []
    for offset in range(0, len(pcm), FRAME_BYTES):
        events += recognizer.feed(pcm[offset:offset + FRAME_BYTES], offset // 32)
    events += recognizer.force_endpoint()
    cpu = time.process_time() - started
    recognizer.close()
    finals = [e for e in events if getattr(e, "end_of_turn", False)]
    return " ".join(w.text for e in finals for w in e.words), cpu


class Session:
    """A bare v3 client: paced frames out, messages in on a reader thread."""

    def __init__(self, url: str) -> None:
        query = urlencode({"speech_model": "universal-streaming-english"})
        self.ws = connect(f"{url}?{query}", open_timeout=5, close_timeout=2)
        self.messages: list[tuple[float, dict]] = []
        self.final = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                self.messages.append((time.monotonic(), message))
                if message.get("type") == "Turn" and message["end_of_turn"]:
                    self.final.set()
        except ConnectionClosed:
            pass

    def stream(self, pcm: bytes) -> None:
        start = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), FRAME_BYTES)):
            delay = start + index * FRAME_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.ws.send(pcm[offset:offset + FRAME_BYTES])

    def close(self) -> None:
        self.ws.send(json.dumps({"type": "Terminate"}))
        self._reader.join(5)
        self.ws.close()


def stream_through_server(url: str, pcm: bytes) -> tuple[str, float | None, int]:
    """Paced press: (final text, ForceEndpoint → final seconds or None, partial Turns)."""
    session = Session(url)
    while not session.messages:   # Begin
        time.sleep(0.005)
    session.stream(pcm)
    forced_at = time.monotonic()
    session.ws.send(json.dumps({"type": "ForceEndpoint"}))
    got_final = session.final.wait(5)
    session.close()
    turns = [(t, m) for t, m in session.messages if m.get("type") == "Turn"]
    finals = [(t, m) for t, m in turns if m["end_of_turn"]]
    partials = len(turns) - len(finals)
    if not got_final or not finals:
        return "", None, partials
    return finals[0][1]["transcript"], finals[0][0] - forced_at, partials


class Ticker:
    """A thread that wakes every 5 ms and records how late each wake-up was."""

    PERIOD_S = 0.005

    def __init__(self) -> None:
        self.lateness: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        due = time.monotonic() + self.PERIOD_S
        while not self._stop.is_set():
            time.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            self.lateness.append(now - due)
            due = max(due + self.PERIOD_S, now)

    def __enter__(self) -> "Ticker":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.lateness)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_mode(mode: str, reps: int) -> dict:
    demo, audio = load_demo()
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    factory = PocketsphinxFactory(demo["phrases"] if mode == "grammar" else None)
    factory.pool.prewarm()
    load_s = time.perf_counter() - started
    clips = [c for c in demo["clips"] if mode == "free" or c["kind"] == "command"]
    result = {"mode": mode, "load_s": load_s, "rss_before_mb": rss_before, "clips": len(clips),
              "reps": reps}
    errors = words = 0
    cpu = audio_s = 0.0
    hypotheses = {}
    for _ in range(reps):
        for clip in clips:
            pcm = audio[clip["file"]]
            text, used = decode_direct(factory, pcm)
            e, n = word_errors(clip["text"], text)
            errors, words, cpu = errors + e, words + n, cpu + used
            audio_s += len(pcm) / 32000
            hypotheses.setdefault(clip["text"], text)
    result.update(wer=errors / words, rtf_recognizer=cpu / audio_s, examples=hypotheses)
    if mode == "grammar":
        dictation = next(c for c in demo["clips"] if c["kind"] == "dictation")
        result["out_of_grammar"] = decode_direct(factory, audio[dictation["file"]])[0]
    latencies, partials, cpu, audio_s, errors, words = [], 0, 0.0, 0.0, 0, 0
    with LocalEngine(factory=factory) as engine, Ticker() as ticker:
        for _ in range(reps):
            for clip in clips:
                pcm = audio[clip["file"]]
                before = time.process_time()
                text, latency, n_partials = stream_through_server(engine.url, pcm)
                cpu += time.process_time() - before
                audio_s += len(pcm) / 32000
                partials += n_partials
                e, n = word_errors(clip["text"], text)
                errors, words = errors + e, words + n
                if latency is not None:
                    latencies.append(latency)
    result.update(rtf_process_streaming=cpu / audio_s, wer_streaming=errors / words,
                  latency_median_ms=1000 * statistics.median(latencies) if latencies else None,
                  latency_max_ms=1000 * max(latencies) if latencies else None,
                  finals=len(latencies), partials_per_audio_s=partials / audio_s,
                  tick_late_p99_ms=ticker.percentile_ms(0.99),
                  tick_late_max_ms=ticker.percentile_ms(1.0),
                  peak_rss_mb=peak_rss_mb())
    return result


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def run_child(mode: str, reps: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--mode", mode, "--reps", str(reps)],
                            check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(results: list[dict]) -> None:
    print(f"{'mode':8} {'clips':>5} {'WER':>6} {'WER(ws)':>8} {'RTF rec':>8} {'RTF proc':>9} "
          f"{'FE→final med/max ms':>20} {'partials/s':>10} {'load s':>7} {'RSS MB':>12} "
          f"{'tick late p99/max ms':>21}")
    for r in results:
        latency = (f"{r['latency_median_ms']:.0f}/{r['latency_max_ms']:.0f}"
                   if r["latency_median_ms"] is not None else "-")
        print(f"{r['mode']:8} {r['clips']:>5} {r['wer']:>6.1%} {r['wer_streaming']:>8.1%} "
              f"{r['rtf_recognizer']:>8.3f} {r['rtf_process_streaming']:>9.3f} {latency:>20} "
              f"{r['partials_per_audio_s']:>10.2f} {r['load_s']:>7.2f} "
              f"{r['rss_before_mb']:>5.0f}→{r['peak_rss_mb']:<5.0f} "
              f"{r['tick_late_p99_ms']:>10.1f}/{r['tick_late_max_ms']:<.1f}")
    for r in results:
        for reference, hypothesis in r["examples"].items():
            print(f"  {r['mode']:8} {reference!r:34} → {hypothesis!r}")
        if "out_of_grammar" in r:
            print(f"  {r['mode']:8} out-of-grammar dictation       → {r['out_of_grammar']!r}")
    print("WER: recognizer alone; WER(ws): through the server, paced. RTF = CPU s per audio s "
          "(rec: recognizer alone; proc: whole process while streaming through the server). "
          "RSS: peak, before any decoder → after the run. Tick late: a 5 ms ticker thread's "
          "lateness while streaming (the GIL cost to other threads).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="passes over the clips (default 3)")
    parser.add_argument("--mode", choices=("grammar", "free"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.reps)))
        return 0
    report([run_child(mode, args.reps) for mode in ("grammar", "free")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
