"""Typing sink: text → key events, partial typing, the sink, the uinput device and the wiring.

This container has no /dev/uinput (the kernel lacks CONFIG_INPUT_UINPUT), so most tests write
to ``RecordingKeyboard``, a stand-in for ``evdev.UInput``, and decode what a keyboard with the
same layout would have typed. The layout tables are checked against the system's XKB data;
``test_real_uinput_*`` run only where /dev/uinput exists.
"""
from __future__ import annotations

import os
import random
import re
import select
import sys
import threading
import time
from pathlib import Path

import pytest

from pttd import config as c
from pttd.outputs import keyboard as ts
from pttd.outputs.keyboard import (EV_KEY, EV_SYN, KEY, LAYOUTS, Edit, Stroke, TurnTyper, TypingError,
                              TypingSink, key_events, stable_words, stroke_events, translate)
from tests.alsa_fifo import wait_until

US, GB, DE = LAYOUTS["us"], LAYOUTS["gb"], LAYOUTS["de"]
SHIFT, ALTGR, BS = KEY["LEFTSHIFT"], KEY["RIGHTALT"], KEY["BACKSPACE"]
XKB = Path("/usr/share/X11/xkb")
HAVE_UINPUT = os.path.exists("/dev/uinput")


# --- a recording UInput and a decoder: what would appear on screen ------------------------------

class RecordingKeyboard:
    """Stands in for ``evdev.UInput``: records every (type, code, value)."""

    def __init__(self):
        self.events: list[tuple[int, int, int]] = []
        self.closed = False
        self.lock = threading.Lock()

    def write(self, etype, code, value):
        assert not self.closed, "write after close"
        with self.lock:
            self.events.append((etype, code, value))

    def close(self):
        self.closed = True

    def snapshot(self):
        with self.lock:
            return list(self.events)


def screen_of(events, layout, start=""):
    """Replay key events as the system's keymap would: Shift/AltGr levels, dead keys, backspace.

    Also checks the event stream is well formed: a SYN_REPORT after every key event, every
    press released, no modifier left held.
    """
    direct = {seq[0]: ch for ch, seq in layout.chars.items() if len(seq) == 1}
    dead = {seq[0]: ch for ch, seq in layout.chars.items() if len(seq) == 2}
    screen, held, pending = list(start), set(), None
    for i, (etype, code, value) in enumerate(events):
        if etype == EV_SYN:
            continue
        assert etype == EV_KEY and events[i + 1][0] == EV_SYN, "every key event is followed by SYN"
        if value == 0:
            assert code in held, f"release of {code} without press"
            held.discard(code)
            continue
        held.add(code)
        if code in (SHIFT, ALTGR):
            continue
        if code == BS:
            assert screen, "backspace on an empty screen"
            screen.pop()
            continue
        stroke = Stroke(code, SHIFT in held, ALTGR in held)
        if pending is not None:
            assert stroke == ts.SPACE, "a dead key must be followed by space here"
            screen.append(pending)
            pending = None
        elif stroke in dead:
            pending = dead[stroke]
        else:
            screen.append(direct[stroke])
    assert not held and pending is None
    return "".join(screen)


# --- key codes and layouts -----------------------------------------------------------------------

def test_key_codes_match_evdev():
    ecodes = pytest.importorskip("evdev").ecodes
    for name, code in KEY.items():
        assert getattr(ecodes, f"KEY_{name}") == code, name
    assert (ecodes.EV_KEY, ecodes.EV_SYN, ecodes.SYN_REPORT) == (EV_KEY, EV_SYN, 0)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_printable_ascii_character_round_trips(name):
    layout = LAYOUTS[name]
    text = "".join(chr(i) for i in range(32, 127)) + "\n\t"
    events, missing = key_events(text, layout)
    assert missing == ()
    assert screen_of(events, layout) == text


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_no_two_characters_share_a_stroke(name):
    firsts = [seq[0] for seq in LAYOUTS[name].chars.values() if len(seq) == 1]
    assert len(firsts) == len(set(firsts))


