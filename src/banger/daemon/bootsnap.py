"""Boot snapshots: an image's first boot, kept, so that later VMs do not boot at all.

With ``boot_snapshots`` on (the default), a ``vm create``/``vm run`` of a QEMU VM that
would boot an image looks for a boot snapshot made from that same start: same image (and
the same build of it), same kernel and initrd files, same QEMU, same banger, same vCPUs,
memory and disk sizes (:func:`key`). Found, the VM is a clone of it (``vmcreate``,
``vmboot``): restored and re-identified instead of booted. Not found, the VM boots, and
before the create returns (before anything of the user's runs in it) it is snapshotted
as ``boot-<key>`` (:func:`take`), once its boot has ended (:func:`settle`); boot
snapshots of the same image made from another start (the image rebuilt, another kernel or
QEMU: the image half of the key differs) are removed then. ``--cold`` boots and takes none.

A boot snapshot is an ordinary snapshot with a ``boot_key`` (``snapshot list`` shows it as
``boot``; ``snapshot rm`` removes it, and the next create of that image and size makes a
new one). Removing an image removes its boot snapshots; a failure to take one is
reported on the create's progress and never fails the create.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from banger.agent import wire
from banger.api import VMSpec
from banger.daemon import kernels, snapshots, vmpool
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, SnapshotRecord, VMRecord
from banger.errors import AlreadyExists, BadRequest, BangerError
from banger.protocol import __version__

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.snapshots")

PREFIX = "boot-"


def key(d: Daemon, img: ImageRecord, vmm: str, spec: VMSpec) -> str | None:
    """``<start>.<size>``: what a boot snapshot for this VM must have been booted from,
    or None when such a VM gets none (the option off, a VMM that cannot clone, disks a
    clone cannot use).

    Raises:
        BangerError: the image's boot files or the VMM's version cannot be read.
    """
    if not d.cfg.boot_snapshots or spec.extra_disks or (
            d.cow is not None and d.cow.name == "dmsnap"):
        return None
    try:
        d.driver(vmm).check_clonable()
    except BadRequest:
        return None
    boot = kernels.boot_files(d, img, vmm)
    drv = d.driver(vmm)
    start = {
        "banger": __version__, "vmm": vmm, "vmm_version": drv.version(),
        # Boot snapshots from before the agent are remade with it.
        "agent": wire.PROTOCOL if drv.agent_port else None,
        "image": img.name, "image_created": img.created_at.isoformat(),
        "files": [_file_id(Path(p)) for p in (img.rootfs, boot.kernel, boot.initrd) if p],
    }
    size = [spec.vcpu, spec.memory_mib, spec.disk_size, spec.work_disk_size]
    return f"{_digest(start)}.{_digest(size)}"


def _file_id(path: Path) -> list[object]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ino]


def _digest(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def name_for(boot_key: str) -> str:
    """The boot snapshot's name: a DNS label of 30 characters."""
    return PREFIX + boot_key.replace(".", "-")


def find(d: Daemon, boot_key: str) -> SnapshotRecord | None:
    """The boot snapshot made for ``boot_key``, if there is one."""
    snap = d.db.find_snapshot(name_for(boot_key))
    return snap if snap is not None and snap.boot_key == boot_key else None


def take(d: Daemon, vm: VMRecord, boot_key: str, op: Operation) -> None:
    """Snapshot a VM just booted for the first time as its boot snapshot, then remove
    the image's boot snapshots from another start. Never raises: a VM is created whether
    or not its boot could be kept (the reason goes on ``op``'s progress and the log)."""
    name = name_for(boot_key)
    settle(d, vm, op)
    inner = Operation(kind="vm.snapshot", target=vm.name,
                      stages=list(snapshots.SNAPSHOT_STAGES), cancellable=False)
    try:
        claimed = snapshots.claim(d, vm)
        snapshots.take_claimed(d, claimed, name, inner, boot_key=boot_key)
    except AlreadyExists:
        return  # another create of the same image and size kept its boot first
    except BangerError as exc:
        log.warning("vm %s: boot not kept as a snapshot: %s", vm.name, exc.message)
        op.report(f"boot not kept for later VMs: {exc.message}")
        return
    d.pool_wanted.set()  # the pool fills from it
    start = boot_key.split(".", 1)[0]
    for snap in d.db.list_snapshots():
        if snap.image == vm.image and snap.boot_key and not snap.boot_key.startswith(start):
            forget(d, snap, "its image, kernel or VMM changed")


SETTLE_S = 120  # the guest's own bound on the end of its boot
SETTLE_UDEV_S = 30  # ... and on udev's queue after it


def settle(d: Daemon, vm: VMRecord, op: Operation) -> None:
    """Wait, bounded, for the end of the guest's boot: systemd's start-up jobs done
    (``systemctl is-system-running --wait``) and udev's queue empty (``udevadm
    settle``). SSH answers well before that (sshd starts early, issue 12), and a
    snapshot taken then would make every clone finish the boot while it wakes up.
    Never raises: a guest that does not settle (or has neither tool) is snapshotted as
    it is, with the reason logged."""
    op.report("waiting for the boot to end")
    script = (f"timeout {SETTLE_S} systemctl is-system-running --wait >/dev/null 2>&1; "
              f"udevadm settle --timeout={SETTLE_UDEV_S} >/dev/null 2>&1; true")
    try:
        d.dial(vm.id, vm.ip).run(script, timeout=SETTLE_S + SETTLE_UDEV_S + 30,
                                 desc="wait for the end of the boot")
    except BangerError as exc:
        log.warning("vm %s: boot kept before it ended: %s", vm.name, exc.message)


def forget(d: Daemon, snap: SnapshotRecord, why: str) -> None:
    """Remove a boot snapshot (a failure is logged: the start-up sweep retries)."""
    d.pool_wanted.set()  # its clones in the pool go too
    try:
        snapshots.remove(d, snap.id)
        log.info("boot snapshot %s removed: %s", snap.name, why)
    except BangerError as exc:
        log.warning("boot snapshot %s: %s", snap.name, exc.message)


def forget_image(d: Daemon, image: str) -> None:
    """Remove every boot snapshot of ``image`` and the pool's clones of them (it is
    being removed)."""
    vmpool.drain(d, lambda vm: vm.image == image, f"image {image!r} is removed")
    for snap in d.db.list_snapshots():
        if snap.image == image and snap.boot_key:
            forget(d, snap, f"image {image!r} is removed")
