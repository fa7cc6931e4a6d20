"""VM lifecycle through the daemon's real code paths, with fake VMM/network/guest seams."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from banger.api import VMState
from banger.api.params import CreateParams
from banger.daemon import vmcreate, vmdelete, vmpower, vms, vmteardown
from banger.daemon.core import Daemon
from banger.daemon.opstate import Operation
from banger.daemon.store import VMRecord
from banger.errors import AlreadyExists, BadName, InvalidState, NotFound, NotRunning, VMMError
from banger.proc import find_by_marker, matches
from banger.vmm import vm_marker
from tests.conftest import FakeWorld
from tests.fakes import instant_ssh, ssh_until_cancelled


def create(d: Daemon, **kw: object) -> dict[str, object]:
    return vmcreate.create_sync(d, CreateParams(**kw))  # type: ignore[arg-type]


def test_create_boots_and_records_handles(daemon: Daemon, world: FakeWorld) -> None:
    vm = create(daemon, name="alpha")
    assert vm["state"] == "running"
    assert vm["ip"] == "172.29.0.2"
    rec = daemon.db.find_vm("alpha")
    assert rec is not None
    h = daemon.handles.get(rec.id)
    assert h is not None and h.process is not None and matches(h.process)
    assert h.tap in world.net.taps()
    assert daemon.layout.vm(rec.id).handles.exists()
    # teardown identity mirrored onto the runtime record
    assert rec.runtime.teardown["tap"] == h.tap
    plan = world.vmm.launched[-1]
    assert "banger.ip=172.29.0.2/24" in plan.cmdline
    assert "banger.hostname=alpha" in plan.cmdline


def test_two_vms_get_different_ips_and_macs(daemon: Daemon) -> None:
    a = create(daemon, name="a1")
    b = create(daemon, name="b1")
    assert a["ip"] != b["ip"]
    assert a["mac"] != b["mac"]


def test_duplicate_and_bad_names_are_refused_without_leftovers(daemon: Daemon,
                                                               world: FakeWorld) -> None:
    create(daemon, name="dup")
    taps_before = set(world.net.taps())
    with pytest.raises(AlreadyExists):
        create(daemon, name="dup")
    with pytest.raises(BadName):
        create(daemon, name="Bad_Name")
    with pytest.raises(BadName):
        create(daemon, name="-lead")
    assert [v.name for v in daemon.db.list_vms()] == ["dup"]
    assert set(world.net.taps()) == taps_before
    assert len(os.listdir(daemon.layout.vms_dir)) == 1


def test_missing_image_is_not_found_with_hint(daemon: Daemon) -> None:
    with pytest.raises(NotFound) as exc:
        create(daemon, name="x", image="nope")
    assert "image register" in exc.value.hint
    assert daemon.db.list_vms() == []


def test_vmm_failure_rolls_back_everything(daemon: Daemon, world: FakeWorld) -> None:
    world.vmm.fail = True
    with pytest.raises(VMMError):
        create(daemon, name="broken")
    assert daemon.db.list_vms() == []
    assert world.net.taps() == [t for t in world.net.taps() if t in daemon.tap_pool.owned()]
    assert os.listdir(daemon.layout.vms_dir) == []
    assert os.listdir(daemon.layout.vms_run_dir) == []


def test_no_start_then_start_stop_delete(daemon: Daemon, world: FakeWorld) -> None:
    vm = create(daemon, name="cold", start=False)
    assert vm["state"] == "stopped"
    assert world.vmm.launched == []
    started = vmpower.start(daemon, "cold")
    assert started["state"] == "running" and started["pid"]
    pid = started["pid"]
    with pytest.raises(InvalidState):
        vmpower.start(daemon, "cold")
    stopped = vmpower.stop(daemon, "cold")
    assert stopped["state"] == "stopped"
    assert stopped["stop_reason"].startswith("stopped by")
    assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    with pytest.raises(NotRunning):
        vmpower.stop(daemon, "cold")
    # guest was asked to sync + power off over SSH first
    assert any("poweroff" in s for g in world.guests.values() for s in g.scripts)
    vmdelete.delete(daemon, "cold")
    assert daemon.db.find_vm("cold") is None
    with pytest.raises(NotFound):
        vms.show(daemon, "cold")


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_delete_running_vm_releases_tap_process_and_ip(daemon: Daemon, world: FakeWorld) -> None:
    vm = create(daemon, name="gone")
    rec = daemon.db.find_vm("gone")
    assert rec is not None
    h = daemon.handles.get(rec.id)
    assert h is not None and h.process is not None
    vmdelete.delete(daemon, "gone")
    assert not matches(h.process)
    assert h.tap not in world.net.taps()
    assert not daemon.layout.vm(rec.id).state.exists()
    again = create(daemon, name="next")
    assert again["ip"] == vm["ip"]  # the lease was released


def test_kill_marks_stopped_with_signal(daemon: Daemon) -> None:
    create(daemon, name="k")
    res = vmpower.kill(daemon, "k", "TERM")
    assert res["state"] == "stopped"
    assert "SIGTERM" in res["stop_reason"]


def test_vmm_exit_is_noticed(daemon: Daemon) -> None:
    from banger.daemon import reconcile

    create(daemon, name="exits")
    rec = daemon.db.find_vm("exits")
    assert rec is not None
    h = daemon.handles.get(rec.id)
    assert h is not None and h.process is not None
    os.kill(h.process.pid, signal.SIGKILL)
    for _ in range(100):
        if not matches(h.process):
            break
        time.sleep(0.02)
    reconcile.reap_exited(daemon)
    after = daemon.db.find_vm("exits")
    assert after is not None and after.state == VMState.STOPPED
    assert "powered off" in after.runtime.stop_reason


def test_restart_gets_a_new_process(daemon: Daemon) -> None:
    first = create(daemon, name="r")
    second = vmpower.restart(daemon, "r")
    assert second["state"] == "running"
    assert second["pid"] != first["pid"]


def test_list_and_show_views(daemon: Daemon) -> None:
    create(daemon, name="v1", vcpu=1, memory_mib=256)
    listed = vms.list_vms(daemon)
    assert [v["name"] for v in listed] == ["v1"]
    shown = vms.show(daemon, "v1")
    assert shown["spec"]["vcpu"] == 1 and shown["spec"]["memory_mib"] == 256
    assert shown["spec"]["disk_size"] == 64 << 20


def test_create_builds_a_missing_builtin_image_once(daemon: Daemon, world: FakeWorld) -> None:
    """vm create on a fresh install builds the default image first; parallel creates share
    that one build (the real build is debootstrap: covered by the e2e image fixture)."""
    from banger.daemon import images
    from banger.daemon.store import ImageRecord, now

    daemon.db.delete_image("debian-bookworm")
    builds: list[str] = []
    release = threading.Event()

    def fake_build(d: Daemon, recipe: object, op: Operation) -> dict[str, object]:
        builds.append(op.target)
        op.enter("debootstrap", "pretending")
        assert release.wait(10)
        img_dir = d.layout.image_dir("debian-bookworm")
        img_dir.mkdir(parents=True, exist_ok=True)
        rootfs = img_dir / "rootfs.ext4"
        with rootfs.open("wb") as fh:
            fh.truncate(32 << 20)
        (img_dir / "vmlinuz").write_bytes(b"k")
        d.db.add_image(ImageRecord("debian-bookworm", "built", str(rootfs),
                                   str(img_dir / "vmlinuz"), None, None, 1, "h", now()))
        return images.view(d.db.get_image("debian-bookworm"))

    daemon.seams.image_build = fake_build
    first = vmcreate.begin_create(daemon, CreateParams(name="one"))
    second = vmcreate.begin_create(daemon, CreateParams(name="two"))
    for _ in range(200):
        if "building image debian-bookworm" in first.progress:
            break
        time.sleep(0.01)
    assert "building image debian-bookworm: debootstrap" in first.progress
    release.set()
    assert first.wait(10) and second.wait(10)
    assert first.error is None and second.error is None
    assert builds == ["debian-bookworm"]  # one build, shared
    assert {v.name for v in daemon.db.list_vms()} == {"one", "two"}


@pytest.mark.parametrize("layout", ["key-link", "dir-link", "key-dir"])
def test_work_seed_symlinks_are_never_written_through(tmp_path: Path, layout: str) -> None:
    """An image's /root/.ssh may point anywhere on the host; banger (root) must not follow."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    seed = tmp_path / "seed"
    (seed / ".ssh").mkdir(parents=True)
    if layout == "key-link":
        (seed / ".ssh" / "authorized_keys").symlink_to(victim)
    elif layout == "dir-link":
        (seed / ".ssh").rmdir()
        (seed / ".ssh").symlink_to(victim_dir)
    else:
        (seed / ".ssh" / "authorized_keys").mkdir()
    vmcreate.write_ssh_file(seed, "authorized_keys", "ssh-ed25519 AAAA banger", 0o600)
    keys = seed / ".ssh" / "authorized_keys"
    assert not keys.is_symlink() and not (seed / ".ssh").is_symlink()
    assert keys.read_text() == "ssh-ed25519 AAAA banger\n"
    assert keys.stat().st_mode & 0o777 == 0o600
    assert victim.read_text() == "precious\n"
    assert list(victim_dir.iterdir()) == []


