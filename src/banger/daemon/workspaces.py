"""Workspaces in the daemon: prepare (repo in), export (patch out), file sync at start.

The git and copy machinery is the ``workspace`` subpackage; this module adds the
daemon's rules around it:

* lock order: ``vm_locks[id]`` only to validate that the VM runs and to record the
  outcome, ``workspace_locks[id]`` for the guest I/O phase, never both at once, so
  ``vm stop``/``vm delete`` never wait behind a slow import;
* host git runs as the repository's owner (:class:`~banger.runner.OwnerRunner`);
* a prepare is an operation (progress in bytes and files, cancellable); the VM's
  record says ``prepared: false`` from the moment a copy starts until it completes.
"""

from __future__ import annotations

import logging
import os
import posixpath
import pwd
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from banger.api import Model, VMState
from banger.config import check_sync_target
from banger.daemon import vms, workspace
from banger.daemon.opstate import Operation
from banger.daemon.session import quote
from banger.daemon.store import VMRecord, now
from banger.errors import BadRequest, BangerError, InvalidState, NotFound, NotRunning
from banger.fsutil import atomic_write
from banger.runner import OwnerRunner, Runner

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.workspaces")

PREPARE_STAGES = ["inspect", "wait", "copy", "record"]
LOCK_POLL_S = 0.2  # how often a queued prepare/export checks for cancellation


class PrepareParams(Model):
    name: str = Field(min_length=1, max_length=256)
    path: str = Field(min_length=1, max_length=4096)
    guest_path: str | None = None
    branch: str | None = None
    from_ref: str | None = None
    mode: str = "shallow"


class ExportParams(Model):
    name: str = Field(min_length=1, max_length=256)
    base_commit: str | None = None


