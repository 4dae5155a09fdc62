"""The whole daemon's CPU with each kind of mic, next to the AssemblyAI SDK, in one run.

    python bench/mic_daemon.py [--seconds 60] [--rounds 2]

``compare_sdk.py``'s pttd reads a 16-bit mono WAV file paced by a timer. The appliance reads an
ALSA mic: an I2S MEMS mic (S32_LE stereo 48 kHz, converted with numpy) or a USB mic (S16_LE
mono 16 kHz: the 80 Hz high-pass, with numpy, unless ``highpass_hz = 0``). Here a real ``pttd run`` process captures from each in turn:

* ``wav``: the WAV source, as in compare_sdk.py;
* ``usb``: real alsa-lib reading the ALSA ``file`` plugin, whose FIFO a feeder process fills
  in real time (tests/alsa_fifo.py), S16_LE mono 16 kHz; ``usb-nohp``: the same with
  ``highpass_hz = 0``, so no conversion and no numpy;
* ``i2s``: the same, S32_LE stereo 48 kHz, left channel (the I2S MEMS format).

One press is held for ``--seconds`` of audio. The figure is the process's CPU (utime + stime in
/proc, every thread, ended ones too) from the press to the final on stdout, divided by the
final's ``audio_ms``; plus peak RSS. The SDK's pacing loop from compare_sdk.py runs in the same
rounds against the same fake server (its own process), for the ratio. jsonl stdout, mock GPIO,
no journald (compare_sdk.py measures that: +0.1 ms/s). Prints figures, never fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import compare_sdk as cs  # noqa: E402
from tests.alsa_fifo import FifoMic  # noqa: E402
from tests.daemon_proc import DaemonProcess, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def speech_like(rate: int, channels: int, dtype: str, scale: float):
    """A FifoMic signal: a 300 Hz tone for 1.2 s of every 3 s (the turns), quiet noise between."""
    def signal(start: int, n: int) -> np.ndarray:
        t = (start + np.arange(n)) / rate
        loud = (t % 3.0) < 1.2
        x = np.where(loud, 0.3 * np.sin(2 * np.pi * 300 * t), 0.001 * np.sin(2 * np.pi * 97 * t))
        out = np.zeros((n, channels), dtype=dtype)
        out[:, 0] = (x * scale).astype(np.int64) & (~0xFF if dtype == "<i4" else ~0)
        return out
    return signal


MICS = {  # kind: FifoMic arguments and the [audio] lines
    "usb": (dict(signal=speech_like(16000, 1, "<i2", 32767), format="S16_LE", channels=1,
                 rate=16000),
            'capture_format = "S16_LE"\ncapture_channels = 1\ncapture_rate = 16000\nchannel = 0'),
    "i2s": (dict(signal=speech_like(48000, 2, "<i4", 2 ** 31 - 256), format="S32_LE",
                 channels=2, rate=48000),
            'capture_format = "S32_LE"\ncapture_channels = 2\ncapture_rate = 48000\nchannel = 0'),
}
MICS["usb-nohp"] = (MICS["usb"][0], MICS["usb"][1] + "\nhighpass_hz = 0")  # no numpy at all


def process_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (ended threads included), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_daemon(kind: str, server: cs.Server, wav: Path, seconds: float, tmp: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=tmp))
    sock = work / "ctl.sock"
    mic = None
    env = {"OPENBLAS_NUM_THREADS": "1"}
    if kind == "wav":
        cfg = write_config(work / "pttd.toml", url=server.url, key=cs.KEY, socket=sock, wav=wav)
    else:
        fifo_args, audio = MICS[kind]
        mic = FifoMic(patch_env=False, **fifo_args).__enter__()
        env.update(mic.env)
        cfg = write_config(work / "pttd.toml", url=server.url, key=cs.KEY, socket=sock,
                           audio=f'device = "{mic.device}"\n{audio}')
    d = DaemonProcess(cfg, sock, env=env)
    try:
        d.wait_ready()
        d.wait_audio_ms(1500)
        pid = d.proc.pid
        cpu0 = process_cpu_s(pid)
        d.command("press")
        time.sleep(max(0.0, seconds - 0.8))   # pre-roll 0.5 s + post-roll 0.3 s make it up
        d.command("release")
        final = d.wait_event(lambda e: e["event"] == "final" and e["latency_ms"] > 0, 30)
        cpu1 = process_cpu_s(pid)
        rss_mb = cs.vm_kb("VmHWM", pid) / 1024
        d.stop()
    finally:
        d.kill()
        if mic is not None:
            mic.__exit__(None, None, None)
    server.take()
    audio_s = final["audio_ms"] / 1000
    return {"cpu_ms_per_s": (cpu1 - cpu0) / audio_s * 1000, "rss_mb": rss_mb, "audio_s": audio_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="audio per press")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pttd-mics-"))
    wav = tmp / "speech.wav"
    cs.make_wav(wav, args.seconds + 5, 0)
    kinds = ("wav", "usb", "usb-nohp", "i2s", "sdk")
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    print(f"mic_daemon: {args.seconds:g} s per press, {args.rounds} round(s), {cs.machine()}",
          flush=True)
    server = cs.Server()
    try:
        for i in range(args.rounds):
            for kind in kinds:
                print(f"  round {i + 1}: {kind} ...", flush=True)
                if kind == "sdk":
                    r = cs.run_pacer("sdk", server, wav, args.seconds, tmp)
                else:
                    r = run_daemon(kind, server, wav, args.seconds, tmp)
                rows[kind].append(r)
    finally:
        server.close()
    sdk = statistics.median(r["cpu_ms_per_s"] for r in rows["sdk"])
    names = {"wav": "pttd, WAV source (compare_sdk's)", "usb": "pttd, USB mic S16 mono 16k (ALSA)",
             "usb-nohp": "the same, highpass_hz = 0 (no numpy)",
             "i2s": "pttd, I2S mic S32 stereo 48k (ALSA)", "sdk": "SDK, pacing loop"}
    print("| contender | CPU ms per audio s (rounds) | / SDK | peak RSS MB |")
    print("|---|---|---|---|")
    for kind in kinds:
        cpu = [r["cpu_ms_per_s"] for r in rows[kind]]
        med = statistics.median(cpu)
        print(f"| {names[kind]} | {med:.2f} ({', '.join(f'{c:.2f}' for c in cpu)}) | "
              f"{med / sdk:.2f} | {statistics.median(r['rss_mb'] for r in rows[kind]):.1f} |")


if __name__ == "__main__":
    main()
