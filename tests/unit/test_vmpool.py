"""The pool of ready clones (vmpool, vmpoolfill) through the daemon's real create path,
with the fake VMM and guest: filled from the image's boot snapshot within its memory
budget, taken by a create of that image and size, kept out of every user's view, and
emptied when its snapshot or image goes or the daemon stops. The real thing runs in
tests/e2e/test_snapshots.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from banger.api import VMSpec, VMState
from banger.cli.output import daemon_status, vm_detail
from banger.daemon import caps, images, reconcile, snapshots, vmcreate, vmdelete, vmpool, vms
from banger.daemon.core import Daemon
from banger.daemon.vmpoolfill import PoolFiller
from banger.daemon.vmruntime import VMRuntime
from banger.errors import NotFound
from tests.conftest import FakeWorld
from tests.unit.test_bootsnap import fake_mkfs, make

IMAGE = "debian-bookworm"


@pytest.fixture
def pooled(daemon: Daemon, world: FakeWorld) -> Iterator[Daemon]:
    daemon.cfg = daemon.cfg.model_copy(update={
        "boot_snapshots": True, "pool_size": {IMAGE: 2}, "pool_memory_mib": 4096})
    world.runner.on(("mkfs.ext4",), fake_mkfs)
    yield daemon


def members(d: Daemon) -> list[vms.VMRecord]:
    return vmpool.members(d)


def test_no_boot_snapshot_no_pool(pooled: Daemon, world: FakeWorld) -> None:
    PoolFiller(pooled).fill()
    assert members(pooled) == [] and world.vmm.launched == []


def test_the_pool_fills_from_the_boot_snapshot_and_stays_out_of_sight(
        pooled: Daemon, world: FakeWorld) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    ready = members(pooled)
    assert [m.state for m in ready] == [VMState.POOLED] * 2
    (snap,) = [s for s in snapshots.list_snapshots(pooled) if s["kind"] == "boot"]
    for m in ready:
        assert m.runtime.from_snapshot == snap["name"]
        assert m.name.startswith(vmpool.NAME_PREFIX)
        # restored, given an identity of its own, run until SSH answered, paused
        calls = [c for c, vm_id in world.vmm.calls if vm_id == m.id]
        assert calls == ["restore", "reidentify", "resume", "pause"]
        with pytest.raises(NotFound):
            vms.resolve(pooled, m.name)
        assert m.ip not in pooled.layout.ssh_config.read_text()
    assert [v["name"] for v in vms.list_vms(pooled)] == ["first"]
    assert len({m.ip for m in ready} | {vms.resolve(pooled, "first").ip}) == 3
    status = vmpool.status(pooled)
    assert status["images"][IMAGE] == {"size": 2, "ready": 2, "filling": 0}
    PoolFiller(pooled).fill()  # full: nothing more
    assert len(members(pooled)) == 2


def test_the_memory_budget_bounds_the_pool(pooled: Daemon) -> None:
    pooled.cfg = pooled.cfg.model_copy(update={"pool_memory_mib": 1024})  # one 1 GiB VM
    make(pooled, "first")
    PoolFiller(pooled).fill()
    assert len(members(pooled)) == 1


def test_a_create_takes_a_ready_clone_with_its_own_name_and_egress(
        pooled: Daemon, world: FakeWorld) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    oldest = members(pooled)[0]
    pooled.pool_wanted.clear()
    launched = len(world.vmm.launched)
    op = make(pooled, "taken", allow_out=["1.1.1.1/32"])
    assert op.stages == vmcreate.POOL_STAGES and op.error is None
    vm = vms.resolve(pooled, "taken")
    assert vm.id == oldest.id and vm.ip == oldest.ip and vm.state == VMState.RUNNING
    assert not vm.in_pool and vm.runtime.from_pool is True
    assert vm.spec.nat and vm.spec.allow_out == ["1.1.1.1/32"]
    assert len(world.vmm.launched) == launched  # woken, not launched
    assert world.vmm.calls[-1] == ("resume", vm.id)
    (named,) = [s for s in world.dial(vm.ip).scripts if "h=taken" in s]
    assert "date -u -s @" in named and "/etc/hosts" in named
    rule = pooled.firewall.admitted()[vms.handles_of(pooled, vm).tap or ""]
    assert rule.nat and rule.ip == vm.ip
    assert "taken" in pooled.layout.ssh_config.read_text()
    assert pooled.pool_wanted.is_set()  # refilled behind it
    assert vms.view(pooled, vm)["from_pool"] is True
    assert len(members(pooled)) == 1


def test_only_the_same_image_and_size_take_from_the_pool(pooled: Daemon) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    for name, kw in (("cold", {"cold": True}), ("big", {"memory_mib": 512}),
                     ("idle", {"start": False})):
        make(pooled, name, **kw)
        assert not vms.resolve(pooled, name).runtime.from_pool, name
    assert len(members(pooled)) == 2


def test_a_clone_whose_vmm_died_is_never_taken_and_is_removed(
        pooled: Daemon, world: FakeWorld) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    dead, alive = members(pooled)
    proc = next(p for p, plan in zip(world.vmm.procs, world.vmm.launched, strict=True)
                if plan.vm_id == dead.id)
    proc.kill()
    proc.wait()
    make(pooled, "taken")
    assert vms.resolve(pooled, "taken").id == alive.id
    PoolFiller(pooled).fill()
    assert dead.id not in {m.id for m in members(pooled)}
    assert pooled.db.find_vm(dead.id) is None


def test_a_forgotten_boot_snapshot_or_image_empties_its_pool(pooled: Daemon) -> None:
    make(pooled, "first")
    filler = PoolFiller(pooled)
    filler.fill()
    (snap,) = [s for s in snapshots.list_snapshots(pooled) if s["kind"] == "boot"]
    snapshots.remove(pooled, str(snap["name"]))
    filler.fill()
    assert members(pooled) == []  # and none made: no boot snapshot to make them from
    make(pooled, "second")  # boots again, keeps its boot again
    filler.fill()
    assert len(members(pooled)) == 2
    for name in ("first", "second"):
        vmdelete.delete(pooled, name)
    images.delete(pooled, IMAGE)
    assert members(pooled) == [] and pooled.db.list_vms() == []


def test_a_failed_clone_leaves_nothing_and_waits_before_trying_again(
        pooled: Daemon, world: FakeWorld) -> None:
    make(pooled, "first")
    world.vmm.fail = True
    filler = PoolFiller(pooled)
    filler.fill()
    assert members(pooled) == [] and [v.name for v in pooled.db.list_vms()] == ["first"]
    world.vmm.fail = False
    filler.fill()  # within RETRY_S of the failure: left alone
    assert members(pooled) == []


def failed_removal(d: Daemon, vm: vms.VMRecord) -> None:
    """``vm`` as a removal that failed leaves it: in ``error``, still the pool's."""
    vms.transition(d, vm.id, VMState.DELETING, expect={VMState.POOLED})
    vms.transition(d, vm.id, VMState.ERROR, expect={VMState.DELETING})


