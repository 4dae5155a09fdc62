"""The offline engine on the fake's server core, for tests that need its faults and records.

Why: pttd/local/engine.py serves the runtime v3 server only; tests of the engine still assert
on the wire (``engine.sessions``, ``record.received``) and run the protocol conformance tests
with faults, so they run the same engine on :class:`~tests.fakes.fake_server.FakeServer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pttd.local.engine import LocalEngine
from tests.fakes.fake_server import FakeControls, FakeServer
from tests.fakes.faults import Faults


class RecordedLocalEngine(FakeControls, LocalEngine):
    """:class:`LocalEngine` with records and ``faults`` (one for all, or one per attempt).
    ``options`` may be :class:`~tests.fakes.fake_server.FakeOptions`."""

    server_class = FakeServer

    def __init__(self, *args: Any, faults: Faults | Sequence[Faults] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server.use_faults(faults)
