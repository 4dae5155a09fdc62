"""``[output] type = true``: type each final into the focused application via a uinput keyboard.

The kernel sees a real keyboard, so this works on the console, under X11 and under Wayland
alike. A keyboard sends key *positions*, not characters: the system's own keyboard layout turns
them into text, so pttd picks keys with the same layout (``type_layout``). Characters that layout
cannot type are logged and counted, never dropped silently.

The pure parts (text → strokes → key events, and the partial-typing diff in :class:`TurnTyper`)
are plain functions that tests drive without a kernel. :class:`TypingSink` only writes their
output to an ``evdev.UInput`` (or any object with ``write(type, code, value)`` and ``close()``).
python-evdev is imported only when the sink opens its device.
"""

from __future__ import annotations

import logging
import os
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

from pttd.errors import StartupError
from pttd.events import EventKind, State

log = logging.getLogger(__name__)

UINPUT_PATH = "/dev/uinput"
DEVICE_NAME = "pttd virtual keyboard"
TRAILING = {"space": " ", "newline": "\n", "none": ""}

# --- Linux key codes (linux/input-event-codes.h; a stable kernel ABI) ---------------------------

EV_SYN, EV_KEY, SYN_REPORT = 0x00, 0x01, 0
KEY: dict[str, int] = {
    **{d: 2 + i for i, d in enumerate("123456789")},
    "0": 11,
    **{c: 16 + i for i, c in enumerate("QWERTYUIOP")},
    **{c: 30 + i for i, c in enumerate("ASDFGHJKL")},
    **{c: 44 + i for i, c in enumerate("ZXCVBNM")},
    "MINUS": 12,
    "EQUAL": 13,
    "BACKSPACE": 14,
    "TAB": 15,
    "LEFTBRACE": 26,
    "RIGHTBRACE": 27,
    "ENTER": 28,
    "SEMICOLON": 39,
    "APOSTROPHE": 40,
    "GRAVE": 41,
    "LEFTSHIFT": 42,
    "BACKSLASH": 43,
    "COMMA": 51,
    "DOT": 52,
    "SLASH": 53,
    "SPACE": 57,
    "102ND": 86,
    "RIGHTALT": 100,
}


@dataclass(frozen=True)
class Stroke:
    """One key tap, with Shift and/or AltGr (right Alt, XKB level 3) held around it."""

    code: int
    shift: bool = False
    altgr: bool = False


SPACE = Stroke(KEY["SPACE"])
BACKSPACE = Stroke(KEY["BACKSPACE"])


# --- layouts -------------------------------------------------------------------------------------
# Each key lists what it types at levels (plain, Shift, AltGr, AltGr+Shift); "" = nothing.
# Checked against xkb-data 2.35 (symbols/us, gb, de, latin), the "basic" variants, which the
# console's keymaps are built from on Debian/Raspberry Pi OS (console-setup).

