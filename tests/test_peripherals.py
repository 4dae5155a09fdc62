"""Button and LEDs on gpiozero's MockFactory/MockPWMPin: drive pins, assert the pin history."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time

import pytest
from gpiozero import LED
from gpiozero.pins.mock import MockFactory, MockPWMPin

from pttd.events import State
from pttd.frontends.peripherals import (DEFAULT_PATTERNS, ButtonInput, LedThread, Pattern, PeripheralError,
                              StatusLeds, make_pin_factory, parse_pattern)

RGB = [5, 6, 13]


@pytest.fixture
def factory():
    """A fresh mock factory per test; every device made through ``factory.track`` is closed after."""
    f = MockFactory(pin_class=MockPWMPin)
    devices = []
    f.track = lambda dev: devices.append(dev) or dev
    try:
        yield f
    finally:
        for dev in reversed(devices):
            dev.close()
        f.reset()
        f.close()


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns the last result (a bounded wait)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def history(pin, expected):
    """Wait until ``pin`` recorded len(expected) states, then compare states and times."""
    assert wait_for(lambda: len(pin.states) >= len(expected)), pin.states
    pin.assert_states_and_times(expected)


def show_fresh(leds: StatusLeds, factory, pins, state: State) -> None:
    for p in pins:
        factory.pin(p).clear_states()
    leds.show(state)


# --- button ---------------------------------------------------------------------------------------

def _button(factory, events, pull_up=True, bounce_ms=30, pin=17):
    return factory.track(ButtonInput(pin, pull_up, bounce_ms, lambda: events.append("press"),
                                     lambda: events.append("release"), pin_factory=factory))


def test_button_pull_up_press_is_low(factory):
    events = []
    button = _button(factory, events, pull_up=True)
    pin = factory.pin(17)
    assert pin.state == 1 and not button.is_pressed  # pulled up, idle high
    pin.drive_low()
    assert events == ["press"] and button.is_pressed
    pin.drive_high()
    assert events == ["press", "release"]


def test_button_pull_down_press_is_high(factory):
    events = []
    _button(factory, events, pull_up=False)
    pin = factory.pin(17)
    pin.drive_high()
    pin.drive_low()
    pin.drive_high()
    assert events == ["press", "release", "press"]


def test_button_bounce_setting(factory):
    _button(factory, [], bounce_ms=30)
    assert factory.pin(17).bounce == pytest.approx(0.03)
    _button(factory, [], bounce_ms=0, pin=22)
    assert factory.pin(22).bounce is None


def test_button_callback_error_is_logged_not_raised(factory, caplog):
    def boom():
        raise RuntimeError("queue full")

    factory.track(ButtonInput(17, True, 30, boom, lambda: None, pin_factory=factory))
    factory.pin(17).drive_low()
    assert "button press callback failed" in caplog.text


def test_button_pin_busy(factory):
    factory.track(LED(17, pin_factory=factory))
    with pytest.raises(PeripheralError, match="button on GPIO17"):
        ButtonInput(17, True, 30, lambda: None, lambda: None, pin_factory=factory)


def test_button_invalid_pin(factory):
    with pytest.raises(PeripheralError, match="GPIO99"):
        ButtonInput(99, True, 30, lambda: None, lambda: None, pin_factory=factory)


def test_button_starts_no_polling_thread(factory):
    """gpiozero's Button starts a HoldThread that wakes every 100 ms forever; ours starts none."""
    from gpiozero.mixins import HoldThread

    before = set(threading.enumerate())
    items: "queue.Queue[str]" = queue.Queue()
    factory.track(ButtonInput(17, True, 30, lambda: items.put("press"),
                              lambda: items.put("release"), pin_factory=factory))
    hold = [t for t in threading.enumerate() if isinstance(t, HoldThread) or "held" in t.name]
    assert hold == []
    assert [t.name for t in threading.enumerate() if t not in before] == []
    pin = factory.pin(17)
    pin.drive_low()
    pin.drive_high()
    pin.drive_low()
    assert [items.get_nowait() for _ in range(3)] == ["press", "release", "press"]
    assert items.empty()


def test_button_close_frees_pin(factory):
    ButtonInput(17, True, 30, lambda: None, lambda: None, pin_factory=factory).close()
    _button(factory, [])


