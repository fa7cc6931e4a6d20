"""Firecracker process primitives and API client.

- :mod:`.api` — :class:`FirecrackerAPI`, the REST client on the API socket.
- :mod:`.driver` — :class:`FirecrackerDriver` (the ``VMMDriver``), launch,
  graceful stop, snapshots.
- :mod:`.host` — the version check, whether to jail, jailer status for doctor.
  The jail itself (layout, the jailer's command line, building and removing it)
  is the root helper's: :mod:`banger.hostops.jail` and :mod:`banger.hostops.fcjail`.
- :mod:`.vsock` — host-initiated connections to a guest's vsock port (a clone's
  identity).
- ``_spawn.py`` — a script that starts a command detached (double fork).

A leaf subpackage: it imports banger's top-level modules and ``banger.hostops``
(the jail's names, and the requests that build it), no other ``banger.daemon``
module.
"""

from __future__ import annotations

# Only the host checks here: the driver and its API client (httpx, about 9 MiB of a
# daemon's memory) are imported from .driver and .api by who uses them, and the daemon
# does that only for a VM that runs on Firecracker (banger.daemon.vmmselect).
from .host import (
    MIN_VERSION,
    JailerStatus,
    check_version,
    jailer_binary,
    jailer_status,
)

__all__ = [
    "MIN_VERSION",
    "JailerStatus",
    "check_version",
    "jailer_binary",
    "jailer_status",
]