def owner_runner(d: Daemon, path: Path) -> Runner:
    """A runner that runs host git as the owner of ``path`` (root stays root)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise BadRequest(f"{path}: {exc.strerror}", hint="pass an existing git work tree") \
            from exc
    try:
        home = pwd.getpwuid(st.st_uid).pw_dir
    except KeyError:
        home = "/nonexistent"
    return OwnerRunner(d.runner, st.st_uid, st.st_gid, home)


def _running(d: Daemon, ref: str) -> VMRecord:
    """The VM, checked to be running under its lock (then the lock is released)."""
    vm = vms.resolve(d, ref)
    with d.vm_locks.held(vm.id):
        vm = d.db.get_vm(vm.id)
        if vm.state != VMState.RUNNING:
            raise NotRunning(f"VM {vm.name!r} is {vm.state.value}, not running",
                             hint=f"start it with `banger vm start {vm.name}`")
    return vm


def _set_workspace(d: Daemon, vm_id: str, ws: dict[str, Any] | None) -> None:
    """Record the workspace column alone (no vm_locks: it is never held together with
    workspace_locks, and lifecycle updates never write this column)."""
    d.db.set_workspace(vm_id, ws)


def _acquire(d: Daemon, vm_id: str, op: Operation | None) -> threading.Lock:
    """Take ``workspace_locks[id]``, waiting behind another prepare/export (cancellable).

    Returns the lock taken, which the caller must release (not a fresh ``get``).
    """
    lock = d.workspace_locks.get(vm_id)
    while not lock.acquire(timeout=LOCK_POLL_S):
        if op is not None:
            op.cancel.check()
    return lock


def begin_prepare(d: Daemon, p: PrepareParams) -> Operation:
    """Validate the VM and the repository now; copy on a worker thread."""
    if not os.path.isabs(p.path):
        raise BadRequest(f"workspace path {p.path!r} must be absolute")
    if p.from_ref and not p.branch:
        raise BadRequest("--from needs --branch", hint="e.g. --branch feature --from main")
    mode = workspace.WorkspaceMode.parse(p.mode)
    vm = _running(d, p.name)
    runner = owner_runner(d, Path(p.path))
    info = workspace.inspect_repo(runner, p.path, mode.value)
    plan = workspace.build_plan(runner, info)
    guest_path = p.guest_path or workspace.default_guest_path(Path(info.host_path).name)
    workspace.check_guest_path(guest_path)
    op = Operation(kind="workspace.prepare", target=vm.name, stages=list(PREPARE_STAGES))
    op.enter("inspect", f"{plan.files} files, {plan.bytes / 1e6:.1f} MB")

    def work(o: Operation) -> dict[str, Any]:
        return _prepare(d, o, vm=vm, runner=runner, info=info, plan=plan,
                        guest_path=guest_path, p=p)

    return d.workspace_ops.run(op, work, name=f"prepare-{vm.name}")


def _prepare(d: Daemon, op: Operation, *, vm: VMRecord, runner: Runner,
             info: workspace.RepoInfo, plan: workspace.CopyPlan, guest_path: str,
             p: PrepareParams) -> dict[str, Any]:
    op.enter("wait")
    lock = _acquire(d, vm.id, op)
    try:
        op.enter("copy")
        record: dict[str, Any] = {
            "host_path": info.host_path, "guest_path": guest_path,
            "base_commit": info.head, "branch": p.branch, "mode": info.mode.value,
            "prepared": False, "prepared_at": None, "info": info.to_dict(),
        }
        _set_workspace(d, vm.id, record)
        started = time.monotonic()
        total_files, total_mb = plan.files, plan.bytes / 1e6  # walking the plan is not free

        def progress(sent: int, files: int) -> None:
            rate = sent / max(time.monotonic() - started, 1e-3) / 1e6
            op.report(f"{files}/{total_files} files, {sent / 1e6:.1f}/{total_mb:.1f} MB"
                      f" ({rate:.1f} MB/s)")

        try:
            prep = workspace.prepare(
                d.dial(vm.ip), runner, info, plan, guest_path=guest_path, branch=p.branch,
                from_ref=p.from_ref, progress=progress, cancel=op.cancel)
        except BangerError as exc:
            _set_workspace(d, vm.id, {**record, "error": exc.message})
            raise
        op.enter("record")
        record.update({
            "base_commit": prep.base_commit, "branch": prep.branch, "prepared": True,
            "prepared_at": now().isoformat(), "files": prep.files,
            "bytes": prep.bytes, "error": None,
        })
        _set_workspace(d, vm.id, record)
        log.info("vm %s: workspace %s -> %s (%d files, %d bytes)", vm.name, info.host_path,
                 guest_path, prep.files, prep.bytes)
        return {"vm": vm.name, **{k: v for k, v in record.items() if k != "info"}}
    finally:
        lock.release()


def export(d: Daemon, p: ExportParams) -> dict[str, Any]:
    """Diff the guest workspace; the patch goes to a 0600 file the CLI reads and removes."""
    vm = _running(d, p.name)
    ws = vm.workspace
    if not ws or not ws.get("prepared"):
        raise InvalidState(f"VM {vm.name!r} has no prepared workspace",
                           hint=f"prepare one with `banger vm workspace prepare {vm.name} PATH`")
    lock = _acquire(d, vm.id, None)
    try:
        out = workspace.export(d.dial(vm.ip), ws["guest_path"], base_commit=p.base_commit)
    finally:
        lock.release()
    exports = d.layout.runtime_dir / "exports"
    exports.mkdir(mode=0o700, exist_ok=True)
    path = exports / f"{vm.name}-{secrets.token_hex(4)}.patch"
    atomic_write(path, out.patch, 0o600)
    return {
        "vm": vm.name, "patch_path": str(path), "bytes": len(out.patch), "base": out.base,
        "changes": [{"status": c.status, "path": c.path, "old_path": c.old_path}
                    for c in out.changes],
    }


def status(d: Daemon, ref: str) -> dict[str, Any]:
    """The VM's workspace record and whether the host tree changed since it was copied."""
    vm = vms.resolve(d, ref)
    ws = vm.workspace
    if not ws:
        raise NotFound(f"VM {vm.name!r} has no workspace",
                       hint=f"prepare one with `banger vm workspace prepare {vm.name} PATH`")
    host = ws["host_path"]
    changed = True
    if ws.get("prepared") and os.path.isdir(host):
        info = workspace.RepoInfo.from_dict(ws["info"])
        changed = workspace.needs_resync(owner_runner(d, Path(host)), info)
    return {"vm": vm.name, "needs_resync": changed,
            **{k: v for k, v in ws.items() if k != "info"}}


# ------------------------------------------------------------------ file sync


def sync_files(d: Daemon, vm: VMRecord) -> list[str]:
    """Copy ``[[file_sync]]`` host files into the guest; returns warnings (missing files)."""
    warnings: list[str] = []
    if not d.cfg.file_sync:
        return warnings
    guest = d.dial(vm.ip)
    for entry in d.cfg.file_sync:
        target = check_sync_target(entry.guest)
        mode = int(entry.mode, 8)  # both checked when the config was loaded
        src = Path(entry.host).expanduser()
        try:
            if src.is_symlink() and not src.resolve().is_file():
                raise FileNotFoundError(entry.host)
            data = src.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            warnings.append(f"file_sync: {entry.host} does not exist on the host; skipped")
            continue
        except OSError as exc:
            warnings.append(f"file_sync: cannot read {entry.host}: {exc.strerror}; skipped")
            continue
        tmp = f"{target}.banger-{secrets.token_hex(3)}"
        script = (f"umask 077 && mkdir -p {quote(posixpath.dirname(target))} && "
                  f"cat > {quote(tmp)} && chmod {mode:o} {quote(tmp)} && "
                  f"mv -f {quote(tmp)} {quote(target)}")
        guest.run(script, input=data, timeout=60, desc=f"sync {entry.host}")
    for w in warnings:
        log.warning("vm %s: %s", vm.name, w)
    return warnings
