"""``pttd demo``: the real pipeline on the embedded default — no Pi, mic, key or internet.

A WAV of bundled speech clips plays as the mic; gpiozero's mock pins stand in for the button,
which a script presses before each clip and releases after it (the real Button callback path);
the offline engine (pocketsphinx behind a v3-compatible WebSocket on 127.0.0.1) transcribes.
Two passes: kiosk commands (recognition constrained to the phrase list, sent as
``keyterms_prompt``) and free dictation. It prints states, partials and finals, then the
word error rate of each pass against the known text.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import wave
from importlib import resources
from pathlib import Path

from pttd.config import from_dict

LEAD_MS, GAP_MS, PRESS_EARLY_MS, RELEASE_LATE_MS = 800, 1200, 300, 250


NEXT_STEP = (
    "Next, on a Raspberry Pi with a mic and a button: sudo ./install.sh (from a pttd "
    "checkout), then your AssemblyAI key in /etc/pttd/api-key; see docs/install.md."
)


def run_demo(jsonl: bool = False, out=None) -> int:
    """Exit 0 with every clip's final, 1 if one got none; StartupError (exit 2) without the
    ``[local]`` extra."""
    from pttd.app.offline import require_pocketsphinx

    out = out or sys.stdout
    require_pocketsphinx("pttd demo")
    from pttd.local.engine import LocalEngine

    meta = json.loads(_data("demo.json").read_text())
    say = (lambda text: None) if jsonl else (lambda text: print(text, file=out, flush=True))
    say(
        "pttd demo: WAV mic -> ring buffer -> controller -> v3 session -> offline engine "
        "(pocketsphinx on 127.0.0.1); mock GPIO button. No Pi, mic, key or internet."
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="pttd-demo-") as tmp, LocalEngine() as engine:
        commands = [c for c in meta["clips"] if c["kind"] == "command"]
        dictation = [c for c in meta["clips"] if c["kind"] != "command"]
        say(f"\n== kiosk commands: recognition limited to {len(meta['phrases'])} phrases ==")
        results += _pass(
            engine.url,
            Path(tmp),
            "commands",
            commands,
            {"keyterms_prompt": meta["phrases"]},
            jsonl,
            say,
        )
        say("\n== free dictation: the default language model (expect mistakes) ==")
        results += _pass(engine.url, Path(tmp), "dictation", dictation, {}, jsonl, say)
    return _summary(results, say)


def _pass(url: str, tmp: Path, name: str, clips: list[dict], params: dict, jsonl: bool, say):
    from pttd.app.daemon import Daemon

    mic, spans = _build_mic(tmp / f"{name}.wav", clips)
    sink = _Collector()
    cfg = from_dict(
        {
            "stt": {"url": url, "params": params, "speech_model": "universal-streaming-english"},
            "audio": {"source": "wav", "wav": str(mic)},
            "gpio": {"pin_factory": "mock"},
            "leds": {"kind": "led"},
            "control": {"socket": str(tmp / f"{name}.sock")},
            "output": {"stdout": "jsonl" if jsonl else "text", "journal": False},
        },
        environ={},
    )
    daemon = Daemon(cfg, extra_sinks=[sink], url_override=url)
    daemon.build()
    daemon.start()
    try:
        pin = daemon.button.pin
        for start_ms, end_ms in spans:
            _wait_audio(daemon, start_ms - PRESS_EARLY_MS)
            pin.drive_low()  # pressed (pull-up: active low)
            _wait_audio(daemon, end_ms + RELEASE_LATE_MS)
            pin.drive_high()  # released
        sink.wait_finals(len(clips), timeout=30)
    finally:
        daemon.request_stop()
        daemon.shutdown()
    finals = {e["press_id"]: e["text"] for e in sink.finals}
    return [(name, clip["text"], finals.get(i + 1, "")) for i, clip in enumerate(clips)]


def _build_mic(path: Path, clips: list[dict]) -> tuple[Path, list[tuple[int, int]]]:
    """One WAV: silence, clip, silence, clip, ...; returns the speech spans in ms."""
    frames, spans, pos_ms = [bytes(16 * 2 * LEAD_MS)], [], LEAD_MS
    for clip in clips:
        with wave.open(str(_data(clip["file"])), "rb") as w:
            audio = w.readframes(w.getnframes())
        ms = len(audio) // 32
        spans.append((pos_ms, pos_ms + ms))
        frames += [audio, bytes(16 * 2 * GAP_MS)]
        pos_ms += ms + GAP_MS
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(frames))
    return path, spans


def _wait_audio(daemon, ms: int) -> None:
    target = max(0, ms) * 16
    deadline = time.monotonic() + ms / 1000 + 10
    while daemon.ring.end < target and time.monotonic() < deadline:
        daemon.ring.wait_for(target - 1, 0.5)


def _data(name: str) -> Path:
    return Path(str(resources.files("pttd") / "data" / name))


class _Collector:
    def __init__(self):
        self.finals: list[dict] = []
        self._cond = threading.Condition()

    def emit(self, event: dict) -> None:
        if event.get("event") == "final":
            with self._cond:
                self.finals.append(event)
                self._cond.notify_all()

    def close(self) -> None:
        pass

    def wait_finals(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.finals) < n and time.monotonic() < deadline:
                self._cond.wait(0.2)


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length), case and punctuation ignored."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c in " '" else " " for c in text).split()


def _summary(results, say) -> int:
    say("\n== word error rate against the known text ==")
    missing = 0
    for name in dict.fromkeys(r[0] for r in results):
        errors = words = 0
        for _, ref, hyp in (r for r in results if r[0] == name):
            e, n = word_errors(ref, hyp)
            errors, words = errors + e, words + n
            missing += not hyp
            say(f"  {name:9} said {ref!r:34} heard {hyp!r}")
        say(f"  {name:9} WER {100 * errors / max(1, words):.0f}% ({errors}/{words} words)")
    if missing:
        say(f"{missing} clip(s) produced no final")
        return 1
    say("\n" + NEXT_STEP)
    return 0
