"""The hook command: real programs (small scripts written to tmp), real process groups, no shell."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pttd.hook import HookSink, env_name, hook_env
from tests.daemon_proc import DaemonProcess, speech_wav, write_config

FINAL = {"event": "final", "text": "Turn on the lights; rm -rf / $(touch pwned)\nsecond line",
         "turn_order": 3, "session_id": "sess-1", "press_id": 7, "audio_ms": 2300,
         "latency_ms": 412, "ts": 1700000000.25, "late": True, "gap_ms": 40}

RECORDER = """\
import json, os, sys
out = sys.argv[1]
data = {"argv": sys.argv[2:], "stdin": sys.stdin.read(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("PTTD_") or k == "ASSEMBLYAI_API_KEY"}}
n = len([f for f in os.listdir(out) if f.startswith("run")])
with open(os.path.join(out, f"run{n}.json"), "w") as f:
    json.dump(data, f)
"""


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def runs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("run*.json"))]


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling files written by the hook, with a deadline


@pytest.fixture
def sinks():
    made: list[HookSink] = []

    def make(*args, **kwargs) -> HookSink:
        sink = HookSink(*args, **kwargs)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def test_stdin_env_and_literal_argv(tmp_path, sinks, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    rec = script(tmp_path, "rec.py", RECORDER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASSEMBLYAI_API_KEY", "must-not-leak")
    tricky = ["; touch x", "$(touch y)", "`touch z`", "a b", "*"]
    sink = sinks([sys.executable, str(rec), str(out), *tricky])
    sink.emit({"event": "partial", "text": "ignored"})
    sink.emit({"event": "state", "state": "idle"})
    sink.emit(FINAL)
    wait_for(lambda: len(runs(out)) == 1, what="the hook run")
    run = runs(out)[0]
    assert run["argv"] == tricky                       # no shell: passed literally
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z", "pwned"))
    assert run["stdin"] == FINAL["text"] + "\n"
    env = run["env"]
    assert env == {"PTTD_TURN_ORDER": "3", "PTTD_SESSION_ID": "sess-1", "PTTD_PRESS_ID": "7",
                   "PTTD_AUDIO_MS": "2300", "PTTD_LATENCY_MS": "412", "PTTD_TS": "1700000000.25",
                   "PTTD_LATE": "true", "PTTD_GAP_MS": "40", "PTTD_EVENT": "final",
                   "PTTD_ATTEMPT": "1"}
    assert sink.runs == 1


def test_env_helpers():
    assert env_name("turn_order") == "PTTD_TURN_ORDER" and env_name("a-b c") == "PTTD_A_B_C"
    env = hook_env({"event": "final", "text": "t", "x": None, "s": "a\0b"}, 2, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PTTD_S": "ab", "PTTD_EVENT": "final", "PTTD_ATTEMPT": "2"}


def test_failure_is_retried_then_succeeds(tmp_path, sinks, caplog):
    count = tmp_path / "count"
    hook = script(tmp_path, "flaky.sh", f"""#!/bin/sh
echo x >> {count}
[ "$(wc -l < {count})" -ge 3 ] && exit 0
echo "not yet" >&2
exit 3
""")
    sink = sinks([str(hook)], retries=2)
    sink.emit(FINAL)
    wait_for(lambda: sink.delivered or sink.failures, what="the third run")
    assert sink.delivered == 1 and sink.failures == 0 and sink.runs == 3
    assert caplog.text.count("exit code 3") == 2 and "not yet" in caplog.text


def test_gives_up_after_the_retries(tmp_path, sinks, caplog):
    hook = script(tmp_path, "fail.sh", "#!/bin/sh\necho broken >&2\nexit 5\n")
    sink = sinks([str(hook)], retries=1)
    started = time.monotonic()
    sink.emit(FINAL)
    wait_for(lambda: sink.failures == 1, what="giving up")
    assert sink.runs == 2  # one try plus one retry, not more
    assert time.monotonic() - started < 5
    assert caplog.text.count("exit code 5") == 2 and "gave up on press 7 after 2 attempt" in caplog.text


def test_timeout_kills_the_whole_process_group(tmp_path, sinks, caplog):
    pids = tmp_path / "pids"
    hook = script(tmp_path, "hang.sh", f"""#!/bin/sh
