"""The kiosk page in a real browser: Debian's Chromium (headless), driven by playwright-core.

``pttd run`` (WAV mic with a long tone "speech", mock GPIO, the fake v3 server) serves the page;
``tests/browser/kiosk_driver.js`` holds the mic button and sees partials (grey) then the final
(black), does a tap-to-toggle turn with touch, then — while the test restarts pttd with a key
the server refuses — sees the page reconnect on its own and show the error banner with the reason.
Screenshots go to ``test-artifacts/`` (kiosk.png, kiosk-partial.png, kiosk-error.png).
No internet: Chromium runs with networking extras off and only talks to 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.test_kiosk import LONG_SPEECH, free_port, start_daemon

REPO = Path(__file__).resolve().parent.parent
BROWSER_DIR = REPO / "tests" / "browser"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
SCRIPT = ["turn on the kitchen lights", "what time is it"]
FIRST, SECOND = "Turn on the kitchen lights.", "What time is it."
STEP_TIMEOUT_S = 60

pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason="Debian chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (apt-get install nodejs)"),
    pytest.mark.skipif(not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(),
                       reason="playwright-core not installed (npm ci --prefix tests/browser)"),
]


class Driver:
    """The node process and its JSON-lines report, read on a thread (bounded waits)."""

    def __init__(self, config: dict):
        self.proc = subprocess.Popen(["node", str(BROWSER_DIR / "kiosk_driver.js"), json.dumps(config)],
                                     cwd=BROWSER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.stderr.append(line)
        self.lines.put({"step": "exited"})

    def step(self, name: str) -> dict:
        try:
            msg = self.lines.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"browser driver silent waiting for {name!r}: {''.join(self.stderr)}")
        assert msg.get("step") == name, f"expected {name!r}, got {msg} {''.join(self.stderr)}"
        return msg

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        try:
            self.proc.wait(STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("browser driver did not exit")


def test_kiosk_page_in_chromium(tmp_path, fake_v3):
    srv = fake_v3(script=SCRIPT, api_keys={"kiosk-key-0123456789"})
    port = free_port()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    d = start_daemon(tmp_path / "one", srv, port=port, layout=LONG_SPEECH)
    ARTIFACTS.mkdir(exist_ok=True)
    driver = Driver({"url": f"http://127.0.0.1:{port}/", "userDataDir": str(tmp_path / "profile"),
                     "artifacts": str(ARTIFACTS), "first": FIRST, "second": SECOND,
                     "timeoutMs": 20000})
    d2 = None
    try:
        driver.step("loaded")
        turns = driver.step("turns-done")
        check_hold_turn(turns["hold"])
        check_tap_turn(turns["tap"])
        code, took = d.stop()
        assert code == 0 and took < 5.0
        bad = fake_v3(script=SCRIPT, api_keys={"another-key"})  # refuses ours: 1008
        d2 = start_daemon(tmp_path / "two", bad, port=port, layout=LONG_SPEECH)
        driver.say("restarted")
        done = driver.step("done")
        error = d2.wait_event(lambda e: e["event"] == "error")
        assert error["message"] and error["message"] in done["banner"]
        assert done["afterReconnect"] == SECOND  # the reconnect kept the page's transcript
        assert done["pageErrors"] == []
        driver.finish()
        assert driver.proc.returncode == 0
    except AssertionError:
        print("daemon events:", *d.all_events, sep="\n  ")
        raise
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        d.kill()
        if d2 is not None:
            d2.kill()
    assert (ARTIFACTS / "kiosk.png").stat().st_size > 1000


def check_hold_turn(hold: dict) -> None:
    assert hold["pressed"] == "true"
    seen = hold["seen"]
    partials = [s for s in seen if s["kind"] == "partial" and s["text"]]
    finals = [s for s in seen if s["kind"] == "final"]
    assert len({p["text"] for p in partials}) >= 2, seen
    for p in partials:
        assert "turn on the kitchen lights".startswith(p["text"].lower()), p
        assert p["color"] == "rgb(138, 138, 138)"      # grey while it may still change
    assert finals[-1]["text"] == FIRST and finals[-1]["color"] == "rgb(0, 0, 0)"  # black when final
    assert seen.index(partials[0]) < seen.index(finals[-1])
    states = [s["state"] for s in seen]
    assert "listening" in states and states[-1] in ("finalizing", "idle")


def check_tap_turn(tap: dict) -> None:
    assert tap["latched"] == {"pressed": "true", "state": "listening"}  # still on after the tap
    seen = tap["seen"]
    assert any(s["kind"] == "partial" and "what time is it".startswith(s["text"].lower())
               for s in seen if s["text"])
    assert seen[-1]["kind"] == "final" and seen[-1]["text"] == SECOND
