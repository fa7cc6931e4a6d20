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

import errno
import logging
import os
import posixpath
import pwd
import secrets
import stat
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.api.params import WorkspaceExportParams, WorkspacePrepareParams
from banger.config import check_sync_target, config_path
from banger.daemon import vms, workspace
from banger.daemon.opstate import Operation
from banger.daemon.session import quote
from banger.daemon.store import VMRecord, now
from banger.errors import (
    BadRequest,
    BangerError,
    GuestError,
    InvalidState,
    NotFound,
)
from banger.fsutil import atomic_write
from banger.runner import OwnerRunner, Runner

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.workspaces")

PREPARE_STAGES = ["inspect", "wait", "save", "copy", "record"]
LOCK_POLL_S = 0.2  # how often a queued prepare/export checks for cancellation


def owner_runner(d: Daemon, path: Path) -> OwnerRunner:
    """A runner that runs host git as the owner of ``path`` (root stays root)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise BadRequest(f"{path}: {exc.strerror}", hint="pass an existing git work tree") \
            from exc
    me = os.getuid()
    if me not in (0, st.st_uid):
        # Only root may become another user; a daemon running as its owner user runs
        # git as itself, and never in someone else's repository (their hooks, their
        # config).
        raise BadRequest(f"{path} belongs to uid {st.st_uid}, and this bangerd runs as "
                         f"uid {me}: it runs git only in its own user's repositories",
                         hint="use a clone the daemon's user owns")
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
            raise vms.not_running(vm)
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


def begin_prepare(d: Daemon, p: WorkspacePrepareParams) -> Operation:
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


def _export_max_bytes(d: Daemon) -> int:
    return d.cfg.workspace_export_max_mib << 20


def _save_guest_changes(d: Daemon, op: Operation, vm: VMRecord, guest_path: str,
                        discard: bool) -> tuple[workspace.Exported, Path] | None:
    """Save what the guest changed in the workspace about to be replaced.

    The same comparison as ``vm workspace export``. Returns the changes and the
    backup file, or None when there is no workspace at ``guest_path`` or it has
    no changes. The backup is written before anything is replaced, also when the
    changes are to be discarded.

    Raises:
        GuestError: the changes could not be read (unless ``discard``: then the
            failure is logged and reported in the result, and the copy goes on).
    """
    try:
        out = workspace.export(d.dial(vm.id, vm.ip), guest_path, cancel=op.cancel,
                               max_bytes=_export_max_bytes(d))
    except NotFound:
        return None  # nothing at guest_path that prepare would replace with edits in it
    except (BadRequest, GuestError) as exc:
        if not discard:
            raise GuestError(
                f"cannot save the guest's changes in {vm.name}:{guest_path} before "
                f"replacing it: {exc.message}",
                hint="export them yourself if you can (`banger vm workspace export`), or "
                     "re-run with --discard-guest-changes to replace the workspace anyway"
            ) from exc
        log.warning("vm %s: guest changes in %s not saved (discarding as asked): %s",
                    vm.name, guest_path, exc.message)
        op.report(f"could not save the guest's changes: {exc.message}")
        return None
    if not out.patch:
        return None
    backups = d.layout.vm(vm.id).workspace_backups
    backups.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Microseconds: names sort in time order, and two prepares never share one.
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = backups / f"{stamp}.patch"
    atomic_write(path, out.patch, 0o600)
    log.info("vm %s: guest changes to %d file(s) in %s saved to %s", vm.name,
             len(out.changes), guest_path, path)
    return out, path


def _prepare(d: Daemon, op: Operation, *, vm: VMRecord, runner: Runner,
             info: workspace.RepoInfo, plan: workspace.CopyPlan, guest_path: str,
             p: WorkspacePrepareParams) -> dict[str, Any]:
    op.enter("wait")
    lock = _acquire(d, vm.id, op)
    try:
        previous = d.db.get_vm(vm.id).workspace
        saved: list[tuple[workspace.Exported, Path]] = []

        def save_changes() -> bytes:
            # Guest edits are never lost: whatever the guest changed in a workspace
            # at guest_path is saved before it is replaced, then re-applied on the new
            # copy (or the prepare is refused before anything is replaced). The copy
            # calls this only when the guest found a workspace there.
            op.enter("save")
            try:
                found = _save_guest_changes(d, op, vm, guest_path, p.discard_guest_changes)
            except BangerError:
                # Nothing was replaced: the old workspace and its record stay.
                _set_workspace(d, vm.id, previous)
                raise
            op.enter("copy")
            if found is None:
                return b""
            saved.append(found)
            return b"" if p.discard_guest_changes else found[0].patch

        op.enter("copy")
        record: dict[str, Any] = {
            "host_path": info.host_path, "guest_path": guest_path,
            "base_commit": info.head, "branch": p.branch, "mode": info.mode.value,
            "prepared": False, "prepared_at": None, "info": info.to_dict(),
        }
        if p.origin is not None:
            record["origin"] = p.origin.model_dump()
        _set_workspace(d, vm.id, record)
        started = time.monotonic()
        total_files, total_mb = plan.files, plan.bytes / 1e6  # walking the plan is not free

        def progress(sent: int, files: int) -> None:
            rate = sent / max(time.monotonic() - started, 1e-3) / 1e6
            op.report(f"{files}/{total_files} files, {sent / 1e6:.1f}/{total_mb:.1f} MB"
                      f" ({rate:.1f} MB/s)")

        d.layout.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            prep = workspace.prepare(
                d.dial(vm.id, vm.ip), runner, info, plan, guest_path=guest_path, branch=p.branch,
                from_ref=p.from_ref, progress=progress, cancel=op.cancel,
                save_changes=save_changes, scratch_dir=d.layout.staging_dir,
                transport=d.cfg.workspace_transport)
        except workspace.WorkspaceConflict as exc:
            changes, backup = saved[0]
            # The old workspace is still there, as it was: so is its record.
            _set_workspace(d, vm.id, previous)
            raise workspace.WorkspaceConflict(
                f"the guest's changes to {len(changes.changes)} file(s) in "
                f"{vm.name}:{guest_path} do not apply to the new copy of {info.host_path}; "
                f"the workspace was left as it was, and the changes are saved in "
                f"{backup}\n{exc.message}",
                hint=f"merge them on the host (e.g. `git apply --3way {backup}`), or "
                     "replace the workspace anyway with --discard-guest-changes "
                     "(the saved patch stays)",
                backup=str(backup)) from exc
        except BangerError as exc:
            if op.stage != "save":  # (a failed save put the previous record back)
                _set_workspace(d, vm.id, {**record, "error": exc.message})
            raise
        op.enter("record")
        record.update({
            "base_commit": prep.base_commit, "branch": prep.branch, "prepared": True,
            "prepared_at": now().isoformat(), "files": prep.files,
            "bytes": prep.bytes, "transport": prep.transport, "error": None,
        })
        _set_workspace(d, vm.id, record)
        log.info("vm %s: workspace %s -> %s (%d files, %d bytes)", vm.name, info.host_path,
                 guest_path, prep.files, prep.bytes)
        guest_changes = None
        if saved:
            guest_changes = {
                "files": len(saved[0][0].changes), "backup": str(saved[0][1]),
                "outcome": "discarded" if p.discard_guest_changes
                else "reapplied" if prep.reapplied == "applied" else "already_present",
            }
        return {"vm": vm.name, "guest_changes": guest_changes,
                **{k: v for k, v in record.items() if k != "info"}}
    finally:
        lock.release()


def export(d: Daemon, p: WorkspaceExportParams) -> dict[str, Any]:
    """Diff the guest workspace; the patch goes to a 0600 file the CLI reads and removes."""
    vm = _running(d, p.name)
    ws = vm.workspace
    if not ws or not ws.get("prepared"):
        raise InvalidState(f"VM {vm.name!r} has no prepared workspace",
                           hint=f"prepare one with `banger vm workspace prepare {vm.name} PATH`")
    lock = _acquire(d, vm.id, None)
    try:
        out = workspace.export(d.dial(vm.id, vm.ip), ws["guest_path"], base_commit=p.base_commit,
                               max_bytes=_export_max_bytes(d))
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
    return {"vm": vm.name, "vm_id": vm.id, "needs_resync": changed,
            **{k: v for k, v in ws.items() if k != "info"}}


# ------------------------------------------------------------------ file sync


SYNC_MAX_BYTES = 16 << 20  # a [[file_sync]] file is a credential or a dotfile, not a data set
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted at the path must not hang VM start.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SyncSkipped(Exception):
    """A ``[[file_sync]]`` entry that is not copied; the message is the warning."""


def _sync_path(host: str, home: str) -> str:
    """``host`` as an absolute path; ``~/`` is the config owner's home, not root's."""
    if host == "~" or host.startswith("~/"):
        host = home.rstrip("/") + host[1:]
    if not host.startswith("/"):
        raise SyncSkipped(f"file_sync: {host} is not an absolute path (or ~/...); skipped")
    return host


def _check_no_symlinks(host: str, path: str) -> None:
    """Walk ``path`` from ``/`` with ``O_NOFOLLOW`` on every component (bangerd is root:
    a symlink anywhere must not redirect it) and check it names a regular file."""
    parts = [c for c in path.split("/") if c]
    if not parts:
        raise SyncSkipped(f"file_sync: {host} is not a regular file; skipped")
    fd = os.open("/", _DIR_FLAGS)
    try:
        for i, comp in enumerate(parts):
            try:
                nxt = os.open(comp, _FILE_FLAGS if i == len(parts) - 1 else _DIR_FLAGS,
                              dir_fd=fd)
            except OSError as exc:
                try:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise SyncSkipped(f"file_sync: {host} is or passes through a symlink "
                                      "(not followed); skipped") from exc
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise SyncSkipped(f"file_sync: {host} does not exist on the host; "
                                      "skipped") from exc
                raise SyncSkipped(f"file_sync: cannot read {host}: {exc.strerror}; "
                                  "skipped") from exc
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SyncSkipped(f"file_sync: {host} is not a regular file; skipped")
    if st.st_size > SYNC_MAX_BYTES:
        raise SyncSkipped(f"file_sync: {host} is larger than {SYNC_MAX_BYTES >> 20} MiB; "
                          "skipped")


def read_sync_source(host: str, owner: OwnerRunner) -> bytes:
    """The contents of a ``[[file_sync]]`` host file, read as the config file's owner.

    bangerd is root, and the config (with the paths it names) belongs to a user:
    reading as root would let that user copy any file of the host into a VM. So
    the file is read by ``cat`` running as the owner; and no symlink is followed
    (every component is checked with ``O_NOFOLLOW`` first). A symlink swapped in
    between the two could only lead to a file the owner can read anyway.

    Raises:
        SyncSkipped: missing, a symlink, not a regular file, too large, or not
            readable by the owner; the message is the warning to log.
    """
    path = _sync_path(host, owner.home)
    _check_no_symlinks(host, path)
    res = owner.run(["cat", "--", path], desc=f"read file_sync source {path}", check=False,
                    timeout=30)
    if res.returncode != 0:
        who = _user_name(owner.uid)
        raise SyncSkipped(f"file_sync: {who} (owner of the config) cannot read {host}: "
                          f"{res.err.strip()[-200:]}; skipped")
    if len(res.stdout) > SYNC_MAX_BYTES:
        raise SyncSkipped(f"file_sync: {host} is larger than {SYNC_MAX_BYTES >> 20} MiB; "
                          "skipped")
    return res.stdout


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def sync_files(d: Daemon, vm: VMRecord) -> list[str]:
    """Copy ``[[file_sync]]`` host files into the guest; returns warnings (files skipped).

    Files are read as the owner of the config file (:func:`read_sync_source`).
    """
    warnings: list[str] = []
    if not d.cfg.file_sync:
        return warnings
    cfg_file = config_path()
    try:
        owner = owner_runner(d, cfg_file)
    except BadRequest:
        warnings.append(f"file_sync: cannot tell who owns the config file {cfg_file}; "
                        "no file copied")
        log.warning("vm %s: %s", vm.name, warnings[0])
        return warnings
    guest = d.dial(vm.id, vm.ip)
    for entry in d.cfg.file_sync:
        target = check_sync_target(entry.guest)
        mode = int(entry.mode, 8)  # both checked when the config was loaded
        try:
            data = read_sync_source(entry.host, owner)
        except SyncSkipped as exc:
            warnings.append(str(exc))
            continue
        tmp = f"{target}.banger-{secrets.token_hex(3)}"
        script = (f"umask 077 && mkdir -p {quote(posixpath.dirname(target))} && "
                  f"cat > {quote(tmp)} && chmod {mode:o} {quote(tmp)} && "
                  f"mv -f {quote(tmp)} {quote(target)}")
        guest.run(script, input=data, timeout=60, desc=f"sync {entry.host}")
    for w in warnings:
        log.warning("vm %s: %s", vm.name, w)
    return warnings
