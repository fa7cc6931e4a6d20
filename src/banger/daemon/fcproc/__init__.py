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

from .api import (
    ActionType,
    FirecrackerAPI,
    InstanceInfo,
    InstanceState,
    SnapshotType,
)
from .driver import (
    FirecrackerDriver,
    SnapshotFiles,
    VMMView,
    configure,
    direct_view,
    jailed_view,
    kill,
    saved_files,
    stop_gracefully,
    wait_for_api,
)
from .host import (
    MIN_VERSION,
    JailerStatus,
    check_version,
    jailer_binary,
    jailer_status,
)

__all__ = [
    "MIN_VERSION",
    "ActionType",
    "FirecrackerAPI",
    "FirecrackerDriver",
    "InstanceInfo",
    "InstanceState",
    "JailerStatus",
    "SnapshotFiles",
    "SnapshotType",
    "VMMView",
    "check_version",
    "configure",
    "direct_view",
    "jailed_view",
    "jailer_binary",
    "jailer_status",
    "kill",
    "saved_files",
    "stop_gracefully",
    "wait_for_api",
]
