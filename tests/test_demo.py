"""``pttd demo`` runs the whole pipeline offline and exits 0 with the finals printed."""
import json
import subprocess
import sys


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "pttd.cli", "demo", *args], capture_output=True,
                          text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_demo_text():
    r = run_demo()
    assert r.returncode == 0, r.stdout + r.stderr
    finals = [l for l in r.stdout.splitlines() if l.startswith("final: ")]
    assert finals[:3] == ["final: Turn on the kitchen lights.", "final: What time is it.",
                          "final: Play some music."]
    assert len(finals) == 4 and finals[3] != "final: "
    assert "commands  WER 0%" in r.stdout and "Traceback" not in r.stderr


def test_demo_jsonl_prints_contract_events():
    r = run_demo("--jsonl")
    assert r.returncode == 0, r.stderr
    events = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    finals = [e for e in events if e["event"] == "final"]
    assert [f["text"] for f in finals[:3]] == ["Turn on the kitchen lights.", "What time is it.",
                                                "Play some music."]
    for f in finals:
        assert set(f) >= {"text", "turn_order", "session_id", "press_id", "audio_ms", "latency_ms", "ts"}
    assert {e["state"] for e in events if e["event"] == "state"} >= {"idle", "connecting",
                                                                      "listening", "finalizing"}
