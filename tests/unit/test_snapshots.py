"""vm snapshot / snapshot list+rm / vm create --from-snapshot through the daemon's real
code paths, with the fake VMM and guest.

The real thing (QEMU migration to a file, restored clones re-identified through the
identity channel and reached over SSH) runs in tests/e2e/test_snapshots.py; here: the
states, the files, what a clone is handed, refusals, failures and daemon restarts.
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from banger.agent import wire
from banger.api import VMState
from banger.api.params import CreateParams
from banger.daemon import (
    identity,
    reconcile,
    snapshots,
    vmcreate,
    vmdelete,
    vmpower,
    vms,
    vmsuspend,
)
from banger.daemon.core import Daemon
from banger.daemon.qemuproc import IDENT_PORT, QemuDriver, build_argv, launch_request
from banger.daemon.store import VMRecord
from banger.errors import (
    AlreadyExists,
    BadRequest,
    GuestError,
    InvalidState,
    NotFound,
    NotRunning,
    VMMError,
)
from banger.layout import VMPaths
from banger.vmm import LaunchPlan
from tests.conftest import FakeWorld


def make(d: Daemon, name: str = "src", **kw: object) -> VMRecord:
    vmcreate.create_sync(d, CreateParams(name=name, **kw))  # type: ignore[arg-type]
    vm = vms.resolve(d, name)
    work = d.layout.vm(vm.id).work_disk
    if not work.exists():  # the fake runner makes no file system
        work.write_bytes(b"work of " + name.encode())
    return vm


def clone(d: Daemon, name: str, snap: str = "snap", **kw: object) -> VMRecord:
    return make(d, name, from_snapshot=snap, **kw)


def fields(message: bytes) -> dict[str, str]:
    """name -> value; the private key's lines (several ``key=``) joined as the guest does."""
    lines = message.decode().splitlines()
    assert lines[-1] == "end"
    out: dict[str, str] = {}
    for line in lines[:-1]:
        name, value = line.split("=", 1)
        out[name] = out.get(name, "") + value + "\n" if name == "key" else value
    return out


def test_a_snapshot_copies_the_guest_and_leaves_it_running(daemon: Daemon,
                                                           world: FakeWorld) -> None:
    vm = make(daemon)
    paths = daemon.layout.vm(vm.id)
    paths.work_disk.write_bytes(b"work at the instant")
    snap = snapshots.take(daemon, "src", "snap")
    assert snap["name"] == "snap" and snap["source_vm"] == "src" and snap["vmm"] == "qemu"
    assert snap["vcpu"] == vm.spec.vcpu and snap["memory_mib"] == vm.spec.memory_mib
    assert world.vmm.calls == [("pause", vm.id), ("save", vm.id), ("resume", vm.id)]
    files = daemon.layout.snapshot(snap["id"])
    assert files.work_disk.read_bytes() == b"work at the instant"
    assert files.rootfs.read_bytes() == paths.rootfs.read_bytes()
    assert files.kernel.read_bytes() == b"kernel" and (files.dir / "memory").is_file()
    assert not files.partial.exists()
    assert vms.resolve(daemon, "src").state == VMState.RUNNING
    assert [s["name"] for s in snapshots.list_snapshots(daemon)] == ["snap"]
    # the guest was asked whether banger-ident waits, before anything was copied
    assert any(identity.GUEST_LISTENING in s for s in world.dial(vm.ip).scripts)
    paths.work_disk.write_bytes(b"moved on")  # the snapshot is a copy
    assert files.work_disk.read_bytes() == b"work at the instant"