def test_a_member_whose_removal_failed_goes_at_the_next_pass_or_start(
        pooled: Daemon) -> None:
    make(pooled, "first")
    filler = PoolFiller(pooled)
    filler.fill()
    one, two = members(pooled)
    failed_removal(pooled, one)
    filler.fill()  # removed, and the pool made whole again
    assert one.id not in {m.id for m in members(pooled)} and len(members(pooled)) == 2
    failed_removal(pooled, two)
    reconcile.reconcile_vm(pooled, pooled.db.get_vm(two.id))
    assert pooled.db.find_vm(two.id) is None


def test_a_stopping_daemon_removes_its_pool(pooled: Daemon, world: FakeWorld) -> None:
    make(pooled, "first")
    filler = PoolFiller(pooled)
    filler.fill()
    filler.stop()
    assert members(pooled) == [] and vms.resolve(pooled, "first").state == VMState.RUNNING


def test_adopt_pooled_succeeds_once(pooled: Daemon) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    m = members(pooled)[0]
    spec = VMSpec.model_validate({**m.spec.model_dump(), "nat": True})
    assert pooled.db.adopt_pooled(m, "one", spec, VMRuntime(cow=m.runtime.cow)) is not None
    assert pooled.db.adopt_pooled(m, "two", spec, VMRuntime()) is None
    assert pooled.db.get_vm(m.id).name == "one"


def test_the_ssh_config_skips_the_pool(pooled: Daemon) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    caps.write_ssh_config(pooled)
    text = pooled.layout.ssh_config.read_text()
    assert "Host first.vm" in text and vmpool.NAME_PREFIX not in text


def test_vm_show_and_daemon_status_say_so(pooled: Daemon) -> None:
    make(pooled, "first")
    PoolFiller(pooled).fill()
    make(pooled, "taken")
    shown = vm_detail(vms.view(pooled, vms.resolve(pooled, "taken")))
    assert "(taken ready from the pool)" in shown
    assert "from the pool" not in vm_detail(vms.view(pooled, vms.resolve(pooled, "first")))
    status = {**pooled.status(), "vm_pool": vmpool.status(pooled)}
    assert "pool" in daemon_status(status) and "1 of 2 ready" in daemon_status(status)
