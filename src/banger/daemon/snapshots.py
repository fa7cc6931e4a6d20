"""``vm snapshot``, ``snapshot list`` and ``snapshot rm``: a guest kept to clone from.

A snapshot is a directory, ``Layout.snapshot(id)``: the VMM's saved guest (memory and
device state, the driver's ``save``), the root and work disks at that same instant
(reflinks where the file system can, else sparse copies), and the kernel and initrd
the guest runs, so that a restore needs nothing else. It is written as
``<id>.partial/``, renamed once complete, and only then gets its store row; at
start-up (:func:`sweep`) anything partial, and any directory without a row, is
removed, so a half-made snapshot is never cloned.

Taking one claims the VM (``snapshotting``), stops its vCPUs (QEMU completes the
guest's outstanding disk writes first), copies its disks, saves its state, and runs
it again (or leaves it paused, as it was). The guest lives on, unchanged.

``vm create --from-snapshot`` (``vmcreate``, ``vmboot``) restores clones of it, each
given its own identity through the identity channel (``identity``): a snapshot is
taken only of a guest whose ``banger-ident`` waits on that channel.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.agent import wire
from banger.api import SnapshotView, VMState
from banger.daemon import identity, kernels
from banger.daemon.core import new_id
from banger.daemon.dmsnap import CowHandle, clone_or_copy
from banger.daemon.guest import end_masters
from banger.daemon.opstate import Operation
from banger.daemon.store import SnapshotRecord, VMRecord
from banger.daemon.vms import handles_of, resolve, transition, wait_op, wrong_state
from banger.errors import (
    AlreadyExists,
    BadRequest,
    BangerError,
    GuestError,
    HostError,
    InvalidState,
    NotRunning,
)
from banger.fsutil import fsync_path, remove_tree
from banger.layout import SnapshotPaths
from banger.names import check_name
from banger.proc import matches

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.snapshots")

SNAPSHOT_STAGES = ["check", "pause", "disks", "save", "resume"]
LISTENER_WAIT_S = 20.0  # polls of 0.1 s (each `sleep` costs more under TCG)
LISTENER_CHECK_S = 60.0  # the whole check, as a guest command


# ------------------------------------------------------------------ taking one


def begin_snapshot(d: Daemon, ref: str, name: str) -> Operation:
    """``vm.snapshot.begin``: check and claim a running or paused VM now, snapshot it on
    a worker. The op's result is the snapshot's view. Not cancellable: the guest is
    stopped for the whole copy, and a snapshot cut short is thrown away anyway.

    Raises:
        BadRequest: the name is not a DNS label, or the VM cannot be cloned (its VMM or
            its root disk's kind).
        AlreadyExists: a snapshot of that name exists.
        NotRunning / InvalidState: the VM is not running or paused.
    """
    check_name(name, "snapshot")
    if d.db.find_snapshot(name) is not None:
        raise AlreadyExists(f"a snapshot named {name!r} already exists",
                            hint=f"pick another name, or `banger snapshot rm {name}` first")
    vm = resolve(d, ref)
    refuse_unclonable(d, vm)
    op = Operation(kind="vm.snapshot", target=vm.name, stages=list(SNAPSHOT_STAGES),
                   cancellable=False)
    claimed = claim(d, vm)
    return d.power_ops.run(op, lambda o: snapshot_view(take_claimed(d, claimed, name, o)),
                           name=f"vm.snapshot-{vm.name}")


def take(d: Daemon, ref: str, name: str) -> dict[str, Any]:
    """``vm.snapshot``: :func:`begin_snapshot` and wait for it; the snapshot's view."""
    result: dict[str, Any] = wait_op(begin_snapshot(d, ref, name))
    return result


def refuse_unclonable(d: Daemon, vm: VMRecord) -> None:
    """Refuse a VM whose snapshot could not be cloned.

    Raises:
        BadRequest: its VMM cannot clone (an unjailed Firecracker), its root disk is a
            device-mapper snapshot, or it was started without the identity channel.
    """
    try:
        d.driver(vm.vmm).check_clonable()
    except BadRequest as exc:
        raise BadRequest(f"VM {vm.name!r} cannot be snapshotted: {exc.message}",
                         hint=exc.hint) from exc
    cow = vm.runtime.cow or {}
    if cow.get("strategy") == "dmsnap":
        raise BadRequest(f"VM {vm.name!r}'s root disk is a device-mapper snapshot, which a "
                         "snapshot cannot copy yet",
                         hint="set cow_strategy to reflink or copy for VMs to snapshot")
    if vm.state in (VMState.RUNNING, VMState.PAUSED) and not vm.runtime.ident_channel:
        raise BadRequest(f"VM {vm.name!r} was started without the identity channel its "
                         "clones need (by an older banger)",
                         hint=f"`banger vm restart {vm.name}` gives it one")


def _not_running(vm: VMRecord) -> BangerError:
    if vm.state in (VMState.STOPPED, VMState.SUSPENDED):
        return NotRunning(f"VM {vm.name!r} is {vm.state.value}; cannot snapshot it",
                          hint=f"`banger vm start {vm.name}` first")
    return wrong_state(vm, VMState.SNAPSHOTTING)


def claim(d: Daemon, vm: VMRecord) -> VMRecord:
    """Move a running or paused VM to ``snapshotting``, remembering which it was.

    Raises:
        NotRunning / InvalidState: it is neither.
    """
    with d.vm_locks.held(vm.id):
        current = d.db.get_vm(vm.id)
        if current.state not in (VMState.RUNNING, VMState.PAUSED):
            raise _not_running(current)
        return d.db.update_vm(current, state=VMState.SNAPSHOTTING,
                              runtime=current.runtime.merged(snapshot_from=current.state))


def take_claimed(d: Daemon, vm: VMRecord, name: str, op: Operation, *,
                 boot_key: str | None = None) -> SnapshotRecord:
    """Snapshot a claimed (``snapshotting``) VM as ``name``; it is back as it was
    afterwards, whether the snapshot was made or not."""
    paths = d.layout.vm(vm.id)
    drv = d.driver(vm.vmm)
    was = vm.runtime.snapshot_from or VMState.RUNNING
    snap_id = new_id()
    files = d.layout.snapshot(snap_id)
    try:
        op.enter("check")
        agent_listens = _check_listener(d, vm) if was == VMState.RUNNING else False
        version = drv.version()
        img = d.db.get_image(vm.image)
        boot = kernels.boot_files(d, img, vm.vmm)
        op.enter("pause")
        # The snapshot holds no connection of the daemon's: every clone would wake up
        # with a copy of it, talking to a host that forgot it.
        end_masters(d.runner, paths.ssh_dir)
        drv.pause(paths)
        op.enter("disks")
        cow = CowHandle.from_json(vm.runtime.cow or {})
        _copy_all(files, [(Path(cow.disk), files.rootfs), (paths.work_disk, files.work_disk),
                          (boot.kernel, files.kernel),
                          *([(boot.initrd, files.initrd)] if boot.initrd else [])])
        d.checkpoint("snapshot.disks")
        op.enter("save")
        drv.save(paths, files.partial, lambda n: op.report(f"{n / 2**20:.0f} MiB"))
        d.checkpoint("snapshot.saved")
        _commit(files)
        snap = SnapshotRecord(id=snap_id, name=name, image=vm.image, source_vm=vm.name,
                              vmm=vm.vmm, spec=vm.spec, vmm_version=version,
                              size_bytes=_allocated(files.dir), boot_key=boot_key,
                              agent=agent_state(vm, agent_listens))
        d.db.add_snapshot(snap)
    except BaseException as exc:
        remove_tree(files.partial)
        remove_tree(files.dir)
        _back_to(d, vm, was, exc)
        raise
    d.checkpoint("snapshot.committed")
    op.enter("resume")
    _back_to(d, vm, was, None)
    log.info("vm %s: snapshot %s taken (%d MiB)", vm.name, name, snap.size_bytes >> 20)
    return snap


def _copy_all(files: SnapshotPaths, pairs: list[tuple[Path, Path]]) -> None:
    """Copy each (source, file of the snapshot) into ``<id>.partial/``.

    Raises:
        HostError: a copy failed (out of space, a file gone).
    """
    try:
        files.partial.mkdir(mode=0o700, parents=True)
        for src, dst in pairs:
            clone_or_copy(src, files.partial / dst.name)
    except OSError as exc:
        hint = "free some disk space" if exc.errno == errno.ENOSPC else ""
        raise HostError(f"cannot copy {exc.filename or 'a disk'} into the snapshot: "
                        f"{exc.strerror}", hint=hint) from exc


def _check_listener(d: Daemon, vm: VMRecord) -> bool:
    """Refuse a guest whose ``banger-ident`` is not waiting on its channel: its clones
    would keep the snapshot's identity. Returns whether its agent listens on its port
    too (:mod:`banger.agent`).

    Raises:
        BadRequest: it is not (an image made before banger had it, or stopped by hand).
    """
    # banger-ident starts late in a boot, and says it listens once its helpers are
    # ready (a boot snapshot follows right after SSH answers): wait for it, bounded,
    # where it is installed.
    polls = int(LISTENER_WAIT_S * 10)
    listening, installed = identity.GUEST_LISTENING, identity.GUEST_IDENT_PATH
    script = (f"i=0; while [ ! -e {listening} ] && [ -x {installed} ] && [ $i -lt {polls} ]; "
              f"do sleep 0.1; i=$((i + 1)); done; test -e {listening} || exit 1; "
              f"if [ -e {wire.GUEST_LISTENING} ]; then echo agent; fi")
    try:
        res = d.dial(vm.id, vm.ip).run(script, timeout=LISTENER_CHECK_S,
                                       desc="check banger-ident")
    except GuestError as exc:
        raise BadRequest(f"VM {vm.name!r} has no banger-ident waiting for a new identity, "
                         "so its clones could not be given their own",
                         hint="images built or registered by this banger have it: rebuild "
                              "or re-register the image") from exc
    return res.out.strip() == "agent"


def agent_state(vm: VMRecord, listens: bool) -> str:
    """``SnapshotRecord.agent`` for a snapshot of ``vm`` (whose agent ``listens``, or
    answered when it became ready)."""
    if not vm.runtime.agent_channel:
        return ""
    return "ready" if listens or vm.runtime.agent else "port"


def _commit(files: SnapshotPaths) -> None:
    """Make ``<id>.partial/`` the snapshot: its files synced, then one rename."""
    try:
        for f in files.partial.iterdir():
            fsync_path(f)
        os.rename(files.partial, files.dir)
        fsync_path(files.dir.parent)
    except OSError as exc:
        raise HostError(f"cannot commit snapshot {files.dir}: {exc.strerror}") from exc


def _allocated(directory: Path) -> int:
    """Bytes the snapshot's files hold on disk (reflinked blocks counted once per file)."""
    return sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())


