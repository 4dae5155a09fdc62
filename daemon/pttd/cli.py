"""The ``pttd`` command line: exit 0 ok, 2 a problem to fix, 1 runtime failure.

User mistakes end in one ``pttd: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pttd import __version__
from pttd.config import load_config
from pttd.config_files import config_path
from pttd.errors import UsageError, UserError
from pttd.events import Command

log = logging.getLogger("pttd")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
CONTROL_COMMANDS = tuple(c.value for c in Command if c is not Command.SUBSCRIBE)

Subcommands = argparse._SubParsersAction  # what add_subparsers() returns


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``pttd --help`` lists them."""
    parser = argparse.ArgumentParser(prog="pttd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pttd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _with_config(sub.add_parser("run", help="the daemon (what systemd runs)"))
    demo = sub.add_parser("demo", help="the whole pipeline offline: no Pi, mic, key or internet")
    demo.add_argument("--jsonl", action="store_true", help="print the contract's JSON events")
    _with_config(sub.add_parser("check", help="self-test: config, mic, GPIO, server and key"))
    _add_control_commands(sub)
    rec = _with_config(sub.add_parser("record", help="record exactly what would be sent"))
    rec.add_argument("--seconds", type=float, required=True, metavar="N")
    rec.add_argument("out", metavar="OUT.wav")
    local = sub.add_parser("serve-local", help="the offline v3-compatible engine")
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=8765)
    _add_serve_tokens(sub)
    return parser


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $PTTD_CONFIG, else /etc/pttd/pttd.toml)",
    )
    return p


def _add_control_commands(sub: Subcommands) -> None:
    """The commands that talk to a running daemon over its control socket."""
    for name in CONTROL_COMMANDS:
        p = _with_config(sub.add_parser(name, help=f"send {name!r} to the running daemon"))
        p.add_argument("--socket", metavar="PATH", help="control socket (overrides the config)")
    ev = _with_config(sub.add_parser("events", help="print the daemon's events as JSON lines"))
    ev.add_argument("--socket", metavar="PATH", help="control socket (overrides the config)")


def _add_serve_tokens(sub: Subcommands) -> None:
    what = "token broker for a fleet: one-use AssemblyAI tokens, key stays here"
    tokens = _with_config(sub.add_parser("serve-tokens", help=what))
    tokens.add_argument("--listen", required=True, metavar="HOST:PORT")
    tokens.add_argument(
        "--devices", required=True, metavar="FILE", help="'device_id secret' per line, mode 0600"
    )
    limits = (
        ("--max-session-s", 600, "cap on each token's session (60-10800, default 600)"),
        ("--expires-s", 300, "how long a token may wait unused (1-600, default 300)"),
        ("--per-device-per-minute", 30, "tokens per device per minute before 429 (default 30)"),
    )
    for flag, default, text in limits:
        tokens.add_argument(flag, type=int, default=default, metavar="N", help=text)
    tokens.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    tokens.add_argument("--tls-key", metavar="FILE", help="... and this private key")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:  # config, usage, start-up: the one place they become exit 2
        print(f"pttd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # a bug: one line for the user, the traceback with -v
        log.debug("internal error", exc_info=True)
        print(
            f"pttd: internal error: {type(exc).__name__}: {exc} (run with -v for details)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME


def setup_logging(verbose: bool) -> None:
    from pttd.outputs.journal import journal_logging_handler, journal_stream_matches

    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    if journal_stream_matches():
        handler = journal_logging_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pttd: %(asctime)s %(levelname)s: %(message)s"))
    root.handlers[:] = [handler]
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _load(args):
    return load_config(config_path(getattr(args, "config", None)))


# --- commands -------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from pttd.app.daemon import run

    # The daemon's threads mostly sleep; a waking one waits for the GIL at most this long when
    # another runs Python (5 ms by default: ~5 ms added to wake-ups next to a busy thread, such
    # as the in-process offline engine; ~1.3 ms at 1 ms). No CPU cost measured (bench/RESULTS.md).
    sys.setswitchinterval(0.001)
    return run(_load(args))


def cmd_control(args) -> int:
    from pttd.frontends.control.client import request
    from pttd.frontends.control.protocol import ControlError

    path = _socket_path(args)
    try:
        reply = request(path, args.command)
    except ControlError as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(json.dumps(reply))
    return EXIT_OK if reply.get("ok") else EXIT_RUNTIME


def cmd_events(args) -> int:
    from pttd.frontends.control.client import subscribe
    from pttd.frontends.control.protocol import ControlError

    path = _socket_path(args)
    try:
        for event in subscribe(path):
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
            sys.stdout.flush()
    except ControlError as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except BrokenPipeError:
        pass
    return EXIT_OK


def _socket_path(args) -> str:
    if getattr(args, "socket", None):
        return args.socket
    path = config_path(getattr(args, "config", None))
    cfg = load_config(
        path, require_file=getattr(args, "config", None) is not None or "PTTD_CONFIG" in os.environ
    )
    return cfg.control.socket


def cmd_demo(args) -> int:
    from pttd.app.demo import run_demo

    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # the demo's own lines tell the story
    return run_demo(jsonl=args.jsonl)  # (a StartupError, e.g. no [local] extra: exit 2)


def cmd_check(args) -> int:
    from pttd.app.check import run_check

    return run_check(_load(args))


def cmd_record(args) -> int:
    from pttd.audio.record import run_record

    if args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    return run_record(_load(args), args.seconds, args.out)


def cmd_serve_local(args) -> int:
    from pttd.app.offline import require_pocketsphinx
    from pttd.local.engine import serve

    require_pocketsphinx("pttd serve-local")

    return serve(args.host, args.port)


def cmd_serve_tokens(args) -> int:
    from pttd.stt.assemblyai.broker import serve

    return serve(
        _load(args),
        args.listen,
        args.devices,
        max_session_s=args.max_session_s,
        expires_s=args.expires_s,
        per_device_per_minute=args.per_device_per_minute,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


COMMANDS = {
    "serve-tokens": cmd_serve_tokens,
    "run": cmd_run,
    "demo": cmd_demo,
    "check": cmd_check,
    "events": cmd_events,
    "record": cmd_record,
    "serve-local": cmd_serve_local,
    **{name: cmd_control for name in CONTROL_COMMANDS},
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
