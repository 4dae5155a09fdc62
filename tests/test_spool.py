"""The spool (issue 27): its files, and the controller's use of it, on real files.

The controller runs without its thread against the scripted world of test_press_lifecycle (fake
sessions and streamers, a fake clock, a real ring); the spool is a real ``Spool`` on a temporary
directory. The real daemon process is exercised in test_spool_e2e.py.
"""
from __future__ import annotations

import os
import stat
import time
import wave
from pathlib import Path

import pytest

from pttd import config
from pttd.core.press import Outcome, PressPhase
from pttd.stt.base import Begin, FinalTurn, Turn
from pttd.core.spool import DEFAULT_DIR, Spool, SpoolError, encode, open_spool
from tests.test_press_lifecycle import RATE, Harness


# --- the files -----------------------------------------------------------------------------------

def spool_at(path: Path, **kw) -> Spool:
    path.mkdir(mode=0o700, exist_ok=True)
    return Spool(path, max_bytes=kw.get("max_bytes", 1 << 20), max_age_s=kw.get("max_age_s", 3600),
                 threaded=kw.get("threaded", True))


def meta(pid: int, **kw) -> dict:
    return {"press_id": pid, "pressed_at": time.time(), "sample_rate": RATE, "audio_start": 0,
            **kw}


def write_all(spool: Spool, presses) -> list:
    done = []
    entries = [spool.add(meta(pid), pcm, lambda e, err: done.append((e, err)))
               for pid, pcm in presses]
    assert spool.close(5)
    assert [err for _, err in done] == [None] * len(entries)
    return entries


def test_a_press_file_is_a_playable_wav_0600_written_once(tmp_path):
    spool = spool_at(tmp_path / "spool")
    pcm = bytes(range(256)) * 25
    (entry,) = write_all(spool, [(4, pcm)])
    path = spool.dir / entry.name
    assert entry.name == "0000000001-4.wav" and path.stat().st_size == entry.size
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in spool.dir.iterdir()] == [entry.name]  # no temp file left
    with wave.open(str(path)) as w:  # any WAV player reads it (the pttd chunk is skipped)
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        assert w.readframes(w.getnframes()) == pcm
    assert spool.read(entry) == pcm
    assert spool.bytes_written == entry.size and spool.files_written == 1