# --- single LED -----------------------------------------------------------------------------------

LED_HISTORY = {
    State.IDLE: [(0, False)],
    State.CONNECTING: [(0, False), (0, True), (0.1, False), (0.1, True), (0.1, False)],
    State.LISTENING: [(0, False), (0, True)],
    State.FINALIZING: [(0, False), (0, True), (0.25, False), (0.25, True)],
    State.ERROR: [(0, False), (0, True), (0.5, False)],
    State.OFFLINE: [(0, False), (0, True), (0.05, False)],
}


@pytest.mark.parametrize("state", list(State))
def test_led_history_per_state(factory, state):
    leds = factory.track(StatusLeds("led", [27], True, pin_factory=factory))
    show_fresh(leds, factory, [27], state)
    history(factory.pin(27), LED_HISTORY[state])


def test_led_active_low_inverts(factory):
    leds = factory.track(StatusLeds("led", [27], active_high=False, pin_factory=factory))
    pin = factory.pin(27)
    assert pin.state == 1  # off = high
    show_fresh(leds, factory, [27], State.LISTENING)
    history(pin, [(0, True), (0, False)])


def test_led_state_change_stops_blink(factory):
    leds = factory.track(StatusLeds("led", [27], pin_factory=factory))
    pin = factory.pin(27)
    leds.show(State.CONNECTING)
    assert wait_for(lambda: len(pin.states) >= 3)
    leds.show(State.IDLE)
    assert pin.state == 0
    settled = len(pin.states)
    assert not wait_for(lambda: len(pin.states) > settled, timeout=0.3)  # blink thread stopped


def test_led_same_pattern_keeps_running_blink(factory):
    leds = factory.track(StatusLeds("led", [27], patterns={"finalizing": "blink:0.1,0.1"},
                                    pin_factory=factory))
    show_fresh(leds, factory, [27], State.CONNECTING)
    assert wait_for(lambda: len(factory.pin(27).states) >= 3)
    leds.show(State.FINALIZING)  # identical pattern: not restarted, phase kept
    history(factory.pin(27), LED_HISTORY[State.CONNECTING] + [(0.1, True)])


def test_led_override_pattern(factory):
    leds = factory.track(StatusLeds("led", [27], patterns={"idle": "on"}, pin_factory=factory))
    show_fresh(leds, factory, [27], State.IDLE)
    history(factory.pin(27), [(0, False), (0, True)])
    assert leds.shown == Pattern("on")


# --- the LED thread (how the daemon drives the LEDs) ---------------------------------------------

