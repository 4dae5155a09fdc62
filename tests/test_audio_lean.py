"""numpy is loaded only when a converter needs it: a daemon with a 16 kHz mono WAV (or a 16 kHz
mono ALSA mic with ``highpass_hz = 0``) runs without it, and still sends the bytes unchanged.

Each case runs in a fresh interpreter, since this test process has numpy loaded already.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.alsa_fifo import FifoMic
from tests.daemon_proc import RATE, write_config, write_wav


# What `pttd run` does up to its wait loop (cli.main → cmd_run → daemon.run), with a handle on
# the ring: journal logging as under systemd, the config's sinks, capture, controller, mock GPIO,
# control socket, watchdog. Prints whether numpy got loaded and the first N samples captured.
DAEMON = textwrap.dedent("""
    import json, os, sys, threading
    st = os.fstat(sys.stderr.fileno())
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    from pttd import cli
    from pttd.config import load_config
    from pttd.app.daemon import Daemon
    from pttd.app.service import install_stop_signals

    cli.setup_logging(False)
    daemon = Daemon(load_config(sys.argv[1]))
    daemon.build()
    restore = install_stop_signals(daemon.request_stop)
    daemon.start()
    n, sent = int(sys.argv[2]), []

    def take():
        if daemon.ring.wait_for(n - 1, 10.0):
            sent.append(daemon.ring.read(0, n).data)
        daemon.request_stop()

    threading.Thread(target=take).start()
    daemon.run()
    daemon.shutdown()
    restore()
    print(json.dumps({"numpy": "numpy" in sys.modules, "sent": sent[0].hex() if sent else ""}))
""")


@pytest.mark.parametrize("channels,needs_numpy", [(1, False), (2, True)])
def test_daemon_with_16k_wav_runs_without_numpy_and_sends_the_file(tmp_path, channels,
                                                                   needs_numpy):
    """Mono: the identity path, no numpy. Stereo (both channels equal) must mix in numpy,
    which shows the check sees numpy whenever a converter loads it."""
    mono = np.random.default_rng(7).integers(-20000, 20000, RATE, dtype="<i2")
    wav = write_wav(tmp_path / "mic.wav", np.repeat(mono[:, None], channels, axis=1))
    cfg = write_config(tmp_path / "pttd.toml", url="ws://127.0.0.1:9/v3/ws", key="lean-key",
                       socket=tmp_path / "ctl.sock", wav=wav, journal=True)
    n = RATE // 2
    r = subprocess.run([sys.executable, "-c", DAEMON, str(cfg), str(n)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["numpy"] is needs_numpy
    assert bytes.fromhex(got["sent"]) == mono[:n].tobytes()


@pytest.mark.parametrize("highpass,needs_numpy", [("0", False), ("80", True)])
def test_16k_mono_alsa_mic_without_high_pass_runs_without_numpy(tmp_path, highpass,
                                                                 needs_numpy):
    """Real alsa-lib (the FIFO mic). High-pass off: the captured bytes go out as they are."""
    noise = np.random.default_rng(9).integers(-20000, 20000, 20 * RATE, dtype="<i2")
    with FifoMic(lambda start, n: noise[start:start + n, None], patch_env=False) as mic:
        cfg = write_config(tmp_path / "pttd.toml", url="ws://127.0.0.1:9/v3/ws", key="lean-key",
                           socket=tmp_path / "ctl.sock", journal=True,
                           audio=f'device = "{mic.device}"\nhighpass_hz = {highpass}')
        n = RATE // 2
        r = subprocess.run([sys.executable, "-c", DAEMON, str(cfg), str(n)], capture_output=True,
                           text=True, timeout=30, env={**os.environ, **mic.env})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["numpy"] is needs_numpy
    sent = np.frombuffer(bytes.fromhex(got["sent"]), dtype="<i2")
    assert len(sent) == n
    if not needs_numpy:   # a slice of the mic's signal, sample for sample
        starts = np.flatnonzero(noise == sent[0])
        assert any(np.array_equal(noise[i:i + n], sent) for i in starts)


def test_convert_exports_its_numpy_classes_lazily():
    code = textwrap.dedent("""
        import sys
        import pttd.audio.capture, pttd.audio.convert
        assert "numpy" not in sys.modules
        from pttd.audio import dsp
        from pttd.audio.convert import FilterBank, HighPass, LevelMeter, Resampler, design_filter_bank
        assert (FilterBank, HighPass, LevelMeter, Resampler, design_filter_bank) == (
            dsp.FilterBank, dsp.HighPass, dsp.LevelMeter, dsp.Resampler, dsp.design_filter_bank)
        try:
            pttd.audio.convert.Nothing
        except AttributeError:
            print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