def test_concurrent_deletes_remove_once_without_errors(daemon: Daemon) -> None:
    create(daemon, name="twice")
    results: list[object] = []

    def go() -> None:
        try:
            results.append(vmdelete.delete(daemon, "twice"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ok = [r for r in results if isinstance(r, dict)]
    others = [r for r in results if not isinstance(r, dict)]
    assert ok and all(isinstance(r, NotFound | InvalidState) for r in others), others
    assert daemon.db.find_vm("twice") is None


def test_delete_waits_for_a_stop_in_progress(daemon: Daemon) -> None:
    create(daemon, name="busy")
    rec = daemon.db.find_vm("busy")
    assert rec is not None
    vms.transition(daemon, rec.id, VMState.STOPPING)  # as the exit watcher would
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(vmdelete.delete(daemon, "busy")))
    t.start()
    time.sleep(0.3)
    assert not done and daemon.db.find_vm("busy") is not None  # waiting, not racing
    h = daemon.handles.get(rec.id)
    vmpower.finish_stop(daemon, rec, "watcher", vmteardown.teardown(daemon, rec.id, h))
    t.join(10)
    assert done and daemon.db.find_vm("busy") is None


def test_kill_claims_the_vm_before_signalling(daemon: Daemon) -> None:
    create(daemon, name="k2")
    rec = daemon.db.find_vm("k2")
    assert rec is not None
    vms.transition(daemon, rec.id, VMState.STOPPING)  # a stop is under way
    res = vmpower.kill(daemon, "k2", "KILL")  # only signals; the stop owns the teardown
    assert res["state"] == "stopping"
    with pytest.raises(InvalidState):
        vms.transition(daemon, rec.id, VMState.STOPPING)  # no second claimant


def _failed_with_leftovers(d: Daemon, name: str) -> VMRecord:
    """A running VM moved to ``error`` as a stop whose cleanup failed leaves it: its VMM,
    TAP and disk are still there for the next start to clear."""
    create(d, name=name)
    rec = d.db.find_vm(name)
    assert rec is not None
    return d.db.update_vm(rec, state=VMState.ERROR,
                          runtime=rec.runtime.merged(last_error="tap: busy"))


def test_concurrent_starts_of_a_failed_vm_leave_one_intact_running_vm(
        daemon: Daemon, world: FakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both starts see the VM failed; the one that loses the claim must not tear down
    the VMM the winner just booted, and the winner clears the old leftovers."""
    rec = _failed_with_leftovers(daemon, "flaky")
    old = daemon.handles.get(rec.id)
    assert old is not None and old.process is not None
    in_ssh, release = threading.Event(), threading.Event()

    def gated_ssh(guest: object, **kw: Any) -> float:
        in_ssh.set()  # the first start has claimed the VM and launched its fresh VMM
        assert release.wait(10)
        return instant_ssh(guest, **kw)

    get_image = daemon.db.get_image

    def gated_get_image(name: str) -> object:
        # The second start has looked the VM up (still "error") and goes on only
        # once the first one has booted: the interleaving that lost the fresh VMM.
        if threading.current_thread().name == "second":
            assert in_ssh.wait(10)
        return get_image(name)

    daemon.seams.wait_for_ssh = gated_ssh
    monkeypatch.setattr(daemon.db, "get_image", gated_get_image)
    results: dict[str, object] = {}

    def go() -> None:
        try:
            results[threading.current_thread().name] = vmpower.start(daemon, "flaky")
        except Exception as exc:
            results[threading.current_thread().name] = exc

    threads = [threading.Thread(target=go, name=n) for n in ("second", "first")]
    for t in threads:
        t.start()
    threads[0].join(10)  # the second start ends while the first waits for SSH
    release.set()
    threads[1].join(10)
    assert isinstance(results["second"], InvalidState), results
    assert isinstance(results["first"], dict) and results["first"]["state"] == "running"
    assert daemon.db.get_vm(rec.id).state == VMState.RUNNING
    h = daemon.handles.get(rec.id)
    assert h is not None and h.process is not None and matches(h.process)
    assert h.process != old.process and not matches(old.process)  # leftovers were cleared
    assert h.tap in world.net.taps()
    assert daemon.db.get_vm(rec.id).runtime.teardown["tap"] == h.tap


def test_exit_watcher_leaves_a_vm_restarted_under_it_alone(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher saw the old VMM dead; a stop and start in between must not make it
    tear down the fresh one."""
    from banger.daemon import reconcile

    create(daemon, name="w")
    rec = daemon.db.find_vm("w")
    assert rec is not None
    old = daemon.handles.get(rec.id)
    assert old is not None and old.process is not None
    real_matches = reconcile.matches
    restarted: list[bool] = []

    def matches_then_restart(ident: object) -> bool:
        alive = real_matches(ident)  # type: ignore[arg-type]
        if ident == old.process and not restarted:
            restarted.append(True)
            vmpower.stop(daemon, "w")  # the old VMM is gone ...
            vmpower.start(daemon, "w")  # ... and a new one runs, before the watcher claims
            return False
        return alive

    monkeypatch.setattr(reconcile, "matches", matches_then_restart)
    reconcile.reap_exited(daemon)
    assert restarted
    after = daemon.db.get_vm(rec.id)
    assert after.state == VMState.RUNNING
    h = daemon.handles.get(rec.id)
    assert h is not None and h.process is not None and h.process != old.process
    assert real_matches(h.process)


def test_kill_tears_down_the_vmm_it_claimed_not_an_older_one(
        daemon: Daemon, world: FakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop and start between kill's first look and its claim: the fresh VMM's TAP
    must be released, not the old (gone) one's."""
    create(daemon, name="k3")
    rec = daemon.db.find_vm("k3")
    assert rec is not None
    old = daemon.handles.get(rec.id)
    assert old is not None and old.process is not None
    real_matches = vmpower.matches
    restarted: list[bool] = []

    def matches_after_restart(ident: object) -> bool:
        if ident == old.process and not restarted:
            restarted.append(True)
            vmpower.stop(daemon, "k3")
            vmpower.start(daemon, "k3")
            return True  # kill looked while the old VMM still ran
        return real_matches(ident)  # type: ignore[arg-type]

    monkeypatch.setattr(vmpower, "matches", matches_after_restart)
    res = vmpower.kill(daemon, "k3", "KILL")
    assert restarted and res["state"] == "stopped"
    leaked = set(world.net.taps()) - daemon.tap_pool.owned()
    assert leaked == set(), leaked
    assert not find_by_marker(vm_marker(rec.id))  # the fresh VMM is gone too


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every stage each kind of operation enters, in order."""
    seen: dict[str, list[str]] = {}
    enter = Operation.enter

    def spy(op: Operation, stage: str, progress: str = "") -> None:
        seen.setdefault(op.kind, []).append(stage)
        enter(op, stage, progress)

    monkeypatch.setattr(Operation, "enter", spy)
    return seen


def _finished(op: Operation) -> dict[str, Any]:
    assert op.wait(30) and op.error is None, op.error
    assert op.stage == "done"
    result: dict[str, Any] = op.result
    return result


def test_start_stop_restart_are_operations_with_named_stages(
        daemon: Daemon, stages: dict[str, list[str]]) -> None:
    create(daemon, name="s", start=False)
    op = vmpower.begin_start(daemon, "s")
    assert op.stages == ["network", "boot", "wait-ssh"]  # the boot stages create shows
    assert _finished(op)["state"] == "running"
    assert stages["vm.start"] == ["network", "boot", "wait-ssh"]

    op = vmpower.begin_stop(daemon, "s")
    assert op.stages == ["poweroff", "wait-poweroff", "teardown"]
    assert _finished(op)["state"] == "stopped"
    assert stages["vm.stop"] == ["poweroff", "wait-poweroff", "teardown"]

    first = _finished(vmpower.begin_start(daemon, "s"))
    op = vmpower.begin_restart(daemon, "s")
    assert op.stages == ["poweroff", "wait-poweroff", "teardown", "network", "boot", "wait-ssh"]
    again = _finished(op)
    assert again["state"] == "running" and again["pid"] != first["pid"]
    assert stages["vm.restart"] == op.stages
    assert {o.kind for o in daemon.power_ops.all()} == {"vm.start", "vm.stop", "vm.restart"}


def test_a_failed_vm_start_shows_its_cleanup_stage(daemon: Daemon,
                                                   stages: dict[str, list[str]]) -> None:
    _failed_with_leftovers(daemon, "f")
    op = vmpower.begin_start(daemon, "f")
    assert op.stages == ["cleanup", "network", "boot", "wait-ssh"]
    assert _finished(op)["state"] == "running"
    assert stages["vm.start"] == op.stages


def test_lifecycle_refusals_come_before_any_operation(daemon: Daemon) -> None:
    create(daemon, name="r1")
    with pytest.raises(InvalidState, match="already running"):
        vmpower.begin_start(daemon, "r1")
    vmpower.stop(daemon, "r1")
    with pytest.raises(NotRunning):
        vmpower.begin_stop(daemon, "r1")
    with pytest.raises(NotFound):
        vmpower.begin_restart(daemon, "ghost")
    assert [o.kind for o in daemon.power_ops.all()] == ["vm.stop"]  # the refused made none


def test_lifecycle_ops_over_rpc_and_a_stop_is_not_cancelled(daemon: Daemon) -> None:
    """``vm.<verb>.begin`` + ``.status`` long-poll + ``.cancel``, as the CLI drives them;
    the synchronous methods still answer."""
    create(daemon, name="rp")
    call = daemon.methods
    op = call["vm.stop.begin"]({"name": "rp"})
    assert op["kind"] == "vm.stop" and op["stages"] == vmpower.STOP_STAGES
    call["vm.stop.cancel"]({"id": op["id"]})  # refused: the stop goes on
    while not op["done"]:
        op = call["vm.stop.status"]({"id": op["id"], "wait_s": 5, "since": op["updated_at"]})
    assert op["error"] is None and op["result"]["state"] == "stopped"
    assert call["vm.start"]({"name": "rp"})["state"] == "running"
    assert call["vm.restart"]({"name": "rp"})["state"] == "running"
    assert call["vm.stop"]({"name": "rp"})["state"] == "stopped"


def test_cancelling_a_start_leaves_the_vm_stopped(daemon: Daemon) -> None:
    create(daemon, name="c", start=False)
    in_ssh = threading.Event()
    daemon.seams.wait_for_ssh = ssh_until_cancelled(in_ssh)
    op = daemon.methods["vm.start.begin"]({"name": "c"})
    assert in_ssh.wait(10)
    daemon.methods["vm.start.cancel"]({"id": op["id"]})
    done = daemon.power_ops.get(op["id"])
    assert done.wait(10) and done.stage == "cancelled"
    vm = daemon.db.find_vm("c")
    assert vm is not None and vm.state == VMState.STOPPED
    assert vm.runtime.stop_reason == "start failed"
    assert daemon.handles.get(vm.id) is None


def test_a_restart_never_cancels_another_calls_boot(daemon: Daemon) -> None:
    create(daemon, name="b", start=False)
    in_ssh, release = threading.Event(), threading.Event()

    def gated_ssh(guest: object, **kw: Any) -> float:
        in_ssh.set()
        assert release.wait(10)
        return instant_ssh(guest, **kw)

    daemon.seams.wait_for_ssh = gated_ssh
    starting = vmpower.begin_start(daemon, "b")
    assert in_ssh.wait(10)
    with pytest.raises(InvalidState, match="starting"):
        vmpower.begin_restart(daemon, "b")
    release.set()
    assert _finished(starting)["state"] == "running"


def test_a_cancel_racing_the_reservation_leaves_no_creating_row(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete cancels a create the instant its row exists, before the worker runs:
    the create still rolls back, rather than leaving a ``creating`` row and a token
    nobody ends (the delete would then wait for it in vain)."""
    real_add = daemon.db.add_vm

    def add_then_cancel(vm: VMRecord) -> None:
        real_add(vm)
        assert daemon.cancel_inflight(vm.id, "deleted by the user")  # what delete does

    monkeypatch.setattr(daemon.db, "add_vm", add_then_cancel)
    op = vmcreate.begin_create(daemon, CreateParams(name="racy", start=False))
    assert op.wait(30) and op.stage == "cancelled", op.view()
    assert daemon.db.find_vm("racy") is None
    assert daemon.host_idle()  # no token left behind