class HeldLeds(StatusLeds):
    """Real StatusLeds whose ``show`` can be held at its start, noting the thread it ran on.

    ``entered`` is set as ``show`` starts (before the gate): the LED thread has taken a state."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.drawn: list[tuple[State, str]] = []

    def show(self, state):
        self.entered.set()
        self.gate.wait(5)
        self.drawn.append((state, threading.current_thread().name))
        super().show(state)


def test_led_thread_draws_states_on_its_own_thread(factory):
    leds = HeldLeds("led", [27], pin_factory=factory)
    painter = LedThread(leds)
    painter.start()
    try:
        pin = factory.pin(27)
        painter.show(State.LISTENING)
        assert wait_for(lambda: pin.state == 1)
        painter.show(State.CONNECTING)
        assert wait_for(lambda: len(pin.states) >= 4)  # blinking
        painter.show(State.IDLE)
        assert wait_for(lambda: leds.shown == Pattern("off") and pin.state == 0)
        assert [s for s, _ in leds.drawn] == [State.LISTENING, State.CONNECTING, State.IDLE]
        assert {name for _, name in leds.drawn} == {"pttd-leds"}
    finally:
        painter.close()
    assert not painter._thread.is_alive()
    assert leds._device is None  # pins released


def test_led_thread_show_never_waits_and_skips_states_that_went_by(factory):
    leds = HeldLeds("led", [27], pin_factory=factory)
    painter = LedThread(leds)
    painter.start()
    try:
        leds.gate.clear()
        leds.entered.clear()
        painter.show(State.CONNECTING)  # the thread takes it and is held
        # An explicit event, not the doorbell's qsize() == 0: on Python 3.13 SimpleQueue.put
        # hands the item straight to the parked thread, so the queue is empty before that thread
        # has even woken up to read its state (issue 22).
        assert leds.entered.wait(5), "the LED thread never started drawing CONNECTING"
        started = time.monotonic()
        for state in (State.LISTENING, State.FINALIZING, State.ERROR, State.IDLE):
            painter.show(state)
        assert time.monotonic() - started < 0.5  # the controller was never held up
        leds.gate.set()
        assert wait_for(lambda: leds.shown == Pattern("off"))
        # the one pending ring was for the newest state: drawn once, nothing after it
        assert wait_for(lambda: len(leds.drawn) >= 2)
        assert [s for s, _ in leds.drawn] == [State.CONNECTING, State.IDLE]
        assert factory.pin(27).state == 0
    finally:
        leds.gate.set()
        painter.close()


def test_led_thread_survives_a_failing_draw(factory, caplog):
    leds = HeldLeds("led", [27], pin_factory=factory)
    painter = LedThread(leds)
    painter.start()
    try:
        real = leds.patterns
        leds.patterns = {}   # every lookup fails: a bug in drawing must not end the thread
        painter.show(State.LISTENING)
        assert wait_for(lambda: "cannot show" in caplog.text)
        leds.patterns = real
        painter.show(State.LISTENING)
        assert wait_for(lambda: factory.pin(27).state == 1)
    finally:
        painter.close()
    assert not painter._thread.is_alive()


# --- PWM LED --------------------------------------------------------------------------------------

PWM_HISTORY = {
    State.IDLE: [(0, 0.0)],
    State.CONNECTING: [(0, 0.0), (0, 1.0), (0.1, 0.0), (0.1, 1.0)],
    State.LISTENING: [(0, 0.0), (0, 1.0)],
    State.ERROR: [(0, 0.0), (0, 1.0), (0.5, 0.0)],
    State.OFFLINE: [(0, 0.0), (0, 1.0), (0.05, 0.0)],
}


@pytest.mark.parametrize("state", list(PWM_HISTORY))
def test_pwm_history_per_state(factory, state):
    leds = factory.track(StatusLeds("pwm", [18], pin_factory=factory))
    show_fresh(leds, factory, [18], state)
    history(factory.pin(18), PWM_HISTORY[state])


def assert_one_pulse(pin, fade_in: float, fade_out: float, peak: float = 1.0) -> None:
    """One pulse cycle: rises monotonically to ``peak`` in ~fade_in, falls back to 0 in ~fade_out."""
    def cycle_done():
        values = [s.state for s in pin.states]
        return peak in values and values.index(peak) < len(values) - 1 and values[-1] == 0.0

    assert wait_for(cycle_done), pin.states
    values = [s.state for s in pin.states]
    times = [s.timestamp for s in pin.states]
    top, end = values.index(peak), values.index(0.0, values.index(peak))
    assert values[:top + 1] == sorted(values[:top + 1])
    assert values[top:end + 1] == sorted(values[top:end + 1], reverse=True)
    assert sum(times[1:top + 1]) == pytest.approx(fade_in, abs=0.1)
    assert sum(times[top + 1:end + 1]) == pytest.approx(fade_out, abs=0.1)


def test_pwm_finalizing_pulses(factory):
    leds = factory.track(StatusLeds("pwm", [18], pin_factory=factory))
    show_fresh(leds, factory, [18], State.FINALIZING)
    assert_one_pulse(factory.pin(18), 0.25, 0.25)


def test_pwm_dim_and_active_low(factory):
    leds = factory.track(StatusLeds("pwm", [18], active_high=False, patterns={"idle": "dim:0.2"},
                                    pin_factory=factory))
    show_fresh(leds, factory, [18], State.IDLE)
    history(factory.pin(18), [(0, 1.0), (0, 0.8)])
    show_fresh(leds, factory, [18], State.LISTENING)
    history(factory.pin(18), [(0, 0.8), (0, 0.0)])


# --- RGB LED --------------------------------------------------------------------------------------

RGB_HISTORY = {  # state -> (red, green, blue) pin histories
    State.IDLE: ([(0, 0.0)], [(0, 0.0), (0, 0.1)], [(0, 0.0)]),
    State.CONNECTING: ([(0, 0.0)], [(0, 0.0), (0, 1.0), (0.1, 0.0), (0.1, 1.0)],
                       [(0, 0.0), (0, 1.0), (0.1, 0.0), (0.1, 1.0)]),
    State.LISTENING: ([(0, 0.0)], [(0, 0.0)], [(0, 0.0), (0, 1.0)]),
    State.ERROR: ([(0, 0.0), (0, 1.0), (0.5, 0.0)], [(0, 0.0)], [(0, 0.0)]),
    State.OFFLINE: ([(0, 0.0), (0, 1.0), (0.05, 0.0)], [(0, 0.0), (0, 0.5), (0.05, 0.0)],
                    [(0, 0.0)]),
}


@pytest.mark.parametrize("state", list(RGB_HISTORY))
def test_rgb_history_per_state(factory, state):
    leds = factory.track(StatusLeds("rgb", RGB, pin_factory=factory))
    show_fresh(leds, factory, RGB, state)
    for pin, expected in zip(RGB, RGB_HISTORY[state]):
        history(factory.pin(pin), expected)
        if len(expected) == 1:  # a channel that must stay dark
            assert len(factory.pin(pin).states) == 1


def test_rgb_finalizing_pulses_blue_only(factory):
    leds = factory.track(StatusLeds("rgb", RGB, pin_factory=factory))
    show_fresh(leds, factory, RGB, State.FINALIZING)
    assert_one_pulse(factory.pin(13), 0.25, 0.25)
    assert len(factory.pin(5).states) == len(factory.pin(6).states) == 1


def test_rgb_hex_colour_active_low(factory):
    leds = factory.track(StatusLeds("rgb", RGB, active_high=False,
                                    patterns={"listening": "#ff0080"}, pin_factory=factory))
    show_fresh(leds, factory, RGB, State.LISTENING)
    assert factory.pin(5).state == pytest.approx(0.0)
    assert factory.pin(6).state == pytest.approx(1.0)
    assert factory.pin(13).state == pytest.approx(1 - 128 / 255)


# --- kind "none", pins, factories -----------------------------------------------------------------

def test_none_kind_touches_nothing(factory):
    leds = StatusLeds("none", [27], patterns={"idle": "red:pulse:1"}, pin_factory=factory)
    for state in State:
        leds.show(state)
    assert leds.shown is None
    assert not factory.pins  # no pin was even created
    leds.close()


@pytest.mark.parametrize("kind, pins", [("led", []), ("led", [1, 2]), ("pwm", [1, 2]), ("rgb", [1])])
def test_wrong_pin_count(factory, kind, pins):
    with pytest.raises(ValueError, match="leds.pins must list"):
        StatusLeds(kind, pins, pin_factory=factory)


def test_led_pin_busy(factory):
    factory.track(LED(27, pin_factory=factory))
    with pytest.raises(PeripheralError, match="led LED on GPIO27"):
        StatusLeds("led", [27], pin_factory=factory)


def test_make_pin_factory():
    assert make_pin_factory("") is None
    mock = make_pin_factory("mock")
    try:
        assert isinstance(mock, MockFactory) and mock.pin_class is MockPWMPin
    finally:
        mock.close()
    with pytest.raises(PeripheralError, match="unknown"):
        make_pin_factory("bogus")


def test_unusable_pin_factory_is_a_clear_error():
    try:
        import lgpio  # noqa: F401
    except ImportError:
        with pytest.raises(PeripheralError, match='pin_factory = "lgpio" is not usable here'):
            make_pin_factory("lgpio")
    else:
        pytest.skip("lgpio is installed here")


# --- pattern grammar ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, text, expected", [
    ("led", "off", Pattern("off")),
    ("led", " ON ", Pattern("on")),
    ("led", "blink:0.5", Pattern("blink", (0.5, 0.5))),
    ("led", "blink:0.1,0.9", Pattern("blink", (0.1, 0.9))),
    ("pwm", "dim:0.2", Pattern("on", level=0.2)),
    ("pwm", "pulse:1,2", Pattern("pulse", (1.0, 2.0))),
    ("rgb", "green", Pattern("on", colour=(0.0, 1.0, 0.0))),
    ("rgb", "red:blink:0.5,0.5", Pattern("blink", (0.5, 0.5), colour=(1.0, 0.0, 0.0))),
    ("rgb", "#ff0000:dim:0.5", Pattern("on", level=0.5, colour=(1.0, 0.0, 0.0))),
    ("rgb", "dim:0.3", Pattern("on", level=0.3)),
    ("none", "cyan:pulse:1", Pattern("pulse", (1.0, 1.0), colour=(0.0, 1.0, 1.0))),
])
def test_parse_pattern(kind, text, expected):
    assert parse_pattern(kind, text) == expected


@pytest.mark.parametrize("kind, text, message", [
    ("led", "", "empty pattern"),
    ("led", "sparkle", "unknown effect or colour 'sparkle'"),
    ("led", "pulse:1,1", 'needs kind = "pwm" or "rgb"'),
    ("led", "dim:0.2", 'needs kind = "pwm" or "rgb"'),
    ("pwm", "red", 'colours need kind = "rgb"'),
    ("led", "blink", '"blink" needs a value'),
    ("led", "on:1", "takes no value"),
    ("led", "blink:0,1", "must be > 0"),
    ("led", "blink:1,2,3", "one or two times"),
    ("led", "blink:100", "<= 60"),
    ("led", "blink:nan", "not a finite number"),
    ("led", "blink:x", "'x' is not a number"),
    ("pwm", "dim:1.5", "between 0 and 1"),
    ("rgb", "#12345", "unknown effect or colour"),
    ("rgb", "red:green", "unknown effect 'green'"),
    ("rgb", "red:blink:1:2", "too many"),
    ("lamp", "on", "unknown LED kind"),
])
def test_parse_pattern_errors(kind, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_pattern(kind, text)


def test_parse_pattern_error_names_key():
    with pytest.raises(ValueError, match=r"^leds\.patterns\.listening: unknown effect or colour"):
        parse_pattern("led", "sparkle", key="leds.patterns.listening")


def test_bad_override_names_state(factory):
    with pytest.raises(ValueError, match=r"^leds\.patterns\.listening: .*pwm"):
        StatusLeds("led", [27], patterns={"listening": "pulse:1"}, pin_factory=factory)
    with pytest.raises(ValueError, match=r"^leds\.patterns\.bogus: unknown state"):
        StatusLeds("led", [27], patterns={"bogus": "on"}, pin_factory=factory)


@pytest.mark.parametrize("kind", sorted(DEFAULT_PATTERNS))
def test_defaults_cover_every_state_and_parse(kind):
    assert set(DEFAULT_PATTERNS[kind]) == set(State)
    for state, text in DEFAULT_PATTERNS[kind].items():
        parse_pattern(kind, text)


def test_parse_pattern_does_not_import_gpiozero():
    code = ("import sys; from pttd.frontends.peripherals import parse_pattern, led_patterns; "
            "parse_pattern('rgb', 'red:blink:1'); led_patterns('pwm', {'idle': 'dim:0.1'}); "
            "sys.exit('gpiozero' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


# --- the daemon's LEDs, end to end ---------------------------------------------------------------

def test_daemon_leds_follow_a_press_from_their_own_thread(inprocess_daemon, tmp_path):
    """``pttd run``'s wiring in-process: the button pin pressed and released, the LED pin
    follows idle -> listening (on) -> finalizing (blink) -> idle (off), drawn by the LED thread."""
    daemon, _ = inprocess_daemon("lights follow")
    try:
        painter = daemon.leds
        assert isinstance(painter, LedThread) and painter._thread.is_alive()
        led, button = painter.leds, daemon.button.pin
        assert wait_for(lambda: led.shown == Pattern("off"))
        assert wait_for(lambda: daemon.controller.command("status")["audio_ms"] >= 500, 15)
        button.drive_low()   # pull-up: pressed
        assert wait_for(lambda: led.shown == Pattern("on"), 10)
        assert led._device.pin.state == 1
        # released inside the loud stretch (2-4 s): the press holds speech whatever the post-roll
        assert wait_for(lambda: daemon.controller.command("status")["audio_ms"] >= 3000, 15)
        button.drive_high()
        assert wait_for(lambda: daemon.controller.last_final is not None, 15)
        assert daemon.controller.last_final["text"] == "lights follow"
        assert wait_for(lambda: led.shown == Pattern("off"))
        assert led._device.pin.state == 0
    finally:
        daemon.shutdown()
    assert not painter._thread.is_alive()
    assert led._device is None
