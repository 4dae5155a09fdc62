"""The hook command: real programs (small scripts written to tmp), real process groups, no shell."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pttd.outputs.hook import HookSink, env_name, hook_env
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
with open(os.path.join(out, "partial"), "w") as f:  # renamed when complete: never read half-written
    json.dump(data, f)
os.replace(os.path.join(out, "partial"), os.path.join(out, f"run{n}.json"))
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



# --- issue 23: bounded output, resource limits, an environment without the key -------------------

ENV_DUMP = """\
import json, os, resource, sys
out = sys.argv[1]
stdin = sys.stdin.read()  # pttd feeds stdin after setting the limits: read it first
data = {"stdin": stdin, "env": dict(os.environ),
        "core": resource.getrlimit(resource.RLIMIT_CORE),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)}
n = len([f for f in os.listdir(out) if f.startswith("run")])
with open(os.path.join(out, "partial"), "w") as f:  # renamed when complete: never read half-written
    json.dump(data, f)
os.replace(os.path.join(out, "partial"), os.path.join(out, f"run{n}.json"))
"""


def _allowed_env_name(name: str) -> bool:
    from pttd.outputs.hook import ENV_ALLOWED

    return name in ENV_ALLOWED or name.startswith(("LC_", "PTTD_"))


def test_environment_is_an_allow_list(tmp_path, sinks, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "assemblyai-api-key").write_text("sk_credential_key")
    for name, value in {"CREDENTIALS_DIRECTORY": str(creds), "ASSEMBLYAI_API_KEY": "sk_env_key",
                        "PTTD_CONFIG": "/etc/pttd/secret.toml", "AWS_SECRET_ACCESS_KEY": "x",
                        "LANG": "C.UTF-8", "LC_TIME": "C", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    sink = sinks([sys.executable, str(script(tmp_path, "dump.py", ENV_DUMP)), str(out)])
    sink.emit(FINAL)
    wait_for(lambda: len(runs(out)) == 1, what="the hook run")
    env = runs(out)[0]["env"]
    assert "CREDENTIALS_DIRECTORY" not in env and "ASSEMBLYAI_API_KEY" not in env
    assert "PTTD_CONFIG" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert [k for k in env if not _allowed_env_name(k)] == []
    assert not [k for k, v in env.items() if str(creds) in v or "sk_" in v]
    assert env["LANG"] == "C.UTF-8" and env["LC_TIME"] == "C" and env["HOME"] == str(tmp_path)
    assert env["PATH"] == os.environ["PATH"] and env["PTTD_PRESS_ID"] == "7"


def test_core_dumps_off_and_file_size_limited(tmp_path, sinks):
    from pttd.outputs.hook import FILE_SIZE_LIMIT

    out = tmp_path / "out"
    out.mkdir()
    big = tmp_path / "big"
    writer = script(tmp_path, "write.sh", f"""#!/bin/sh
