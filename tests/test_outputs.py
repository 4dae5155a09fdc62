"""Output sinks: stdout lines, journald fields (injected send and a real journald), the fan-out."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pttd import events
from pttd.events import State
from pttd.outputs.fanout import Outputs
from pttd.outputs.journal import JournalSink, journal_fields, journal_logging_handler
from pttd.outputs.stdout import StdoutSink, text_line
from tests.journald import Journald, run_python_in_journald, unavailable_reason

FINAL = events.final_event("turn the lights on", turn_order=3, session_id="sess-1", press_id=7,
                           audio_ms=2350, latency_ms=412, ts=1700000000.5, late=True, gap_ms=120)
ERROR = events.error_event(1008, "Unauthorized: bad key", retry_in_s=2.5, ts=1700000001.0)
STATE = events.state_event(State.LISTENING, ts=1700000002.0)
PARTIAL = events.partial_event("turn the", turn_order=3, session_id="sess-1", ts=1700000003.0)

needs_journald = pytest.mark.skipif(bool(unavailable_reason()), reason=str(unavailable_reason()))


class RecordingStream(io.StringIO):
    """A text stream that remembers each write and flush call, in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def write(self, s):
        self.calls.append(("write", s))
        return super().write(s)

    def flush(self):
        self.calls.append(("flush", ""))
        super().flush()


# --------------------------------------------------------------------------- stdout

def test_jsonl_is_one_compact_line_per_event_written_whole_and_flushed():
    stream = RecordingStream()
    sink = StdoutSink("jsonl", stream)
    for event in (STATE, PARTIAL, FINAL, ERROR):
        sink.emit(event)
    writes = [s for op, s in stream.calls if op == "write"]
    assert [op for op, _ in stream.calls] == ["write", "flush"] * 4
    assert all(w.endswith("\n") and w.count("\n") == 1 and ", " not in w for w in writes)
    assert [json.loads(w) for w in writes] == [STATE, PARTIAL, FINAL, ERROR]


def test_jsonl_keeps_a_multiline_transcript_on_one_line():
    stream = io.StringIO()
    StdoutSink("jsonl", stream).emit(dict(FINAL, text="line one\nline two é"))
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["text"] == "line one\nline two é"


def test_text_lines():
    assert text_line(STATE) == "state: listening"
    assert text_line(PARTIAL) == "partial: turn the"
    assert text_line(FINAL) == "final: turn the lights on"
    assert text_line(ERROR) == "error: [1008] Unauthorized: bad key (retry in 2.5s)"
    assert text_line(events.error_event(None, "no network")) == "error: no network"
    assert text_line(events.error_event(None, "down", retry_in_s=5)) == "error: down (retry in 5s)"
    assert text_line(dict(FINAL, text="a\nb")) == "final: a b"
    assert text_line({"event": "snapshot", "state": "idle", "ts": 1.0}) == 'snapshot: {"state":"idle"}'
    stream = io.StringIO()
    sink = StdoutSink("text", stream)
    sink.emit(STATE)
    sink.emit(FINAL)
    assert stream.getvalue() == "state: listening\nfinal: turn the lights on\n"


def test_mode_none_writes_nothing_and_bad_mode_is_refused():
    stream = io.StringIO()
    StdoutSink("none", stream).emit(FINAL)
    assert stream.getvalue() == ""
    with pytest.raises(ValueError):
        StdoutSink("xml", stream)


def test_broken_pipe_disables_the_sink_once(caplog):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = os.fdopen(write_fd, "w")
    sink = StdoutSink("jsonl", stream)
    sink.emit(FINAL)
    sink.emit(FINAL)
    sink.close()
    assert not sink.enabled
    assert len([r for r in caplog.records if "stdout is gone" in r.message]) == 1
    stream.close()


BROKEN_PIPE_CHILD = textwrap.dedent("""
    import logging, sys
    from pttd import events
    from pttd.outputs.stdout import StdoutSink
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.stdin.readline()                      # wait until the reader has gone
    sink = StdoutSink("jsonl")
    for i in range(200):
        sink.emit(events.final_event("x" * 100, i, "s", i, 1, 1))
    print("child done", file=sys.stderr)
""")


