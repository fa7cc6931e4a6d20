"""What bangerd loads at start: not the HTTP client (httpx and its TLS stack, ~9 MiB)
that only pulls, exports and Firecracker's API use. Checked in a fresh interpreter:
this one has imported everything the other tests use."""

from __future__ import annotations

import subprocess
import sys

# Modules a daemon that never pulls, exports or runs Firecracker must not hold.
HEAVY = ("httpx", "httpcore", "h11", "banger.daemon.distrpc", "banger.daemon.fcproc.api",
         "banger.daemon.fcproc.driver")

# (banger.daemon marks httpx._main absent, a None entry: not a loaded module)
PROBE = f"""
import sys
import banger.cli.bangerd
import banger.daemon
from banger.daemon import rpc, vmmselect
{{extra}}
heavy = {HEAVY!r}
print(",".join(sorted(m for m, mod in sys.modules.items()
                      if mod is not None and (m in heavy or m.split(".")[0] in heavy))))
"""


def _loaded(extra: str = "") -> set[str]:
    res = subprocess.run([sys.executable, "-c", PROBE.format(extra=extra)],
                         capture_output=True, text=True, check=True)
    return set(filter(None, res.stdout.strip().split(",")))


def test_the_daemon_starts_without_the_http_client() -> None:
    assert _loaded() == set()


def test_the_first_pull_or_export_call_loads_it() -> None:
    # the probe would see it: the handlers' module brings httpx with it
    loaded = _loaded("rpc._distribution()")
    assert {"banger.daemon.distrpc", "httpx"} <= loaded
    assert "banger.daemon.fcproc.driver" not in loaded