_LETTERS = {c: (c.lower(), c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}

_US = {
    **_LETTERS,
    "GRAVE": ("`", "~"),
    "1": ("1", "!"),
    "2": ("2", "@"),
    "3": ("3", "#"),
    "4": ("4", "$"),
    "5": ("5", "%"),
    "6": ("6", "^"),
    "7": ("7", "&"),
    "8": ("8", "*"),
    "9": ("9", "("),
    "0": ("0", ")"),
    "MINUS": ("-", "_"),
    "EQUAL": ("=", "+"),
    "LEFTBRACE": ("[", "{"),
    "RIGHTBRACE": ("]", "}"),
    "BACKSLASH": ("\\", "|"),
    "SEMICOLON": (";", ":"),
    "APOSTROPHE": ("'", '"'),
    "COMMA": (",", "<"),
    "DOT": (".", ">"),
    "SLASH": ("/", "?"),
}

_GB = {
    **_US,
    "GRAVE": ("`", "¬", "|"),
    "1": ("1", "!", "¹"),
    "2": ("2", '"', "²"),
    "3": ("3", "£", "³"),
    "4": ("4", "$", "€"),
    "5": ("5", "%", "½"),
    "6": ("6", "^", "¾"),
    "M": ("m", "M", "µ"),
    "APOSTROPHE": ("'", "@"),
    "BACKSLASH": ("#", "~"),
    "102ND": ("\\", "|"),
}

_DE = {
    **_LETTERS,
    "Y": ("z", "Z"),
    "Z": ("y", "Y"),
    "GRAVE": ("^", "°"),
    "1": ("1", "!", "¹"),
    "2": ("2", '"', "²"),
    "3": ("3", "§", "³"),
    "4": ("4", "$", "¼"),
    "5": ("5", "%", "½"),
    "6": ("6", "&", "¬"),
    "7": ("7", "/", "{"),
    "8": ("8", "(", "["),
    "9": ("9", ")", "]"),
    "0": ("0", "=", "}"),
    "MINUS": ("ß", "?", "\\"),
    "EQUAL": ("´", "`"),
    "Q": ("q", "Q", "@"),
    "E": ("e", "E", "€"),
    "M": ("m", "M", "µ"),
    "V": ("v", "V", "„"),
    "B": ("b", "B", "“"),
    "N": ("n", "N", "”"),
    "LEFTBRACE": ("ü", "Ü"),
    "RIGHTBRACE": ("+", "*", "~"),
    "SEMICOLON": ("ö", "Ö"),
    "APOSTROPHE": ("ä", "Ä"),
    "BACKSLASH": ("#", "'", "’"),
    "102ND": ("<", ">", "|"),
    "COMMA": (",", ";", "·"),
    "DOT": (".", ":", "…"),
    "SLASH": ("-", "_", "–", "—"),
}
# Dead keys type their character only when followed by a space.
_DE_DEAD = {("GRAVE", 0), ("EQUAL", 0), ("EQUAL", 1)}

# Typographic characters a layout may lack, typed as their plain look-alikes instead.
SUBSTITUTES = {
    "’": "'",
    "‘": "'",
    "“": '"',
    "”": '"',
    "„": '"',
    "–": "-",
    "—": "-",
    "…": "...",
    "\u00a0": " ",
    "\u202f": " ",
}


@dataclass(frozen=True)
class Layout:
    """Which strokes type each character, for one keyboard layout."""

    name: str
    chars: dict[str, tuple[Stroke, ...]]

    @property
    def codes(self) -> set[int]:
        """Every key code the layout uses (the virtual keyboard's capabilities)."""
        codes = {KEY["LEFTSHIFT"], KEY["RIGHTALT"], KEY["BACKSPACE"]}
        return codes | {s.code for seq in self.chars.values() for s in seq}


def _layout(
    name: str, table: Mapping[str, tuple[str, ...]], dead: Set[tuple[str, int]] = frozenset()
) -> Layout:
    """Build char → strokes; the lowest level wins (Shift+x beats AltGr+y for the same char)."""
    chars: dict[str, tuple[Stroke, ...]] = {
        " ": (SPACE,),
        "\n": (Stroke(KEY["ENTER"]),),
        "\t": (Stroke(KEY["TAB"]),),
    }
    for level in range(4):
        for key, levels in table.items():
            ch = levels[level] if level < len(levels) else ""
            if not ch or ch in chars:
                continue
            stroke = Stroke(KEY[key], shift=level in (1, 3), altgr=level >= 2)
            chars[ch] = (stroke, SPACE) if (key, level) in dead else (stroke,)
    return Layout(name, chars)


LAYOUTS: dict[str, Layout] = {
    "us": _layout("us", _US),
    "gb": _layout("gb", _GB),
    "de": _layout("de", _DE, _DE_DEAD),
}


# --- text → strokes → key events -----------------------------------------------------------------


@dataclass(frozen=True)
class Translation:
    """What typing ``text`` does: the strokes, the text they produce, what could not be typed."""

    strokes: tuple[Stroke, ...]
    typed: str
    missing: tuple[str, ...]


def translate(text: str, layout: Layout) -> Translation:
    """Strokes for ``text``; untypable characters are skipped and listed in ``missing``."""
    strokes: list[Stroke] = []
    typed: list[str] = []
    missing: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        seq = _strokes_for(ch, layout)
        if seq is None:
            missing.append(ch)
            continue
        for out, strokes_of_char in seq:
            strokes.extend(strokes_of_char)
            typed.append(out)
    return Translation(tuple(strokes), "".join(typed), tuple(missing))


def _strokes_for(ch: str, layout: Layout) -> list[tuple[str, tuple[Stroke, ...]]] | None:
    """[(character typed, its strokes)], using a plain substitute when the layout lacks ``ch``."""
    if ch in layout.chars:
        return [(ch, layout.chars[ch])]
    sub = SUBSTITUTES.get(ch)
    if sub and all(c in layout.chars for c in sub):
        return [(c, layout.chars[c]) for c in sub]
    return None


def typable_prefix(text: str, layout: Layout) -> str:
    """The on-screen text of ``text`` up to (not including) its first untypable character."""
    typed: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        seq = _strokes_for(ch, layout)
        if seq is None:
            break
        typed.extend(out for out, _ in seq)
    return "".join(typed)


def stroke_events(stroke: Stroke) -> list[tuple[int, int, int]]:
    """The (type, code, value) input events of one stroke, each followed by a SYN_REPORT."""
    mods = [KEY["LEFTSHIFT"]] * stroke.shift + [KEY["RIGHTALT"]] * stroke.altgr
    steps = [(m, 1) for m in mods] + [(stroke.code, 1), (stroke.code, 0)]
    steps += [(m, 0) for m in reversed(mods)]
    events: list[tuple[int, int, int]] = []
    for code, value in steps:
        events += [(EV_KEY, code, value), (EV_SYN, SYN_REPORT, 0)]
    return events


def key_events(text: str, layout: Layout) -> tuple[list[tuple[int, int, int]], tuple[str, ...]]:
    """All input events that type ``text``, and the characters the layout could not type."""
    tr = translate(text, layout)
    return [e for s in tr.strokes for e in stroke_events(s)], tr.missing


# --- partial typing: what to erase and what to type ----------------------------------------------


@dataclass(frozen=True)
class Edit:
    """Backspace ``erase`` characters, then type ``text`` (already on-screen text)."""

    erase: int = 0
    text: str = ""

    def __bool__(self) -> bool:
        return bool(self.erase or self.text)


def stable_words(previous: list[str] | None, current: list[str]) -> list[str]:
    """Words two successive partials agree on, never the newest word (it may still change)."""
    if previous is None:
        return []
    stable = []
    for a, b in zip(previous, current[:-1]):
        if a != b:
            break
        stable.append(a)
    return stable


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TurnTyper:
    """Decides what to type for partials and finals; keeps no device, so tests drive it directly.

    ``preview`` is exactly what pttd typed for the turn in progress. Partials only ever append
    their stable words to it; the final is reconciled against it by erasing the part after
    their common prefix (the unstable tail, never more than ``preview``) and typing the rest.
    So pttd only ever erases characters it typed itself for the current turn.
    """

    def __init__(self, layout: Layout, trailing: str = "space", partials: bool = False):
        self.layout = layout
        self.trailing = TRAILING[trailing]
        self.partials = partials
        self.preview = ""
        self._turn: object = None
        self._words: list[str] | None = None

    def partial(self, turn: object, text: str) -> Edit:
        if not self.partials:
            return Edit()
        if turn != self._turn:
            if self.preview:
                return Edit()  # another turn's preview is on screen: hold until its final
            self._turn, self._words = turn, None
        words = text.split()
        stable = stable_words(self._words, words)
        self._words = words
        screen = typable_prefix("".join(w + " " for w in stable), self.layout)
        if len(screen) > len(self.preview) and screen.startswith(self.preview):
            added = screen[len(self.preview) :]
            self.preview = screen
            return Edit(0, added)
        return Edit()  # nothing new, or a revision of typed words: the final settles it

    def final(self, turn: object, text: str) -> tuple[Edit, tuple[str, ...]]:
        """The edit that leaves exactly the final (plus trailing) on screen; and what's missing."""
        tr = translate(text, self.layout)
        target = tr.typed + self.trailing
        keep = common_prefix(self.preview, target) if turn == self._turn else 0
        edit = Edit(len(self.preview) - keep, target[keep:])
        self._reset()
        return edit, tr.missing

    def abandon(self) -> Edit:
        """The turn ended without a final (cancelled, failed): erase its preview."""
        edit = Edit(len(self.preview), "")
        self._reset()
        return edit

    def _reset(self) -> None:
        self.preview, self._turn, self._words = "", None, None


# --- the sink ------------------------------------------------------------------------------------


class TypingError(StartupError):
    """The virtual keyboard cannot be made (the daemon turns this into a start-up error)."""


class TypingSink:
    """Types finals (and, with ``partials``, their stable prefix) on a uinput keyboard.

    Runs on its own output worker (outputs.Outputs), so the pauses between keystrokes never
    hold up the controller. ``close()`` interrupts typing that is still going on.
    """

    def __init__(
        self,
        keyboard,
        layout: str = "us",
        trailing: str = "space",
        partials: bool = False,
        delay_ms: int = 10,
    ):
        self.layout = LAYOUTS[layout]
        self._kbd = keyboard
        self._typer = TurnTyper(self.layout, trailing, partials)
        self._delay_s = delay_ms / 1000
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.untypable: Counter[str] = Counter()

    @classmethod
    def open(cls, layout: str = "us", **kwargs) -> TypingSink:
        """A sink on a new kernel uinput keyboard; TypingError says what to fix."""
        if layout not in LAYOUTS:
            raise TypingError(f"unknown keyboard layout {layout!r} (known: {', '.join(LAYOUTS)})")
        return cls(open_keyboard(LAYOUTS[layout]), layout, **kwargs)

    def emit(self, event: dict) -> None:
        kind = event.get("event")
        turn = (event.get("session_id"), event.get("turn_order"))
        if kind == EventKind.PARTIAL:
            edit = self._typer.partial(turn, str(event.get("text", "")))
        elif kind == EventKind.FINAL:
            edit, missing = self._typer.final(turn, str(event.get("text", "")))
            self._report(missing, event)
        elif kind == EventKind.STATE and event.get("state") == State.IDLE:
            edit = self._typer.abandon()
        else:
            return
        if edit:
            self._type(edit)

    def close(self) -> None:
        self._closing.set()
        got = self._lock.acquire(timeout=1.0)  # let a stroke in progress release its keys
        if not got:
            log.warning("typing: keyboard still busy at close")
        try:
            self._kbd.close()
        finally:
            if got:
                self._lock.release()

    @property
    def untypable_count(self) -> int:
        return sum(self.untypable.values())

    def _report(self, missing: Iterable[str], event: dict) -> None:
        missing = list(missing)
        if not missing:
            return
        self.untypable.update(missing)
        shown = ", ".join(sorted({f"{c!r} (U+{ord(c):04X})" for c in missing}))
        log.warning(
            "typing: layout %r cannot type %s in final of press %s; skipped "
            "(%d untypable characters so far)",
            self.layout.name,
            shown,
            event.get("press_id"),
            self.untypable_count,
        )

    def _type(self, edit: Edit) -> None:
        strokes = [BACKSPACE] * edit.erase + list(translate(edit.text, self.layout).strokes)
        for i, stroke in enumerate(strokes):
            if self._closing.is_set():
                log.warning("typing: stopped with %d keystrokes left", len(strokes) - i)
                return
            with self._lock:
                for event in stroke_events(stroke):
                    self._kbd.write(*event)
            if self._delay_s:
                self._closing.wait(self._delay_s)


def open_keyboard(layout: Layout, path: str = UINPUT_PATH, import_evdev: Callable | None = None):
    """An ``evdev.UInput`` keyboard with the layout's keys; TypingError names what to fix."""
    evdev = (import_evdev or _import_evdev)()
    if not os.path.exists(path):
        raise TypingError(
            f"output.type = true needs {path}: load the kernel module "
            "(sudo modprobe uinput; persist it with "
            "echo uinput | sudo tee /etc/modules-load.d/uinput.conf)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise TypingError(
            f"output.type = true: no access to {path}: install "
            "hardware/99-pttd-uinput.rules (group input, mode 0660) and give the "
            "service SupplementaryGroups=input and DeviceAllow=/dev/uinput rw"
        )
    try:
        return evdev.UInput({EV_KEY: sorted(layout.codes)}, name=DEVICE_NAME, devnode=path)
    except (OSError, evdev.UInputError) as exc:
        raise TypingError(
            f"output.type = true: cannot create a keyboard on {path} ({exc}); "
            "under systemd the unit needs DeviceAllow=/dev/uinput rw"
        ) from None


def _import_evdev():
    try:
        import evdev
    except ImportError as exc:
        raise TypingError(
            "output.type = true needs python-evdev: pip install 'pttd[type]', or "
            f"'evdev>=1.6' into pttd's venv ({exc})"
        ) from None
    return evdev
