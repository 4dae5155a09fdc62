"""The output sinks the config asks for: every event the controller emits goes to each of them.

They are all made before any part starts, so a missing hook program, typing library,
/dev/uinput or MQTT password file stops start-up with one line (exit 2). The kiosk and MQTT
are sinks that also take commands; those reach the controller through ``command``, which is
only called once it runs. Their libraries are imported only when the config uses them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pttd.config import Config
from pttd.errors import StartupError, startup_error
from pttd.outputs.fanout import Sink
from pttd.outputs.journal import JournalSink, journal_stream_matches
from pttd.outputs.stdout import StdoutSink

if TYPE_CHECKING:
    from pttd.frontends.kiosk import KioskServer
    from pttd.frontends.mqtt import MqttBridge

#: ``command(name, source)``: a command from the kiosk or MQTT, answered like the control socket's
CommandHandler = Callable[[str, str], dict]


class ControlSocketSink:
    """Forwards events to the control socket once it runs (it starts after the outputs).

    Inline: ``ControlServer.publish`` only queues for the subscribers and wakes its thread."""

    inline = True
    target: Callable[[dict], None] | None = None

    def emit(self, event: dict) -> None:
        if self.target is not None:
            self.target(event)

    def close(self) -> None:
        self.target = None


@dataclass
class OutputSinks:
    """The sinks in delivery order, and the ones the daemon starts or wires itself."""

    all: list[Sink]
    control: ControlSocketSink
    kiosk: KioskServer | None
    mqtt: MqttBridge | None


def build_sinks(
    cfg: Config, extra: list[Sink], command: CommandHandler, waiting: Callable[[], dict]
) -> OutputSinks:
    """Every sink the config asks for, after ``extra`` (tests', the demo's); StartupError when
    one cannot be made. ``waiting`` is the kiosk's status of presses waiting to be sent."""
    sinks: list[Sink] = [StdoutSink(_stdout_mode(cfg)), *extra]
    if cfg.output.journal:
        sinks.append(JournalSink(cfg.stt.speech_model))
    control = ControlSocketSink()
    sinks.append(control)
    if cfg.output.hook:
        sinks.append(_hook_sink(cfg))
    kiosk = _kiosk(cfg, command, waiting) if cfg.kiosk.listen else None
    mqtt = _mqtt(cfg, command) if cfg.mqtt.url else None
    sinks += [sink for sink in (kiosk, mqtt) if sink is not None]
    if cfg.output.type:
        sinks.append(_typing_sink(cfg))
    return OutputSinks(sinks, control, kiosk, mqtt)


def _stdout_mode(cfg: Config) -> str:
    """Under systemd stdout is the journal: with journald on, don't record each final twice."""
    out = cfg.output
    if out.stdout == "text" and out.journal and journal_stream_matches(sys.stdout):
        return "none"
    return out.stdout


def _hook_sink(cfg: Config) -> Sink:
    """The hook program runs once per final."""
    import shutil

    from pttd.outputs.hook import HookSink

    out = cfg.output
    if shutil.which(out.hook[0]) is None:
        raise StartupError(f"output.hook: {out.hook[0]} is not an executable program")
    return HookSink(out.hook, out.hook_timeout_s, out.hook_retries)


def _kiosk(cfg: Config, command: CommandHandler, waiting: Callable[[], dict]) -> KioskServer:
    """The kiosk endpoint mirrors every event to its pages and takes their commands."""
    from pttd.frontends.kiosk import KioskServer  # asyncio + websockets
    from pttd.frontends.kiosk_http import KioskError

    k = cfg.kiosk
    with startup_error(KioskError):
        return KioskServer(
            k.listen,
            lambda cmd: command(cmd, "kiosk"),
            token=k.token,
            allowed_origins=k.allowed_origins,
            status=waiting,
        )


def _mqtt(cfg: Config, command: CommandHandler) -> MqttBridge:
    """The MQTT bridge publishes events and takes commands (a missing password file: exit 2)."""
    from pttd.frontends.mqtt import MqttBridge, MqttError

    with startup_error(MqttError):
        return MqttBridge.from_config(cfg.mqtt, on_command=lambda cmd: command(cmd, "mqtt"))


def _typing_sink(cfg: Config) -> Sink:
    """Types the finals (and maybe partials) on a virtual keyboard (/dev/uinput)."""
    from pttd.outputs.keyboard import TypingError, TypingSink

    out = cfg.output
    with startup_error(TypingError):
        return TypingSink.open(
            out.type_layout,
            trailing=out.type_trailing,
            partials=out.type_partials,
            delay_ms=out.type_delay_ms,
        )