def test_broken_stdout_pipe_does_not_kill_the_process():
    proc = subprocess.Popen([sys.executable, "-c", BROKEN_PIPE_CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0, err
    assert "child done" in err
    assert err.count("stdout is gone") == 1
    assert "Traceback" not in err and "Exception ignored" not in err


FLOOD_CHILD = textwrap.dedent("""
    import itertools
    from pttd import events
    from pttd.outputs.stdout import StdoutSink
    sink = StdoutSink("jsonl")
    for i in itertools.count():
        sink.emit(events.final_event("word " * (i % 700), i, "s", i, 1, 1))
""")


def test_sigkill_never_leaves_half_a_line():
    """Lines up to PIPE_BUF (4 KiB) are written by one write(2) each: a kill cuts between lines."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOD_CHILD], stdout=subprocess.PIPE)
    try:
        head = proc.stdout.read(200_000)
        proc.send_signal(signal.SIGKILL)
        data = head + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(10)
    assert data.endswith(b"\n")
    lines = data.splitlines()
    assert len(lines) > 50
    assert all(json.loads(line)["event"] == "final" for line in lines)


# --------------------------------------------------------------------------- journald, injected send

class Capture:
    def __init__(self, fail: bool = False):
        self.records: list[dict] = []
        self.fail = fail

    def __call__(self, message, **fields):
        if self.fail:
            raise OSError(111, "Connection refused")
        self.records.append(dict(fields, MESSAGE=message))


def test_final_fields():
    assert journal_fields(FINAL, "universal-streaming-english") == {
        "MESSAGE": "turn the lights on", "SYSLOG_IDENTIFIER": "pttd", "PTTD_EVENT": "final",
        "PRIORITY": "6", "TURN_ORDER": "3", "SESSION_ID": "sess-1", "PRESS_ID": "7",
        "SPEECH_MODEL": "universal-streaming-english", "AUDIO_MS": "2350", "LATENCY_MS": "412",
        "PTTD_LATE": "true", "PTTD_GAP_MS": "120"}


def test_error_state_and_partial_fields():
    assert journal_fields(ERROR, "m") == {
        "MESSAGE": "Unauthorized: bad key", "SYSLOG_IDENTIFIER": "pttd", "PTTD_EVENT": "error",
        "PRIORITY": "3", "ERROR_CODE": "1008", "PTTD_RETRY_IN_S": "2.5"}
    no_code = journal_fields(events.error_event(None, "offline"), "m")
    assert "ERROR_CODE" not in no_code and "PTTD_RETRY_IN_S" not in no_code
    assert journal_fields(STATE, "m") == {
        "MESSAGE": "state: listening", "SYSLOG_IDENTIFIER": "pttd", "PTTD_EVENT": "state",
        "PRIORITY": "7", "PTTD_STATE": "listening"}
    assert journal_fields(PARTIAL, "m") is None
    assert journal_fields({"event": "snapshot", "last-final": {"a": 1}}, "m")["PTTD_LAST_FINAL"] == '{"a":1}'


def test_journal_sink_uses_the_injected_send():
    send = Capture()
    sink = JournalSink("universal-streaming-english", send=send)
    for event in (STATE, PARTIAL, FINAL, ERROR):
        sink.emit(event)
    assert [r["PTTD_EVENT"] for r in send.records] == ["state", "final", "error"]
    assert send.records[1]["MESSAGE"] == "turn the lights on"


def test_journal_send_failure_is_logged_once_and_recovers(caplog):
    caplog.set_level(logging.INFO, logger="pttd.outputs.journal")
    send = Capture(fail=True)
    sink = JournalSink("m", send=send)
    sink.emit(FINAL)
    sink.emit(ERROR)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    send.fail = False
    sink.emit(FINAL)
    assert len(send.records) == 1
    assert any("reachable again" in r.message for r in caplog.records)


def test_missing_journald_socket_is_said_once(tmp_path, caplog):
    sink = JournalSink("m", socket_path=str(tmp_path / "no-journald"))  # the real systemd.journal.send
    sink.emit(FINAL)
    sink.emit(ERROR)
    warnings = [r for r in caplog.records if "journald socket" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# --------------------------------------------------------------------------- journald, real read-back

def emit_through_journal_sink():
    """Runs inside the private journald (source sent by run_python_in_journald)."""
    from pttd import events
    from pttd.events import State
    from pttd.outputs.fanout import Outputs
    from pttd.outputs.journal import JournalSink
    outputs = Outputs([JournalSink("universal-streaming-english")])
    outputs.emit(events.state_event(State.LISTENING))
    outputs.emit(events.partial_event("turn the", 3, "sess-1"))
    outputs.emit(events.final_event("turn the lights on", turn_order=3, session_id="sess-1",
                                    press_id=7, audio_ms=2350, latency_ms=412, late=True))
    outputs.emit(events.error_event(1008, "Unauthorized: bad key", retry_in_s=2.5))
    outputs.close()


@needs_journald
def test_real_journald_read_back():
    run = run_python_in_journald(emit_through_journal_sink, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    by_event = {r["PTTD_EVENT"]: r for r in run.records}
    assert sorted(by_event) == ["error", "final", "state"]          # partials are not journaled
    final = by_event["final"]
    assert {k: final[k] for k in ("MESSAGE", "SYSLOG_IDENTIFIER", "PTTD_EVENT", "TURN_ORDER",
                                  "SESSION_ID", "PRESS_ID", "SPEECH_MODEL", "AUDIO_MS",
                                  "LATENCY_MS", "PRIORITY", "PTTD_LATE")} == {
        "MESSAGE": "turn the lights on", "SYSLOG_IDENTIFIER": "pttd", "PTTD_EVENT": "final",
        "TURN_ORDER": "3", "SESSION_ID": "sess-1", "PRESS_ID": "7",
        "SPEECH_MODEL": "universal-streaming-english", "AUDIO_MS": "2350", "LATENCY_MS": "412",
        "PRIORITY": "6", "PTTD_LATE": "true"}
    error = by_event["error"]
    assert (error["MESSAGE"], error["ERROR_CODE"], error["PRIORITY"]) == ("Unauthorized: bad key", "1008", "3")
    assert (by_event["state"]["PTTD_STATE"], by_event["state"]["PRIORITY"]) == ("listening", "7")
    assert all(r["_TRANSPORT"] == "journal" for r in run.records)


@needs_journald
def test_real_journald_filter_and_logging_handler_under_a_journal_stream():
    """Like a service: stdout/stderr on journald's stream socket with $JOURNAL_STREAM set.
    The daemon's own log records then arrive as structured records with their priority."""
    script = textwrap.dedent("""
        import logging
        from systemd.journal import JournalHandler
        from pttd.outputs.journal import journal_logging_handler
        handler = journal_logging_handler()
        assert isinstance(handler, JournalHandler), handler
        log = logging.getLogger("pttd.test")
        log.addHandler(handler)
        log.warning("mic not found")
        print("plain stdout line")
    """)
    with Journald() as jd:
        run = jd.run([sys.executable, "-c", script], journal_stream="pttd", timeout=30)
        assert (run.returncode, run.timed_out) == (0, False), jd.records()
        logged = jd.records("SYSLOG_IDENTIFIER=pttd", "_TRANSPORT=journal")
        streamed = jd.records("SYSLOG_IDENTIFIER=pttd", "_TRANSPORT=stdout")
    assert [(r["MESSAGE"], r["PRIORITY"], r["LOGGER"]) for r in logged] == [("mic not found", "4", "pttd.test")]
    assert [r["MESSAGE"] for r in streamed] == ["plain stdout line"]


@needs_journald
def test_journald_harness_drives_a_long_running_process():
    """The pattern for end-to-end tests: popen, wait for records while it runs, stop it."""
    script = textwrap.dedent("""
        import os, sys
        from systemd import journal
        journal.send("hello", SYSLOG_IDENTIFIER="pttd", PTTD_EVENT="final", WHO=os.environ["WHO"])
        sys.stdin.read()                          # run until the test closes stdin
    """)
    with Journald() as jd:
        proc = jd.popen([sys.executable, "-c", script], env={"WHO": "harness"}, stdin=subprocess.PIPE)
        found = jd.wait_for_records(bool, "PTTD_EVENT=final", timeout=10)
        assert [(r["MESSAGE"], r["WHO"], r["_PID"]) for r in found] == [("hello", "harness", str(proc.pid))]
        proc.stdin.close()
        assert proc.wait(10) == 0
        slow = jd.run(["sleep", "30"], timeout=0.3)
        assert slow.timed_out and slow.returncode == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{jd.pid}/root/run/systemd/journal/socket")


def test_logging_handler_is_stderr_outside_systemd(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert type(journal_logging_handler()) is logging.StreamHandler
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")          # inherited, but stderr is elsewhere
    assert type(journal_logging_handler()) is logging.StreamHandler


# --------------------------------------------------------------------------- fan-out

class Broken:
    def __init__(self):
        self.calls = 0

    def emit(self, event):
        self.calls += 1
        raise RuntimeError("boom")

    def close(self):
        raise RuntimeError("boom at close")


class Collect:
    def __init__(self, gate: threading.Event | None = None):
        self.events: list[dict] = []
        self.gate = gate
        self.closed = False
        self.entered = threading.Event()

    def emit(self, event):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.events.append(event)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("threaded", [True, False])
def test_failing_sink_is_logged_once_and_never_raises(threaded, caplog):
    broken, good = Broken(), Collect()
    outputs = Outputs([broken, good], threaded=threaded)
    for event in (STATE, FINAL, ERROR):
        outputs.emit(event)
    outputs.close()
    assert good.events == [STATE, FINAL, ERROR] and good.closed
    assert broken.calls == 3 and outputs.failures == 3  # logged once, every failure counted
    assert len([r for r in caplog.records if r.message.startswith("output Broken failed")]) == 1


def test_a_stuck_sink_blocks_neither_the_caller_nor_the_other_sinks(caplog):
    gate = threading.Event()
    stuck, good = Collect(gate), Collect()
    outputs = Outputs([stuck, good], queue_size=4)
    for i in range(10):
        started = time.monotonic()
        outputs.emit(dict(FINAL, press_id=i))
        assert time.monotonic() - started < 0.1
        _wait_until(lambda: len(good.events) == i + 1)
        _wait_until(stuck.entered.is_set)
    assert [e["press_id"] for e in good.events] == list(range(10))
    assert len([r for r in caplog.records if "dropping new events" in r.message]) == 1
    gate.set()
    outputs.close(timeout=5)
    assert [e["press_id"] for e in stuck.events] == [0, 1, 2, 3, 4]  # in hand + a full queue


def test_close_is_bounded_when_a_sink_never_returns():
    gate = threading.Event()
    outputs = Outputs([Collect(gate)])
    outputs.emit(FINAL)
    started = time.monotonic()
    outputs.close(timeout=0.3)
    assert time.monotonic() - started < 2.0
    gate.set()


def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


class Threads:
    """Notes the thread each event arrives on."""

    def __init__(self, inline: bool):
        self.inline = inline
        self.threads: list[threading.Thread] = []
        self.closed = False

    def emit(self, event):
        self.threads.append(threading.current_thread())

    def close(self):
        self.closed = True


def test_an_inline_sink_is_called_on_the_emitting_thread_and_gets_no_worker():
    before = {t.name for t in threading.enumerate()}
    inline, threaded, silent = Threads(inline=True), Threads(inline=False), StdoutSink("none")
    outputs = Outputs([inline, threaded, silent])
    started = {t.name for t in threading.enumerate()} - before
    outputs.emit(FINAL)
    outputs.emit(STATE)
    assert inline.threads == [threading.current_thread()] * 2  # delivered before emit returned
    _wait_until(lambda: len(threaded.threads) == 2)
    assert threading.current_thread() not in threaded.threads
    assert started == {"pttd-out-Threads"}  # one worker: not for the inline sink, nor for "none"
    outputs.close()
    assert inline.closed and threaded.closed


def test_a_failing_inline_sink_is_logged_once_and_never_raises(caplog):
    class BrokenInline(Broken):
        inline = True

    broken, good = BrokenInline(), Collect()
    outputs = Outputs([broken, good])
    for event in (STATE, FINAL, ERROR):
        outputs.emit(event)
    outputs.close()
    assert good.events == [STATE, FINAL, ERROR] and broken.calls == 3
    assert outputs.failures == 3
    assert len([r for r in caplog.records if r.message.startswith("output BrokenInline")]) == 1


def test_kinds_a_sink_skips_are_not_queued_for_its_worker():
    class NoPartials(Collect):
        skips = frozenset({"partial"})

    partial = events.partial_event("turn the", turn_order=3, session_id="sess-1")
    picky, every = NoPartials(), Collect()
    outputs = Outputs([picky, every])
    for event in (STATE, partial, FINAL):
        outputs.emit(event)
    outputs.close()
    assert picky.events == [STATE, FINAL]
    assert every.events == [STATE, partial, FINAL]
    assert JournalSink("universal-streaming-english").skips == {"partial"}


# --------------------------------------------------------------------------- delivery receipts

class Receipts:
    """Records, in order, each ``on_delivered`` call and what each sink had then."""

    def __init__(self, *sinks: Collect):
        self.sinks = sinks
        self.seen: list[tuple[str, list[int]]] = []
        self.called = threading.Event()

    def __call__(self):
        self.seen.append((threading.current_thread().name, [len(s.events) for s in self.sinks]))
        self.called.set()


def test_on_delivered_runs_once_after_every_worker_has_delivered_the_event():
    gate = threading.Event()
    slow, fast = Collect(gate), Collect()
    receipts = Receipts(slow, fast)
    outputs = Outputs([slow, fast])
    outputs.emit(FINAL, receipts)
    _wait_until(lambda: len(fast.events) == 1)
    _wait_until(slow.entered.is_set)
    assert not receipts.called.wait(0.2)          # the slow sink has not delivered yet
    gate.set()
    assert receipts.called.wait(5)
    outputs.close()
    assert receipts.seen == [("pttd-out-Collect", [1, 1])]  # called once, by the last worker
    assert slow.events == fast.events == [FINAL]


def test_on_delivered_counts_inline_sinks_skipped_kinds_and_dropped_events():
    class Inline(Collect):
        inline = True

    class NoFinals(Collect):
        skips = frozenset({"final"})

    inline, skipper = Inline(), NoFinals()
    receipts = Receipts(inline, skipper)
    outputs = Outputs([inline, skipper])
    outputs.emit(FINAL, receipts)                 # no worker takes a final: called at once,
    assert receipts.seen == [("MainThread", [1, 0])]  # after the inline sink had it
    outputs.close()

    gate = threading.Event()
    stuck = Collect(gate)
    outputs = Outputs([stuck], queue_size=1)
    outputs.emit(STATE)                           # in the worker's hands
    _wait_until(stuck.entered.is_set)
    outputs.emit(STATE)                           # fills the queue
    dropped = Receipts(stuck)
    outputs.emit(FINAL, dropped)                  # dropped: nobody will deliver it
    assert dropped.seen == [("MainThread", [0])]
    gate.set()
    outputs.close()
    assert stuck.events == [STATE, STATE]


@pytest.mark.parametrize("threaded", [True, False])
def test_on_delivered_runs_even_when_a_sink_fails(threaded):
    broken, good = Broken(), Collect()
    receipts = Receipts(good)
    outputs = Outputs([broken, good], threaded=threaded)
    outputs.emit(FINAL, receipts)
    assert receipts.called.wait(5)
    outputs.close()
    assert len(receipts.seen) == 1 and broken.calls == 1 and good.events == [FINAL]