def test_load_keeps_whole_files_in_order_and_removes_cut_short_ones(tmp_path):
    spool = spool_at(tmp_path / "spool")
    entries = write_all(spool, [(1, b"\1\0" * 800), (2, b"\2\0" * 800), (3, b"\3\0" * 800)])
    d = spool.dir
    whole = (d / entries[1].name).read_bytes()
    for cut in (len(whole) - 1, len(whole) // 2, 60, 10, 0):
        (d / f"00000000{cut % 100:02d}-9.wav").write_bytes(whole[:cut])
    (d / ".0000000004-4.wav.tmp").write_bytes(whole)      # a write cut short before its rename
    (d / "0000000005-5.wav").write_bytes(whole)           # named press 5, header says press 2
    (d / "README").write_text("not ours")
    again = spool_at(d)
    loaded, problems = again.load()
    assert [(e.press_id, e.name) for e in loaded] == [(e.press_id, e.name) for e in entries]
    assert all(e.restored and e.state == "written" for e in loaded)
    assert sorted(p.name for p in d.iterdir()) == sorted([e.name for e in entries] + ["README"])
    assert len(problems) == 7
    assert again.read(loaded[2]) == b"\3\0" * 800
    # the next file is numbered after the ones there
    (new,) = write_all(again, [(7, b"\0\0" * 800)])
    assert new.name == "0000000004-7.wav"


def test_a_damaged_file_is_found_when_read(tmp_path):
    spool = spool_at(tmp_path / "spool")
    (entry,) = write_all(spool, [(1, b"\1\0" * 800)])
    path = spool.dir / entry.name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the audio: the sizes still add up
    path.write_bytes(bytes(data))
    (loaded,), _ = spool_at(spool.dir).load()
    with pytest.raises(SpoolError, match="damaged"):
        spool.read(loaded)


def test_open_spool_off_default_and_explicit(tmp_path):
    cfg = config.from_dict({"spool": {"dir": ""}}, environ={})
    assert open_spool(cfg.spool) is None
    # the default directory is only used where /var/lib/pttd exists (the unit makes it)
    assert config.from_dict({}, environ={}).spool.dir == DEFAULT_DIR
    if not Path(DEFAULT_DIR).parent.exists():
        assert open_spool(config.from_dict({}, environ={}).spool) is None
    target = tmp_path / "a" / "spool"
    cfg = config.from_dict({"spool": {"dir": str(target), "max_mb": 0.5, "max_age_h": 2}},
                           environ={})
    spool = open_spool(cfg.spool)
    assert spool.dir == target and stat.S_IMODE(target.stat().st_mode) == 0o700
    assert spool.max_bytes == 512 * 1024 and spool.max_age_s == 7200
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = config.from_dict({"spool": {"dir": str(blocker / "spool")}}, environ={})
    with pytest.raises(SpoolError, match="spool.dir"):
        open_spool(cfg.spool)


@pytest.mark.parametrize("table, key", [({"dir": "rel/spool"}, "spool.dir"),
                                        ({"max_mb": 0}, "spool.max_mb"),
                                        ({"max_age_h": "1"}, "spool.max_age_h"),
                                        ({"size": 1}, "spool.size")])
def test_bad_spool_config_names_the_key(table, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.from_dict({"spool": table}, environ={})


def test_encode_is_what_load_reads(tmp_path):
    blob = encode(dict(meta(3), version=1, samples=2, crc32=0), b"\0\0\0\0")
    assert blob[:4] == b"RIFF" and blob[8:12] == b"WAVE"


# --- the controller and its spool ------------------------------------------------------------------

def keep_offline(h: Harness) -> None:
    """Every session that tries to open meets a closed port."""
    for s in list(h.world.sessions):
        if s.started and s.begin is None and not s.done:
            h.close_session(s, None)


def offline_presses(h: Harness, n: int) -> None:
    for _ in range(n):
        h.command("press")
        keep_offline(h)
        h.tick(1.0)
        keep_offline(h)
        h.command("release")
        h.tick(0.5)
        keep_offline(h)
    h.tick(1.0)  # the last post-roll is captured: every press is on disk
    keep_offline(h)


def deliver_all(h: Harness, n: int) -> list[dict]:
    """The server is back: each press in turn opens, streams and gets its final."""
    h.step()
    for k in range(n):
        for _ in range(60):  # a press backing off opens its session when its backoff ends
            fresh = [s for s in h.world.sessions if s.started and s.begin is None and not s.done]
            if fresh:
                break
            h.tick(1.0)
        (s,) = fresh
        h.session_event(s, Begin(id=f"b{k}", expires_at=None))
        h.stream_done(h.world.streamers[-1])
        h.session_event(s, FinalTurn(Turn(0, True, f"text {k}"), formatted=True))
    return [e for e in h.events if e["event"] == "final"]


def test_offline_presses_are_spooled_and_a_restart_delivers_them_late_in_order(tmp_path):
    h = Harness(spool_dir=tmp_path)
    offline_presses(h, 3)
    assert (h.c.waiting["waiting"], h.c.waiting["spooled"]) == (3, 3)
    assert 3 < h.c.waiting["waiting_s"] < 8
    assert all(p.audio is None for p in h.c._presses)  # on disk, not in memory
    status = h.c.command("status")
    assert (status["waiting"], status["spooled"]) == (3, 3)
    h.stop()
    h.check_invariants(stopped=True)
    assert [p.outcome for p in h.presses.values()] == [Outcome.SPOOLED] * 3
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["0000000001-1.wav", "0000000002-2.wav", "0000000003-3.wav"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    pressed = [p.pressed_wall for p in h.presses.values()]

    h2 = Harness(spool_dir=tmp_path)
    assert h2.restored == {1, 2, 3} and h2.c.waiting["waiting"] == 3
    finals = deliver_all(h2, 3)
    assert [(f["press_id"], f["text"]) for f in finals] == [(1, "text 0"), (2, "text 1"),
                                                            (3, "text 2")]
    assert all(f["late"] is True for f in finals)
    assert [f["pressed_at"] for f in finals] == [round(t, 3) for t in pressed]
    assert os.listdir(tmp_path) == []
    h2.command("press")  # a new press is numbered after the restored ones
    assert max(h2.presses) == 4
    h2.settle()
    h2.check_invariants()


def test_the_spool_size_bound_drops_the_oldest_with_its_press_id(tmp_path):
    # a press here is 1.8 s + a chunk = ~59 kB: two fit in 130 kB, three do not
    h = Harness(spool_dir=tmp_path, max_bytes=130_000)
    offline_presses(h, 3)
    dropped = [e for e in h.events if e["event"] == "error" and "press_id" in e]
    assert [e["press_id"] for e in dropped] == [1]
    assert "press 1 dropped" in dropped[0]["message"]
    assert "0000000001-1.wav" in dropped[0]["message"]
    assert sorted(os.listdir(tmp_path)) == ["0000000002-2.wav", "0000000003-3.wav"]
    assert h.c.waiting["spooled"] == 2
    h.stop()
    h.check_invariants(stopped=True)


def test_presses_past_max_age_are_dropped_at_restart_with_an_error(tmp_path):
    h = Harness(spool_dir=tmp_path)
    offline_presses(h, 2)
    h.stop()
    h2 = Harness(spool_dir=tmp_path, max_age_s=0.01)
    time.sleep(0.02)  # older than 10 ms (wall clock: the spool's age is in real time)
    h2.step()
    errors = [e for e in h2.events if e["event"] == "error"]
    assert [e["press_id"] for e in errors] == [1, 2]
    assert all("spool.max_age_h" in e["message"] for e in errors)
    assert os.listdir(tmp_path) == [] and not h2.world.sessions  # none was opened
    h2.check_invariants()


def test_a_damaged_spooled_press_ends_with_an_error_and_the_next_goes(tmp_path):
    h = Harness(spool_dir=tmp_path)
    offline_presses(h, 2)
    h.stop()
    first = tmp_path / "0000000001-1.wav"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x55
    first.write_bytes(bytes(data))
    h2 = Harness(spool_dir=tmp_path)
    h2.step()
    errors = [e for e in h2.events if e["event"] == "error"]
    assert [e["press_id"] for e in errors] == [1] and "damaged" in errors[0]["message"]
    s = h2.world.sessions[0]
    h2.session_event(s, Begin(id="b", expires_at=None))
    h2.stream_done(h2.world.streamers[0])
    h2.session_event(s, FinalTurn(Turn(0, True, "second"), formatted=True))
    assert [(e["press_id"], e["late"]) for e in h2.events if e["event"] == "final"] == [(2, True)]
    assert os.listdir(tmp_path) == []
    h2.settle()
    h2.check_invariants()


def test_a_spool_that_cannot_be_written_leaves_the_press_in_memory(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    h = Harness(spool_dir=d)
    d.rmdir()  # the disk went away: every write fails (a real ENOENT)
    offline_presses(h, 1)
    warnings = [e for e in h.events if e["event"] == "error" and "spool" in e["message"]]
    assert warnings and "press_id" not in warnings[0]  # said, but the press goes on
    press = h.presses[1]
    assert press.phase is PressPhase.WAITING and press.spool is None and press.audio is not None
    finals = deliver_all(h, 1)  # the network comes back: it is still delivered
    assert [f["press_id"] for f in finals] == [1]
    h.settle()
    h.check_invariants()


def test_a_press_still_held_at_stop_is_spooled_with_the_audio_there_is(tmp_path):
    h = Harness(spool_dir=tmp_path)
    h.command("press")
    keep_offline(h)
    h.tick(1.5)
    keep_offline(h)
    assert h.c._presses.active() is not None  # held, waiting for the network
    h.stop()
    assert h.presses[1].outcome is Outcome.SPOOLED
    h2 = Harness(spool_dir=tmp_path)
    finals = deliver_all(h2, 1)
    assert [(f["press_id"], f["late"]) for f in finals] == [(1, True)]
    h2.settle()
    h2.check_invariants()


@pytest.mark.skipif(os.geteuid() != 0, reason="uninstall.sh needs root")
def test_uninstall_keeps_the_spool_unless_purge(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parent.parent / "uninstall.sh"
    spooled = tmp_path / "var/lib/pttd/spool/0000000001-1.wav"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"RIFF")
    args = [str(script), "--root", str(tmp_path), "--no-systemctl"]
    kept = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
    assert spooled.exists() and "kept /var/lib/pttd" in kept.stdout
    subprocess.run(args + ["--purge"], capture_output=True, text=True, timeout=60, check=True)
    assert not (tmp_path / "var/lib/pttd").exists()
