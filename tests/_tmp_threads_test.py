import threading, time
from tests.test_typing import *
from tests.test_typing import _wait
def test_x(fake_v3, tmp_path, monkeypatch):
    from pttd.daemon import Daemon
    from tests.daemon_proc import speech_wav
    kbd = RecordingKeyboard()
    monkeypatch.setattr(ts, "open_keyboard", lambda layout: kbd)
    key = "typing-key-0123456789"
    srv = fake_v3(script=["one two three four five"], api_keys={key})
    wav = tmp_path / "mic.wav"; speech_wav(wav)
    cfg = c.from_dict({"stt": {"url": srv.url, "api_key": key, "format_turns": False},
        "audio": {"source": "wav", "wav": str(wav)}, "gpio": {"pin_factory": "mock"},
        "control": {"socket": str(tmp_path / "ctl.sock")},
        "output": {"stdout": "none", "journal": False, "type": True, "type_delay_ms": 1}}, environ={})
    d = Daemon(cfg); d.build(); d.start()
    _wait(lambda: d.controller.command("status")["audio_ms"] >= 1700)
    d.controller.command("press")
    _wait(lambda: d.controller.command("status")["audio_ms"] >= 4200)
    d.controller.command("release")
    _wait(lambda: screen_of(kbd.snapshot(), US) == "one two three four five ", timeout=20)
    t=time.monotonic(); d.shutdown(); print("shutdown", time.monotonic()-t)
    print([th.name for th in threading.enumerate()])
    import os; print("fds", [os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")]); import gc; gc.collect()
    t=time.monotonic(); srv.stop(); print("srv stop", time.monotonic()-t)
