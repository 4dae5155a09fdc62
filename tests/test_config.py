"""Config: the contract's schema, clear errors naming the key, and a key that never shows."""
import dataclasses
import os

import pytest

from pttd import config as c


def load(tmp_path, text, env=None):
    path = tmp_path / "pttd.toml"
    path.write_text(text)
    return c.load_config(str(path), environ=env or {})


def test_defaults_match_contract():
    cfg = c.from_dict({}, environ={})
    assert cfg.stt.url == "wss://streaming.assemblyai.com/v3/ws"
    assert cfg.stt.speech_model == "universal-streaming-english" and cfg.stt.format_turns is True
    assert (cfg.audio.source, cfg.audio.device, cfg.audio.capture_format) == ("alsa", "default", "S16_LE")
    assert (cfg.audio.chunk_ms, cfg.audio.preroll_ms, cfg.audio.postroll_ms) == (50, 500, 300)
    assert cfg.audio.period_ms == 100 and cfg.audio.highpass_hz == 80.0
    assert (cfg.audio.warmup_ms, cfg.audio.ring_seconds) == (150, 30)
    assert (cfg.button.pin, cfg.button.pull_up, cfg.button.bounce_ms, cfg.button.mode) == (17, True, 30, "hold")
    assert (cfg.leds.kind, cfg.leds.pins) == ("led", [27])
    assert cfg.control.socket == "/run/pttd/control.sock"
    assert (cfg.output.stdout, cfg.output.journal) == ("text", True)


def test_every_contract_key_is_accepted(tmp_path):
    cfg = load(tmp_path, """
[stt]
url = "local"
api_key = ""
api_key_file = ""
speech_model = "u3-rt-pro"
format_turns = false
keep_warm_s = 5
fallback = "local"
params = { keyterms_prompt = ["pttd"], max_turn_silence = 800 }
[audio]
source = "wav"
device = "mic"
wav = "x.wav"
capture_format = "S32_LE"
capture_channels = 2
capture_rate = 48000
channel = 1
sample_rate = 16000
gain_db = 12
warmup_ms = 150
ring_seconds = 30
chunk_ms = 100
period_ms = 100
highpass_hz = 0
preroll_ms = 500
postroll_ms = 300
[button]
pin = 5
pull_up = false
bounce_ms = 20
mode = "toggle"
[leds]
kind = "rgb"
pins = [5, 6, 13]
active_high = false
[gpio]
pin_factory = "mock"
[control]
socket = "/tmp/x.sock"
[output]
stdout = "jsonl"
journal = false
hook = ["/bin/cat"]
type = false
[kiosk]
listen = "127.0.0.1:8766"
token = ""
[mqtt]
url = ""
device_id = ""
username = ""
password_file = ""
[local]
phrases = ["lights on"]
""")
    assert cfg.stt.keep_warm_s == 5.0 and isinstance(cfg.stt.keep_warm_s, float)
    assert cfg.audio.gain_db == 12.0 and cfg.leds.pins == [5, 6, 13]
    assert cfg.stt.params["keyterms_prompt"] == ["pttd"]


@pytest.mark.parametrize("text,needle", [
    ("[stt]\nnope = 1\n", "stt.nope"),
    ("[bogus]\n", "[bogus]"),
    ("[audio]\nchunk_ms = 20\n", "audio.chunk_ms"),
    ("[audio]\nchunk_ms = true\n", "audio.chunk_ms"),
    ("[audio]\nperiod_ms = 5\n", "audio.period_ms"),
    ("[audio]\nhighpass_hz = -1\n", "audio.highpass_hz"),
    ("[audio]\nhighpass_hz = \"80\"\n", "audio.highpass_hz"),
    ("[audio]\ncapture_rate = 22050\n", "audio.capture_rate"),
    ("[audio]\nchannel = 1\n", "audio.channel"),
    ("[audio]\nsource = \"wav\"\n", "audio.wav"),
    ("[button]\nmode = \"tap\"\n", "button.mode"),
    ("[button]\npin = \"17\"\n", "button.pin"),
    ("[leds]\nkind = \"rgb\"\n", "leds.pins"),
    ("[leds]\npatterns = { sleeping = \"on\" }\n", "leds.patterns.sleeping"),
    ("[output]\nstdout = \"xml\"\n", "output.stdout"),
    ("[output]\nhook = \"/bin/cat\"\n", "output.hook"),
    ("[stt]\nurl = \"http://x\"\n", "stt.url"),
    ("[stt]\nparams = { speech_model = \"x\" }\n", "stt.params.speech_model"),
    ("[kiosk]\nlisten = \"0.0.0.0:8766\"\n", "kiosk.token"),
    ("stt = 3\n", "stt"),
    ("[stt\n", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(c.ConfigError) as err:
        load(tmp_path, text)
    assert needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(c.ConfigError, match="not found"):
        c.load_config(str(tmp_path / "nope.toml"), environ={})


def test_config_path_order():
    assert c.config_path("a.toml", {"PTTD_CONFIG": "b.toml"}) == "a.toml"
    assert c.config_path(None, {"PTTD_CONFIG": "b.toml"}) == "b.toml"
    assert c.config_path(None, {}) == "/etc/pttd/pttd.toml"


KEY = "sk_live_0123456789abcdef"


def test_api_key_sources_in_order(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "assemblyai-api-key").write_text(KEY + "-cred")
    env = {"ASSEMBLYAI_API_KEY": KEY + "-env", "CREDENTIALS_DIRECTORY": str(creds)}
    assert load(tmp_path, f'[stt]\napi_key = "{KEY}"\n', env).stt.api_key.reveal() == KEY
    assert load(tmp_path, f'[stt]\napi_key_file = "{keyfile}"\n', env).stt.api_key.reveal() == KEY + "-file"
    assert load(tmp_path, "", env).stt.api_key.reveal() == KEY + "-env"
    env.pop("ASSEMBLYAI_API_KEY")
    assert load(tmp_path, "", env).stt.api_key.reveal() == KEY + "-cred"
    assert not load(tmp_path, "", {}).stt.api_key


def test_api_key_never_shown(tmp_path):
    cfg = load(tmp_path, f'[stt]\napi_key = "{KEY}"\n')
    for text in (repr(cfg), str(cfg), repr(cfg.stt), str(cfg.stt.api_key), f"{cfg.stt.api_key}",
                 repr(dataclasses.asdict(cfg))):
        assert KEY not in text
    with pytest.raises(c.ConfigError) as err:
        load(tmp_path, f'[stt]\napi_key = "{KEY}"\nspeech_model = ""\n')
    assert KEY not in str(err.value)


def test_missing_key_file_and_required_key(tmp_path):
    with pytest.raises(c.ConfigError, match="api_key_file"):
        load(tmp_path, f'[stt]\napi_key_file = "{tmp_path}/missing"\n')
    cfg = load(tmp_path, "")
    with pytest.raises(c.ConfigError, match="no AssemblyAI API key"):
        c.require_api_key(cfg)
    c.require_api_key(load(tmp_path, '[stt]\nurl = "local"\n'))