def _back_to(d: Daemon, vm: VMRecord, was: VMState, exc: BaseException | None) -> None:
    """After a snapshot (``exc`` None) or a failed one: the guest runs (or stays paused)
    as before; failed if its VMM is gone."""
    note = None if exc is None else f"snapshot failed: {d.error_of(exc, 'vm.snapshot').message}"
    try:
        h = handles_of(d, vm)
        if h.process is None or not matches(h.process):
            raise HostError("the VMM is gone")
        if was == VMState.RUNNING:
            d.driver(vm.vmm).resume(d.layout.vm(vm.id))
        transition(d, vm.id, was, expect={VMState.SNAPSHOTTING}, snapshot_from=None,
                   **({"last_error": note} if note else {}))
    except BangerError as again:
        log.error("vm %s: after a snapshot: %s", vm.name, again.message)
        transition(d, vm.id, VMState.ERROR, snapshot_from=None,
                   last_error="; ".join(m for m in (note, again.message) if m))
        if exc is None:
            raise


# ------------------------------------------------------------------ list / rm / sweep


def snapshot_view(snap: SnapshotRecord) -> dict[str, Any]:
    """A snapshot as the CLI shows it (``SnapshotView``)."""
    return SnapshotView(
        id=snap.id, name=snap.name, kind="user" if snap.boot_key is None else "boot",
        image=snap.image, source_vm=snap.source_vm,
        vmm=snap.vmm, vcpu=snap.spec.vcpu, memory_mib=snap.spec.memory_mib,
        disk_size=snap.spec.disk_size, work_disk_size=snap.spec.work_disk_size,
        size_bytes=snap.size_bytes, created_at=snap.created_at,
    ).model_dump(mode="json")


