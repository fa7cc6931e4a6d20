"""Boot snapshots through the daemon's real create path, with the fake VMM and guest:
an image's first boot is kept, later VMs of that image and size are its clones, and a
change of image, kernel, VMM or size is a new start. The real thing runs in
tests/e2e/test_snapshots.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.api import VMState
from banger.api.params import CreateParams
from banger.daemon import bootsnap, images, snapshots, vmcreate, vmdelete, vms
from banger.daemon.core import Daemon
from banger.daemon.opstate import Operation
from banger.errors import BangerError, InvalidState
from banger.runner import Result
from tests.conftest import FakeWorld


def fake_mkfs(argv: list[str]) -> Result:
    """mkfs.ext4 -d SEED TARGET SIZE: a stand-in work disk file (a snapshot copies it)."""
    Path(argv[-2]).write_bytes(b"work disk")
    return Result(argv, 0, b"", b"")


@pytest.fixture
def warm(daemon: Daemon, world: FakeWorld) -> Iterator[Daemon]:
    daemon.cfg = daemon.cfg.model_copy(update={"boot_snapshots": True})
    world.runner.on(("mkfs.ext4",), fake_mkfs)
    yield daemon


def make(d: Daemon, name: str, **kw: object) -> Operation:
    op = vmcreate.begin_create(d, CreateParams(name=name, **kw))  # type: ignore[arg-type]
    with contextlib.suppress(BangerError):
        vms.wait_op(op)
    return op


def boot_snaps(d: Daemon) -> list[dict[str, object]]:
    return [s for s in snapshots.list_snapshots(d) if s["kind"] == "boot"]


def test_the_first_boot_is_kept_and_the_next_vm_is_its_clone(warm: Daemon,
                                                              world: FakeWorld) -> None:
    first = make(warm, "first")
    assert first.stages[-1] == "snapshot"
    (snap,) = boot_snaps(warm)
    assert snap["source_vm"] == "first" and str(snap["name"]).startswith("boot-")
    # kept once the boot had ended, not as soon as SSH answered
    first_ip = vms.resolve(warm, "first").ip
    assert any("systemctl is-system-running --wait" in sc and "udevadm settle" in sc
               for sc in world.dial(first_ip).scripts)
    assert vms.resolve(warm, "first").state == VMState.RUNNING
    second = make(warm, "second")
    assert second.stages == vmcreate.CLONE_STAGES
    vm = vms.resolve(warm, "second")
    assert vm.runtime.from_snapshot == snap["name"] and vm.state == VMState.RUNNING
    assert ("reidentify", vm.id) in world.vmm.calls
    assert len(boot_snaps(warm)) == 1  # a clone keeps nothing more


def test_cold_no_start_and_the_option_off_boot_and_keep_nothing(warm: Daemon) -> None:
    assert "snapshot" not in make(warm, "cold", cold=True).stages
    make(warm, "later", start=False)
    assert boot_snaps(warm) == []
    warm.cfg = warm.cfg.model_copy(update={"boot_snapshots": False})
    assert "snapshot" not in make(warm, "off").stages
    assert boot_snaps(warm) == []


def test_another_size_is_another_start(warm: Daemon) -> None:
    make(warm, "small", memory_mib=256)
    make(warm, "big", memory_mib=512)
    assert sorted(s["memory_mib"] for s in boot_snaps(warm)) == [256, 512]
    assert vms.resolve(warm, "big").runtime.from_snapshot is None


def test_a_changed_image_or_vmm_replaces_the_old_boot(warm: Daemon, world: FakeWorld
                                                     ) -> None:
    make(warm, "a")
    (old,) = boot_snaps(warm)
    rootfs = warm.db.get_image("debian-bookworm").rootfs
    os.utime(rootfs, ns=(1, 1))  # the image file is not the one that was booted
    assert make(warm, "b").stages[-1] == "snapshot"  # booted, not cloned
    (new,) = boot_snaps(warm)
    assert new["name"] != old["name"]
    assert not warm.layout.snapshot(str(old["id"])).dir.exists()
    world.vmm.vmm_version = "fake VMM 2.0"
    assert make(warm, "c").stages[-1] == "snapshot"
    assert [s["name"] for s in boot_snaps(warm)] != [new["name"]]


def test_a_failed_boot_snapshot_does_not_fail_the_create(warm: Daemon, world: FakeWorld
                                                        ) -> None:
    world.vmm.fail_save = True
    op = make(warm, "a")
    assert op.error is None and "boot not kept" in op.progress
    assert vms.resolve(warm, "a").state == VMState.RUNNING
    assert boot_snaps(warm) == []


def test_removing_the_image_removes_its_boot_snapshots(warm: Daemon) -> None:
    make(warm, "a")
    (snap,) = boot_snaps(warm)
    with pytest.raises(InvalidState):  # a VM uses it
        images.delete(warm, "debian-bookworm")
    assert len(boot_snaps(warm)) == 1
    for vm in vms.list_vms(warm):
        vmdelete.delete(warm, vm["name"])
    images.delete(warm, "debian-bookworm")
    assert snapshots.list_snapshots(warm) == []
    assert not warm.layout.snapshot(str(snap["id"])).dir.exists()


def test_no_boot_snapshot_for_a_vmm_without_clones(warm: Daemon, world: FakeWorld) -> None:
    img = warm.db.get_image("debian-bookworm")
    spec = vms.resolve(warm, make(warm, "a").target).spec
    assert bootsnap.key(warm, img, "qemu", spec) is not None
    world.vmm.unclonable = True  # as an unjailed Firecracker
    assert bootsnap.key(warm, img, "qemu", spec) is None