cat > /dev/null
head -c {FILE_SIZE_LIMIT + (8 << 20)} /dev/zero > {big}
echo "head: $?" >&2
exit 0
""")
    sink = sinks([sys.executable, str(script(tmp_path, "dump.py", ENV_DUMP)), str(out)])
    sink.emit(FINAL)
    wait_for(lambda: len(runs(out)) == 1, what="the hook run")
    run = runs(out)[0]
    assert run["core"] == [0, 0]
    assert run["fsize"] == [FILE_SIZE_LIMIT, FILE_SIZE_LIMIT]
    files = sinks([str(writer)])
    files.emit(FINAL)
    wait_for(lambda: files.delivered, what="the file-writing hook")
    assert big.stat().st_size == FILE_SIZE_LIMIT  # SIGXFSZ stopped head there


def _bytes_held_under(folder: Path, pid: int | str = "self") -> int:
    """Bytes in files under ``folder``, also deleted ones that process ``pid`` still holds open."""
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += os.stat(fd).st_size
        except OSError:
            continue  # closed meanwhile
    return total


FLOOD = """#!/bin/sh
# 200 MB of output, then wait (bounded) until the test has looked, then succeed
head -c 200000000 /dev/zero
echo flooded > {wrote}
i=0
while [ ! -e {go} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i + 1)); done
exit 0
"""


def test_a_flood_of_output_is_never_stored(tmp_path, sinks, monkeypatch, caplog):
    import tempfile

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    wrote, go = tmp_path / "wrote", tmp_path / "go"
    sink = sinks([str(script(tmp_path, "flood.sh", FLOOD.format(wrote=wrote, go=go)))])
    sink.emit(FINAL)
    wait_for(wrote.exists, timeout=20, what="the flood")
    assert _bytes_held_under(tmpdir) < 16 << 20
    go.touch()
    wait_for(lambda: sink.delivered or sink.failures, what="the run to end")
    assert sink.delivered == 1  # head got SIGPIPE; the hook itself carried on and succeeded
    assert "printed more than 1048576 bytes for press 7" in caplog.text


def test_endless_output_ends_fast_without_a_file(tmp_path, sinks, caplog):
    yes = __import__("shutil").which("yes")
    sink = sinks([yes, "spam"], timeout_s=5, retries=0)
    started = time.monotonic()
    sink.emit(FINAL)
    wait_for(lambda: sink.failures == 1, what="the failure")
    assert time.monotonic() - started < 4  # the closed pipe ended it, not the 5 s timeout
    assert "killed by SIGPIPE" in caplog.text and "over 1048576 bytes, pipe closed" in caplog.text
    line = next(r.getMessage() for r in caplog.records if "killed by SIGPIPE" in r.getMessage())
    assert len(line) < 3000  # only the tail is logged


def test_tail_keeps_the_last_bytes():
    from pttd.outputs.hook import HookOutput

    out = HookOutput(keep=10, limit=100)
    assert out.add(b"0123456789abcdef") and out.tail == b"6789abcdef"
    assert out.add(b"XY") and out.tail == b"89abcdefXY" and out.describe() == "; output: 89abcdefXY"
    assert not out.add(b"z" * 90) and out.cut and out.total == 108
    assert HookOutput().describe() == ""


def _daemon_with_hook(tmp_path, fake_v3, hook: list[str], *, key_line: bool = True, env=None):
    srv = fake_v3(script=["hello hook"], api_keys={KEY})
    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    sock = tmp_path / "ctl.sock"
    cfg = write_config(tmp_path / "pttd.toml", url=srv.url, key=KEY if key_line else None,
                       wav=wav, socket=sock)
    cfg.write_text(cfg.read_text().replace(
        "[output]", f"[output]\nhook = {json.dumps(hook)}\nhook_timeout_s = 20"))
    return DaemonProcess(cfg, sock, env=env)


def _one_press(d: DaemonProcess) -> dict:
    d.wait_ready()
    d.wait_audio_ms(1500)
    d.command("press")
    d.wait_audio_ms(4200)
    d.command("release")
    return d.wait_event(lambda e: e["event"] == "final")


def test_daemon_hook_flood_stays_off_disk_and_finals_arrive(tmp_path, fake_v3):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    wrote, go = tmp_path / "wrote", tmp_path / "go"
    flood = script(tmp_path, "flood.sh", FLOOD.format(wrote=wrote, go=go))
    d = _daemon_with_hook(tmp_path, fake_v3, [str(flood)], env={"TMPDIR": str(tmpdir)})
    try:
        final = _one_press(d)
        assert final["text"] == "Hello hook."
        wait_for(wrote.exists, timeout=20, what="the flood")
        assert _bytes_held_under(tmpdir, d.proc.pid) < 16 << 20
        go.touch()
        assert d.command("status")["ok"]
        code, took = d.stop()
        assert code == 0 and took < 5.0
        assert "printed more than" in "".join(d.stderr_lines)
    finally:
        go.touch()
        d.kill()


def test_daemon_hook_cannot_find_the_credential(tmp_path, fake_v3, monkeypatch):
    """The key comes from $CREDENTIALS_DIRECTORY, as under the shipped unit; the hook sees
    neither the variable nor the key."""
    monkeypatch.delenv("ASSEMBLYAI_API_KEY", raising=False)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "assemblyai-api-key").write_text(KEY + "\n")
    out = tmp_path / "out"
    out.mkdir()
    dump = script(tmp_path, "dump.py", ENV_DUMP)
    d = _daemon_with_hook(tmp_path, fake_v3, [sys.executable, str(dump), str(out)],
                          key_line=False, env={"CREDENTIALS_DIRECTORY": str(creds)})
    try:
        final = _one_press(d)  # the server accepted the key: it was read from the credential
        wait_for(lambda: len(runs(out)) == 1, what="the hook run")
        run = runs(out)[0]
        assert run["stdin"] == final["text"] + "\n"
        env = run["env"]
        assert "CREDENTIALS_DIRECTORY" not in env
        assert not [k for k, v in env.items() if KEY in v or str(creds) in v]
        assert [k for k in env if not _allowed_env_name(k)] == []
        assert d.stop()[0] == 0
    finally:
        d.kill()
