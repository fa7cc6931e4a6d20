"""``client.snapshots``: saved guests that ``vms.create(from_snapshot=...)`` clones."""

from __future__ import annotations

import builtins
import threading

from banger.api import SnapshotView
from banger.sdk.base import Namespace, Progress, view, views


class Snapshots(Namespace):
    """``client.snapshots``."""

    def take(self, vm: str, name: str, *, on_progress: Progress | None = None,
             cancel: threading.Event | None = None) -> SnapshotView:
        """Snapshot running (or paused) VM ``vm`` as ``name``: memory, devices, disks."""
        op = self._c.call("vm.snapshot.begin", vm=vm, name=name)
        return self._wait("vm.snapshot", op, SnapshotView, on_progress, cancel)

    def list(self) -> builtins.list[SnapshotView]:
        """Every snapshot (``kind`` boot: made by banger at an image's first boot)."""
        return views(SnapshotView, self._c.call("snapshot.list"), "snapshot.list")

    def remove(self, name: str) -> SnapshotView:
        """Delete snapshot ``name`` (clones made from it keep running); what it was."""
        return view(SnapshotView, self._c.call("snapshot.rm", name=name), "snapshot.rm")
