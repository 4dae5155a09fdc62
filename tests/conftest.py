"""Shared pytest fixtures. Fixtures live next to their helpers; this file only re-exports them."""
from tests.fakes.fake_v3 import fake_v3  # noqa: F401  (fixture: started FakeV3Server factory)
from tests.daemon_proc import daemon_factory  # noqa: F401,E402  (fixture: pttd run subprocesses)
from tests.daemon_proc import daemons  # noqa: F401,E402  (fixture: kills the DaemonProcesses a test adds)
from tests.daemon_proc import inprocess_daemon  # noqa: F401,E402  (fixture: Daemon in-process)
