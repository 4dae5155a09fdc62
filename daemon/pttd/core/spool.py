"""The spool: presses waiting for the network, kept on disk so that a restart or a power cut
loses none of them ([spool] in the config; ``dir = ""`` keeps them in memory only).

One file per press, written once and never rewritten (SD cards wear out): a WAV file (16-bit
mono at the press's ``sample_rate``: ``aplay`` plays it) whose ``pttd`` chunk holds what is
known of the press as JSON (its id, when it was pressed and released, the CRC-32 of its audio,
its ring positions, ...). A file is written to a temporary name (``.NAME.tmp``), fsynced, renamed
to ``NNNNNNNNNN-<press id>.wav`` (the number orders the presses across restarts), and the
directory is fsynced; a press's file is unlinked (and the directory fsynced) once the press has
ended. Files are 0600 in a 0700 directory: the audio is the user's speech.

At start-up :meth:`Spool.load` reads every file's header: a temporary file (a write cut short by
a power cut or SIGKILL) and a file whose chunk layout or sizes do not add up (truncated, or not
one of ours but named like one) are removed and reported, never delivered and never fatal. The
audio's CRC is checked when the press is read to be sent (:meth:`Spool.read`); a damaged one
ends that press with an error.

Writes and removals run on one thread of their own, in FIFO order (a removal never overtakes the
write of its file), so the controller never waits for the disk; it hears of each write through
the ``done`` callback (it posts to its own queue). ``threaded=False`` does the I/O at once on the
caller's thread (tests that drive the controller step by step).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pttd.audio.ring import Snapshot
from pttd.core.mailbox import Mailbox
from pttd.errors import PttdError

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/pttd/spool"
QUEUE_BOUND = 256  # writes waiting for the spool thread; past it a press stays in memory
MAX_META_BYTES = 64 * 1024  # a bigger "pttd" chunk is not one of ours
FORMAT_VERSION = 1
NAME = re.compile(r"^(\d{10})-(\d{1,12})\.wav$")
TEMP = re.compile(r"^\.\d{10}-\d{1,12}\.wav\.tmp$")


class SpoolError(PttdError):
    """A spool that cannot be used (start-up: exit 2 naming ``spool.dir``), or a press's file
    that cannot be read back."""


@dataclass(eq=False)
class SpoolEntry:
    """One press's file. The controller owns ``state``; the spool thread only reads the rest."""

    name: str
    seq: int
    press_id: int
    meta: dict
    size: int  # bytes on disk
    state: str = "pending"  # pending (being written) | written | failed
    restored: bool = False  # loaded at start-up (written by an earlier run)
    blob: bytes | None = field(default=None, repr=False)  # the file's bytes until written

    @property
    def samples(self) -> int:
        return int(self.meta["samples"])


def encode(meta: dict, pcm: bytes) -> bytes:
    """The file's bytes: RIFF/WAVE, ``fmt `` (PCM16 mono), ``pttd`` (the JSON), ``data``."""
    rate = int(meta["sample_rate"])
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    if len(body) % 2:
        body += b" "  # chunks are word-aligned: pad with JSON whitespace
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    chunks = (
        b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"pttd"
        + struct.pack("<I", len(body))
        + body
        + b"data"
        + struct.pack("<I", len(pcm))
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + len(pcm)) + b"WAVE" + chunks + pcm


