"""``client.workspace``: a repository into a VM and the guest's edits back out."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banger import client as rpc
from banger.api.params import WorkspaceOrigin
from banger.sdk.base import Namespace, Progress, absolute


@dataclass(frozen=True)
class Patch:
    """A workspace export: the changed files and the patch (``git apply`` on the host)."""

    changes: list[dict[str, Any]]  # {"status": git's letter, "path", "old_path"}
    data: bytes
    vm: str
    base: str  # the commit the patch is relative to


class Workspace(Namespace):
    """``client.workspace``."""

    def prepare(self, name: str, path: str | Path, *, guest_path: str | None = None,
                branch: str | None = None, from_ref: str | None = None,
                mode: str = "shallow", discard_guest_changes: bool = False,
                origin: WorkspaceOrigin | None = None,
                on_progress: Progress | None = None,
                cancel: threading.Event | None = None) -> dict[str, Any]:
        """Copy the git work tree at ``path`` into VM ``name`` (``vm workspace prepare``);
        what was copied, and what became of the guest's earlier changes. ``origin``:
        where a repository sent from another machine came from (kept with the record)."""
        op = self._c.call("vm.workspace.prepare.begin", name=name, path=absolute(path),
                          guest_path=guest_path, branch=branch, from_ref=from_ref, mode=mode,
                          discard_guest_changes=discard_guest_changes,
                          origin=origin.model_dump() if origin is not None else None)
        result: dict[str, Any] = self._c.operation("vm.workspace.prepare", op,
                                                   on_progress=on_progress, cancel=cancel)
        return result

    def status(self, name: str) -> dict[str, Any]:
        """The VM's workspace record, and whether the host tree changed since it was
        copied (``needs_resync``)."""
        result: dict[str, Any] = self._c.call("vm.workspace.status", name=name)
        return result

    def export(self, name: str, base_commit: str | None = None) -> Patch:
        """The guest's edits since the workspace was prepared (or since ``base_commit``),
        as a patch."""
        res, data = rpc.fetch_patch(self._c.rpc, name, base_commit)
        return Patch(changes=list(res.get("changes") or []), data=data, vm=res["vm"],
                     base=res["base"])
