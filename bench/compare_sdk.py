"""pttd side by side with AssemblyAI's Python SDK and a bare websocket-client loop.

    python bench/compare_sdk.py [--seconds 60] [--presses 20] [--only pttd,session,sdk,bare]
                                [--plot bench/send_lateness.png] [--json FILE]

The same WAV (tone "speech" 1.2 s / silence 1.8 s, so the server ends a turn every 3 s by
silence), paced in real time, to the same fake v3 server (tests/fakes/fake_v3.py, in its own
process, on 127.0.0.1), through four contenders, each in its own fresh process, one after the
other on this machine:

* ``pttd``    the whole daemon: the installed ``pttd run`` code path (``pttd.cli.main``) with a
              WAV source, mock GPIO LEDs, jsonl stdout and (``--journal``, on where the test
              harness can start a private systemd-journald) journald records; one press at
              READY=1 and a release after ``--seconds`` of audio via the control socket, then
              ``--presses`` short presses for the release -> ForceEndpoint figures, then 5 s
              idle.
* ``session`` pttd's ``Session`` alone, fed by a pacing loop (no daemon around it).
* ``sdk``     ``assemblyai.streaming.v3.RealTimeTranscriber`` fed by the same pacing loop
              (``api_host="ws://127.0.0.1:PORT"``: the SDK builds ``ws://`` URLs itself when
              ``api_host`` starts with ``ws://``, so nothing is patched).
* ``bare``    websocket-client: a pacing loop that sends, and a reader thread (the floor).

Every contender reads its frames from the WAV file as it goes (``wave.readframes``; pttd's WAV
source reads its blocks with ``os.pread``), opens the session, streams ``--seconds`` of audio,
sends ForceEndpoint and waits for that turn's final. Figures:

* CPU per audio second: the process's own user+system CPU (``getrusage``, every thread, also
  threads that ended) from the start of connecting (pttd: the press) to the last final, divided
  by the audio seconds sent. pttd's idle cost (mic running, no press) is shown apart.
* peak RSS: ``VmHWM`` of the process at its end.
* import time: a fresh interpreter importing every non-stdlib module the contender had loaded
  (pttd: what ``pttd run`` loaded), median of 3.
* start -> first frame: ``Popen`` to the server receiving the first audio frame (pttd: includes
  start-up to READY=1, the press over the control socket, connect and Begin).
* send lateness: from the moment a frame's audio was there to be sent (the pacing loop's
  deadline; for pttd the deadline of the WAV source's capture block holding the frame's last
  sample) to its WebSocket send returning: what the software adds. pttd's pre-roll/connect
  backlog frames are left out (they are old by design).
* frame age at send: from the moment a frame's last sample would have been captured to its send
  returning. The same as send lateness for the pacing loops (one frame per wake-up); for pttd it
  adds the capture period's buffering (``--period-ms``: the first 50 ms frame of a 100 ms period
  waits 50 ms for the period to end, as with an ALSA mic's 100 ms periods).
* release -> ForceEndpoint (pttd): "raw" = from the deadline of the stream's last sample (the
  release plus the post-roll the adaptive judge kept: at most ``POSTROLL_MS``); "own" = from the
  later of that and the moment that sample was captured (pipeline_bench's two figures).
  The others: from the last frame's deadline to ForceEndpoint on the wire (one per run).
* Turn -> delivered: the server sending a turn's formatted end-of-turn Turn to the client
  handing over the final: pttd = the final line written to stdout; SDK = its Turn handler
  called; session/bare = the final parsed on the reader thread. Below the table, pttd's is
  split at its hand-offs (receiver -> controller -> Outputs -> stdout worker -> written), for
  turns the server ended mid-press and for the finals after a release, with the slowest five.

Tail percentiles: with ``--rounds`` above 1 the table also shows each tail figure's p99 over
the samples of every round pooled (p99 of one round's 40 samples is just its largest).

Timing instrumentation (timestamps appended to lists, ~1 us each) is the same kind for all:
pttd's process wraps a few methods to note times (no behaviour changes); the SDK's socket
``send`` is wrapped on the instance to note when each frame left. Prints figures, never fails.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

# children import only what they need: the parent's tools are imported in the parent's functions

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.journald (the private journald) for the parent
    sys.path.insert(1, str(ROOT))
KEY = "bench-key"
RATE = 16000
CHUNK_MS = int(os.environ.get("PTTD_BENCH_CHUNK_MS", "50"))   # --chunk-ms, passed to children
FRAME_S, FRAME_SAMPLES = CHUNK_MS / 1000, RATE * CHUNK_MS // 1000
PERIOD_MS = int(os.environ.get("PTTD_BENCH_PERIOD_MS", "100"))  # --period-ms
MODEL = "universal-streaming-english"
CYCLE_A = (1200, 1800)      # phase 1: speech, silence (ms); silence > 1280 ms ends a turn
CYCLE_B = (800, 1200)       # phase 2 (pttd presses): the press/release end each turn
PREROLL_MS, POSTROLL_MS = 500, 300
CONTENDERS = ("pttd", "session", "sdk", "bare")


# ================================================================================================
# the fake server, in its own process
# ================================================================================================

_SERVER = r"""
import json, sys
from tests.fakes.fake_v3 import FakeV3Server
srv = FakeV3Server(script=["hello world"], api_keys={sys.argv[1]}, expires_in_s=3600,
                   python_booleans=True)  # the SDK sends format_turns=True
srv.start()
print(srv.url, flush=True)
done = 0
for line in sys.stdin:
    out = []
    sessions = srv.sessions
    for rec in sessions[done:]:
        rx = rec.received
        out.append({
            "session_id": rec.session_id, "started": rec.started,
            "binary": [r.t for r in rx if r.kind == "binary"],
            "fe": [r.t for r in rx if r.kind == "text" and isinstance(r.data, dict)
                   and r.data.get("type") == "ForceEndpoint"],
            "eot": [[s.t, s.message.get("turn_order"), bool(s.message.get("turn_is_formatted"))]
                    for s in rec.sent if s.message.get("type") == "Turn"
                    and s.message.get("end_of_turn")]})
    done = len(sessions)
    print(json.dumps(out), flush=True)
