"""The button and the status LEDs, on gpiozero (imported lazily: it costs ~60 ms at start-up).

Threading: gpiozero calls the button callbacks on its own thread; they must only enqueue.
``StatusLeds.show`` runs on one thread at a time: in the daemon ``LedThread``'s, which the
controller hands each new state to (changing a pattern stops and joins gpiozero's blink thread,
which the controller must not wait for). gpiozero's own blink threads do the timing, and every
``show`` replaces whatever was running, so the LEDs always reflect one state.

LED pattern grammar (``[leds] patterns``, one string per state)::

    pattern := [colour ":"] effect | colour
    effect  := "off" | "on" | "dim:" LEVEL | "blink:" ON ["," OFF] | "pulse:" IN ["," OUT]
    colour  := red | green | blue | white | yellow | cyan | magenta | orange | "#rrggbb"

LEVEL is 0..1; ON/OFF (blink) and IN/OUT (fade times of pulse) are seconds, 0 < t <= 60; a single
time means both halves. ``dim`` and ``pulse`` need kind "pwm" or "rgb"; colours need kind "rgb"
(without one an RGB LED shows white). A bare colour means that colour on.
"""

from __future__ import annotations

import importlib
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pttd.core.mailbox import Mailbox
from pttd.errors import StartupError
from pttd.events import State

log = logging.getLogger(__name__)

KINDS = ("led", "pwm", "rgb", "none")
PIN_COUNTS = {"led": 1, "pwm": 1, "rgb": 3}
EFFECTS = ("off", "on", "dim", "blink", "pulse")
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
}
_HEX = re.compile(r"#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})")
_MAX_SECONDS = 60.0

DEFAULT_PATTERNS: dict[str, dict[State, str]] = {
    "led": {
        State.IDLE: "off",
        State.CONNECTING: "blink:0.1,0.1",
        State.LISTENING: "on",
        State.FINALIZING: "blink:0.25,0.25",
        State.ERROR: "blink:0.5,0.5",
        State.OFFLINE: "blink:0.05,1.95",
    },
    "pwm": {
        State.IDLE: "off",
        State.CONNECTING: "blink:0.1,0.1",
        State.LISTENING: "on",
        State.FINALIZING: "pulse:0.25,0.25",
        State.ERROR: "blink:0.5,0.5",
        State.OFFLINE: "blink:0.05,1.95",
    },
    "rgb": {
        State.IDLE: "green:dim:0.1",
        State.CONNECTING: "cyan:blink:0.1,0.1",
        State.LISTENING: "blue",
        State.FINALIZING: "blue:pulse:0.25,0.25",
        State.ERROR: "red:blink:0.5,0.5",
        State.OFFLINE: "orange:blink:0.05,1.95",
    },
}
"""State -> pattern per LED kind; ``[leds] patterns`` overrides single states."""


class PeripheralError(StartupError):
    """GPIO hardware cannot be set up (pin busy or invalid, no pin factory); message says why."""


# --- patterns (no gpiozero here: config validation calls parse_pattern) ---------------------------


@dataclass(frozen=True)
class Pattern:
    """A parsed LED pattern: ``effect`` is "off", "on", "blink" or "pulse" ("dim": "on", dimmed).

    ``times`` holds blink on/off or pulse fade-in/fade-out seconds; ``level`` scales brightness.
    """

    effect: str
    times: tuple[float, float] = (0.0, 0.0)
    level: float = 1.0
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)


def parse_pattern(kind: str, text: str, key: str = "") -> Pattern:
    """Parse ``text`` for LED ``kind``; ValueError texts start with ``key`` (leds.patterns.idle)."""
    try:
        return _parse(kind, text)
    except ValueError as exc:
        if key:
            raise ValueError(f"{key}: {exc}") from None
        raise


def _parse(kind: str, text: str) -> Pattern:
    if kind not in KINDS:
        raise ValueError(f"unknown LED kind {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty pattern")
    parts = [p.strip() for p in text.strip().lower().split(":")]
    colour = None
    if parts[0] not in EFFECTS:
        colour = _parse_colour(parts[0])
        parts = parts[1:] or ["on"]
    effect, args = parts[0], parts[1:]
    if effect not in EFFECTS:
        raise ValueError(f"unknown effect {effect!r} (known: {', '.join(EFFECTS)})")
    if len(args) > 1:
        raise ValueError("too many ':' sections")
    _check_capability(kind, effect, colour)
    pattern = _make(effect, args[0] if args else None)
    return pattern if colour is None else _with_colour(pattern, colour)


def _make(effect: str, arg: str | None) -> Pattern:
    if effect in ("off", "on"):
        if arg is not None:
            raise ValueError(f'"{effect}" takes no value')
        return Pattern(effect)
    if arg is None:
        raise ValueError(
            f'"{effect}" needs a value, e.g. '
            + ("dim:0.2" if effect == "dim" else f"{effect}:0.5,0.5")
        )
    if effect == "dim":
        return Pattern("on", level=_level(arg))
    return Pattern(effect, times=_times(effect, arg))