sleep 60 &
echo $! > {pids}
trap '' TERM
wait
""")
    sink = sinks([str(hook)], timeout_s=0.5, retries=0)
    started = time.monotonic()
    sink.emit(FINAL)
    wait_for(lambda: sink.failures == 1, timeout=10, what="the timeout")
    took = time.monotonic() - started
    assert 0.5 <= took < 4  # timeout, SIGTERM ignored by the shell, SIGKILL a second later
    child = int(pids.read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="the grandchild to die")
    assert "timed out after 0.5 s" in caplog.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by init later) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_signal_exit_is_reported(tmp_path, sinks, caplog):
    hook = script(tmp_path, "die.sh", "#!/bin/sh\nkill -SEGV $$\n")
    sink = sinks([str(hook)], retries=0)
    sink.emit(FINAL)
    wait_for(lambda: sink.failures == 1, what="the failure")
    assert "killed by SIGSEGV" in caplog.text


def test_missing_program_is_logged_not_retried(tmp_path, sinks, caplog):
    sink = sinks([str(tmp_path / "nope")], retries=2)
    sink.emit(FINAL)
    wait_for(lambda: sink.failures == 1, what="the failure")
    assert sink.runs == 0 and caplog.text.count("cannot be started") == 1


def test_emit_never_blocks_and_the_queue_is_bounded(tmp_path, sinks, caplog):
    hook = script(tmp_path, "slow.sh", "#!/bin/sh\nsleep 30\n")
    sink = sinks([str(hook)], timeout_s=30, queue_size=2, close_grace_s=0.2)
    started = time.monotonic()
    for i in range(10):
        sink.emit({**FINAL, "press_id": i})
    assert time.monotonic() - started < 0.1
    wait_for(lambda: sink.runs == 1, what="the first run")
    assert "dropping press" in caplog.text  # 1 running + 2 queued; the rest dropped and logged
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 3  # the running hook was killed, not waited for
    dropped = caplog.text.count("dropping press")
    assert sink.runs == 1 and 1 <= sink.abandoned <= 2  # at most queue_size were waiting
    assert sink.runs + sink.abandoned + dropped == 10  # every final accounted for


def test_close_lets_a_quick_hook_finish(tmp_path, sinks):
    out = tmp_path / "out"
    out.mkdir()
    rec = script(tmp_path, "rec.py", RECORDER)
    sink = sinks([sys.executable, str(rec), str(out)], close_grace_s=5)
    sink.emit(FINAL)
    sink.close()
    assert len(runs(out)) == 1 and sink.abandoned == 0


# --- pttd run end to end --------------------------------------------------------------------------

KEY = "hook-key-0123456789"


def test_daemon_runs_the_hook_for_each_final(tmp_path, fake_v3):
    srv = fake_v3(script=["hello hook"], api_keys={KEY})
    out = tmp_path / "out"
    out.mkdir()
    rec = script(tmp_path, "rec.py", RECORDER)
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    sock = tmp_path / "ctl.sock"
    hook = json.dumps([sys.executable, str(rec), str(out), "; touch x"])
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY, wav=wav, socket=sock)
    cfg.write_text(cfg.read_text().replace("[output]", f"[output]\nhook = {hook}\nhook_timeout_s = 5"))
    d = DaemonProcess(cfg, sock)
    try:
        d.wait_ready()
        d.wait_audio_ms(1500)
        d.command("press")
        d.wait_audio_ms(4200)
        d.command("release")
        final = d.wait_event(lambda e: e["event"] == "final")
        wait_for(lambda: len(runs(out)) == 1, what="the hook run")
        run = runs(out)[0]
        assert run["stdin"] == final["text"] + "\n" == "Hello hook.\n"
        assert run["argv"] == ["; touch x"]
        assert run["env"]["PTTD_PRESS_ID"] == "1"
        assert run["env"]["PTTD_SESSION_ID"] == final["session_id"]
        code, took = d.stop()
        assert code == 0 and took < 5.0
    finally:
        d.kill()


def test_daemon_refuses_a_missing_hook_program(tmp_path):
    import subprocess

    cfg = tmp_path / "pttd.toml"
    cfg.write_text(f'[stt]\nurl = "local"\n[output]\nhook = ["{tmp_path}/absent"]\n'
                   f'[gpio]\npin_factory = "mock"\n')
    result = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "output.hook" in result.stderr


def test_hook_config_keys_are_range_checked():
    from pttd.config import ConfigError, from_dict

    cfg = from_dict({"output": {"hook": ["/bin/true"], "hook_timeout_s": 2, "hook_retries": 0}})
    assert cfg.output.hook_timeout_s == 2.0 and cfg.output.hook_retries == 0
    assert from_dict({}).output.hook_timeout_s == 10.0 and from_dict({}).output.hook_retries == 2
    for bad in ({"hook_timeout_s": 0}, {"hook_retries": -1}, {"hook_retries": 11},
                {"hook_retries": 1.5}, {"hook": "/bin/true"}):
        with pytest.raises(ConfigError):
            from_dict({"output": bad})