srv.stop()
"""


class Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, KEY], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=child_env())  # the same pttd code as the contenders
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("ws://"):
            raise SystemExit("fake server did not start")

    def take(self) -> list[dict]:
        """Records of the sessions opened since the last call."""
        self.proc.stdin.write("dump\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ================================================================================================
# helpers (used by children too: stdlib only)
# ================================================================================================

def cpu_now() -> float:
    """``common.cpu_seconds``, repeated: a contender's process must not import ``common``, or
    ``third_party_modules`` would count it among the contender's imports (and time it)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vm_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def third_party_modules() -> list[str]:
    """Loaded modules that are neither stdlib nor this harness: what the contender imported."""
    out = []
    for name in sorted(sys.modules):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("__main__", "_distutils_hack") or top.startswith("_"):
            continue
        out.append(name)
    return out


def pct(values, p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))]


def make_wav(path: Path, seconds: float, presses: int) -> tuple[int, int]:
    """Phase A cycles covering ``seconds`` + slack, then phase B cycles; returns (B start ms, total ms)."""
    import numpy as np

    rng = np.random.default_rng(1)
    a_cycles = int(seconds * 1000 // sum(CYCLE_A)) + 2
    layout = [CYCLE_A] * a_cycles + [CYCLE_B] * (presses + 1)
    parts = []
    for speech_ms, silence_ms in layout:
        for ms, loud in ((speech_ms, True), (silence_ms, False)):
            n = RATE * ms // 1000
            x = rng.integers(-60, 60, n).astype(np.float64)
            if loud:
                t = np.arange(n) / RATE
                x += 9000 * np.sin(2 * np.pi * 300 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))
            parts.append(x)
    samples = np.concatenate(parts).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())
    return a_cycles * sum(CYCLE_A), len(samples) * 1000 // RATE


# ================================================================================================
# children: pacing-loop contenders (session, sdk, bare)
# ================================================================================================

def pace(n_frames: int, wav: wave.Wave_read, send, deadlines: list) -> None:
    """Read and send one 50 ms frame per absolute deadline (no drift)."""
    t0 = time.monotonic()
    for i in range(n_frames):
        deadline = t0 + (i + 1) * FRAME_S   # the frame's last sample is "captured" now
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        frame = wav.readframes(FRAME_SAMPLES)
        deadlines.append(deadline)
        send(frame)


def child_pacer(kind: str, url: str, wav_path: str, seconds: float, out_path: str) -> None:
    t_imp = time.monotonic()
    if kind == "sdk":
        from assemblyai.streaming.v3 import (RealTimeEvents, RealTimeParameters,
                                             RealTimeTranscriber, RealTimeTranscriberOptions)
    elif kind == "bare":
        import websocket
    else:
        from pttd.stt.assemblyai import protocol
        from pttd.config import Secret
        from pttd.stt.assemblyai.session import Session
        from pttd.stt.base import FinalTurn
    t_imp_done = time.monotonic()

    n_frames = int(round(seconds / FRAME_S))
    wav = wave.open(wav_path, "rb")
    deadlines: list[float] = []
    sent: list[float] = []
    delivered: list[list] = []      # [t, turn_order, session_id]
    fe_called: list[float] = []
    rx: list[list] = []             # [t received, raw message]: parsed after the run
    final_after_fe = threading.Event()
    session_id = [""]

    def on_final(turn_order: int) -> None:
        delivered.append([time.monotonic(), turn_order, session_id[0]])
        if fe_called:
            final_after_fe.set()

    cpu0, t0 = cpu_now(), time.monotonic()
    if kind == "sdk":
        host = url.rsplit("/v3/ws", 1)[0]          # "ws://127.0.0.1:PORT": the SDK keeps ws://
        client = RealTimeTranscriber(RealTimeTranscriberOptions(api_host=host, api_key=KEY))
        begun = threading.Event()

        def on_begin(_c, event):
            session_id[0] = event.id
            begun.set()

        def on_turn(_c, event):
            if event.end_of_turn and event.turn_is_formatted:
                on_final(event.turn_order)

        client.on(RealTimeEvents.Begin, on_begin)
        client.on(RealTimeEvents.Turn, on_turn)
        client.on(RealTimeEvents.Error, lambda _c, err: print(f"sdk error: {err}", file=sys.stderr))
        client.connect(RealTimeParameters(sample_rate=RATE, speech_model=MODEL, format_turns=True))
        ws = client._websocket                      # instrumentation only: note when frames leave
        ws_send = ws.send

        def timed_send(message, *a, **kw):
            ws_send(message, *a, **kw)
            if isinstance(message, (bytes, bytearray)):
                sent.append(time.monotonic())

        ws_recv = ws.recv

        def timed_recv(*a, **kw):
            message = ws_recv(*a, **kw)
            rx.append([time.monotonic(), message])
            return message

        ws.send, ws.recv = timed_send, timed_recv
        send, force_endpoint = client.stream, client.force_endpoint
        finish = lambda: client.disconnect(terminate=True)  # noqa: E731
    elif kind == "bare":
        query = f"?speech_model={MODEL}&sample_rate={RATE}&encoding=pcm_s16le&format_turns=true"
        ws = websocket.create_connection(url + query, header=[f"Authorization: {KEY}"], timeout=10,
                                         enable_multithread=True)

        def reader():
            try:
                while True:
                    try:
                        raw = ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if not raw:
                        return
                    rx.append([time.monotonic(), raw])
                    msg = json.loads(raw)
                    if msg.get("type") == "Begin":
                        session_id[0] = msg["id"]
                    elif msg.get("type") == "Turn" and msg["end_of_turn"] and msg.get("turn_is_formatted"):
                        on_final(msg["turn_order"])
                    elif msg.get("type") == "Termination":
                        return
            except (OSError, websocket.WebSocketException):
                return

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()

        def send(frame):
            ws.send_binary(frame)
            sent.append(time.monotonic())

        def force_endpoint():
            ws.send('{"type":"ForceEndpoint"}')

        def finish():
            ws.send('{"type":"Terminate"}')
            rt.join(5)
            ws.close()
    else:
        def on_event(_s, event):
            if isinstance(event, FinalTurn):
                on_final(event.turn.turn_order)

        def on_sent(opcode, n):
            if n == FRAME_SAMPLES * 2:
                sent.append(time.monotonic())

        on_text = Session._on_text

        def timed_on_text(self, data):
            t = time.monotonic()
            on_text(self, data)
            rx.append([t, data.decode() if isinstance(data, bytes) else data])

        Session._on_text = timed_on_text
        url_q = protocol.build_url(url, MODEL, RATE, True)
        session = Session(url_q, Secret(KEY), on_event=on_event, sample_rate=RATE,
                          format_turns=True, on_sent=on_sent)
        session_id[0] = session.connect(timeout=10).id
        # the daemon's own path: each press's streamer sends on its thread, no hand-off
        send, force_endpoint = session.send_audio_now, session.force_endpoint_now
        finish = lambda: session.terminate(timeout=5)  # noqa: E731

    pace(n_frames, wav, send, deadlines)
    fe_called.append(time.monotonic())
    force_endpoint()
    final_after_fe.wait(10)
    cpu1, t1 = cpu_now(), time.monotonic()
    finish()
    result = {"kind": kind, "import_s": t_imp_done - t_imp, "window": [t0, t1, cpu0, cpu1],
              "audio_s": n_frames * FRAME_S, "deadlines": deadlines, "sent": sent,
              "delivered": delivered, "rx": rx, "fe_called": fe_called, "last_deadline": deadlines[-1],
              "vmhwm_kb": vm_kb("VmHWM"), "modules": third_party_modules(),
              "threads_max": threading.active_count()}
    Path(out_path).write_text(json.dumps(result))