def test_a_paused_vm_is_snapshotted_and_stays_paused(daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    vmsuspend.pause(daemon, "src")
    snapshots.take(daemon, "src", "snap")
    assert world.vmm.calls == [("pause", vm.id), ("pause", vm.id), ("save", vm.id)]
    assert vms.resolve(daemon, "src").state == VMState.PAUSED


def test_snapshot_refusals_change_nothing(daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    with pytest.raises(BadRequest):
        snapshots.take(daemon, "src", "Not_A_Label")
    snapshots.take(daemon, "src", "snap")
    with pytest.raises(AlreadyExists):
        snapshots.take(daemon, "src", "snap")
    with pytest.raises(NotFound):
        snapshots.take(daemon, "nope", "other")
    make(daemon, "off", start=False)
    with pytest.raises(NotRunning) as stopped:
        snapshots.take(daemon, "off", "other")
    assert "vm start off" in stopped.value.hint
    world.dial(vm.ip).failing.add(identity.GUEST_LISTENING)
    with pytest.raises(BadRequest) as no_listener:
        snapshots.take(daemon, "src", "other")
    assert "banger-ident" in no_listener.value.message
    assert [s["name"] for s in snapshots.list_snapshots(daemon)] == ["snap"]
    assert vms.resolve(daemon, "src").state == VMState.RUNNING
    assert list(daemon.layout.snapshots_dir.iterdir()) == [
        daemon.layout.snapshot(snapshots.list_snapshots(daemon)[0]["id"]).dir]


def test_unclonable_vms_are_refused(daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    world.vmm.unclonable = True
    with pytest.raises(BadRequest) as refused:
        snapshots.refuse_unclonable(daemon, vm)
    assert "cannot clone" in refused.value.message and refused.value.hint == "use another"
    world.vmm.unclonable = False
    for changed, words in (
            (dataclasses.replace(vm, runtime=vm.runtime.merged(cow={"strategy": "dmsnap"})),
             "device-mapper"),
            (dataclasses.replace(vm, runtime=vm.runtime.merged(ident_channel=None)),
             "identity channel")):
        with pytest.raises(BadRequest) as exc:
            snapshots.refuse_unclonable(daemon, changed)
        assert words in exc.value.message


def test_a_failed_save_leaves_no_snapshot_and_the_guest_running(daemon: Daemon,
                                                               world: FakeWorld) -> None:
    vm = make(daemon)
    world.vmm.fail_save = True
    with pytest.raises(VMMError):
        snapshots.take(daemon, "src", "snap")
    row = vms.resolve(daemon, "src")
    assert row.state == VMState.RUNNING and "snapshot failed" in row.runtime.last_error
    assert world.vmm.calls[-1] == ("resume", vm.id)
    assert snapshots.list_snapshots(daemon) == []
    assert not daemon.layout.snapshots_dir.exists() or \
        list(daemon.layout.snapshots_dir.iterdir()) == []


def test_a_clone_gets_the_snapshots_disks_and_its_own_identity(daemon: Daemon,
                                                               world: FakeWorld) -> None:
    src = make(daemon)
    daemon.layout.vm(src.id).work_disk.write_bytes(b"source work")
    snap = snapshots.take(daemon, "src", "snap")
    a = clone(daemon, "clone-a", nat=True)
    b = clone(daemon, "clone-b")
    files = daemon.layout.snapshot(snap["id"])
    for vm in (a, b):
        assert vm.state == VMState.RUNNING and vm.image == src.image
        assert vm.spec.vcpu == src.spec.vcpu and vm.spec.memory_mib == src.spec.memory_mib
        assert vm.runtime.from_snapshot == "snap"
        assert vms.view(daemon, vm)["from_snapshot"] == "snap"
        paths = daemon.layout.vm(vm.id)
        assert paths.work_disk.read_bytes() == b"source work"
        plan = next(p for p in world.vmm.launched if p.vm_id == vm.id)
        assert plan.restore == files.dir and plan.kernel == files.kernel
        assert plan.ident_channel and plan.mac == vm.mac
    assert a.spec.nat and not b.spec.nat  # a clone's network is its own
    # the identity was handed over before the vCPUs ran
    calls = [c for c in world.vmm.calls if c[1] == a.id]
    assert calls == [("restore", a.id), ("reidentify", a.id), ("resume", a.id)]
    fa, fb = (fields(world.vmm.identities[v.id]) for v in (a, b))
    assert fa["ip"].split("/")[0] == a.ip and fa["mac"] == a.mac and fa["host"] == "clone-a"
    assert fb["ip"].split("/")[0] == b.ip and fb["host"] == "clone-b"
    for key in ("ip", "mac", "host", "machine_id", "seed", "key", "pub", "gen"):
        assert fa[key] != fb[key], key
    known = daemon.layout.known_hosts.read_text().splitlines()
    assert f"{a.ip} {fa['pub']}" in known and f"{b.ip} {fb['pub']}" in known
    # a clone writes its own disks
    daemon.layout.vm(a.id).work_disk.write_bytes(b"a's own")
    assert daemon.layout.vm(b.id).work_disk.read_bytes() == b"source work"
    assert files.work_disk.read_bytes() == b"source work"


def test_clone_refusals(daemon: Daemon, world: FakeWorld) -> None:
    make(daemon, vcpu=1)
    snapshots.take(daemon, "src", "snap")
    with pytest.raises(BadRequest) as exc:
        clone(daemon, "c", vcpu=2)
    assert "--vcpu 2" in exc.value.message and "--vcpu" in exc.value.hint
    with pytest.raises(BadRequest):
        clone(daemon, "c", image="other")
    with pytest.raises(NotFound):
        clone(daemon, "c", snap="missing")
    world.vmm.vmm_version = "fake VMM 2.0"
    with pytest.raises(InvalidState) as old:
        clone(daemon, "c")
    assert "fake VMM 1.0" in old.value.message and "snapshot rm snap" in old.value.hint
    assert vms.list_vms(daemon)[0]["name"] == "src" and len(vms.list_vms(daemon)) == 1


def test_a_clone_whose_identity_cannot_be_handed_over_is_rolled_back(
        daemon: Daemon, world: FakeWorld) -> None:
    make(daemon)
    snapshots.take(daemon, "src", "snap")
    world.vmm.fail_reidentify = True
    with pytest.raises(VMMError):
        clone(daemon, "c")
    assert [v["name"] for v in vms.list_vms(daemon)] == ["src"]
    world.vmm.fail_reidentify = False
    assert clone(daemon, "c").state == VMState.RUNNING


def test_removing_a_snapshot_keeps_its_clones(daemon: Daemon) -> None:
    make(daemon)
    snap = snapshots.take(daemon, "src", "snap")
    c = clone(daemon, "c")
    assert snapshots.remove(daemon, "snap")["name"] == "snap"
    assert not daemon.layout.snapshot(snap["id"]).dir.exists()
    assert snapshots.list_snapshots(daemon) == []
    assert vms.resolve(daemon, "c").state == VMState.RUNNING
    assert vmpower.stop(daemon, "c")["state"] == "stopped"
    with pytest.raises(NotFound):
        snapshots.remove(daemon, "snap")
    del c


def test_an_image_with_snapshots_is_not_removed(daemon: Daemon) -> None:
    make(daemon)
    snapshots.take(daemon, "src", "snap")
    vmdelete.delete(daemon, "src")
    with pytest.raises(InvalidState) as exc:
        daemon.db.delete_image("debian-bookworm")
    assert "snap" in exc.value.message


def test_a_restart_mid_snapshot_runs_the_guest_on_and_drops_the_partial_copy(
        daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    with daemon.vm_locks.held(vm.id):
        row = daemon.db.get_vm(vm.id)
        daemon.db.update_vm(row, state=VMState.SNAPSHOTTING,
                            runtime=row.runtime.merged(snapshot_from="running"))
    partial = daemon.layout.snapshot("abc").partial
    partial.mkdir(parents=True)
    (partial / "memory").write_bytes(b"half")
    orphan = daemon.layout.snapshot("def").dir  # committed, but no row: never cloned
    orphan.mkdir()
    reconcile.reconcile(daemon)
    row = vms.resolve(daemon, "src")
    assert row.state == VMState.RUNNING and "interrupted" in row.runtime.last_error
    assert ("resume", vm.id) in world.vmm.calls
    assert not partial.exists() and not orphan.exists()


def test_a_snapshot_row_without_files_is_forgotten_at_start(daemon: Daemon) -> None:
    make(daemon)
    snap = snapshots.take(daemon, "src", "snap")
    files = daemon.layout.snapshot(snap["id"])
    for f in files.dir.iterdir():
        f.unlink()
    files.dir.rmdir()
    snapshots.sweep(daemon)
    assert snapshots.list_snapshots(daemon) == []


def suspend_as_an_older_banger(daemon: Daemon, vm: VMRecord, without: str) -> None:
    """Suspend ``vm``, then drop ``without`` from its saved state's record, as a banger
    from before that device wrote it."""
    vmsuspend.suspend(daemon, vm.name)
    with daemon.vm_locks.held(vm.id):
        row = daemon.db.get_vm(vm.id)
        saved = {k: v for k, v in row.runtime.suspended.items() if k != without}
        daemon.db.update_vm(row, runtime=row.runtime.merged(suspended=saved))


def test_a_suspended_guest_restores_with_the_devices_it_was_saved_with(
        daemon: Daemon, world: FakeWorld) -> None:
    vm = make(daemon)
    vmsuspend.suspend(daemon, "src")
    assert vms.resolve(daemon, "src").runtime.suspended["ident"] is True
    vmpower.start(daemon, "src")
    assert world.vmm.launched[-1].ident_channel
    # a guest saved by a banger without the channel is restored without it
    suspend_as_an_older_banger(daemon, vm, "ident")
    vmpower.start(daemon, "src")
    assert not world.vmm.launched[-1].ident_channel
    assert not vms.resolve(daemon, "src").runtime.ident_channel
    with pytest.raises(BadRequest):  # and cannot be snapshotted for clones
        snapshots.take(daemon, "src", "snap")


# ------------------------------------------------------------------ the channel itself


def ident(**kw: object) -> identity.Identity:
    base: dict[str, object] = dict(
        ip_cidr="172.30.0.5/24", gateway="172.30.0.1", mac="52:54:00:00:00:05",
        hostname="c", machine_id="ab" * 16, host_key="-----BEGIN-----\nxyz\n-----END-----\n",
        host_key_pub="ssh-ed25519 AAAA", seed=b"\x01" * 32, generation="g1")
    base.update(kw)
    return identity.Identity(**base)  # type: ignore[arg-type]


def test_the_identity_message_is_one_bounded_piece() -> None:
    msg = identity.encode(ident(), now=1234.5)
    got = fields(msg)
    assert got["time"] == "1234.500" and got["seed"] == "01" * 32 and got["ip"] == "172.30.0.5/24"
    assert got["key"] == "-----BEGIN-----\nxyz\n-----END-----\n"  # joined back whole
    assert len(msg) <= select.PIPE_BUF
    with pytest.raises(ValueError):
        identity.encode(ident(hostname="c\nip=1.2.3.4/8"))
    with pytest.raises(ValueError):
        identity.encode(ident(host_key_pub="x" * 5000))


def test_a_real_host_key_round_trips(tmp_path: Path) -> None:
    from banger.runner import SubprocessRunner

    private, public = identity.new_host_key(SubprocessRunner(), tmp_path / "scratch")
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.startswith("ssh-ed25519 ") and len(public.split()) == 2
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left behind
    known = tmp_path / "known_hosts"
    known.write_text("10.0.0.9 ssh-ed25519 OLD\n10.0.0.8 ssh-ed25519 KEEP\n")
    identity.trust_host_key(known, "10.0.0.9", public)
    assert known.read_text().splitlines() == ["10.0.0.8 ssh-ed25519 KEEP", f"10.0.0.9 {public}"]


def plan(tmp_path: Path, **kw: object) -> LaunchPlan:
    paths = VMPaths(tmp_path / "state", tmp_path / "run")
    base: dict[str, object] = dict(
        vm_id="v1", name="v", vcpu=1, memory_mib=512, kernel=tmp_path / "k", initrd=None,
        cmdline="console=ttyS0", rootfs="/r", work_disk="/w", tap="t0",
        mac="52:54:00:00:00:01", paths=paths)
    base.update(kw)
    return LaunchPlan(**base)  # type: ignore[arg-type]


def test_qemu_gets_the_identity_channel_unless_the_saved_guest_had_none(tmp_path: Path
                                                                        ) -> None:
    p = plan(tmp_path, vm_id="0123456789ab")
    argv = build_argv("qemu", p, "tcg")
    assert f"virtserialport,chardev=ident,name={IDENT_PORT}" in argv
    assert "pipe,id=ident,path=/proc/self/fd/{fd:ident}" in argv
    ident = launch_request(p, argv[1:], "tcg").files["ident"]
    assert (ident.path, ident.mode, ident.give) == (str(p.paths.ident_fifo), "rw", True)
    old = plan(tmp_path, vm_id="0123456789ab", ident_channel=False,
               restore=tmp_path / "saved")
    argv = build_argv("qemu", old, "tcg")
    assert not any("ident" in a for a in argv)
    assert "ident" not in launch_request(old, argv[1:], "tcg").files


def test_reidentify_writes_the_fifo_in_one_piece(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "state", tmp_path / "run")
    paths.run.mkdir(parents=True)
    drv = QemuDriver.__new__(QemuDriver)
    with pytest.raises(VMMError):  # no FIFO: a VM started without the channel
        drv.reidentify(paths, b"x")
    os.mkfifo(paths.ident_fifo)
    with pytest.raises(VMMError):  # a FIFO nobody reads: no VMM holds it
        drv.reidentify(paths, b"x")
    got: list[bytes] = []
    reader = os.open(paths.ident_fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        message = identity.encode(ident())
        drv.reidentify(paths, message)
        t = threading.Thread(target=lambda: got.append(os.read(reader, 65536)))
        t.start()
        t.join(5)
        assert got == [message]
        with pytest.raises(VMMError):
            drv.reidentify(paths, b"x" * (select.PIPE_BUF + 1))
    finally:
        os.close(reader)


def test_a_clone_that_never_reports_its_identity_applied_is_rolled_back(
        daemon: Daemon, world: FakeWorld) -> None:
    src = make(daemon)
    snapshots.take(daemon, "src", "snap")
    ip = vms.resolve(daemon, "src").ip
    for n in range(2, 10):  # whatever address the clone gets, its guest never reports
        world.dial(ip.rsplit(".", 1)[0] + f".{n}").failing.add(identity.GUEST_STATUS)
    with pytest.raises(GuestError) as exc:
        clone(daemon, "c")
    assert "ssh readiness probe" in exc.value.message
    assert [v["name"] for v in vms.list_vms(daemon)] == [src.name]


def test_firecracker_clones_only_jailed_vms_and_needs_their_vsock(tmp_path: Path) -> None:
    from banger.daemon.fcproc.driver import FirecrackerDriver

    drv = FirecrackerDriver.__new__(FirecrackerDriver)
    drv.jail = None
    with pytest.raises(BadRequest) as unjailed:
        drv.check_clonable()
    assert "jailed" in unjailed.value.message and "--vmm qemu" in unjailed.value.hint
    with pytest.raises(VMMError) as no_vsock:
        drv.reidentify(VMPaths(tmp_path / "s", tmp_path / "r"), b"gen=1\nend\n")
    assert "no vsock socket" in no_vsock.value.message


def test_the_vmm_version_is_the_first_line_it_prints() -> None:
    from banger.errors import HostError
    from banger.vmm import binary_version
    from tests.fakes import FakeRunner, ok

    runner = FakeRunner()
    runner.on(("qemu",), ok("QEMU emulator version 7.2.0 (Debian)\nCopyright (c) ...\n"))
    assert binary_version(runner, "qemu", "QEMU") == "QEMU emulator version 7.2.0 (Debian)"
    broken = FakeRunner()
    broken.on(("qemu",), ok(rc=1, err="exec format error"))
    with pytest.raises(HostError) as exc:
        binary_version(broken, "qemu", "QEMU")
    assert "QEMU's version" in exc.value.message


class KeyFlipGuest:
    """Answers with the snapshot's host key ``stale`` times, then with the trusted one."""

    ip = "172.30.0.9"

    def __init__(self, stale: int) -> None:
        self.stale = stale
        self.calls = 0

    def run(self, script: str, **kw: object) -> object:
        self.calls += 1
        if self.calls <= self.stale:
            raise GuestError("ssh failed", stderr="Host key verification failed.")
        return None


def test_a_clone_is_waited_for_past_the_snapshots_host_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone of a VM that had the clone's address answers there with the snapshot's key
    until it has its own: ssh refuses that key (before authenticating), and the wait goes
    on. A VM that is not a clone and shows another key is refused at once."""
    from banger.daemon import guest as guest_mod

    monkeypatch.setattr(guest_mod, "tcp_open",
                        lambda ip, port=None, timeout=1.0, until=None: True)
    monkeypatch.setattr(guest_mod.time, "sleep", lambda s: None)
    clone_guest = KeyFlipGuest(stale=3)
    guest_mod.wait_for_ssh(clone_guest, budget_s=30, alive=lambda: True,  # type: ignore[arg-type]
                           new_host_key=True)
    assert clone_guest.calls == 4
    with pytest.raises(GuestError) as exc:
        guest_mod.wait_for_ssh(KeyFlipGuest(stale=3), budget_s=30,  # type: ignore[arg-type]
                               alive=lambda: True)
    assert "host key" in exc.value.message


def test_a_clone_that_announces_itself_is_probed_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the clone's console says it applied its identity, the wait stops polling its
    address and goes straight to the ssh probe, which runs the identity check; before
    that, an address that does not answer keeps it waiting."""
    from banger.daemon import guest as guest_mod

    own = identity.Identity(ip_cidr="172.30.0.9/24", gateway="172.30.0.1", mac="02:00:00:00:00:09",
                            hostname="c", machine_id="0" * 32, host_key="k", host_key_pub="p",
                            seed=b"s", generation="cafe0123")
    log = tmp_path / "serial.log"
    log.write_bytes(b"x" * 10000 + b"banger-ident: applied gen=other\n")
    said = identity.announced(log, own)
    assert not said()
    connects: list[str] = []
    monkeypatch.setattr(guest_mod, "tcp_open",
                        lambda ip, port=None, timeout=1.0, until=None:
                        connects.append(ip) or False)

    class Probed:
        ip = "172.30.0.9"
        scripts: list[str] = []

        def run(self, script: str, **kw: object) -> None:
            self.scripts.append(script)

    def on_wait(waited: float) -> None:
        if len(connects) == 2:  # the guest speaks up while the host polls
            with log.open("ab") as fh:
                fh.write(b"banger-ident: applied gen=cafe0123\r\n")

    g = Probed()
    guest_mod.wait_for_ssh(g, budget_s=30, alive=lambda: True,  # type: ignore[arg-type]
                           new_host_key=True, probe=identity.applied_probe(own),
                           announced=said, on_wait=on_wait)
    assert said() and len(connects) == 2
    assert g.scripts == [identity.applied_probe(own)]
    assert "gen=cafe0123" in g.scripts[0] and identity.GUEST_STATUS in g.scripts[0]


def test_the_applied_probe_passes_only_for_its_generation(tmp_path: Path) -> None:
    own = identity.Identity(ip_cidr="172.30.0.9/24", gateway="g", mac="m", hostname="c",
                            machine_id="0" * 32, host_key="k", host_key_pub="p", seed=b"s",
                            generation="cafe0123")
    status = tmp_path / "status"
    probe = identity.applied_probe(own).replace(identity.GUEST_STATUS, str(status))
    for content, ok in ((None, False), ("gen=other rng=reseeded\n", False),
                        ("gen=cafe0123 rng=reseeded got=1 net=2\n", True)):
        if content is not None:
            status.write_text(content)
        res = subprocess.run(["sh", "-c", probe], capture_output=True, text=True)
        assert (res.returncode == 0) == ok
        assert ok or "has not applied its identity" in res.stderr


def test_a_pending_connect_ends_when_the_guest_announces_itself() -> None:
    """A connect whose SYN goes unanswered (here: a loopback listener with a full
    backlog) waits out its timeout unless ``until`` turns true first; a listener that
    accepts answers at once, a closed port refuses."""
    from banger.daemon.guest import tcp_open

    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = [socket.create_connection(("127.0.0.1", port), timeout=5)]  # fills it
        try:
            asked: list[int] = []

            def said() -> bool:
                asked.append(1)
                return len(asked) >= 3

            assert not tcp_open("127.0.0.1", port, timeout=60, until=said)
            assert len(asked) == 3
        finally:
            for c in queued:
                c.close()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        assert tcp_open("127.0.0.1", listener.getsockname()[1], timeout=5)
        closed = listener.getsockname()[1]
    assert not tcp_open("127.0.0.1", closed, timeout=5)


# ------------------------------------------------------------------ the agent's port


def test_qemu_gets_the_agents_port_with_a_third_serial_port(tmp_path: Path) -> None:
    p = plan(tmp_path, vm_id="0123456789ab")
    argv = build_argv("qemu", p, "tcg")
    assert "virtio-serial-device,max_ports=3" in argv
    assert "socket,id=agent,fd={fd:agent},server=on,wait=off" in argv
    assert f"virtserialport,chardev=agent,name={wire.PORT_NAME}" in argv
    assert launch_request(p, argv[1:], "tcg").agent == str(p.paths.agent_socket)
    # a guest saved without the port: the device set it was saved with, max_ports included
    old = plan(tmp_path, vm_id="0123456789ab", agent_channel=False,
               restore=tmp_path / "saved")
    argv = build_argv("qemu", old, "tcg")
    assert "virtio-serial-device,max_ports=2" in argv
    assert not any("agent" in a for a in argv)
    assert launch_request(old, argv[1:], "tcg").agent is None


def test_the_agents_port_follows_the_saved_guest(daemon: Daemon, world: FakeWorld) -> None:
    """Boots get the port; a suspended guest and a snapshot's clones get it exactly when
    the saved guest had it, and a snapshot records whether its agent listened."""
    world.vmm.agent_port = True  # type: ignore[misc]
    vm = make(daemon)
    assert world.vmm.launched[-1].agent_channel
    assert vms.resolve(daemon, "src").runtime.agent_channel
    vmsuspend.suspend(daemon, "src")
    assert vms.resolve(daemon, "src").runtime.suspended["agent"] is True
    vmpower.start(daemon, "src")
    assert world.vmm.launched[-1].agent_channel
    suspend_as_an_older_banger(daemon, vm, "agent")
    vmpower.start(daemon, "src")
    assert not world.vmm.launched[-1].agent_channel
    assert not vms.resolve(daemon, "src").runtime.agent_channel
    assert snapshots.take(daemon, "src", "without")["name"] == "without"
    assert daemon.db.get_snapshot("without").agent == ""
    clone(daemon, "c-without", snap="without")
    assert not world.vmm.launched[-1].agent_channel

    make(daemon, "fresh")
    snapshots.take(daemon, "fresh", "with")  # the fake guest says no agent listens
    assert daemon.db.get_snapshot("with").agent == "port"
    clone(daemon, "c-with", snap="with")
    assert world.vmm.launched[-1].agent_channel


def test_a_vmm_without_the_port_never_gets_one(daemon: Daemon, world: FakeWorld) -> None:
    make(daemon)  # FakeVMM, like Firecracker: agent_port False
    assert not world.vmm.launched[-1].agent_channel
    assert not vms.resolve(daemon, "src").runtime.agent_channel
    snapshots.take(daemon, "src", "snap")
    assert daemon.db.get_snapshot("snap").agent == ""


@pytest.mark.parametrize(("channel", "answered", "listens", "state"), [
    (None, None, True, ""), (True, None, False, "port"), (True, None, True, "ready"),
    (True, True, False, "ready")])
def test_agent_state(daemon: Daemon, channel: bool | None, answered: bool | None,
                     listens: bool, state: str) -> None:
    vm = make(daemon)
    vm = dataclasses.replace(vm, runtime=vm.runtime.merged(agent_channel=channel,
                                                           agent=answered))
    assert snapshots.agent_state(vm, listens) == state
