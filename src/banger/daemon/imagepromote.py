"""``image promote VM NAME``: a stopped VM's disks and kernel become a new image.

The design's ``PromoteImage``. The VM's root disk is cloned (a reflink where the state
dir allows, else a sparse copy; a dm-snapshot disk is read through its snapshot, origin
and exceptions merged, into a sparse file) and so is its work disk, whose files become the new
image's work-seed: a VM made from the image starts with the promoted VM's ``/`` and
``/root``. The VM's own identity is taken out of the copy (its SSH host key and
machine-id), banger's guest agent is refreshed, and the kernel is the VM's image's
(its registry kernel, or its files copied). The VM is left as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import images, vms
from banger.daemon.dmsnap import CowHandle, clone_or_copy, copy_device
from banger.daemon.store import VMRecord
from banger.errors import HostError, InvalidState
from banger.fsutil import remove_tree
from banger.names import check_name

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.imagepromote")

# The VM's identity, removed from the promoted root disk (banger-init makes a new host
# key at first boot, systemd a new machine-id).
IDENTITY_FILES = ("/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub",
                  "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_rsa_key.pub",
                  "/etc/ssh/ssh_host_ecdsa_key", "/etc/ssh/ssh_host_ecdsa_key.pub")


def promote(d: Daemon, vm_ref: str, name: str) -> dict[str, Any]:
    """Make stopped VM ``vm_ref``'s disks and kernel the new image ``name``.

    ``vm_locks[id]`` is held while the disks are cloned, so the VM cannot start and
    change them mid-copy (instant with reflinks; a copy of the used blocks otherwise).

    Raises:
        BadRequest: a bad image name.
        NotFound: no such VM.
        InvalidState: the VM is not stopped.
        AlreadyExists: an image called ``name`` exists.
    """
    check_name(name, "image")
    vm = vms.resolve(d, vm_ref)
    images.refuse_taken(d, name, "promote under another name")
    staging = d.layout.staging_dir / f"promote-{name}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True, mode=0o700)
        work = staging / "work.ext4"
        with d.vm_locks.held(vm.id):
            vm = vms.resolve(d, vm.id)
            if vm.state != VMState.STOPPED:
                raise InvalidState(f"VM {vm.name} is {vm.state.value}; promote needs it stopped",
                                   hint=f"stop it first: banger vm stop {vm.name}")
            paths = d.layout.vm(vm.id)
            cow = vm.runtime.cow
            if cow and cow.get("strategy") == "dmsnap":
                how = read_snapshot(d, vm, CowHandle.from_json(cow), staging / "rootfs.ext4")
            else:
                how = clone_or_copy(paths.rootfs, staging / "rootfs.ext4")
            clone_or_copy(paths.work_disk, work)
        log.info("promote %s: root disk %s", vm.name, how)
        img = d.db.get_image(vm.image)  # an image a VM uses cannot be deleted
        if img.kernel_name is None:
            shutil.copy2(img.kernel, staging / "vmlinuz")
            if img.initrd:
                shutil.copy2(img.initrd, staging / "initrd.img")
        seed_from_work_disk(d, work, staging / "workseed")
        work.unlink()
        forget_identity(d, staging / "rootfs.ext4", staging)
        images.inject_guest_agent(d, staging / "rootfs.ext4", staging)
        return images.publish(d, name, staging, source="promoted", recipe_hash=None,
                              kernel_name=img.kernel_name,
                              origin=f"vm {vm.name} (image {img.name})")
    except BaseException:
        remove_tree(staging)
        raise


def read_snapshot(d: Daemon, vm: VMRecord, cow: CowHandle, dest: Path) -> str:
    """Stopped VM ``vm``'s dm-snapshot root disk (its image's rootfs plus the exception
    store) as the plain file ``dest``: the snapshot is set up as for a boot, read, and
    taken down again (the caller holds ``vm_locks[vm.id]``, so no start races it)."""
    strategy = d.cow_for(cow)
    active = strategy.activate(cow, Path(d.db.get_image(vm.image).rootfs), vm.id)
    try:
        fd = strategy.open_disk(active)
        try:
            copy_device(fd, dest)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HostError(f"cannot read VM {vm.name}'s dm-snapshot disk {active.disk}: "
                        f"{exc.strerror or exc}") from exc
    finally:
        strategy.deactivate(active)
    return "read through the dm-snapshot"


def seed_from_work_disk(d: Daemon, work: Path, dest: Path) -> None:
    """The work disk's files (debugfs rdump: no mount; special files are skipped) as
    a work-seed, without ``lost+found``; authorized_keys is rewritten per VM anyway."""
    dest.mkdir(mode=0o700)
    d.runner.run(["debugfs", "-R", f"rdump / {dest}", str(work)],
                 desc="read the work disk", timeout=600)
    lost = dest / "lost+found"
    if lost.is_dir() and not lost.is_symlink():
        remove_tree(lost)


def forget_identity(d: Daemon, rootfs: Path, staging: Path) -> None:
    """Remove the VM's SSH host keys and empty its machine-id in ext4 ``rootfs``."""
    empty = staging / "empty"
    empty.write_bytes(b"")
    script = staging / "identity.debugfs"
    lines = [f"rm {f}" for f in IDENTITY_FILES]
    lines += ["rm /etc/machine-id", f"write {empty} /etc/machine-id",
              "set_inode_field /etc/machine-id mode 0100444"]
    script.write_text("\n".join(lines) + "\n")
    # debugfs reports a missing file and goes on; the image stays consistent.
    d.runner.run(["debugfs", "-w", "-f", str(script), str(rootfs)],
                 desc="remove the VM's host key and machine-id", timeout=120)
    empty.unlink()
    script.unlink()