# ================================================================================================
# child: the whole daemon (``pttd run``), with timestamps noted around a few methods
# ================================================================================================

def thread_cpu_ns() -> dict[str, int]:
    """CPU so far of every thread of this process, by Python thread name (ns)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[f"{names.get(int(tid), 'native')}|{tid}"] = int(f.read().split()[0])
        except OSError:
            pass
    return out


def child_pttd(config: str, out_path: str, t0_path: str) -> int:
    import websocket

    from pttd.audio import capture as audio
    from pttd import cli
    from pttd.core import controller
    from pttd.outputs import fanout as outputs
    from pttd.outputs.stdout import StdoutSink
    from pttd.audio import ring
    from pttd.stt.assemblyai import link, session
    from pttd.core import streamer

    notes = {"appends": [], "sends": [], "rx": [], "ended": [], "streamers": [], "finish": [], "judged": [], "press": [],
             "release": [], "finals": [], "ctl": [], "emitted": [],
             "wav_t0": None}

    # every thread's CPU when it ends (session threads end before the last snapshot is taken);
    # with $PTTD_BENCH_CPROFILE=DIR also a cProfile per thread, timed in thread CPU time
    prof_dir = os.environ.get("PTTD_BENCH_CPROFILE")
    thread_run = threading.Thread.run

    def run_thread(self):
        prof = None
        if prof_dir:
            import cProfile
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
        try:
            thread_run(self)
        finally:
            notes["ended"].append([f"{self.name}|{self.native_id}", time.monotonic(),
                                   time.thread_time_ns()])
            if prof is not None:
                prof.disable()
                prof.dump_stats(os.path.join(prof_dir, f"{self.name}-{self.native_id}.prof"))

    threading.Thread.run = run_thread

    ws_send = websocket.WebSocket.send

    def send(self, payload, opcode=websocket.ABNF.OPCODE_TEXT):
        r = ws_send(self, payload, opcode)
        notes["sends"].append([time.monotonic(), id(self), opcode, len(payload)])
        return r

    websocket.WebSocket.send = send

    write_frames = link.Link.write_frames

    def timed_write_frames(self, frames, force_endpoint):
        # the streamer's path: a capture period's frames (and the turn's ForceEndpoint) in one
        # socket write; each frame is noted with the time that write returned
        ws_id = id(self.ws)
        write_frames(self, frames, force_endpoint)
        t = time.monotonic()
        for pcm in frames:
            notes["sends"].append([t, ws_id, websocket.ABNF.OPCODE_BINARY, len(pcm)])
        if force_endpoint:
            notes["sends"].append([t, ws_id, websocket.ABNF.OPCODE_TEXT, 0])

    link.Link.write_frames = timed_write_frames

    on_text = session.Session._on_text

    def timed_on_text(self, data):
        t = time.monotonic()
        on_text(self, data)
        notes["rx"].append([t, self.id, data.decode() if isinstance(data, bytes) else data])

    session.Session._on_text = timed_on_text

    append = ring.RingBuffer.append

    def ring_append(self, pcm):
        append(self, pcm)
        notes["appends"].append([time.monotonic(), self.end])

    ring.RingBuffer.append = ring_append

    wav_run = audio.WavSource._run

    def run_wav(self):
        # WavSource._run takes its t0 on its first line: note ours just before, and write it out
        # from another thread later (a file write here would shift every deadline by ~0.7 ms)
        def write():
            time.sleep(0.01)
            Path(t0_path).write_text(f"{notes['wav_t0']!r} {os.getpid()}")

        threading.Thread(target=write, daemon=True).start()
        notes["wav_t0"] = time.monotonic()
        return wav_run(self)

    audio.WavSource._run = run_wav

    st_init, st_finish = streamer.Streamer.__init__, streamer.Streamer.finish

    def init(self, ring_, session, start_pos, *a, **kw):
        st_init(self, ring_, session, start_pos, *a, **kw)
        notes["streamers"].append([time.monotonic(), start_pos])

    def finish(self, end_pos, *judge):  # (the adaptive post-roll's judge, since issue 26)
        end = st_finish(self, end_pos, *judge)
        notes["finish"].append([time.monotonic(), end, self.start_pos])
        return end

    st_judge = streamer.Streamer._judge_end

    def judge_end(self):  # the adaptive post-roll may move the end earlier: note where it did
        before = self._end
        st_judge(self)
        if self._end != before:
            notes["judged"].append([time.monotonic(), self._end, self.start_pos])

    streamer.Streamer.__init__, streamer.Streamer.finish = init, finish
    streamer.Streamer._judge_end = judge_end

    press, release = controller.Controller._press, controller.Controller._release

    def on_press(self, at):
        if not notes["press"]:
            notes["threads0"] = thread_cpu_ns()
        notes["press"].append([time.monotonic(), cpu_now(), at])
        return press(self, at)

    def on_release(self, *args):  # (at) before the press lifecycle, (press, at) since
        notes["release"].append([time.monotonic(), cpu_now(), args[-1]])
        return release(self, *args)

    controller.Controller._press, controller.Controller._release = on_press, on_release

    from pttd.core import finals

    on_final = finals.Finals.on_final

    def timed_on_final(self, press, session_, final):
        # Turn -> final by stage: when the controller took the final, and when it was done with it
        t_in = time.monotonic()
        on_final(self, press, session_, final)
        notes["ctl"].append([t_in, time.monotonic(), session_.id, final.turn.turn_order])

    finals.Finals.on_final = timed_on_final

    outputs_emit = outputs.Outputs.emit

    def timed_outputs_emit(self, event, on_delivered=None):
        if event.get("event") == "final":
            notes["emitted"].append([time.monotonic(), event["session_id"], event["turn_order"]])
        if on_delivered is None:   # as called before on_delivered existed (A/B with old code)
            outputs_emit(self, event)
        else:
            outputs_emit(self, event, on_delivered)

    outputs.Outputs.emit = timed_outputs_emit

    emit = StdoutSink.emit

    def sink_emit(self, event):
        t_in = time.monotonic()
        emit(self, event)
        if event.get("event") == "final":
            if event["press_id"] == 1 and event["latency_ms"] > 0:
                notes["threads1"] = thread_cpu_ns()
            notes["finals"].append([time.monotonic(), cpu_now(), event["turn_order"],
                                    event["session_id"], event["press_id"], event["audio_ms"],
                                    event["latency_ms"], t_in])

    StdoutSink.emit = sink_emit

    if os.environ.get("PTTD_BENCH_SWITCHINTERVAL"):   # A/B knob; cmd_run may set its own after
        sys.setswitchinterval(float(os.environ["PTTD_BENCH_SWITCHINTERVAL"]))
    if prof_dir:
        import cProfile
        prof = cProfile.Profile(time.thread_time)
        code = prof.runcall(cli.main, ["run", "-c", config])
        prof.dump_stats(os.path.join(prof_dir, "MainThread.prof"))
    else:
        code = cli.main(["run", "-c", config])
    notes.update(vmhwm_kb=vm_kb("VmHWM"), modules=third_party_modules(),
                 switchinterval=sys.getswitchinterval())
    Path(out_path).write_text(json.dumps(notes))
    return code


# ================================================================================================
# the parent
# ================================================================================================

def child_env(**extra) -> dict:
    """Every contender gets OPENBLAS_NUM_THREADS=1, as systemd/pttd.service sets for the daemon."""
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
    return dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", **extra)


def import_time_s(modules: list[str], runs: int = 3) -> float:
    import statistics

    code = ("import importlib, time\nt = time.perf_counter()\n"
            f"for m in {modules!r}:\n"
            "    try:\n        importlib.import_module(m)\n    except Exception:\n        pass\n"
            "print(time.perf_counter() - t)")
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=child_env(), cwd=ROOT)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def task_cpu_ns(pid: int) -> dict[str, int]:
    """CPU of every live thread of ``pid`` (ns, /proc/<pid>/task/*/schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def cpu_between(before: dict[str, int], after: dict[str, int]) -> float:
    """Seconds of CPU used between two snapshots by the threads alive at both."""
    return sum(after[t] - before[t] for t in before if t in after) / 1e9


def eot_received(rx: list) -> dict:
    """(session id or None, turn_order) -> when the formatted end-of-turn Turn was received."""
    out = {}
    for item in rx:
        t, sid, raw = (item[0], None, item[1]) if len(item) == 2 else item
        try:
            msg = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if msg.get("type") == "Turn" and msg.get("end_of_turn") and msg.get("turn_is_formatted"):
            out.setdefault((sid, msg["turn_order"]), t)
    return out


def run_pacer(kind: str, server: Server, wav: Path, seconds: float, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp)) / "out.json"
    t_spawn = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, server.url, str(wav),
                           str(seconds), str(out)], cwd=ROOT, text=True, capture_output=True,
                          env=child_env())
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())
    sessions = server.take()
    s = sessions[0]
    t0, t1, c0, c1 = r["window"]
    lat = [(snt - d) * 1000 for d, snt in zip(r["deadlines"], r["sent"])]
    eot = {(x[1]): x[0] for x in s["eot"] if x[2]}
    t2f = [(t - eot[o]) * 1000 for t, o, sid in r["delivered"] if o in eot]
    fe = [(s["fe"][0] - r["last_deadline"]) * 1000] if s["fe"] else []
    got = eot_received(r["rx"])
    rx2f = [(t - got[(None, o)]) * 1000 for t, o, _ in r["delivered"] if (None, o) in got]
    return {"kind": kind, "cpu_ms_per_s": (c1 - c0) / r["audio_s"] * 1000,
            "audio_s": r["audio_s"], "rss_mb": r["vmhwm_kb"] / 1024,
            "import_ms": import_time_s(r["modules"]) * 1000,
            "first_frame_ms": (s["binary"][0] - t_spawn) * 1000,
            "lateness": lat, "age": lat, "lat_t": [d - r["deadlines"][0] for d in r["deadlines"]],
            "fe_raw": fe, "fe_own": fe, "turn_to_final": t2f, "rx_to_final": rx2f, "frames": len(r["sent"]),
            "threads": r["threads_max"], "modules": len(r["modules"])}


def run_pttd(server: Server, wav: Path, b_start_ms: int, seconds: float, presses: int,
             tmp: Path, idle_s: float = 5.0, spy: str | None = None,
             cprofile: str | None = None, journal: bool = False) -> dict:
    """One pttd round; with ``journal`` inside a private systemd-journald (tests/journald.py),
    so its journald records cost what they cost under systemd."""
    if not journal:
        return _run_pttd(server, wav, b_start_ms, seconds, presses, tmp, idle_s, spy, cprofile,
                         None)
    from tests.journald import Journald

    with Journald() as jd:
        r = _run_pttd(server, wav, b_start_ms, seconds, presses, tmp, idle_s, spy, cprofile, jd)
        r["journal_finals"] = len(jd.records("SYSLOG_IDENTIFIER=pttd", "PTTD_EVENT=final"))
    return r


def _run_pttd(server, wav, b_start_ms, seconds, presses, tmp, idle_s, spy, cprofile,
              jd) -> dict:
    import signal
    import socket

    from pttd.frontends.control.client import request

    tmp = Path(tempfile.mkdtemp(prefix="pttd-", dir=tmp))

    cfg = tmp / "pttd.toml"
    sock_path = tmp / "ctl.sock"
    cfg.write_text(f"""
[stt]
url = "{server.url}"
api_key = "{KEY}"
[audio]
source = "wav"
wav = "{wav}"
preroll_ms = {PREROLL_MS}
postroll_ms = {POSTROLL_MS}
chunk_ms = {CHUNK_MS}
period_ms = {PERIOD_MS}
[gpio]
pin_factory = "mock"
[control]
socket = "{sock_path}"
[output]
stdout = "jsonl"
journal = {"true" if jd is not None else "false"}
""")
    out, t0_file = tmp / "pttd.json", tmp / "wav_t0"
    notify = tmp / "notify"
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(str(notify))
    nsock.settimeout(20)
    env = child_env(NOTIFY_SOCKET=str(notify), PYTHONUNBUFFERED="1")
    if cprofile:
        os.makedirs(cprofile, exist_ok=True)
        env["PTTD_BENCH_CPROFILE"] = os.path.abspath(cprofile)
    argv = [sys.executable, __file__, "--child", "pttd", str(cfg), str(out), str(t0_file)]
    if spy:  # py-spy cannot attach to a running process in this container; it launches instead
        argv = ["py-spy", "record", "--nonblocking", "--threads", "-r", "250", "-f", "raw", "-o", spy,
                "--"] + argv
    if jd is not None:
        argv = jd.command(argv, cwd=str(ROOT))
    t_spawn = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finals: list[dict] = []
    got_final = threading.Condition()
    err_lines: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "final":
                with got_final:
                    finals.append(ev)
                    got_final.notify_all()

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True).start()

    def wait_final(press_id: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with got_final:
            while not any(f["press_id"] == press_id and f["latency_ms"] > 0 for f in finals):
                if not got_final.wait(max(0.0, deadline - time.monotonic())):
                    raise SystemExit(f"pttd: no final for press {press_id}: {''.join(err_lines)[-2000:]}")

    try:
        while b"READY=1" not in nsock.recv(4096).split(b"\n"):
            pass
    except socket.timeout:
        proc.kill()
        raise SystemExit(f"pttd never sent READY=1: {''.join(err_lines)[-2000:]}")
    t_ready = time.monotonic()
    while not t0_file.exists() or not t0_file.read_text():
        time.sleep(0.005)
    wav_t0, pid = t0_file.read_text().split()
    wav_t0, pid = float(wav_t0), int(pid)
    rel_sent = []
    # phase 1: one long press from READY
    t_press = time.monotonic()
    request(str(sock_path), "press")
    time.sleep(max(0.0, t_press + seconds - (PREROLL_MS + POSTROLL_MS) / 1000 - time.monotonic()))
    rel_sent.append(time.monotonic())
    request(str(sock_path), "release")
    wait_final(1)
    # phase 2: short presses around each phase-B "utterance", scheduled on the WAV's clock; each
    # release at a random phase of the capture block (on a block edge, the ring's end would be
    # either just updated or a whole block behind, which skews "release + post-roll")
    import random

    phase = random.Random(7)
    for k in range(presses):
        speech_at = wav_t0 + (b_start_ms + k * sum(CYCLE_B)) / 1000
        time.sleep(max(0.0, speech_at - 0.2 - time.monotonic()))
        request(str(sock_path), "press")
        release_at = speech_at + (CYCLE_B[0] + 100) / 1000 + phase.uniform(0, FRAME_S)
        time.sleep(max(0.0, release_at - time.monotonic()))
        rel_sent.append(time.monotonic())
        request(str(sock_path), "release")
    wait_final(presses + 1)
    time.sleep(1.0)
    idle0 = task_cpu_ns(pid)
    time.sleep(idle_s)
    idle_ms_per_s = cpu_between(idle0, task_cpu_ns(pid)) / idle_s * 1000
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    nsock.close()
    if not out.exists():
        raise SystemExit(f"pttd child wrote nothing: {''.join(err_lines)[-3000:]}")
    n = json.loads(out.read_text())
    sessions = server.take()

    # CPU window: press 1 handled -> its last final (the one after release) written
    p_t, p_cpu, _ = n["press"][0]
    f1 = [f for f in n["finals"] if f[4] == 1][-1]
    audio_s = f1[5] / 1000
    cpu_ms_per_s = (f1[1] - p_cpu) / audio_s * 1000

    # send lateness, press 1's session: frame j ends at ring position start + (j+1)*chunk, whose
    # deadline is the WAV source's wav_t0 + position / rate; backlog frames left out
    ws_ids = []
    for t, wid, op, size in n["sends"]:
        if wid not in ws_ids:
            ws_ids.append(wid)
    # one ForceEndpoint per press, in order: a press may reuse the session the one before kept
    # warm, so they are matched to presses by time, not by session
    fe_all = sorted(t for s in sessions for t in s["fe"])
    # press 1's frames: on the first socket, before press 1's ForceEndpoint (a warm session
    # carries the next press's frames on the same socket)
    first = [s for s in n["sends"] if s[1] == ws_ids[0] and s[2] == 2 and s[3] == FRAME_SAMPLES * 2
             and s[0] < fe_all[0]]
    st_t, start_pos = n["streamers"][0]
    lat, age, lat_t, backlog = [], [], [], 0
    period = RATE * PERIOD_MS // 1000
    for j, (t_sent, _, _, _) in enumerate(first):
        end = start_pos + (j + 1) * FRAME_SAMPLES
        deadline = n["wav_t0"] + end / RATE
        if deadline < st_t:
            backlog += 1
            continue
        block_due = n["wav_t0"] + -(-end // period) * period / RATE  # its capture block's end
        lat.append((t_sent - block_due) * 1000)
        age.append((t_sent - deadline) * 1000)
        lat_t.append(deadline)
    lat_t = [t - lat_t[0] for t in lat_t]
    capture_late = [(t - (n["wav_t0"] + end / RATE)) * 1000 for t, end in n["appends"]]

    # release -> ForceEndpoint on the wire, per press (its streamer's end; FEs matched above)
    appends = n["appends"]
    fe_raw, fe_own = [], []
    finish_of, seen = [], set()
    judged = {start: end for _, end, start in n.get("judged", [])}  # the end the judge chose
    for _, end, start in n["finish"]:   # one end per press (by its streamer's start)
        if start not in seen:
            seen.add(start)
            finish_of.append(judged.get(start, end))
    if not len(fe_all) == len(finish_of) == len(rel_sent):
        print(f"compare_sdk: {len(rel_sent)} presses, {len(finish_of)} streams ended, "
              f"{len(fe_all)} ForceEndpoints: release -> FE figures are unmatched", flush=True)
    for fe, end in zip(fe_all, finish_of):
        t_avail = next((t for t, e in appends if e >= end), fe)
        fe_raw.append((fe - (n["wav_t0"] + end / RATE)) * 1000)
        fe_own.append((fe - t_avail) * 1000)

    eot = {(s["session_id"], x[1]): x[0] for s in sessions for x in s["eot"] if x[2]}
    t2f = [(t - eot[(sid, o)]) * 1000 for t, _, o, sid, *_ in n["finals"] if (sid, o) in eot]
    got = eot_received(n["rx"])
    rx2f = [(t - got[(sid, o)]) * 1000 for t, _, o, sid, *_ in n["finals"] if (sid, o) in got]
    # the same, stage by stage: receiver -> the controller took it -> handed it to Outputs ->
    # the stdout worker began writing it -> written; then the controller's whole handling of it
    # and whether the final came after a release (a ForceEndpoint)
    ctl = {(sid, o): (t_in, t_out) for t_in, t_out, sid, o in n["ctl"]}
    emitted = {(sid, o): t for t, sid, o in n["emitted"]}
    stages = []
    for t, _, o, sid, _p, _a, latency, t_w in n["finals"]:
        key = (sid, o)
        if key in got and key in ctl and key in emitted:
            t_in, t_out = ctl[key]
            stages.append([(t_in - got[key]) * 1000, (emitted[key] - t_in) * 1000,
                           (t_w - emitted[key]) * 1000, (t - t_w) * 1000,
                           (t - got[key]) * 1000, (t_out - t_in) * 1000, latency > 0])
    per_thread: dict[str, float] = {}
    t_end1 = f1[0]
    last = dict(n["threads1"])
    for key, t_ended, ns in n["ended"]:
        if key not in last and t_ended <= t_end1:
            last[key] = ns
    for key, ns in last.items():
        name = "".join(c if not c.isdigit() else "N" for c in key.split("|")[0])
        name = name.replace("NN", "N").replace("NN", "N")
        per_thread[name] = per_thread.get(name, 0.0) + (ns - n["threads0"].get(key, 0)) / 1e6 / audio_s
    return {"kind": "pttd", "cpu_ms_per_s": cpu_ms_per_s, "per_thread": per_thread, "audio_s": audio_s,
            "rss_mb": n["vmhwm_kb"] / 1024, "import_ms": import_time_s(n["modules"]) * 1000,
            "first_frame_ms": (sessions[0]["binary"][0] - t_spawn) * 1000,
            "ready_ms": (t_ready - t_spawn) * 1000, "lateness": lat, "age": age, "lat_t": lat_t,
            "backlog_frames": backlog, "capture_late": capture_late,
            "fe_raw": fe_raw, "fe_own": fe_own, "turn_to_final": t2f, "rx_to_final": rx2f,
            "final_stages": stages, "frames": len(first),
            "idle_ms_per_s": idle_ms_per_s, "modules": len(n["modules"]),
            "switchinterval": n["switchinterval"], "journal": jd is not None,
            "finals_out": len(finals)}


def summarise(r: dict) -> dict:
    """One round's figures as scalars."""
    out = {k: r[k] for k in ("cpu_ms_per_s", "rss_mb", "import_ms", "first_frame_ms", "frames")}
    for key, name in (("lateness", "lat"), ("age", "age"), ("fe_own", "fe_own"), ("fe_raw", "fe_raw"),
                      ("rx_to_final", "rx"), ("turn_to_final", "t2f")):
        vals = r.get(key) or []
        out[f"{name}_p50"], out[f"{name}_p99"] = pct(vals, 50), pct(vals, 99)
        out[f"{name}_max"] = max(vals) if vals else float("nan")
        out[f"{name}_n"] = len(vals)
    if r["kind"] == "pttd":
        out.update(journal=float(r["journal"]), finals_out=r["finals_out"],
                   journal_finals=r.get("journal_finals", float("nan")))
        out.update(ready_ms=r["ready_ms"], idle_ms_per_s=r["idle_ms_per_s"],
                   backlog_frames=r["backlog_frames"], cap_p50=pct(r["capture_late"], 50),
                   cap_p99=pct(r["capture_late"], 99), switchinterval=r["switchinterval"])
        out.update({f"thread:{k}": v for k, v in r["per_thread"].items()})
    return out


POOLED = (("lateness", "lat"), ("fe_own", "fe_own"), ("fe_raw", "fe_raw"),
          ("rx_to_final", "rx"))


def aggregate(rounds: list[dict], raw: list[dict]) -> dict:
    """Median of each figure over the rounds (a figure missing from a round counts as absent),
    and the tail figures' p99 over all rounds' samples pooled."""
    import statistics

    keys = {k for r in rounds for k in r}
    out = {}
    for k in keys:
        vals = [r[k] for r in rounds if k in r and r[k] == r[k]]   # drop NaN
        out[k] = statistics.median(vals) if vals else float("nan")
    out["rounds"] = len(rounds)
    out["cpu_rounds"] = [r["cpu_ms_per_s"] for r in rounds]
    for key, name in POOLED:
        vals = [v for r in raw for v in (r.get(key) or [])]
        out[f"{name}_pooled_p99"] = pct(vals, 99)
        out[f"{name}_pooled_n"] = len(vals)
    return out


def fmt_table(results: dict[str, dict]) -> str:
    """``results``: contender -> aggregate() of its rounds."""
    kinds = [k for k in CONTENDERS if k in results]
    names = {"pttd": "pttd daemon", "session": "pttd Session", "sdk": "SDK", "bare": "bare ws"}
    rows = [
        ("CPU ms per audio s", "cpu_ms_per_s", "{:.2f}"),
        ("peak RSS (VmHWM) MB", "rss_mb", "{:.1f}"),
        ("import time ms", "import_ms", "{:.0f}"),
        ("start -> first frame ms", "first_frame_ms", "{:.0f}"),
        ("send lateness p50 ms", "lat_p50", "{:.2f}"),
        ("send lateness p99 ms", "lat_p99", "{:.2f}"),
        ("send lateness max ms", "lat_max", "{:.2f}"),
        ("frame age at send p50 ms", "age_p50", "{:.2f}"),
        ("frame age at send p99 ms", "age_p99", "{:.2f}"),
        ("last post-roll sample -> FE on wire p50 ms", "fe_own_p50", "{:.2f}"),
        ("last post-roll sample -> FE on wire p99 ms", "fe_own_p99", "{:.2f}"),
        ("release + post-roll -> FE on wire p50 ms", "fe_raw_p50", "{:.1f}"),
        ("release + post-roll -> FE on wire p99 ms", "fe_raw_p99", "{:.1f}"),
        ("  FE samples per round", "fe_own_n", "{:.0f}"),
        ("Turn received -> final delivered p50 ms", "rx_p50", "{:.2f}"),
        ("Turn received -> final delivered p99 ms", "rx_p99", "{:.2f}"),
        ("Turn sent by server -> delivered p99 ms", "t2f_p99", "{:.2f}"),
        ("  Turn samples per round", "rx_n", "{:.0f}"),
        ("frames timed per round", "frames", "{:.0f}"),
    ]
    if max(r["rounds"] for r in results.values()) > 1:
        rows += [
            ("send lateness p99, rounds pooled, ms", "lat_pooled_p99", "{:.2f}"),
            ("last post-roll sample -> FE p99, pooled, ms", "fe_own_pooled_p99", "{:.2f}"),
            ("release + post-roll -> FE p99, pooled, ms", "fe_raw_pooled_p99", "{:.1f}"),
            ("Turn received -> final p99, pooled, ms", "rx_pooled_p99", "{:.2f}"),
            ("  Turn samples pooled", "rx_pooled_n", "{:.0f}"),
        ]
    width = 44
    lines = ["| figure | " + " | ".join(names[k] for k in kinds) + " | pttd/SDK |",
             "|---|" + "---|" * (len(kinds) + 1)]
    ratios = {"cpu_ms_per_s", "rss_mb", "import_ms", "first_frame_ms", "lat_p50", "lat_p99", "lat_max"}
    for label, key, fmt in rows:
        cells = []
        for k in kinds:
            v = results[k].get(key, float("nan"))
            cells.append("-" if v != v else fmt.format(v))
        ratio = ""
        if key in ratios and "pttd" in results and "sdk" in results:
            ratio = f"{results['pttd'][key] / results['sdk'][key]:.2f}"
        lines.append(f"| {label:<{width}} | " + " | ".join(cells) + f" | {ratio} |")
    rounds = max(r["rounds"] for r in results.values())
    lines.append("")
    lines.append(f"medians of {rounds} round(s); CPU ms per audio s in each round: " + "; ".join(
        f"{names[k]} " + ", ".join(f"{v:.2f}" for v in results[k]["cpu_rounds"]) for k in kinds))
    p = results.get("pttd")
    if p:
        lines.append(f"pttd daemon: process start -> READY=1 {p['ready_ms']:.0f} ms; idle (mic on, "
                     f"no press) {p['idle_ms_per_s']:.2f} ms CPU per s; {p['backlog_frames']:.0f} "
                     f"pre-roll/connect backlog frames not timed; capture thread (WAV) lateness "
                     f"p50/p99 {p['cap_p50']:.2f} / {p['cap_p99']:.2f} ms; "
                     f"switch interval {p['switchinterval'] * 1000:g} ms; journald "
                     + (f"on (finals: {p['journal_finals']:.0f} in the journal, "
                        f"{p['finals_out']:.0f} on stdout)" if p["journal"] else "off"))
        threads = sorted(((k[7:], v) for k, v in p.items() if k.startswith("thread:")),
                         key=lambda kv: -kv[1])
        lines.append("pttd daemon CPU by thread during the turn (ms per audio s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in threads if v >= 0.01))
    return "\n".join(lines)


def fmt_stages(stages: list[list]) -> str:
    """pttd's Turn received -> final delivered, split at its two thread hand-offs, all rounds."""
    if not stages:
        return ""
    names = ("receiver -> controller", "controller -> Outputs", "Outputs -> stdout worker",
             "stdout write", "whole", "controller's whole handling")
    lines = [f"pttd Turn -> final by stage, {len(stages)} finals, all rounds (ms):"]
    for kind, pick in (("mid-press", False), ("after release", True)):
        sel = [st for st in stages if st[6] is pick]
        if sel:
            cols = ", ".join(f"{name} {pct([st[i] for st in sel], 50):.2f} / "
                             f"{pct([st[i] for st in sel], 99):.2f}"
                             for i, name in enumerate(names))
            lines.append(f"  {kind} ({len(sel)}), p50 / p99: {cols}")
    worst = sorted(stages, key=lambda st: st[4])[-5:]
    lines.append("  the 5 slowest (" + " + ".join(names[:4]) + f" = whole; {names[5]}): "
                 + "; ".join(" + ".join(f"{v:.2f}" for v in st[:4]) + f" = {st[4]:.2f}"
                             + f"; {st[5]:.2f}" + (" after release" if st[6] else "")
                             for st in reversed(worst)))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    colors = {"pttd": "tab:red", "session": "tab:orange", "sdk": "tab:blue", "bare": "tab:green"}
    names = {"pttd": "pttd daemon", "session": "pttd Session", "sdk": "AssemblyAI SDK",
             "bare": "bare websocket-client"}
    for k in CONTENDERS:
        r = results.get(k)
        if not r:
            continue
        ax1.plot(r["lat_t"], r["lateness"], ".", ms=2, color=colors[k], alpha=0.6,
                 label=f"{names[k]} (p99 {pct(r['lateness'], 99):.2f} ms)")
        s = sorted(r["lateness"])
        ax2.plot(s, [i / len(s) for i in range(len(s))], color=colors[k], label=names[k])
    ax1.set_xlabel("audio time (s)")
    ax1.set_ylabel("send lateness (ms)")
    ax1.set_yscale("log")
    ax1.set_title(f"Frame deadline -> WebSocket send returned, {CHUNK_MS} ms frames")
    ax1.legend(markerscale=5)
    ax2.set_xscale("log")
    ax2.set_xlabel("send lateness (ms)")
    ax2.set_ylabel("fraction of frames")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--presses", type=int, default=20, help="pttd's short presses (release -> FE)")
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--chunk-ms", type=int, default=50,
                    help="frame size for every contender (pttd: [audio] chunk_ms)")
    ap.add_argument("--period-ms", type=int, default=100,
                    help="pttd's capture period ([audio] period_ms; 100 is its default, an ALSA "
                         "mic's period); the pacing loops read one frame per wake-up")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every contender this many times, interleaved; the table shows medians")
    ap.add_argument("--plot", default=str(ROOT / "bench" / "send_lateness.png"))
    ap.add_argument("--json", help="write every figure and sample here")
    ap.add_argument("--py-spy", dest="spy", metavar="FILE",
                    help="run the pttd daemon under py-spy record (raw format) into FILE")
    ap.add_argument("--journal", choices=("auto", "on", "off"), default="auto",
                    help="pttd writes its journald records to a private systemd-journald "
                         "(tests/journald.py; needs root); auto = where that harness can run")
    ap.add_argument("--cprofile", metavar="DIR",
                    help="cProfile every pttd thread (thread CPU time) into DIR/*.prof")
    args = ap.parse_args()
    kinds = [k for k in CONTENDERS if k in args.only.split(",")]
    journal = args.journal == "on"
    if args.journal == "auto" and "pttd" in kinds:
        from tests.journald import unavailable_reason

        reason = unavailable_reason()
        journal = reason is None
        if reason:
            print(f"compare_sdk: pttd runs without journald ({reason})", flush=True)
    global CHUNK_MS, FRAME_S, FRAME_SAMPLES, PERIOD_MS
    CHUNK_MS, FRAME_S, FRAME_SAMPLES = args.chunk_ms, args.chunk_ms / 1000, RATE * args.chunk_ms // 1000
    PERIOD_MS = args.period_ms
    os.environ["PTTD_BENCH_CHUNK_MS"] = str(args.chunk_ms)
    os.environ["PTTD_BENCH_PERIOD_MS"] = str(args.period_ms)
    tmp = Path(tempfile.mkdtemp(prefix="pttd-compare-"))
    wav = tmp / "speech.wav"
    b_start, total = make_wav(wav, args.seconds, args.presses)
    print(f"compare_sdk: {args.seconds:g} s of paced audio in {args.chunk_ms} ms frames "
          f"(pttd: {args.period_ms} ms capture periods), "
          f"{args.rounds} round(s), {machine()}",
          flush=True)
    server = Server()
    raw: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for i in range(args.rounds):
            for kind in kinds:
                print(f"  round {i + 1}: {kind} ...", flush=True)
                if kind == "pttd":
                    r = run_pttd(server, wav, b_start, args.seconds, args.presses, tmp,
                                 spy=args.spy, cprofile=args.cprofile, journal=journal)
                else:
                    r = run_pacer(kind, server, wav, args.seconds, tmp)
                raw[kind].append(r)
    finally:
        server.close()
    results = {k: aggregate([summarise(r) for r in rs], rs) for k, rs in raw.items()}
    print(fmt_table(results))
    if raw.get("pttd"):
        print(fmt_stages([st for r in raw["pttd"] for st in r["final_stages"]]))
    if args.plot:
        plot({k: rs[-1] for k, rs in raw.items()}, args.plot)
        print(f"plot: {args.plot} (last round)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": results, "rounds": raw}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind = sys.argv[2]
        if kind == "pttd":
            sys.exit(child_pttd(*sys.argv[3:6]))
        child_pacer(kind, *sys.argv[3:5], float(sys.argv[5]), sys.argv[6])
    else:
        main()