def _xkb_keycodes() -> dict[str, int]:
    text = (XKB / "keycodes" / "evdev").read_text()
    return {m[1]: int(m[2]) - 8 for m in re.finditer(r"^\s*<(\w+)>\s*=\s*(\d+);", text, re.M)}


def _xkb_symbols(spec: str) -> dict[str, list[str]]:
    """Key name → keysym names per level, for ``file(variant)``, following latin/us includes."""
    file, _, variant = spec.partition("(")
    text = (XKB / "symbols" / file).read_text()
    text = re.sub(r"//.*", "", text)
    variant = variant.rstrip(")") or "basic"
    section = re.search(r'xkb_symbols\s+"%s"\s*\{(.*?)\n\};' % re.escape(variant), text, re.S)
    keys: dict[str, list[str]] = {}
    for m in re.finditer(r'include\s+"([^"]+)"|key\s+<(\w+)>\s*\{(.*?)\};', section[1], re.S):
        if m[1]:
            if m[1].split("(")[0] in ("latin", "us"):
                keys.update(_xkb_symbols(m[1]))
            continue
        body = m[3]
        body = body.split("symbols[Group1]", 1)[1] if "symbols[Group1]" in body else body
        syms = [s.strip() for s in re.search(r"\[([^\]]*)\]", body)[1].split(",")]
        old = keys.get(m[2], [])
        keys[m[2]] = syms + old[len(syms):]
    return keys


KEYSYM_CHARS = {
    "exclam": "!", "at": "@", "numbersign": "#", "dollar": "$", "percent": "%",
    "asciicircum": "^", "ampersand": "&", "asterisk": "*", "parenleft": "(", "parenright": ")",
    "minus": "-", "underscore": "_", "equal": "=", "plus": "+", "bracketleft": "[",
    "braceleft": "{", "bracketright": "]", "braceright": "}", "semicolon": ";", "colon": ":",
    "apostrophe": "'", "quotedbl": '"', "grave": "`", "asciitilde": "~", "backslash": "\\",
    "bar": "|", "comma": ",", "less": "<", "period": ".", "greater": ">", "slash": "/",
    "question": "?", "sterling": "£", "notsign": "¬", "EuroSign": "€", "onesuperior": "¹",
    "twosuperior": "²", "threesuperior": "³", "onequarter": "¼", "onehalf": "½",
    "threequarters": "¾", "mu": "µ", "section": "§", "degree": "°", "ssharp": "ß",
    "udiaeresis": "ü", "Udiaeresis": "Ü", "odiaeresis": "ö", "Odiaeresis": "Ö",
    "adiaeresis": "ä", "Adiaeresis": "Ä", "periodcentered": "·", "endash": "–", "emdash": "—",
    "doublelowquotemark": "„", "leftdoublequotemark": "“", "rightdoublequotemark": "”",
    "rightsinglequotemark": "’",
}
DEAD_CHARS = {"dead_circumflex": "^", "dead_acute": "´", "dead_grave": "`", "dead_tilde": "~"}


