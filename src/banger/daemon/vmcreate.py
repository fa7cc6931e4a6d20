"""``vm create``: reserve a name and address, make the disks, first boot.

A create is an operation (``vm.create.begin`` + status polls): the reservation
is synchronous, the rest runs on a worker thread, and any failure rolls the VM
back completely (:func:`banger.daemon.vmdelete.destroy`).

With ``from_snapshot`` the VM is a clone: its disks are copies of the snapshot's, its
size is the snapshot's, and its first "boot" restores the snapshot's guest and gives
it its own identity (``vmboot.boot``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.api import VMSpec, VMState
from banger.api.params import CreateParams
from banger.config import parse_size
from banger.daemon import (
    bootsnap,
    forwarder,
    identity,
    images,
    kernels,
    rootgrow,
    snapshots,
    vmegress,
    vmpool,
)
from banger.daemon.core import new_id
from banger.daemon.dmsnap import CowHandle, clone_or_copy
from banger.daemon.imagemgr import WORK_LABEL
from banger.daemon.network import allocate_ip, mac_for_ip
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, SnapshotRecord, VMRecord
from banger.daemon.vmboot import boot, wake
from banger.daemon.vmdelete import destroy
from banger.daemon.vmmselect import resolve_vmm
from banger.daemon.vmruntime import VMRuntime
from banger.daemon.vms import transition, update_runtime, view, wait_op
from banger.errors import AlreadyExists, BadRequest, BangerError, Cancelled, HostError
from banger.fsutil import remove_tree
from banger.names import check_name, generate_name
from banger.runner import CancelToken, as_root_owner

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")

CREATE_STAGES = ["reserve", "image", "disk", "network", "boot", "wait-ssh"]
CLONE_STAGES = ["reserve", "disk", "network", "restore", "wait-ssh"]
POOL_STAGES = ["reserve", "network", "restore", "wait-ssh"]  # a clone taken from the pool


def begin_create(d: Daemon, params: CreateParams, *, extra_disks: tuple[str, ...] = ()
                 ) -> Operation:
    """Validate and reserve synchronously, then finish the create on a worker thread.

    ``extra_disks`` (never from a request: image finalize's helper VM) are raw disks
    attached after the work disk.

    Name and IP are reserved under ``create_vm_mu`` (inserting the VM row in state
    ``creating``), so a duplicate name fails here, before any slow work, and two
    concurrent creates never get the same address.
    """
    cfg = d.cfg
    if params.name is not None:
        check_name(params.name)
    nat, allow_private, allow_out = vmegress.resolve(
        params.nat, params.allow_private, params.allow_out, cfg.nat)
    # The VM's own network settings, a clone's as any VM's.
    network: dict[str, Any] = {
        "nat": nat, "allow_private": allow_private, "allow_out": allow_out,
        "forwards": sorted({str(forwarder.parse(f)) for f in params.forwards})}
    snap = None
    if params.from_snapshot is not None:
        if params.cold:
            raise BadRequest("--cold and --from-snapshot contradict each other",
                             hint="a clone is restored, never booted")
        snap = _clone_source(d, params)
        vmm = snap.vmm
        spec = snap.spec.model_copy(update={**network, "extra_disks": []})
    else:
        vmm, spec = plan_boot(d, params, network, extra_disks)
        if params.start and not params.cold:
            snap = _boot_snapshot(d, vmm, spec)

    with d.create_vm_mu:
        name = params.name or generate_name(d.db.used_names())
        if d.db.find_vm(name) is not None:
            raise AlreadyExists(f"a VM named {name!r} already exists",
                                hint="pick another --name, or delete it with `banger vm delete`")
        runtime = VMRuntime(from_snapshot=snap.name if snap is not None else None)
        op = Operation(kind="vm.create", target=name,
                       stages=list(CREATE_STAGES if snap is None else CLONE_STAGES))
        op.enter("reserve")  # before the token is known: this cannot raise Cancelled
        # A boot snapshot's clone may be waiting, restored, in the pool (vmpool).
        vm = (vmpool.take(d, snap, name, spec, runtime.merged(from_pool=True),
                           cancel=op.cancel)
              if snap is not None and snap.boot_key is not None and params.from_snapshot is None
              else None)
        pooled = vm is not None
        if vm is None:
            ip = allocate_ip(cfg.bridge_cidr, d.db.used_ips())
            vm = VMRecord(id=new_id(), name=name, image=spec.image, spec=spec, vmm=vmm,
                          state=VMState.CREATING, ip=ip, mac=mac_for_ip(ip), runtime=runtime)
            # Registered before the row exists: a delete that sees "creating" can
            # always cancel.
            d.register_inflight(vm.id, op.cancel)
            try:
                d.db.add_vm(vm)
            except BaseException:
                d.end_inflight(vm.id, op.cancel)
                raise
        else:
            op.stages[:] = POOL_STAGES
    log.info("vm %s (%s): reserved %s", vm.name, vm.id, vm.ip)
    # From here on only the worker may end the create: a cancel arriving now is seen by
    # its first stage, which rolls the row back and ends the token.
    cold = params.cold or extra_disks != ()
    if pooled:
        d.create_ops.run(op, lambda o: _create_pooled(d, o, vm), name=f"create-{vm.name}")
    else:
        d.create_ops.run(op, lambda o: _create(d, o, vm, params.start, snap, cold=cold),
                         name=f"create-{vm.name}")
    return op


def _boot_snapshot(d: Daemon, vmm: str, spec: VMSpec) -> SnapshotRecord | None:
    """The boot snapshot a VM of this image and size can be a clone of, if any."""
    img = d.db.find_image(spec.image)
    if img is None:
        return None
    boot_key = bootsnap.key(d, img, vmm, spec)
    return bootsnap.find(d, boot_key) if boot_key is not None else None


def plan_boot(d: Daemon, params: CreateParams, network: dict[str, Any] | None = None,
              extra_disks: tuple[str, ...] = ()) -> tuple[str, VMSpec]:
    """The VMM and spec of a VM that boots its image (not a clone); ``network``: its
    egress and forwards (none by default).

    Raises:
        BadRequest / NotFound: the image, its kernel under the VMM, or a size is wrong.
    """
    cfg = d.cfg
    defaults = cfg.vm_defaults
    image = params.image or cfg.default_image_name
    check_name(image, "image")
    img = d.db.find_image(image)
    if img is None:
        images.recipe_or_missing(image)
    vmm = resolve_vmm(cfg, params.vmm, lambda v: kernels.suits(d, img, v))
    if img is not None:
        kernels.boot_files(d, img, vmm)  # raises the precise refusal
    elif not kernels.suits(d, img, vmm):
        raise BadRequest(f"the built-in image {image!r} cannot boot under {vmm}",
                         hint="build a kernel for it (`banger kernel build`) or use --vmm qemu")
    spec = VMSpec(
        image=image,
        vcpu=params.vcpu if params.vcpu is not None else defaults.vcpu,
        memory_mib=params.memory_mib if params.memory_mib is not None else defaults.memory_mib,
        disk_size=parse_size(params.disk_size or defaults.disk_size),
        work_disk_size=parse_size(params.work_disk_size or defaults.work_disk_size),
        vmm=params.vmm,
        extra_disks=list(extra_disks),
        **(network or {}),
    )
    if spec.work_disk_size < 64 << 20:
        raise BadRequest("work disk must be at least 64M")
    return vmm, spec


def _clone_source(d: Daemon, params: CreateParams) -> SnapshotRecord:
    """The snapshot a clone restores, with every flag that contradicts it refused: a
    clone is the saved machine, with its image, VMM and size.

    Raises:
        NotFound: no such snapshot. InvalidState: this host's VMM cannot restore it.
        BadRequest: a flag asks for another image, VMM or size, or the root disks
            are device-mapper snapshots (cow_strategy dmsnap), which a clone cannot use.
    """
    check_name(params.from_snapshot or "", "snapshot")
    snap = snapshots.for_clone(d, params.from_snapshot or "")
    s = snap.spec
    asked = {"--image": (params.image, snap.image), "--vmm": (
        None if params.vmm == "auto" else params.vmm, snap.vmm),
        "--vcpu": (params.vcpu, s.vcpu), "--memory": (params.memory_mib, s.memory_mib),
        "--disk-size": (parse_size(params.disk_size) if params.disk_size else None,
                        s.disk_size),
        "--work-disk-size": (parse_size(params.work_disk_size)
                             if params.work_disk_size else None, s.work_disk_size)}
    for flag, (want, have) in asked.items():
        if want is not None and want != have:
            raise BadRequest(f"{flag} {want} contradicts snapshot {snap.name!r} ({have}): "
                             "a clone is the machine that was saved",
                             hint=f"leave {flag} out, or create a VM without --from-snapshot")
    if d.cow is not None and d.cow.name == "dmsnap":
        raise BadRequest("clones need reflink or copy root disks; this install uses "
                         "device-mapper snapshots", hint="set cow_strategy to reflink or copy")
    d.db.get_image(snap.image)
    return snap


def _create(d: Daemon, op: Operation, vm: VMRecord, start: bool,
            snap: SnapshotRecord | None, *, cold: bool) -> dict[str, Any]:
    with _undone_on_failure(d, op, vm):
        d.checkpoint("create.reserve")
        if snap is None:
            op.enter("image")
            img = images.ensure_image(d, vm.image, op)
            d.checkpoint("create.image")
            op.enter("disk")
            make_disks(d, vm, img, op.cancel)
        else:
            img = d.db.get_image(vm.image)
            op.enter("disk")
            copy_snapshot_disks(d, vm, snap, op.cancel)
        d.checkpoint("create.disk")
        if not start:
            stopped = transition(d, vm.id, VMState.STOPPED,
                                 stop_reason="created with --no-start")
            return view(d, stopped)
        # The VM stays "creating" through its first boot: if bangerd dies now, the
        # restart removes it instead of keeping a VM nobody finished creating.
        booted = boot(d, d.db.get_vm(vm.id), img, op.cancel, op, fork=snap)
    if snap is None and not cold:
        _keep_boot(d, op, booted, img)
    return view(d, d.db.get_vm(vm.id))


def _create_pooled(d: Daemon, op: Operation, vm: VMRecord) -> dict[str, Any]:
    """The worker's half of a create that took a clone from the pool: wake it."""
    try:
        with _undone_on_failure(d, op, vm):
            d.checkpoint("create.reserve")
            wake(d, vm, op.cancel, op)
    finally:
        d.pool_wanted.set()  # refill behind it, now that this VM has the CPU it needed
    return view(d, d.db.get_vm(vm.id))


@contextmanager
def _undone_on_failure(d: Daemon, op: Operation, vm: VMRecord) -> Iterator[None]:
    """A create's worker: ``vm`` rolled back completely when the block fails (a cancel
    reported as such), and the create's in-flight token ended either way."""
    try:
        yield
    except BaseException as exc:
        roll_back(d, vm, exc)
        if isinstance(exc, Cancelled):
            raise Cancelled(f"creation of {vm.name!r} was cancelled; nothing was kept") from exc
        raise
    finally:
        d.end_inflight(vm.id, op.cancel)


def _keep_boot(d: Daemon, op: Operation, vm: VMRecord, img: ImageRecord) -> None:
    """After a first boot: keep it as the image's boot snapshot unless one exists."""
    try:
        boot_key = bootsnap.key(d, img, vm.vmm, vm.spec)
    except BangerError as exc:
        log.warning("vm %s: no boot snapshot: %s", vm.name, exc.message)
        return
    if boot_key is None or bootsnap.find(d, boot_key) is not None:
        return
    op.cancellable = False  # the VM is made: a cancel now would only lose the snapshot
    op.stages.append("snapshot")
    try:
        op.enter("snapshot")
    except Cancelled:  # asked for just before the boot ended: keep nothing more
        return
    bootsnap.take(d, vm, boot_key, op)


def roll_back(d: Daemon, vm: VMRecord, exc: BaseException) -> None:
    """Remove what a create that failed (or was cancelled) made; a clean-up failure is
    noted on ``exc``, which is what the caller reports."""
    log.warning("vm %s: create failed, rolling back: %s", vm.name, exc)
    try:
        destroy(d, vm.id, reason=f"create failed: {exc}")
    except Exception as cleanup:
        # Report why the create failed, not why the clean-up did (that is logged,
        # and the VM is left in "error" for `vm delete` to retry).
        log.error("vm %s: rollback incomplete: %s", vm.name, cleanup)
        exc.add_note(f"rollback incomplete: {cleanup}")


def make_disks(d: Daemon, vm: VMRecord, img: ImageRecord, cancel: CancelToken) -> None:
    """The VM's copy-on-write root disk (grown to ``disk_size``) and its work disk."""
    assert d.cow is not None
    paths = d.layout.vm(vm.id)
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.state.chmod(0o700)
    # A device-mapper snapshot's origin is the image itself, at its own size.
    source = (Path(img.rootfs) if d.cow.name == "dmsnap"
              else rootgrow.rootfs_at(d, img, vm.spec.disk_size))
    cancel.check()
    # Record the intent first so a crash mid-copy still knows what to remove.
    update_runtime(d, vm.id, cow={"strategy": d.cow.name, "path": str(paths.rootfs)})
    if d.spares.take(source, paths.rootfs):  # a copy made ahead (only for "copy")
        cow = CowHandle(d.cow.name, str(paths.rootfs))
    else:
        cow = d.cow.create(source, paths.rootfs)
    update_runtime(d, vm.id, cow=cow.to_json())
    if d.spares.keep:  # the next create's copy, made now, off its path
        d.in_background("spare root disk", lambda: d.spares.refill(source))
    cancel.check()
    make_work_disk(d, vm, img, paths.work_disk)


def copy_snapshot_disks(d: Daemon, vm: VMRecord, snap: SnapshotRecord,
                        cancel: CancelToken) -> None:
    """A clone's root and work disks: copies (reflinks where possible) of the snapshot's."""
    assert d.cow is not None
    paths = d.layout.vm(vm.id)
    files = d.layout.snapshot(snap.id)
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.state.chmod(0o700)
    update_runtime(d, vm.id, cow={"strategy": d.cow.name, "path": str(paths.rootfs)})
    cow = d.cow.create(files.rootfs, paths.rootfs)
    update_runtime(d, vm.id, cow=cow.to_json())
    cancel.check()
    try:
        clone_or_copy(files.work_disk, paths.work_disk)
    except OSError as exc:
        raise HostError(f"cannot copy snapshot {snap.name!r}'s work disk: {exc.strerror}"
                        ) from exc


HOST_KEY_FILE = "banger_host_ed25519_key"
"""In the work disk's ``.ssh``: the VM's SSH host key, made here, which banger-init
installs on a first boot instead of running ssh-keygen (and syncing) in the guest."""


def make_work_disk(d: Daemon, vm: VMRecord, img: ImageRecord, target: Path) -> None:
    """ext4 from the image's work-seed plus the install's authorized_key and the VM's SSH
    host key; its root directory (the guest's ``/root``) is mode 0700."""
    pubkey = d.layout.public_key.read_text()
    private, public = identity.new_host_key(d.runner, d.layout.staging_dir)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".seed-") as tmp:
        seed = Path(tmp) / "root"
        if img.workseed and Path(img.workseed).is_dir():
            shutil.copytree(img.workseed, seed, symlinks=True)
        else:
            seed.mkdir()
        write_ssh_file(seed, "authorized_keys", pubkey, 0o600)
        write_ssh_file(seed, HOST_KEY_FILE, private, 0o600)
        write_ssh_file(seed, f"{HOST_KEY_FILE}.pub", public, 0o644)
        d.runner.run(
            [*as_root_owner(), "mkfs.ext4", "-q", "-F", "-L", WORK_LABEL,
             "-E", "root_owner=0:0", "-d", str(seed), str(target),
             f"{vm.spec.work_disk_size // 1024}k"],
            desc="make the work disk", timeout=300,
        )
    # mkfs -d makes the root directory 0755 whatever the seed's mode: set it here, so the
    # guest need not start chmod on its way to sshd.
    d.runner.run(["debugfs", "-w", "-R", "sif <2> mode 040700", str(target)],
                 desc="make the work disk's root private", timeout=60)


def write_ssh_file(seed: Path, name: str, text: str, mode: int) -> None:
    """Put ``text`` at ``seed/.ssh/<name>`` without following any symlink.

    The seed comes from an image, which is untrusted: its ``.ssh`` or a file in it may
    be a symlink (normal inside a guest, and aimed at ``/etc/shadow`` by a hostile
    one). Anything in the way is replaced, never written through, since bangerd is
    root on the host.
    """
    ssh = seed / ".ssh"
    if ssh.is_symlink() or (ssh.exists() and not ssh.is_dir()):
        ssh.unlink()
    ssh.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh, 0o700, follow_symlinks=False)
    path = ssh / name
    remove_tree(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def create_sync(d: Daemon, params: CreateParams) -> dict[str, Any]:
    """``vm.create``: begin a create and wait for it; returns the VM view or raises its error."""
    result: dict[str, Any] = wait_op(begin_create(d, params))
    return result