def list_snapshots(d: Daemon) -> list[dict[str, Any]]:
    """``snapshot.list``: every snapshot, oldest first."""
    return [snapshot_view(s) for s in d.db.list_snapshots()]


def remove(d: Daemon, ref: str) -> dict[str, Any]:
    """``snapshot.rm``: delete a snapshot's row, then its files. Clones made from it
    keep running: each has its own disks and its VMM has read the saved state.

    Raises:
        NotFound: there is no such snapshot.
        HostError: its files could not all be removed (the row is gone; the next
            start-up sweep removes them).
    """
    snap = d.db.get_snapshot(ref)
    d.db.delete_snapshot(snap.id)
    files = d.layout.snapshot(snap.id)
    remove_tree(files.dir)
    if files.dir.exists():
        raise HostError(f"snapshot {snap.name!r} is forgotten but {files.dir} remains",
                        hint="bangerd removes it at its next start")
    log.info("snapshot %s removed", snap.name)
    return snapshot_view(snap)


def sweep(d: Daemon) -> None:
    """At start-up: remove partial snapshots and directories no row names, and rows
    whose directory is gone (nothing can clone from them)."""
    known = {s.id: s for s in d.db.list_snapshots()}
    root = d.layout.snapshots_dir
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name not in known:
                log.warning("removing unfinished or orphaned snapshot %s", entry)
                remove_tree(entry)
    for snap_id, snap in known.items():
        if not d.layout.snapshot(snap_id).dir.is_dir():
            log.warning("snapshot %s has no files: forgetting it", snap.name)
            d.db.delete_snapshot(snap_id)


def for_clone(d: Daemon, ref: str) -> SnapshotRecord:
    """The snapshot a clone is made from, checked against this host's VMM.

    Raises:
        NotFound: there is no such snapshot.
        InvalidState: this host's VMM is not the one that saved it.
    """
    snap = d.db.get_snapshot(ref)
    current = d.driver(snap.vmm).version()
    if current != snap.vmm_version:
        raise InvalidState(
            f"snapshot {snap.name!r} was saved by {snap.vmm_version!r}; this host runs "
            f"{current!r}, which cannot restore it",
            hint=f"`banger snapshot rm {snap.name}`, then snapshot a VM again")
    return snap