def decode_header(head: bytes, file_size: int) -> tuple[dict, int]:
    """``(meta, data offset)`` of a spool file from its first bytes; ValueError if it is not a
    whole one (truncated, or not ours)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    if struct.unpack_from("<I", head, 4)[0] + 8 != file_size:
        raise ValueError(
            f"RIFF size says {struct.unpack_from('<I', head, 4)[0] + 8} bytes, "
            f"the file has {file_size} (truncated?)"
        )
    pos, meta, rate = 12, None, None
    while pos + 8 <= len(head):
        kind, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        pos += 8
        if kind == b"data":
            if meta is None or rate is None:
                raise ValueError("data before the fmt and pttd chunks")
            if pos + size != file_size:
                raise ValueError(f"data chunk says {size} bytes, the file has {file_size - pos}")
            if size != 2 * int(meta.get("samples", -1)) or rate != meta.get("sample_rate"):
                raise ValueError("the data does not match the press's header")
            return meta, pos
        if pos + size > len(head):
            raise ValueError(f"{kind!r} chunk is cut short")
        if kind == b"fmt ":
            fmt_tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, pos)
            if (fmt_tag, channels, bits) != (1, 1, 16):
                raise ValueError("not 16-bit mono PCM")
        elif kind == b"pttd":
            meta = json.loads(head[pos : pos + size])
            if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
                raise ValueError("not a pttd spool header of this version")
            for key in ("press_id", "samples", "sample_rate", "crc32", "audio_start"):
                if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool):
                    raise ValueError(f"header field {key!r} is missing")
        pos += size + (size % 2)
    raise ValueError("no data chunk (truncated?)")


class Spool:
    """One directory of waiting presses. Not thread-safe: one owner (the controller) calls it."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_bytes: int,
        max_age_s: float,
        threaded: bool = True,
    ):
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.max_age_s = float(max_age_s)
        self.threaded = threaded
        self._next_seq = 1
        self._q = Mailbox(QUEUE_BOUND)
        self._thread: threading.Thread | None = None
        self.bytes_written = 0  # by this run (bench: bytes per spooled second)
        self.files_written = 0

    # --- start-up ------------------------------------------------------------------------------

    def load(self) -> tuple[list[SpoolEntry], list[str]]:
        """Every whole press file, oldest first, and what was wrong with the rest (removed)."""
        entries, problems = [], []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError as exc:
            return [], [f"cannot list {self.dir}: {exc.strerror or exc}"]
        for name in names:
            path = self.dir / name
            if TEMP.match(name):
                problems.append(f"{path}: a write cut short (power cut or kill): removed")
                self._unlink(path)
                continue
            m = NAME.match(name)
            if not m:
                continue  # not ours: left alone
            try:
                entry = self._read_entry(path, int(m.group(1)), int(m.group(2)))
            except (OSError, ValueError) as exc:
                problems.append(f"{path}: {exc}: removed, not delivered")
                self._unlink(path)
                continue
            entries.append(entry)
        if entries or problems:
            self._fsync_dir()
        if entries:
            self._next_seq = max(e.seq for e in entries) + 1
        return entries, problems

    def _read_entry(self, path: Path, seq: int, press_id: int) -> SpoolEntry:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(min(size, MAX_META_BYTES + 64))
        meta, _ = decode_header(head, size)
        if meta["press_id"] != press_id:
            raise ValueError("its name and its header name different presses")
        return SpoolEntry(path.name, seq, press_id, meta, size, state="written", restored=True)

    # --- the owner's calls -----------------------------------------------------------------------

    def add(
        self, meta: dict, pcm: bytes, done: Callable[[SpoolEntry, str | None], None]
    ) -> SpoolEntry | None:
        """Queue a press's file for writing; ``done(entry, error)`` follows (on the spool
        thread). None when the queue is full (the press then stays in memory only)."""
        seq = self._next_seq
        meta = dict(meta, version=FORMAT_VERSION, samples=len(pcm) // 2, crc32=zlib.crc32(pcm))
        blob = encode(meta, pcm)
        entry = SpoolEntry(
            f"{seq:010d}-{int(meta['press_id'])}.wav",
            seq,
            int(meta["press_id"]),
            meta,
            len(blob),
            blob=blob,
        )
        if not self._submit(("write", entry, done)):
            log.error(
                "spool: %d writes queued already; press %d stays in memory only",
                QUEUE_BOUND,
                entry.press_id,
            )
            return None
        self._next_seq += 1
        return entry

    def remove(self, entry: SpoolEntry) -> None:
        """Unlink a press's file (after its write, if that is still queued). Never refused."""
        self._submit(("remove", entry, None), marker=True)

    def read(self, entry: SpoolEntry) -> bytes:
        """The press's audio, checked against its CRC; SpoolError if it is gone or damaged."""
        path = self.dir / entry.name
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            meta, offset = decode_header(data[: MAX_META_BYTES + 64], len(data))
        except (OSError, ValueError) as exc:
            raise SpoolError(
                f"its spool file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        pcm = data[offset:]
        if zlib.crc32(pcm) != meta["crc32"]:
            raise SpoolError(f"its spool file {path} is damaged (CRC mismatch)")
        return pcm

    def read_audio(self, entry: SpoolEntry, sample_rate: int) -> Snapshot:
        """A press's audio read back to be sent; SpoolError if it waited past ``max_age_s``, was
        recorded at another rate, or its file is gone or damaged."""
        if self.expired(entry):
            raise SpoolError(self.expired_reason(entry))
        if entry.meta.get("sample_rate") != sample_rate:
            raise SpoolError(
                f"recorded at {entry.meta.get('sample_rate')} Hz, and "
                f"audio.sample_rate is now {sample_rate}"
            )
        return Snapshot(int(entry.meta["audio_start"]), self.read(entry), sample_rate)

    def expired(self, entry: SpoolEntry, now: float | None = None) -> bool:
        """The press was made more than ``max_age_s`` ago (0: no limit)."""
        return bool(self.max_age_s) and age_s(entry.meta, now) > self.max_age_s

    def expired_reason(self, entry: SpoolEntry) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.meta.get("pressed_at") or 0))
        return (
            f"press {entry.press_id} dropped: it waited more than "
            f"{self.max_age_s / 3600:g} h for the network (spool.max_age_h; pressed at {when})"
        )

    @staticmethod
    def file_size(samples: int, meta_bytes: int = 600) -> int:
        """About how many bytes a press of ``samples`` takes on disk (for the size bound)."""
        return 44 + 8 + meta_bytes + 2 * samples

    def close(self, timeout: float) -> bool:
        """Finish the queued writes and removals (bounded); False if they did not all finish."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._q.put_marker(None)
        thread.join(max(0.0, timeout))
        if thread.is_alive():
            log.error(
                "spool: writes still pending after %.1f s (a slow or hung disk); a file "
                "cut short is removed at the next start",
                timeout,
            )
            return False
        return True

    # --- the spool thread ----------------------------------------------------------------------

    def _submit(self, op: tuple, marker: bool = False) -> bool:
        if not self.threaded:
            self._do(op)
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool", daemon=True)
            self._thread.start()
        try:
            if marker:
                self._q.put_marker(op)
            else:
                self._q.put_nowait(op)
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while True:
            op = self._q.get()
            if op is None:
                return
            self._do(op)

    def _do(self, op: tuple) -> None:
        kind, entry, done = op
        if kind == "remove":
            if self._unlink(self.dir / entry.name):
                self._fsync_dir()
            return
        error = None
        try:
            self._write(entry)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
            log.error("spool: cannot write %s: %s", self.dir / entry.name, error)
        except Exception as exc:  # noqa: BLE001 - a bug here is reported like a full disk,
            error = f"{type(exc).__name__}: {exc}"  # never a spool thread that died unheard
            log.exception("spool: cannot write %s", self.dir / entry.name)
        entry.blob = None  # the bytes are on disk (or never will be): free them
        try:
            done(entry, error)
        except Exception:  # the owner's callback must not kill the spool thread
            log.exception("spool: the write callback failed")

    def _write(self, entry: SpoolEntry) -> None:
        """Temp name, fsync, rename, fsync the directory: a file is whole or absent."""
        blob = entry.blob or b""
        tmp = self.dir / f".{entry.name}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            self._unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, self.dir / entry.name)
        except OSError:
            self._unlink(tmp)
            raise
        self._fsync_dir()
        self.bytes_written += len(blob)
        self.files_written += 1

    def _unlink(self, path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("spool: cannot remove %s: %s", path, exc.strerror or exc)
            return False

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.error("spool: cannot open %s to sync it: %s", self.dir, exc.strerror or exc)
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            log.error("spool: cannot sync %s: %s", self.dir, exc.strerror or exc)
        finally:
            os.close(fd)


def open_spool(cfg, *, threaded: bool = True) -> Spool | None:
    """The spool ``[spool]`` asks for, its directory made (0700) and checked; None when off.

    ``dir = ""`` is off. The default directory is used only where its parent exists (the unit's
    ``StateDirectory=pttd`` creates /var/lib/pttd; ``pttd run`` by hand elsewhere keeps waiting
    presses in memory, as before). A directory set explicitly that cannot be used is a
    :class:`SpoolError` naming ``spool.dir`` (``pttd run`` exits 2).
    """
    if not cfg.dir:
        return None
    path = Path(cfg.dir)
    default = cfg.dir == DEFAULT_DIR
    if default and not (
        path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK) or path.is_dir()
    ):
        log.info(
            "spool: %s is not there (no StateDirectory=pttd): presses waiting for the "
            "network are kept in memory only",
            path.parent,
        )
        return None
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(20, "not a directory")
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)  # spooled audio is the user's speech
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        if default:
            log.warning(
                "spool: cannot use %s (%s): presses waiting for the network are kept "
                "in memory only",
                path,
                exc.strerror or exc,
            )
            return None
        raise SpoolError(
            f"spool.dir = {cfg.dir!r}: cannot use it: "
            f"{(exc.strerror or str(exc)).lower()} "
            '(set spool.dir = "" to keep waiting presses in memory only)'
        ) from None
    return Spool(
        path,
        max_bytes=int(cfg.max_mb * 1024 * 1024),
        max_age_s=cfg.max_age_h * 3600,
        threaded=threaded,
    )


def age_s(meta: dict, now: float | None = None) -> float:
    """How long ago the press was made (wall clock; 0 when unknown)."""
    pressed = meta.get("pressed_at")
    return 0.0 if not isinstance(pressed, (int, float)) else (now or time.time()) - pressed