def _with_colour(pattern: Pattern, colour: tuple[float, float, float]) -> Pattern:
    return Pattern(pattern.effect, pattern.times, pattern.level, colour)


def _check_capability(kind: str, effect: str, colour) -> None:
    if kind == "none":
        return  # nothing is rendered; the syntax is still checked
    if colour is not None and kind != "rgb":
        raise ValueError(f'colours need kind = "rgb" (kind is {kind!r})')
    if effect in ("dim", "pulse") and kind == "led":
        raise ValueError(f'"{effect}" needs kind = "pwm" or "rgb" (a plain LED is on or off)')


def _parse_colour(word: str) -> tuple[float, float, float]:
    if word in COLOURS:
        return COLOURS[word]
    match = _HEX.fullmatch(word)
    if match:
        red, green, blue = (int(h, 16) / 255 for h in match.groups())
        return red, green, blue
    raise ValueError(
        f"unknown effect or colour {word!r} (effects: off, on, dim:L, blink:ON,OFF, "
        f"pulse:IN,OUT; colours: {', '.join(COLOURS)}, #rrggbb)"
    )


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _level(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"dim level must be between 0 and 1, got {text}")
    return value


def _times(effect: str, text: str) -> tuple[float, float]:
    values = [_number(t) for t in text.split(",")]
    if len(values) > 2:
        raise ValueError(f'"{effect}" takes one or two times in seconds')
    for value in values:
        if not 0.0 < value <= _MAX_SECONDS:
            raise ValueError(f"{effect} times must be > 0 and <= {_MAX_SECONDS:g} s, got {value:g}")
    return (values[0], values[-1])


def led_patterns(kind: str, overrides: Mapping[str, str] | None = None) -> dict[State, Pattern]:
    """The effective State -> Pattern table: defaults for ``kind`` with ``overrides`` applied."""
    table = dict(DEFAULT_PATTERNS.get(kind, DEFAULT_PATTERNS["led"]))
    for name, text in (overrides or {}).items():
        try:
            state = State(name)
        except ValueError:
            known = ", ".join(s.value for s in State)
            raise ValueError(f"leds.patterns.{name}: unknown state (known: {known})") from None
        table[state] = text
    return {s: parse_pattern(kind, t, f"leds.patterns.{s.value}") for s, t in table.items()}


# --- gpiozero glue --------------------------------------------------------------------------------

_FACTORIES = {
    "lgpio": ("gpiozero.pins.lgpio", "LGPIOFactory", "python3-lgpio"),
    "rpigpio": ("gpiozero.pins.rpigpio", "RPiGPIOFactory", "python3-rpi.gpio"),
    "pigpio": ("gpiozero.pins.pigpio", "PiGPIOFactory", "python3-pigpio and a running pigpiod"),
    "native": ("gpiozero.pins.native", "NativeFactory", "a Raspberry Pi"),
}