def _keysym_char(name: str) -> tuple[str, bool] | None:
    """(character, is a dead key) for an XKB keysym name, or None if these tests don't know it."""
    if len(name) == 1:
        return name, False
    if re.fullmatch(r"U[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16)), False
    if name in DEAD_CHARS:
        return DEAD_CHARS[name], True
    return (KEYSYM_CHARS[name], False) if name in KEYSYM_CHARS else None


@pytest.mark.skipif(not (XKB / "symbols" / "de").exists(), reason="xkb-data not installed")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_tables_agree_with_xkb(name):
    """Every character pttd types is what XKB's layout of that name puts on that key and level."""
    codes = {code: key for key, code in _xkb_keycodes().items()}
    symbols = _xkb_symbols(name)
    for ch, seq in LAYOUTS[name].chars.items():
        if ch in " \n\t":
            continue
        stroke = seq[0]
        level = stroke.shift + 2 * stroke.altgr
        syms = symbols[codes[stroke.code]]
        assert level < len(syms), (name, ch)
        got = _keysym_char(syms[level])
        assert got == (ch, len(seq) == 2), (name, ch, syms[level])
        if len(seq) == 2:
            assert seq[1] == ts.SPACE


# --- text → strokes → events ---------------------------------------------------------------------

def test_shifted_and_plain_letters_and_punctuation():
    tr = translate("aA!", US)
    assert tr.strokes == (Stroke(KEY["A"]), Stroke(KEY["A"], shift=True), Stroke(KEY["1"], shift=True))
    assert tr.typed == "aA!" and tr.missing == ()


def test_stroke_events_press_modifier_first_release_it_last_syn_after_each():
    assert stroke_events(Stroke(KEY["A"], shift=True)) == [
        (EV_KEY, SHIFT, 1), (EV_SYN, 0, 0), (EV_KEY, KEY["A"], 1), (EV_SYN, 0, 0),
        (EV_KEY, KEY["A"], 0), (EV_SYN, 0, 0), (EV_KEY, SHIFT, 0), (EV_SYN, 0, 0)]
    assert stroke_events(Stroke(KEY["Q"], altgr=True))[0] == (EV_KEY, ALTGR, 1)
    assert [e for e in stroke_events(Stroke(KEY["7"])) if e[0] == EV_KEY] == [
        (EV_KEY, KEY["7"], 1), (EV_KEY, KEY["7"], 0)]


def test_newline_tab_and_space():
    assert translate("a b\nc\td", US).strokes[1::2] == (
        Stroke(KEY["SPACE"]), Stroke(KEY["ENTER"]), Stroke(KEY["TAB"]))


def test_layouts_differ_where_the_keyboards_do():
    assert translate("@", US).strokes == (Stroke(KEY["2"], shift=True),)
    assert translate("@", GB).strokes == (Stroke(KEY["APOSTROPHE"], shift=True),)
    assert translate("@", DE).strokes == (Stroke(KEY["Q"], altgr=True),)
    assert translate("zy", DE).strokes == (Stroke(KEY["Y"]), Stroke(KEY["Z"]))
    assert translate('"', GB).strokes == (Stroke(KEY["2"], shift=True),)
    assert translate("£€", GB).strokes == (Stroke(KEY["3"], shift=True), Stroke(KEY["4"], altgr=True))
    assert translate("\\|", GB).strokes == (Stroke(KEY["102ND"]), Stroke(KEY["102ND"], shift=True))
    assert translate("Grüße", DE).missing == ()


def test_dead_keys_are_followed_by_space():
    assert translate("^", DE).strokes == (Stroke(KEY["GRAVE"]), ts.SPACE)
    assert translate("`", DE).strokes == (Stroke(KEY["EQUAL"], shift=True), ts.SPACE)
    assert translate("~", DE).strokes == (Stroke(KEY["RIGHTBRACE"], altgr=True),)  # not dead
    events, _ = key_events("2^3 = 8", DE)
    assert screen_of(events, DE) == "2^3 = 8"


def test_untypable_characters_are_reported_in_order_and_skipped():
    tr = translate("café ☕ naïve", US)
    assert tr.missing == ("é", "☕", "ï")
    assert tr.typed == "caf  nave"
    assert translate("café", DE).missing == ("é",)
    assert translate("smörgåsbord", DE).missing == ("å",)


def test_typographic_characters_fall_back_to_plain_ones():
    assert translate("It’s “fine” – really…", US).typed == "It's \"fine\" - really..."
    assert translate("It’s", DE).typed == "It’s"  # German keyboards have ’ (AltGr+#)
    assert translate("a\u00a0b", US).typed == "a b"


def test_decomposed_input_is_composed_first():
    assert translate("a\u0308", DE).typed == "ä" and translate("a\u0308", DE).missing == ()


# --- partial typing: the diff logic --------------------------------------------------------------

T1, T2 = ("s1", 0), ("s1", 1)


def test_stable_words_never_include_the_newest_word():
    assert stable_words(None, ["hello", "world"]) == []
    assert stable_words(["hel"], ["hello"]) == []
    assert stable_words(["hello"], ["hello", "wor"]) == ["hello"]
    assert stable_words(["hello", "wor"], ["hello", "world"]) == ["hello"]
    assert stable_words(["a", "b", "c"], ["a", "x", "c", "d"]) == ["a"]


def test_partials_off_types_only_finals_with_trailing():
    t = TurnTyper(US, "space", partials=False)
    assert t.partial(T1, "hello world") == Edit()
    assert t.final(T1, "Hello world.") == (Edit(0, "Hello world. "), ())
    t = TurnTyper(US, "newline")
    assert t.final(T1, "Hi")[0] == Edit(0, "Hi\n")
    assert TurnTyper(US, "none").final(T1, "Hi")[0] == Edit(0, "Hi")


def test_partials_type_the_stable_prefix_then_the_rest():
    t = TurnTyper(US, "space", partials=True)
    edits = [t.partial(T1, p) for p in
             ["hel", "hello", "hello wor", "hello world", "hello world how"]]
    assert edits == [Edit(), Edit(), Edit(0, "hello "), Edit(), Edit(0, "world ")]
    assert t.preview == "hello world "
    assert t.final(T1, "hello world how are you")[0] == Edit(0, "how are you ")
    assert t.preview == ""


def test_formatted_final_erases_only_what_differs():
    t = TurnTyper(US, "space", partials=True)
    for p in ["turn the", "turn the lights", "turn the lights on"]:
        t.partial(T1, p)
    assert t.preview == "turn the lights "
    assert t.final(T1, "turn the lights on.")[0] == Edit(0, "on. ")
    for p in ["turn the", "turn the lights", "turn the lights on"]:
        t.partial(T1, p)
    assert t.final(T1, "Turn the lights on.")[0] == Edit(16, "Turn the lights on. ")
    for p in ["turn the", "turn the lights", "turn the lights on"]:
        t.partial(T1, p)
    assert t.final(T1, "turn the light on.")[0] == Edit(2, " on. ")  # only the tail differs
    for p in ["hello", "hello there", "hello there"]:
        t.partial(T1, p)
    assert t.preview == "hello "
    assert t.final(T1, "hello")[0] == Edit(0, "")  # the preview's space is the trailing space
    t = TurnTyper(US, "newline", partials=True)
    for p in ["hello", "hello there", "hello there"]:
        t.partial(T1, p)
    assert t.final(T1, "hello")[0] == Edit(1, "\n")


def test_revised_words_are_not_backspaced_until_the_final():
    t = TurnTyper(US, "space", partials=True)
    t.partial(T1, "I scream")
    assert t.partial(T1, "I scream is") == Edit(0, "I scream ")
    assert t.partial(T1, "ice cream is good") == Edit()
    assert t.partial(T1, "ice cream is good today") == Edit()  # held: would not extend the preview
    edit, _ = t.final(T1, "ice cream is good today")
    assert edit == Edit(len("I scream "), "ice cream is good today ")


def test_untypable_character_stops_the_preview_before_it():
    t = TurnTyper(US, "space", partials=True)
    t.partial(T1, "the naïve")
    assert t.partial(T1, "the naïve cat") == Edit(0, "the na")
    assert t.partial(T1, "the naïve cat sat") == Edit()
    edit, missing = t.final(T1, "the naïve cat sat")
    assert edit == Edit(0, "ve cat sat ") and missing == ("ï",)


def test_another_turns_partials_wait_while_a_preview_is_on_screen():
    t = TurnTyper(US, "space", partials=True)
    t.partial(T1, "first turn")
    t.partial(T1, "first turn words")
    assert t.preview == "first turn "
    t.partial(T2, "second")
    assert t.partial(T2, "second turn here") == Edit()
    assert t.final(T1, "first turn words")[0] == Edit(0, "words ")
    t.partial(T2, "second turn")
    assert t.partial(T2, "second turn here") == Edit(0, "second turn ")


def test_final_of_a_replayed_turn_replaces_the_old_preview():
    t = TurnTyper(US, "space", partials=True)
    t.partial(("old", 0), "hello there")
    t.partial(("old", 0), "hello there friend")
    assert t.preview == "hello there "
    assert t.final(("new", 0), "hello there friend")[0] == Edit(12, "hello there friend ")


def test_abandoned_turn_erases_its_preview_only():
    t = TurnTyper(US, "space", partials=True)
    assert not t.abandon()
    t.partial(T1, "never mind")
    t.partial(T1, "never mind that")
    assert t.abandon() == Edit(len("never mind "), "")
    assert t.preview == "" and not t.abandon()


def test_random_partial_streams_never_erase_more_than_the_preview():
    """Whatever partials do, only pttd's own text is erased and the final ends up on screen."""
    rng = random.Random(7)
    vocab = ["a", "an", "the", "cat", "cats", "sat", "sit", "on", "mat", "naïve", "ok"]
    user_text = "Dear Sir, "
    for _ in range(300):
        t = TurnTyper(US, rng.choice(["space", "newline", "none"]), partials=True)
        screen, final_words = user_text, [rng.choice(vocab) for _ in range(rng.randint(1, 8))]
        for n in range(1, len(final_words) + 1):
            words = final_words[:n]
            if rng.random() < 0.3:  # a revision of an earlier word
                words = words[:]
                words[rng.randrange(n)] = rng.choice(vocab)
            if rng.random() < 0.3 and words:  # the newest word still half-heard
                words[-1] = words[-1][: rng.randint(1, len(words[-1]))]
            screen = _apply(screen, t.partial(T1, " ".join(words)), len(user_text))
        text = " ".join(final_words)
        edit, missing = t.final(T1, text)
        screen = _apply(screen, edit, len(user_text))
        assert screen == user_text + translate(text, US).typed + t.trailing


def _apply(screen: str, edit: Edit, protected: int) -> str:
    assert len(screen) - edit.erase >= protected, "erased text pttd did not type"
    return screen[: len(screen) - edit.erase] + edit.text


# --- the sink ------------------------------------------------------------------------------------

def final(text, session="s1", turn=0, press=1):
    return {"event": "final", "text": text, "turn_order": turn, "session_id": session,
            "press_id": press, "audio_ms": 1000, "latency_ms": 100, "ts": 0.0}


def partial(text, session="s1", turn=0):
    return {"event": "partial", "text": text, "turn_order": turn, "session_id": session, "ts": 0.0}


def test_sink_types_finals_and_ignores_other_events():
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "us", delay_ms=0)
    sink.emit({"event": "state", "state": "listening", "ts": 0.0})
    sink.emit(partial("hello"))
    sink.emit({"event": "error", "code": None, "message": "x", "retry_in_s": None, "ts": 0.0})
    assert kbd.events == []
    sink.emit(final("Hello, World!"))
    sink.emit(final("Second line?", turn=1))
    assert screen_of(kbd.events, US) == "Hello, World! Second line? "
    sink.close()
    assert kbd.closed


