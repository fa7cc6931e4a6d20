"""vm pause / resume / suspend through the daemon's real code paths, fake VMM and guest.

The real QEMU save and restore (migration to a file, ``-incoming``) run in
tests/e2e/test_suspend.py; here: the states, what is released and kept, the order of
deleting the saved state and running the guest, failures, and daemon restarts at
each step (``reconcile``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from banger.api import VMState
from banger.api.params import CreateParams, EgressParams
from banger.daemon import (
    forwards,
    reconcile,
    savedstate,
    vmcreate,
    vmdelete,
    vmegress,
    vmpower,
    vms,
    vmsuspend,
)
from banger.daemon.core import Daemon
from banger.daemon.store import VMRecord
from banger.errors import InvalidState, NotRunning, VMMError
from banger.proc import matches
from tests.conftest import FakeWorld
from tests.unit.test_forwards import free_port


def make(d: Daemon, name: str = "s", **kw: object) -> VMRecord:
    vmcreate.create_sync(d, CreateParams(name=name, **kw))  # type: ignore[arg-type]
    return vms.resolve(d, name)


def wait_dead(pid_ident: object) -> None:
    for _ in range(200):
        if not matches(pid_ident):  # type: ignore[arg-type]
            return
        time.sleep(0.02)
    raise AssertionError("process still alive")


def test_pause_and_resume_hold_the_vmm_and_refuse_guest_work(daemon: Daemon,
                                                            world: FakeWorld) -> None:
    vm = make(daemon)
    pid = daemon.handles.get(vm.id).process.pid  # type: ignore[union-attr]
    paused = vmsuspend.pause(daemon, "s")
    assert paused["state"] == "paused" and paused["pid"] == pid
    assert world.vmm.calls == [("pause", vm.id)]
    assert vmsuspend.pause(daemon, "s")["state"] == "paused"  # again: no error, no call
    assert world.vmm.calls == [("pause", vm.id)]
    with pytest.raises(NotRunning) as exc:
        vms.ssh_info(daemon, "s")
    assert "banger vm resume s" in exc.value.hint
    with pytest.raises(InvalidState):
        vmpower.start(daemon, "s")
    resumed = vmsuspend.resume(daemon, "s")
    assert resumed["state"] == "running" and resumed["pid"] == pid
    assert world.vmm.calls[-1] == ("resume", vm.id)
    assert vms.ssh_info(daemon, "s")["ip"] == vm.ip


def test_a_refused_pause_leaves_the_vm_running(daemon: Daemon, world: FakeWorld) -> None:
    make(daemon)
    world.vmm.fail_pause = True
    with pytest.raises(VMMError):
        vmsuspend.pause(daemon, "s")
    assert vms.resolve(daemon, "s").state == VMState.RUNNING


def test_pause_of_a_stopped_vm_is_refused(daemon: Daemon) -> None:
    make(daemon, start=False)
    with pytest.raises(NotRunning):
        vmsuspend.pause(daemon, "s")
    with pytest.raises(InvalidState):
        vmsuspend.resume(daemon, "s")


def test_stop_of_a_paused_vm_runs_it_first_for_a_clean_poweroff(daemon: Daemon,
                                                               world: FakeWorld) -> None:
    vm = make(daemon)
    vmsuspend.pause(daemon, "s")
    stopped = vmpower.stop(daemon, "s")
    assert stopped["state"] == "stopped"
    assert world.vmm.calls == [("pause", vm.id), ("resume", vm.id)]
    assert any("poweroff" in s for s in world.guests[vm.ip].scripts)
    assert vms.resolve(daemon, "s").runtime.paused is None


def test_suspend_saves_releases_and_start_restores_in_order(daemon: Daemon,
                                                           world: FakeWorld) -> None:
    port = free_port()
    vm = make(daemon, forwards=[f"{port}:80"])
    extra = free_port()
    forwards.add(daemon, "s", f"{extra}:8080")
    h = daemon.handles.get(vm.id)
    assert h is not None and h.process is not None and h.tap
    booted_at = vms.resolve(daemon, "s").runtime.booted_at
    paths = daemon.layout.vm(vm.id)

    res = vmsuspend.suspend(daemon, "s")
    assert res["state"] == "suspended" and res["pid"] is None and res["tap"] is None
    assert res["suspended"]["bytes"] == (paths.saved_state / "memory").stat().st_size
    assert res["suspended"]["vmm"] == "qemu"
    wait_dead(h.process)
    assert h.tap not in daemon.tap_pool.owned() or h.tap in world.net.taps()
    assert not paths.saved_partial.exists()
    assert daemon.forwards.opened(vm.id) == []
    row = vms.resolve(daemon, "s")
    assert len(row.runtime.forwards) == 1  # the run-time forward is remembered
    with pytest.raises(NotRunning) as exc:
        vms.ssh_info(daemon, "s")
    assert "banger vm start s" in exc.value.hint
    # stop and restart would throw the saved processes away: refused with a hint
    for act in (vmpower.stop, vmpower.restart):
        with pytest.raises(InvalidState) as refused:
            act(daemon, "s")
        assert "vm start" in refused.value.hint
    with pytest.raises(InvalidState):
        vmsuspend.resume(daemon, "s")

    world.vmm.calls.clear()
    op = vmpower.begin_start(daemon, "s")
    assert op.stages == ["network", "restore", "wait-ssh"]
    started = vms.wait_op(op)
    assert started["state"] == "running" and started["suspended"] is None
    plan = world.vmm.launched[-1]
    assert plan.restore == paths.saved_state
    # loaded, then the saved state deleted, then the vCPUs run (see savedstate.consume)
    assert world.vmm.calls == [("restore", vm.id), ("resume", vm.id)]
    assert not paths.saved_state.exists()
    guest = world.guests[vm.ip]
    assert any(s.startswith("date -u -s @") for s in guest.scripts)
    row = vms.resolve(daemon, "s")
    assert row.runtime.booted_at == booted_at and row.runtime.suspended is None
    assert sorted(str(s) for s in daemon.forwards.opened(vm.id)) == sorted(
        f"127.0.0.1:{p}:{g}" for p, g in ((port, 80), (extra, 8080)))
    # the next stop and start are a plain boot again
    vmpower.stop(daemon, "s")
    vmpower.start(daemon, "s")
    assert world.vmm.launched[-1].restore is None


def test_suspend_of_a_paused_vm_and_a_failed_save_leave_it_as_it_was(
        daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    pid = daemon.handles.get(vm.id).process.pid  # type: ignore[union-attr]
    vmsuspend.pause(daemon, "s")
    world.vmm.fail_save = True
    with pytest.raises(VMMError):
        vmsuspend.suspend(daemon, "s")
    row = vms.resolve(daemon, "s")
    paths = daemon.layout.vm(vm.id)
    assert row.state == VMState.PAUSED and "suspend failed" in row.runtime.last_error
    assert not paths.saved_partial.exists() and not paths.saved_state.exists()
    assert vms.view(daemon, row)["pid"] == pid
    assert ("resume", vm.id) not in world.vmm.calls  # it was paused: it stays paused

    vmsuspend.resume(daemon, "s")
    with pytest.raises(VMMError):
        vmsuspend.suspend(daemon, "s")
    assert vms.resolve(daemon, "s").state == VMState.RUNNING
    assert world.vmm.calls[-1] == ("resume", vm.id)

    world.vmm.fail_save = False
    assert vmsuspend.suspend(daemon, "s")["state"] == "suspended"


def test_a_failed_restore_keeps_the_saved_state(daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    vmsuspend.suspend(daemon, "s")
    world.vmm.fail = True
    with pytest.raises(VMMError):
        vmpower.start(daemon, "s")
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.SUSPENDED and "injected" in row.runtime.last_error
    assert savedstate.complete(daemon.layout.vm(vm.id)) is not None
    world.vmm.fail = False
    assert vmpower.start(daemon, "s")["state"] == "running"


def test_delete_of_paused_and_suspended_vms(daemon: Daemon) -> None:
    a = make(daemon, "a")
    vmsuspend.pause(daemon, "a")
    b = make(daemon, "b")
    vmsuspend.suspend(daemon, "b")
    for vm in (a, b):
        vmdelete.delete(daemon, vm.name)
        assert daemon.db.find_vm(vm.name) is None
        assert not daemon.layout.vm(vm.id).state.exists()


def test_a_paused_vm_whose_vmm_dies_is_noticed(daemon: Daemon) -> None:
    vm = make(daemon)
    vmsuspend.pause(daemon, "s")
    h = daemon.handles.get(vm.id)
    assert h is not None and h.process is not None
    os.kill(h.process.pid, signal.SIGKILL)
    wait_dead(h.process)
    reconcile.reap_exited(daemon)
    assert vms.resolve(daemon, "s").state == VMState.STOPPED


# ------------------------------------------------------------------ daemon restarts


def test_restart_finds_a_paused_vm_paused(daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    vmsuspend.pause(daemon, "s")
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.PAUSED
    assert matches(daemon.handles.get(vm.id).process)  # type: ignore[union-attr, arg-type]


def _claim_suspend(d: Daemon, vm: VMRecord, was: VMState) -> None:
    """What a daemon killed mid-suspend leaves: the VM claimed ``suspending``."""
    with d.vm_locks.held(vm.id):
        row = d.db.get_vm(vm.id)
        d.db.update_vm(row, state=VMState.SUSPENDING,
                       runtime=row.runtime.merged(suspend_from=was.value))


def test_restart_mid_save_runs_the_guest_on_and_drops_the_half_save(
        daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    _claim_suspend(daemon, vm, VMState.RUNNING)
    paths = daemon.layout.vm(vm.id)
    paths.saved_partial.mkdir()
    (paths.saved_partial / "memory").write_bytes(b"half")
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.RUNNING and "interrupted" in row.runtime.last_error
    assert world.vmm.calls == [("resume", vm.id)]
    assert not paths.saved_partial.exists()


def test_restart_after_the_save_was_committed_finishes_the_suspend(
        daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    h = daemon.handles.get(vm.id)
    assert h is not None and h.process is not None
    _claim_suspend(daemon, vm, VMState.RUNNING)
    paths = daemon.layout.vm(vm.id)
    paths.saved_state.mkdir()
    (paths.saved_state / "memory").write_bytes(b"x" * 1000)
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.SUSPENDED and row.runtime.suspended["bytes"] == 1000
    wait_dead(h.process)
    assert vmpower.start(daemon, "s")["state"] == "running"
    assert world.vmm.launched[-1].restore == paths.saved_state


def test_restart_mid_save_with_the_vmm_gone_stops_the_vm(daemon: Daemon) -> None:
    vm = make(daemon)
    h = daemon.handles.get(vm.id)
    assert h is not None and h.process is not None
    _claim_suspend(daemon, vm, VMState.RUNNING)
    os.kill(h.process.pid, signal.SIGKILL)
    wait_dead(h.process)
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.STOPPED and "memory was lost" in row.runtime.last_error


def test_restart_mid_restore_before_the_load_keeps_it_suspended(daemon: Daemon,
                                                               world: FakeWorld) -> None:
    """The VMM is loading the saved state (still there) when the daemon dies: the
    VMM goes, and the VM is suspended still, its saved state intact."""
    vm = make(daemon)
    vmsuspend.suspend(daemon, "s")
    paths = daemon.layout.vm(vm.id)
    world.vmm.fail = True  # the start stops right after claiming: simulate the rest
    with pytest.raises(VMMError):
        vmpower.start(daemon, "s")
    world.vmm.fail = False
    with daemon.vm_locks.held(vm.id):
        row = daemon.db.get_vm(vm.id)
        daemon.db.update_vm(row, state=VMState.STARTING)
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.SUSPENDED
    assert savedstate.complete(paths) is not None


def test_a_suspended_vm_without_its_saved_state_is_stopped(daemon: Daemon) -> None:
    vm = make(daemon)
    vmsuspend.suspend(daemon, "s")
    savedstate.remove_tree(daemon.layout.vm(vm.id).saved_state)
    reconcile.reconcile_vm(daemon, vms.resolve(daemon, "s"))
    row = vms.resolve(daemon, "s")
    assert row.state == VMState.STOPPED and "missing" in row.runtime.stop_reason
    assert vmpower.start(daemon, "s")["state"] == "running"


def test_set_egress_applies_to_a_paused_vm_at_once_and_a_suspended_one_at_start(
        daemon: Daemon) -> None:
    make(daemon)
    vmsuspend.pause(daemon, "s")
    res = vmegress.set_egress(daemon, EgressParams(name="s", nat=True))
    assert res["applied"] is True and res["nat"] is True
    vmsuspend.suspend(daemon, "s")
    res = vmegress.set_egress(daemon, EgressParams(name="s", nat=False))
    assert res["applied"] is False
    assert vms.resolve(daemon, "s").spec.nat is False


def test_a_paused_vm_keeps_the_host_network_and_a_suspended_one_does_not(
        daemon: Daemon) -> None:
    make(daemon)
    vmsuspend.pause(daemon, "s")
    assert not daemon.host_idle()
    vmsuspend.suspend(daemon, "s")
    assert daemon.host_idle()