def make_pin_factory(name: str):
    """``[gpio] pin_factory`` -> a gpiozero pin factory; "" means gpiozero's default (None)."""
    if name == "":
        return None
    if name == "mock":
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        return MockFactory(pin_class=MockPWMPin)  # PWM LEDs need MockPWMPin
    if name not in _FACTORIES:
        known = ", ".join(['""', '"mock"'] + [f'"{n}"' for n in _FACTORIES])
        raise PeripheralError(f"unknown [gpio] pin_factory {name!r} (known: {known})")
    module, cls, needs = _FACTORIES[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except Exception as exc:
        raise PeripheralError(
            f'[gpio] pin_factory = "{name}" is not usable here ({exc}); it needs {needs}'
        ) from exc


def _gpio_error(what: str, exc: Exception) -> PeripheralError:
    text = str(exc) or type(exc).__name__
    if type(exc).__name__ == "BadPinFactory":
        text += ' (no GPIO here? set [gpio] pin_factory = "mock")'
    return PeripheralError(f"{what}: {text}")


def _guarded(fn: Callable[[], None], what: str) -> Callable[[], None]:
    """Wrap a callback so an exception is logged instead of vanishing on gpiozero's thread."""

    def call() -> None:
        try:
            fn()
        except Exception:
            log.exception("button %s callback failed", what)

    return call


class ButtonInput:
    """The push-to-talk button; callbacks run on gpiozero's thread and must only enqueue.

    A ``DigitalInputDevice`` rather than gpiozero's ``Button``: ``Button`` is the same device
    plus ``when_held``, whose ``HoldThread`` wakes every 100 ms for the life of the process
    (idle too). pttd never uses ``when_held``; press and release are edge callbacks either way.
    ``pull_up=True`` means active (pressed) when low. ``bounce_ms = 0`` disables debouncing.
    (gpiozero's MockFactory does not simulate bounce.)
    """

    def __init__(
        self,
        pin: int,
        pull_up: bool,
        bounce_ms: int,
        on_press: Callable[[], None],
        on_release: Callable[[], None],
        pin_factory=None,
    ):
        from gpiozero import DigitalInputDevice

        try:
            self._button = DigitalInputDevice(
                pin,
                pull_up=pull_up,
                pin_factory=pin_factory,
                bounce_time=bounce_ms / 1000 if bounce_ms else None,
            )
        except Exception as exc:
            raise _gpio_error(f"button on GPIO{pin}", exc) from exc
        self._button.when_activated = _guarded(on_press, "press")
        self._button.when_deactivated = _guarded(on_release, "release")

    @property
    def is_pressed(self) -> bool:
        return bool(self._button.is_active)

    @property
    def pin(self):
        """The gpiozero pin (with the mock factory, ``pttd demo`` and tests drive it)."""
        return self._button.pin

    def close(self) -> None:
        self._button.close()


class StatusLeds:
    """LEDs rendered from the controller's state: ``show(state)`` is the only way to change them."""

    def __init__(
        self,
        kind: str,
        pins: list[int],
        active_high: bool = True,
        patterns: Mapping[str, str] | None = None,
        pin_factory=None,
    ):
        if kind not in KINDS:
            raise ValueError(f"leds.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        _check_pin_count(kind, pins)
        self.kind = kind
        self.patterns = led_patterns(kind, patterns)
        self._device = _make_device(kind, list(pins), active_high, pin_factory)
        self._shown: Pattern | None = None

    @property
    def shown(self) -> Pattern | None:
        """The pattern currently rendered (None before the first ``show`` or for kind "none")."""
        return self._shown

    def show(self, state: State) -> None:
        """Render ``state``'s pattern; re-showing the same pattern keeps a running blink's phase."""
        pattern = self.patterns[State(state)]
        if self._device is None or pattern == self._shown:
            return
        try:
            _RENDER[self.kind](self._device, pattern)
        except Exception:
            log.exception("LEDs: cannot show %s", State(state).value)
            return
        self._shown = pattern

    def close(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            device.close()


def _check_pin_count(kind: str, pins: list[int]) -> None:
    want = PIN_COUNTS.get(kind)
    if want is not None and len(pins) != want:
        raise ValueError(
            f"leds.pins must list {want} pin{'s' if want > 1 else ''} "
            f"for kind = {kind!r}, got {list(pins)}"
        )


def _make_device(kind: str, pins: list[int], active_high: bool, pin_factory):
    if kind == "none":
        return None
    import gpiozero

    try:
        if kind == "rgb":
            return gpiozero.RGBLED(
                *pins, active_high=active_high, pwm=True, pin_factory=pin_factory
            )
        cls = gpiozero.PWMLED if kind == "pwm" else gpiozero.LED
        return cls(pins[0], active_high=active_high, pin_factory=pin_factory)
    except Exception as exc:
        raise _gpio_error(f"{kind} LED on GPIO{','.join(map(str, pins))}", exc) from exc


def _render_led(device, p: Pattern) -> None:
    if p.effect == "blink":
        device.blink(on_time=p.times[0], off_time=p.times[1])
    elif p.effect == "on":
        device.on()
    else:
        device.off()


def _render_pwm(device, p: Pattern) -> None:
    if p.effect == "blink":
        device.blink(on_time=p.times[0], off_time=p.times[1])
    elif p.effect == "pulse":
        device.pulse(fade_in_time=p.times[0], fade_out_time=p.times[1])
    elif p.effect == "on":
        device.value = p.level
    else:
        device.off()


def _render_rgb(device, p: Pattern) -> None:
    colour = tuple(c * p.level for c in p.colour)
    if p.effect == "blink":
        device.blink(on_time=p.times[0], off_time=p.times[1], on_color=colour)
    elif p.effect == "pulse":
        device.pulse(fade_in_time=p.times[0], fade_out_time=p.times[1], on_color=colour)
    elif p.effect == "on":
        device.value = colour
    else:
        device.off()


_RENDER = {"led": _render_led, "pwm": _render_pwm, "rgb": _render_rgb}


class LedThread:
    """Draws the controller's newest state on the LEDs, from a thread of its own.

    Changing a blinking or pulsing pattern stops and joins gpiozero's blink thread: 0.2–3 ms on
    a 2-core VM, more on a Zero 2 W, during which the controller (which owns every press and
    every final) would be stuck, and the threads that deliver a final would wait behind it for
    the GIL. So ``show`` only notes the state and rings a doorbell; this thread draws it. States
    that go by faster than they are drawn are skipped: the LEDs show the newest one, always.
    """

    def __init__(self, leds: StatusLeds, name: str = "pttd-leds"):
        self.leds = leds
        self._wanted: State | None = None
        self._doorbell = Mailbox(1)  # one ring pending is enough: the thread reads _wanted
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def show(self, state: State) -> None:
        """Called by the controller: never blocks."""
        self._wanted = state
        try:
            self._doorbell.put_nowait(True)
        except queue.Full:
            pass  # a ring is pending; the thread will read the newest state

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (joined with ``timeout``), then release the pins."""
        self._doorbell.put_marker(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("LEDs: the LED thread did not stop within %.1f s", timeout)
        else:
            self.leds.close()

    def _run(self) -> None:
        while self._doorbell.get() is not None:
            state = self._wanted
            try:
                if state is not None:
                    self.leds.show(state)
            except Exception:
                log.exception("LEDs: cannot show %s", state)