def test_sink_reports_untypable_characters(caplog):
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "us", trailing="newline", delay_ms=0)
    with caplog.at_level("WARNING", logger="pttd.outputs.keyboard"):
        sink.emit(final("Café crème ☕", press=4))
    assert screen_of(kbd.events, US) == "Caf crme \n"
    assert sink.untypable_count == 3 and sink.untypable["é"] == 1 and sink.untypable["è"] == 1
    msg = caplog.text
    assert "'é' (U+00E9)" in msg and "U+2615" in msg and "press 4" in msg and "'us'" in msg


def test_sink_partials_cancelled_turn_is_erased():
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "gb", partials=True, delay_ms=0)
    sink.emit(final("Earlier text.", turn=0))
    for p in ["cancel", "cancel this", "cancel this please"]:
        sink.emit(partial(p, turn=1))
    assert screen_of(kbd.events, GB) == "Earlier text. cancel this "
    sink.emit({"event": "state", "state": "idle", "ts": 0.0})
    assert screen_of(kbd.events, GB) == "Earlier text. "


def test_sink_partials_then_formatted_final_in_german():
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "de", partials=True, delay_ms=0)
    for p in ["grüße an", "grüße an alle", "grüße an alle zusammen"]:
        sink.emit(partial(p))
    assert screen_of(kbd.events, DE) == "grüße an alle "
    sink.emit(final("Grüße an alle zusammen!"))
    assert screen_of(kbd.events, DE) == "Grüße an alle zusammen! "


