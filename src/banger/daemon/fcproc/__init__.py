"""Firecracker process primitives and API client.

- :mod:`.api` — :class:`FirecrackerAPI`, the REST client on the API socket.
- :mod:`.driver` — :class:`FirecrackerDriver` (the ``VMMDriver``), launch,
  graceful stop, snapshots.
- :mod:`.jail` — the jailer's chroot layout and command line (pure: the VMM
  user's uid/gid, the cgroup version, limits and parent), and building/removing
  a jail.
- :mod:`.host` — finding the binaries, version check, jailer status for doctor.
- :mod:`.vsock` — host-initiated connections to a guest's vsock port (a clone's
  identity).
- ``_spawn.py`` — a script that starts a command detached (double fork).

A leaf subpackage: it imports banger's top-level modules and, of the other
``banger.daemon`` modules, only the ``cgroups`` leaf (the limits and naming it
shares with the QEMU driver).
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
    find_binary,
    find_firecracker,
    find_jailer,
    jailer_binary,
    jailer_settings,
    jailer_status,
)
from .jail import JailerSettings, JailLayout, jailer_argv

__all__ = [
    "MIN_VERSION",
    "ActionType",
    "FirecrackerAPI",
    "FirecrackerDriver",
    "InstanceInfo",
    "InstanceState",
    "JailLayout",
    "JailerSettings",
    "JailerStatus",
    "SnapshotFiles",
    "SnapshotType",
    "VMMView",
    "check_version",
    "configure",
    "direct_view",
    "find_binary",
    "find_firecracker",
    "find_jailer",
    "jailed_view",
    "jailer_argv",
    "jailer_binary",
    "jailer_settings",
    "jailer_status",
    "kill",
    "saved_files",
    "stop_gracefully",
    "wait_for_api",
]
