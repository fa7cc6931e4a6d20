"""What bangerd loads at start: not the HTTP client (httpx and its TLS stack, ~9 MiB)
that only pulls, exports and Firecracker's API use; and what every CLI command loads:
not the service installer's modules. Checked in fresh interpreters: this one has
imported everything the other tests use."""

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


# What only `banger system ...` needs (the root helper's policy and host operations).
SYSTEM_ONLY = ("banger.cli.system", "banger.hostops.policy", "banger.hostops.ops")


def test_the_cli_loads_the_service_installer_only_for_system() -> None:
    probe = ("import sys\nimport banger.cli.commands as c\n{run}\n"
             f"print(','.join(m for m in {SYSTEM_ONLY!r} if m in sys.modules))")
    def loaded(run: str) -> set[str]:
        res = subprocess.run([sys.executable, "-c", probe.format(run=run)],
                             capture_output=True, text=True, check=True)
        return set(filter(None, res.stdout.strip().rpartition("\n")[2].split(",")))

    assert loaded("") == set()
    # naming it loads it, and it is a whole group there
    assert loaded("c.cli.main(['system', '--help'], standalone_mode=False)") == set(SYSTEM_ONLY)