def test_close_interrupts_typing_and_leaves_no_key_held():
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "us", delay_ms=20)
    worker = threading.Thread(target=sink.emit, args=(final("x" * 500),))
    worker.start()
    deadline = time.monotonic() + 5
    while not kbd.snapshot() and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting (bounded) for typing to begin
    t0 = time.monotonic()
    sink.close()
    worker.join(2)
    assert not worker.is_alive() and time.monotonic() - t0 < 1.5
    typed = screen_of(kbd.events, US)  # also asserts every key was released
    assert 0 < len(typed) < 500


def test_delay_between_keystrokes():
    kbd = RecordingKeyboard()
    sink = TypingSink(kbd, "us", trailing="none", delay_ms=15)
    t0 = time.monotonic()
    sink.emit(final("abcdefghij"))
    assert time.monotonic() - t0 >= 10 * 0.015 * 0.9
    assert screen_of(kbd.events, US) == "abcdefghij"


# --- opening the device --------------------------------------------------------------------------

def test_without_evdev_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "evdev", None)  # makes `import evdev` fail
    with pytest.raises(TypingError, match=r"needs python-evdev: pip install 'pttd\[type\]'"):
        ts.open_keyboard(US)


def test_missing_uinput_device_says_how_to_load_it(tmp_path):
    evdev = pytest.importorskip("evdev")
    with pytest.raises(TypingError, match="modprobe uinput"):
        ts.open_keyboard(US, path=str(tmp_path / "uinput"), import_evdev=lambda: evdev)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_uinput_device_names_the_udev_rule(tmp_path):
    evdev = pytest.importorskip("evdev")
    node = tmp_path / "uinput"
    node.write_text("")
    node.chmod(0)
    with pytest.raises(TypingError, match="99-pttd-uinput.rules"):
        ts.open_keyboard(US, path=str(node), import_evdev=lambda: evdev)


def test_not_a_uinput_device_is_a_clear_error(tmp_path):
    evdev = pytest.importorskip("evdev")
    node = tmp_path / "uinput"
    node.write_text("")
    with pytest.raises(TypingError, match="cannot create a keyboard"):
        ts.open_keyboard(US, path=str(node), import_evdev=lambda: evdev)


def test_unknown_layout_is_a_typing_error():
    with pytest.raises(TypingError, match="unknown keyboard layout"):
        TypingSink.open("dvorak")


@pytest.mark.skipif(not HAVE_UINPUT, reason="no /dev/uinput here (kernel without uinput)")
def test_real_uinput_keyboard_types_what_the_layout_says():
    """Through the kernel: create the device, read back its events with evdev.InputDevice."""
    evdev = pytest.importorskip("evdev")
    sink = TypingSink.open("us", trailing="newline", delay_ms=1)
    try:
        device = _find_device(evdev, ts.DEVICE_NAME)
        sink.emit(final("Hi there, 42!"))
        events = _read_events(device, expected_keys=2 * len(translate("Hi there, 42!\n", US)
                                                              .strokes) + 2)
    finally:
        sink.close()
    assert screen_of(events, US) == "Hi there, 42!\n"


def _find_device(evdev, name, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in evdev.list_devices():
            dev = evdev.InputDevice(path)
            if dev.name == name:
                return dev
            dev.close()
        time.sleep(0.05)  # udev creates the node asynchronously; bounded
    raise AssertionError(f"{name} did not appear")


def _read_events(device, expected_keys, timeout=5.0):
    events, keys = [], 0
    deadline = time.monotonic() + timeout
    while keys < expected_keys and time.monotonic() < deadline:
        if select.select([device.fd], [], [], 0.2)[0]:
            for e in device.read():
                if e.type in (EV_KEY, EV_SYN):
                    events.append((e.type, e.code, e.value))
                    keys += e.type == EV_KEY
    return events


# --- config and wiring ---------------------------------------------------------------------------

def test_type_config_keys_and_range_checks():
    cfg = c.from_dict({"output": {"type": True, "type_layout": "de", "type_trailing": "newline",
                                  "type_partials": True, "type_delay_ms": 0}}, environ={})
    o = cfg.output
    assert (o.type, o.type_layout, o.type_trailing, o.type_partials, o.type_delay_ms) == (
        True, "de", "newline", True, 0)
    d = c.from_dict({}, environ={}).output
    assert (d.type, d.type_layout, d.type_trailing, d.type_partials, d.type_delay_ms) == (
        False, "us", "space", False, 10)
    for key, value in [("type_layout", "fr"), ("type_trailing", "tab"), ("type_delay_ms", 500),
                       ("type_partials", "yes")]:
        with pytest.raises(c.ConfigError, match=f"output.{key}"):
            c.from_dict({"output": {key: value}}, environ={})
    layouts = [f for f in c.dataclasses.fields(c.OutputConfig) if f.name == "type_layout"][0]
    assert all(layouts.metadata["check"](name) is None for name in LAYOUTS)


@pytest.mark.skipif(HAVE_UINPUT, reason="checks the start-up error where /dev/uinput is missing")
def test_pttd_run_with_type_but_no_uinput_exits_2(tmp_path):
    import subprocess

    from tests.daemon_proc import speech_wav, write_config

    wav = tmp_path / "mic.wav"
    speech_wav(wav)
    cfg = write_config(tmp_path / "pttd.toml", url="ws://127.0.0.1:9", key="k", wav=wav,
                       socket=tmp_path / "ctl.sock")
    cfg.write_text(cfg.read_text().replace("[output]", "[output]\ntype = true"))
    r = subprocess.run([sys.executable, "-m", "pttd.cli", "run", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "/dev/uinput" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ctl.sock").exists()


@pytest.mark.parametrize("partials", [False, True])
def test_daemon_types_the_final_end_to_end(inprocess_daemon, monkeypatch, partials):
    """``pttd run``'s wiring in-process (real pipeline, fake server), keyboard = recorder."""
    kbd = RecordingKeyboard()
    monkeypatch.setattr(ts, "open_keyboard", lambda layout: kbd)
    daemon, _ = inprocess_daemon("one two three four five", type=True,
                                 type_partials=partials, type_delay_ms=1)
    try:
        assert wait_until(lambda: daemon.controller.command("status")["audio_ms"] >= 1700, 15)
        assert daemon.controller.command("press")["ok"]
        assert wait_until(lambda: daemon.controller.command("status")["audio_ms"] >= 4200, 15)
        assert daemon.controller.command("release")["ok"]
        assert wait_until(lambda: screen_of(kbd.snapshot(), US) == "one two three four five ",
                          20)
    finally:
        daemon.shutdown()
    assert kbd.closed
    assert BS not in [code for _, code, value in kbd.events if value == 1]


def test_udev_rule_and_unit_example_grant_uinput_to_group_input():
    root = Path(__file__).resolve().parent.parent
    rules = [line for line in (root / "hardware/99-pttd-uinput.rules").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(rules) == 1
    fields = dict(re.findall(r'([A-Z_]+)[=+!]=?"([^"]*)"', rules[0]))
    assert fields["KERNEL"] == "uinput" and fields["SUBSYSTEM"] == "misc"
    assert fields["GROUP"] == "input" and fields["MODE"] == "0660"
    dropin = (root / "systemd/pttd.service.d/example-override.conf").read_text()
    assert "#DeviceAllow=/dev/uinput rw" in dropin and "#SupplementaryGroups=input" in dropin
