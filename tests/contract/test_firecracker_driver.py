"""The real FirecrackerDriver against a fake ``firecracker`` that enforces the published API.

The fake validates every request against ../shared/specs/firecracker-api.yaml
and journals it; these tests drive full lifecycles and then assert that the
journal holds exactly the expected requests and not one validation error.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from banger.config import Config, parse_config
from banger.daemon.fcproc.api import FirecrackerAPI, InstanceState
from banger.daemon.fcproc.driver import FirecrackerDriver, SnapshotFiles, kill, saved_files
from banger.errors import BadRequest, InvalidState, VMMError
from banger.hostops.cgroups import CONTROLLERS, CgroupHost, CgroupVersion
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.jail import JailLayout
from banger.hostops.netlink import tap_name, tap_prefix_for
from banger.hostops.policy import Policy
from banger.layout import VMPaths, install_tag
from banger.proc import find_by_marker, matches, wait_gone
from banger.runner import SubprocessRunner
from banger.vmm import IDENT_VSOCK_PORT, LaunchPlan
from banger.vmmuser import VMMUser, lookup_user
from tests.contract import fake_firecracker
from tests.contract.conftest import FakeInstall, VMs, write_fakes
from tests.contract.fcspec import FirecrackerSpec
from tests.contract.netnsutil import own_netns

# The jailer runs as root; so does the fake, which chowns the jail to the VMM user.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root (chown)")
# The VMM user of the jailed tests: an existing unprivileged account, so that the
# driver finds it and creates nothing on the host.
JAIL_USER = "nobody"

BOOT_CALLS = [
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/rootfs"),
    ("PUT", "/drives/work"),
    ("PUT", "/network-interfaces/eth0"),
    ("PUT", "/vsock"),
    ("PUT", "/actions"),
]


def driver_for(fakes: FakeInstall, vms: VMs) -> FirecrackerDriver:
    cfg = parse_config({
        "state_dir": str(vms.layout.state_dir),
        "runtime_dir": str(vms.layout.runtime_dir),
        "firecracker_bin": str(fakes.firecracker),
        "jailer_enabled": False,
        "jailer_chroot_base": str(vms.layout.state_dir / "jail"),
    })
    return FirecrackerDriver.from_config(cfg, SubprocessRunner(), host_ops(cfg))


def host_ops(cfg: Config, cgroups: CgroupHost | None = None) -> HostOps:
    """The host operations of a root daemon: the helper's executor, in process."""
    def hierarchy() -> CgroupHost:
        if cgroups is None:
            raise AssertionError("this test makes no cgroup")
        return cgroups

    return HostOps.local(Executor(Policy.from_config(cfg), SubprocessRunner(),
                                  cgroups=hierarchy))


def fake_cgroups(root: Path, version: CgroupVersion) -> CgroupHost:
    """A cgroup hierarchy of plain directories: v2 one root, v1 one per controller."""
    roots = {c: root / ("unified" if version == CgroupVersion.V2 else c) for c in CONTROLLERS}
    for d in roots.values():
        d.mkdir(parents=True, exist_ok=True)
    return CgroupHost(version, roots)


def jail_user() -> VMMUser:
    user = lookup_user(JAIL_USER)
    if user is None or 0 in (user.uid, user.gid):
        pytest.skip(f"needs an unprivileged {JAIL_USER!r} account")
    return user


def jailed_driver(tmp_path: Path, spec_path: Path, vms: VMs, base: Path,
                  version: CgroupVersion = CgroupVersion.V2, *, netns: bool = False
                  ) -> tuple[FakeInstall, FirecrackerDriver, CgroupHost]:
    """The real driver built from the config (jailer on, vmm_user nobody; ``netns``:
    jailer_netns) over fakes, its jail built by the root helper's executor in process
    (as in a root daemon)."""
    host = fake_cgroups(tmp_path / "cgroup", version)
    fakes = write_fakes(tmp_path / "bin", spec_path,
                        cgroup_roots={c: str(d) for c, d in host.roots.items()})
    cfg = parse_config({
        "state_dir": str(vms.layout.state_dir),
        "runtime_dir": str(vms.layout.runtime_dir),
        "firecracker_bin": str(fakes.firecracker),
        "jailer_enabled": True,
        "jailer_bin": str(fakes.jailer),
        "jailer_chroot_base": str(base),
        "vmm_user": JAIL_USER,
        "jailer_netns": netns,
    })
    return fakes, FirecrackerDriver.from_config(cfg, SubprocessRunner(), host_ops(cfg, host)), host


def proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def bodies(fakes: FakeInstall, plan: LaunchPlan, pid: int) -> dict[tuple[str, str], object]:
    return {(e["method"], e["path"]): e["body"] for e in fakes.journal(plan.marker).requests(pid)}


def test_create_start_stop_delete(fakes: FakeInstall, vms: VMs, spec: FirecrackerSpec) -> None:
    drv = driver_for(fakes, vms)
    assert drv.jail is None and drv.binary == str(fakes.firecracker)
    plan = vms.plan()
    p = plan.paths

    # create + start
    ident = drv.launch(plan)
    assert matches(ident) and ident.marker == plan.marker
    assert p.pid_file.read_text() == f"{ident.pid}\n"
    # Detached: bangerd (this process) is not the parent, and not in our session.
    assert int(proc_field(ident.pid, "PPid")) != os.getpid()
    assert os.getsid(ident.pid) != os.getsid(0)
    start = fakes.journal(plan.marker).events("start")[0]
    assert start["stdin"] == "/dev/null"
    assert start["argv"][1:] == ["--api-sock", str(p.api_socket), "--id", plan.marker]
    assert drv.instance_info(p).state is InstanceState.RUNNING
    assert "guest console: booting" in p.serial_log.read_text()
    assert "logger ready" in p.vmm_log.read_text()
    assert p.vsock_socket.is_socket()
    drv.flush_metrics(p)
    assert '"utc_timestamp_ms"' in p.metrics.read_text()

    # stop: Ctrl-Alt-Del, and the VMM exits by itself (no SIGKILL needed)
    assert drv.stop(p, ident, grace_s=10) is True
    assert not matches(ident)
    journal = fakes.journal(plan.marker)
    assert [e["reason"] for e in journal.events("exit")] == ["SendCtrlAltDel"]

    # delete
    drv.cleanup(p)
    for gone in (p.api_socket, p.vsock_socket, p.pid_file, p.metrics):
        assert not gone.exists() and not gone.is_symlink(), gone
    assert p.serial_log.exists() and p.vmm_log.exists()  # logs are kept
    drv.cleanup(p)  # idempotent

    assert journal.errors() == []
    assert journal.calls(ident.pid) == [*BOOT_CALLS, ("PUT", "/actions"), ("PUT", "/actions")]
    assert ("GET", "/") in journal.calls(ident.pid, skip_probes=False)
    requests = journal.requests(ident.pid)
    assert requests[0]["method"] == "GET" and requests[0]["path"] == "/"  # readiness probe
    assert [r["body"]["action_type"] for r in requests if r["path"] == "/actions"] == [
        "InstanceStart", "FlushMetrics", "SendCtrlAltDel"]
    sent = bodies(fakes, plan, ident.pid)
    assert sent[("PUT", "/machine-config")] == {"vcpu_count": 2, "mem_size_mib": 256,
                                               "smt": False, "track_dirty_pages": False}
    assert sent[("PUT", "/boot-source")] == {"kernel_image_path": str(plan.kernel),
                                            "initrd_path": str(plan.initrd),
                                            "boot_args": plan.cmdline}
    assert sent[("PUT", "/drives/rootfs")] == {
        "drive_id": "rootfs", "path_on_host": plan.rootfs, "is_root_device": True,
        "is_read_only": False, "cache_type": "Unsafe"}
    assert sent[("PUT", "/drives/work")] == {
        "drive_id": "work", "path_on_host": plan.work_disk, "is_root_device": False,
        "is_read_only": False, "cache_type": "Writeback"}
    assert sent[("PUT", "/network-interfaces/eth0")] == {
        "iface_id": "eth0", "host_dev_name": plan.tap, "guest_mac": plan.mac}
    assert sent[("PUT", "/vsock")] == {"guest_cid": 3, "uds_path": str(p.vsock_socket)}
    assert sent[("PUT", "/logger")] == {"log_path": str(p.vmm_log), "level": "Info",
                                        "show_level": True, "show_log_origin": False}
    assert sent[("PUT", "/metrics")] == {"metrics_path": str(p.metrics)}


def test_boot_without_initrd_omits_it(fakes: FakeInstall, vms: VMs) -> None:
    drv = driver_for(fakes, vms)
    plan = vms.plan(initrd=False)
    ident = drv.launch(plan)
    try:
        boot = bodies(fakes, plan, ident.pid)[("PUT", "/boot-source")]
        assert boot == {"kernel_image_path": str(plan.kernel), "boot_args": plan.cmdline}
    finally:
        assert kill(ident)
        drv.cleanup(plan.paths)
    assert fakes.journal(plan.marker).errors() == []


def test_pause_snapshot_load_resume(fakes: FakeInstall, vms: VMs) -> None:
    drv = driver_for(fakes, vms)
    plan = vms.plan(tap="tap-first")
    p = plan.paths
    first = drv.launch(plan)

    drv.resume(p)  # already running: nothing to do, nothing sent
    with pytest.raises(InvalidState, match=r"cannot snapshot .* 'Running'") as exc:
        drv.snapshot(p, SnapshotFiles(p.state / "x.state", p.state / "x.mem"))
    assert exc.value.hint == "pause it first"
    assert not (p.state / "x.mem").exists()
    drv.pause(p)
    drv.pause(p)  # already paused: nothing sent
    assert drv.instance_info(p).state is InstanceState.PAUSED
    files = SnapshotFiles(p.state / "snap" / "vm.state", p.state / "snap" / "vm.mem")
    drv.snapshot(p, files)
    assert files.state.read_text().startswith("fake snapshot_path")
    assert files.memory.read_text().startswith("fake mem_file_path")

    assert kill(first)
    drv.cleanup(p)

    # A warm start on another TAP from the pool.
    restored_plan = LaunchPlan(**{**plan.__dict__, "tap": "tap-second"})
    second = drv.restore(restored_plan, files)
    assert second.pid != first.pid
    assert drv.instance_info(p).state is InstanceState.RUNNING
    assert drv.stop(p, second, grace_s=10)
    drv.cleanup(p)

    journal = fakes.journal(plan.marker)
    assert journal.errors() == []
    assert journal.calls(first.pid) == [*BOOT_CALLS, ("PATCH", "/vm"),
                                        ("PUT", "/snapshot/create")]
    assert journal.calls(second.pid) == [("PUT", "/logger"), ("PUT", "/metrics"),
                                         ("PUT", "/snapshot/load"), ("PATCH", "/vm"),
                                         ("PUT", "/actions")]
    first_sent = bodies(fakes, plan, first.pid)  # one PATCH /vm: the second pause sent none
    assert first_sent[("PATCH", "/vm")] == {"state": "Paused"}
    assert first_sent[("PUT", "/snapshot/create")] == {
        "snapshot_type": "Full", "snapshot_path": str(files.state),
        "mem_file_path": str(files.memory)}
    second_sent = bodies(fakes, plan, second.pid)
    assert second_sent[("PUT", "/snapshot/load")] == {
        "snapshot_path": str(files.state),
        "mem_backend": {"backend_type": "File", "backend_path": str(files.memory)},
        "track_dirty_pages": False, "resume_vm": False,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-second"}]}
    assert second_sent[("PATCH", "/vm")] == {"state": "Resumed"}


def test_save_and_a_restore_plan_are_vm_suspend_and_start(fakes: FakeInstall, vms: VMs
                                                          ) -> None:
    """``save`` (``vm suspend``): pause, then a full snapshot into the saved-state
    directory; a plan with ``restore`` (``vm start`` of a suspended VM) loads it and
    leaves the guest paused for ``resume``, on whatever TAP the pool gave."""
    drv = driver_for(fakes, vms)
    plan = vms.plan(tap="tap-first")
    p = plan.paths
    first = drv.launch(plan)
    into = p.state / "saved.partial"
    into.mkdir(parents=True)
    seen: list[int] = []
    size = drv.save(p, into, seen.append)
    files = saved_files(into)
    assert size == files.state.stat().st_size + files.memory.stat().st_size == seen[-1]
    assert drv.instance_info(p).state is InstanceState.PAUSED
    assert kill(first)
    drv.cleanup(p)

    second = drv.launch(LaunchPlan(**{**plan.__dict__, "tap": "tap-second", "restore": into}))
    assert drv.instance_info(p).state is InstanceState.PAUSED
    drv.resume(p)
    assert drv.instance_info(p).state is InstanceState.RUNNING
    assert drv.stop(p, second, grace_s=10)
    drv.cleanup(p)
    journal = fakes.journal(plan.marker)
    assert journal.errors() == []
    assert journal.calls(second.pid) == [("PUT", "/logger"), ("PUT", "/metrics"),
                                         ("PUT", "/snapshot/load"), ("PATCH", "/vm"),
                                         ("PUT", "/actions")]
    loaded = bodies(fakes, plan, second.pid)[("PUT", "/snapshot/load")]
    assert loaded["resume_vm"] is False  # type: ignore[index]
    assert loaded["snapshot_path"] == str(files.state)  # type: ignore[index]


@needs_root
@pytest.mark.parametrize("version", [CgroupVersion.V1, CgroupVersion.V2])
def test_jailed_launch_argv_cgroup_and_files(tmp_path: Path, spec_path: Path, vms: VMs,
                                             version: CgroupVersion) -> None:
    """The jailer's exact command line (the VMM user, the cgroup version, limits and
    parent), the cgroup it makes and the driver removes, and what the chroot holds."""
    user = jail_user()
    base = tmp_path / "jails"
    fakes, drv, host = jailed_driver(tmp_path, spec_path, vms, base, version)
    assert drv.jail is not None
    plan = vms.plan(vcpu=2)  # 256 MiB of guest memory
    p = plan.paths
    tag = install_tag(vms.layout.state_dir)
    layout = JailLayout.for_vm(base, str(fakes.firecracker), plan.marker)

    ident = drv.launch(plan)
    journal = fakes.journal(plan.marker)
    jailer = journal.events("jailer")[0]
    assert jailer["problems"] == []
    limits = {  # guest 256 MiB + 512 MiB for the VMM; 256 tasks; weight 100 per vCPU
        CgroupVersion.V2: ["memory.max=805306368", "pids.max=256", "cpu.weight=200"],
        CgroupVersion.V1: ["memory.limit_in_bytes=805306368", "pids.max=256",
                           "cpu.shares=2048"],
    }[version]
    assert jailer["argv"] == [
        "--id", plan.marker, "--exec-file", str(fakes.firecracker),
        "--uid", str(user.uid), "--gid", str(user.gid), "--chroot-base-dir", str(base),
        "--cgroup-version", version.value[1:], "--parent-cgroup", f"banger-{tag}",
        *(arg for value in limits for arg in ("--cgroup", value)),
        "--", "--api-sock", "/fc.sock",
    ]
    assert "0" not in (jailer["argv"][5], jailer["argv"][7])
    # The VM's cgroup: <hierarchy>/banger-<install tag>/<jail id>, beside QEMU VMs' cgroups.
    group = host.group(f"banger-{tag}/{plan.marker}")
    assert group.rel == f"banger-{tag}/{plan.marker}"
    made = journal.events("cgroup")
    assert [f"{e['file']}={e['value']}" for e in made] == limits
    assert {e["dir"] for e in made} == {str(d) for d in group.dirs}
    assert len(group.dirs) == (1 if version == CgroupVersion.V2 else 3)
    assert group.exists()

    # What the chroot holds: the binary the jailer copied, the VM's files and the
    # sockets and metrics Firecracker makes; nothing else from state_dir.
    assert sorted(os.listdir(layout.root)) == sorted([
        "firecracker", "vmlinux", "initrd", "rootfs", "work", "vmm.log", "fc.metrics",
        "fc.sock", "vsock.sock"])
    assert (layout.root.stat().st_uid, layout.root.stat().st_gid) == (user.uid, user.gid)
    state_files = {}
    for d, _, files in os.walk(vms.layout.state_dir):
        for name in files:
            st = os.lstat(os.path.join(d, name))
            state_files[(st.st_dev, st.st_ino)] = Path(d) / name
    linked = {}
    for name in os.listdir(layout.root):
        st = os.lstat(layout.root / name)
        if (st.st_dev, st.st_ino) in state_files:
            linked[name] = state_files[(st.st_dev, st.st_ino)]
    assert linked == {"vmlinux": plan.kernel, "initrd": plan.initrd,
                      "rootfs": Path(plan.rootfs), "work": Path(plan.work_disk),
                      "vmm.log": p.vmm_log}
    # What Firecracker writes stays the daemon's (root's here), given to the VMM user's
    # group; its metrics are its own; the boot files are left as they were.
    for name in ("rootfs", "work", "vmm.log"):
        st = os.stat(layout.root / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, user.gid, 0o660), name
    st = os.stat(layout.root / "fc.metrics")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o600)
    for name in ("vmlinux", "initrd"):
        st = os.stat(layout.root / name)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644), name
    assert p.serial_log.stat().st_uid == 0  # the console log is never handed over

    assert drv.stop(p, ident, grace_s=10)
    drv.cleanup(p)
    assert not layout.jail_dir.exists()
    assert not group.exists()
    assert not any((root / f"banger-{tag}").exists() for root in host.roots.values())
    assert journal.errors() == []


def test_the_fake_jailer_refuses_what_banger_must_never_pass(tmp_path: Path) -> None:
    """The harness can fail: root ids and malformed cgroup options are journalled."""
    argv = ["--id", "banger-x", "--exec-file", "/usr/bin/firecracker", "--uid", "0",
            "--gid", "0", "--cgroup-version", "2", "--parent-cgroup", "../up",
            "--cgroup", "memory.limit_in_bytes=1", "--cgroup", "cpu.weight",
            "--", "--api-sock", "/fc.sock"]
    assert fake_firecracker.jailer_main(argv, journal_dir=str(tmp_path)) == 1
    entries = [json.loads(line)
               for line in (tmp_path / "banger-x.jsonl").read_text().splitlines()]
    assert [e["event"] for e in entries] == ["jailer"]  # refused: nothing exec'd
    assert sorted(entries[0]["problems"]) == sorted([
        "invalid --parent-cgroup '../up'",
        "--cgroup memory.limit_in_bytes is not a cgroup v2 file",
        "invalid --cgroup 'cpu.weight'",
        "banger must not run Firecracker as uid/gid 0/0"])


@needs_root
def test_jailed_lifecycle(tmp_path: Path, spec_path: Path, vms: VMs) -> None:
    """Through the (fake) jailer: files in the chroot, in-jail paths, sockets reached
    through connections the helper hands over."""
    # Deep enough that the in-jail API socket's host path cannot be connect()ed by name:
    # the helper connects through a descriptor of it.
    base = vms.layout.state_dir / ("deep-" * 12) / "jail"
    user = jail_user()
    fakes, drv, _ = jailed_driver(tmp_path, spec_path, vms, base)
    plan = vms.plan()
    p = plan.paths
    layout = JailLayout.for_vm(base, str(fakes.firecracker), plan.marker)

    ident = drv.launch(plan)
    jailed_sock = layout.root / "fc.sock"
    assert len(str(jailed_sock).encode()) >= 108
    assert not p.api_socket.exists() and not p.api_socket.is_symlink()
    assert jailed_sock.is_socket()
    assert (layout.root / "vsock.sock").is_socket()
    argv = fakes.journal(plan.marker).events("start")[0]["argv"]
    assert f"--id={plan.marker}" in argv and argv[-2:] == ["--api-sock", "/fc.sock"]
    jailer_argv = fakes.journal(plan.marker).events("jailer")[0]
    assert jailer_argv["problems"] == []
    # Disks and the log are hard links (writes reach the originals), the jail group's.
    for inside, original in (("rootfs", plan.rootfs), ("work", plan.work_disk),
                             ("vmm.log", p.vmm_log)):
        st = os.stat(layout.root / inside)
        assert st.st_ino == os.stat(original).st_ino
        assert (st.st_uid, st.st_gid) == (0, user.gid)
    assert "logger ready" in p.vmm_log.read_text()
    drv.flush_metrics(p)
    assert "utc_timestamp_ms" in (layout.root / "fc.metrics").read_text()

    drv.pause(p)
    files = SnapshotFiles(p.state / "snap" / "vm.state", p.state / "snap" / "vm.mem")
    drv.snapshot(p, files)
    assert files.memory.read_text().startswith("fake mem_file_path")
    assert not (layout.root / "snapshot.mem").exists()  # moved out of the jail
    for moved in (files.state, files.memory):  # and made the daemon's
        st = moved.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert drv.stop(p, ident, grace_s=10)
    drv.cleanup(p)
    assert not layout.jail_dir.exists()
    assert Path(plan.rootfs).read_bytes() == b"fake rootfs"  # originals survive

    second = drv.restore(plan, files)
    assert drv.instance_info(p).state is InstanceState.RUNNING
    # A restored VM is snapshotted again (suspend, start, suspend): the loaded files
    # have names of their own in the jail, so the new snapshot does not overwrite them.
    drv.pause(p)
    again = SnapshotFiles(p.state / "snap2" / "vm.state", p.state / "snap2" / "vm.mem")
    drv.snapshot(p, again)
    assert again.memory.read_text().startswith("fake mem_file_path")
    assert files.memory.read_text().startswith("fake mem_file_path")  # the loaded one kept
    drv.resume(p)
    assert drv.stop(p, second, grace_s=10)
    drv.cleanup(p)
    assert not layout.jail_dir.exists()

    journal = fakes.journal(plan.marker)
    assert journal.errors() == []
    sent = bodies(fakes, plan, ident.pid)
    assert sent[("PUT", "/boot-source")] == {"kernel_image_path": "/vmlinux",
                                            "initrd_path": "/initrd",
                                            "boot_args": plan.cmdline}
    assert sent[("PUT", "/drives/rootfs")]["path_on_host"] == "/rootfs"  # type: ignore[index]
    assert sent[("PUT", "/vsock")] == {"guest_cid": 3, "uds_path": "/vsock.sock"}
    assert sent[("PUT", "/snapshot/create")] == {
        "snapshot_type": "Full", "snapshot_path": "/snapshot.state",
        "mem_file_path": "/snapshot.mem"}
    loaded = bodies(fakes, plan, second.pid)[("PUT", "/snapshot/load")]
    assert loaded["snapshot_path"] == "/restore.state"  # type: ignore[index]


@needs_root
def test_jailer_netns_vm_opens_its_tap_in_a_namespace_of_its_own(tmp_path: Path,
                                                                spec_path: Path,
                                                                vms: VMs) -> None:
    """``jailer_netns``: the jailer joins the VM's own network namespace, where the fake
    Firecracker opens ``tap0`` as the VMM user (the real one fails to start without
    it); the VM's port sits on the bridge; once joined, the namespace has no name and
    goes, port and all, with the VMM. Run in a network namespace this test makes, so
    the bridge and the port are never the host's."""
    jail_user()
    with own_netns():
        fakes, drv, _ = jailed_driver(tmp_path, spec_path, vms, tmp_path / "jails",
                                      netns=True)
        assert drv.jail is not None and drv.own_port
        drv.jail.ensure_bridge("br-banger", "172.29.0.1/24")
        tag = install_tag(vms.layout.state_dir)
        port = tap_name(tap_prefix_for(tag))
        plan = vms.plan(tap=port)
        ns = Path(f"/run/netns/banger-{tag}-{plan.vm_id}")
        ident = None
        try:
            ident = drv.launch(plan)
            journal = fakes.journal(plan.marker)
            jailer = journal.events("jailer")[0]
            assert jailer["problems"] == []
            own = jailer["argv"][:jailer["argv"].index("--")]
            assert own[own.index("--netns") + 1] == str(ns)
            assert bodies(fakes, plan, ident.pid)[("PUT", "/network-interfaces/eth0")] == {
                "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": plan.mac}
            assert journal.errors() == []  # the fake opened tap0 in there, as the VMM user
            # Firecracker holds the namespace; its name is gone, its port on the bridge.
            assert not ns.exists() and drv.jail.fc_netns_vms() == []
            assert os.readlink(f"/proc/{ident.pid}/ns/net") != os.readlink(
                "/proc/thread-self/ns/net")
            shown = json.loads(subprocess.run(
                ["ip", "-j", "-d", "link", "show", "dev", port], capture_output=True,
                text=True, check=True).stdout)
            assert shown[0]["master"] == "br-banger"
            assert shown[0]["linkinfo"]["info_kind"] == "veth"

            assert drv.stop(plan.paths, ident, grace_s=10)
            drv.cleanup(plan.paths)
            # The last process left the namespace: the kernel frees it, the port with it.
            deadline = time.monotonic() + 30
            while port in drv.jail.links():
                assert time.monotonic() < deadline, "the VM's port outlived its namespace"
                time.sleep(0.1)
        finally:
            if ident is not None:
                kill(ident)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


def test_jailer_netns_without_the_jailer_is_refused(fakes: FakeInstall, vms: VMs) -> None:
    cfg = parse_config({"state_dir": str(vms.layout.state_dir),
                        "runtime_dir": str(vms.layout.runtime_dir),
                        "firecracker_bin": str(fakes.firecracker), "jailer_enabled": False,
                        "jailer_netns": True})
    with pytest.raises(BadRequest, match="jailer is off") as exc:
        FirecrackerDriver.from_config(cfg, SubprocessRunner(), host_ops(cfg))
    assert "jailer_netns off" in exc.value.hint


@needs_root
def test_a_jailed_snapshot_clones_into_a_vm_of_its_own(tmp_path: Path, spec_path: Path,
                                                      vms: VMs) -> None:
    """A clone of a jailed VM's snapshot runs beside its source: the load reopens the
    recorded in-jail disk and vsock names, which in the clone's jail are its own files;
    its identity goes over the clone's vsock to ``banger-ident``'s port, taken only once
    the vCPUs run. Unjailed, the recorded names are the source's files: refused."""
    with pytest.raises(BadRequest, match="jailed"):
        driver_for(write_fakes(tmp_path / "plain", spec_path), vms).check_clonable()
    jail_user()
    fakes, drv, _ = jailed_driver(tmp_path, spec_path, vms, vms.layout.state_dir / "jail")
    drv.check_clonable()
    src = vms.plan(tap="tap-src")
    first = drv.launch(src)
    drv.pause(src.paths)
    files = SnapshotFiles(src.paths.state / "snap" / "vm.state",
                          src.paths.state / "snap" / "vm.mem")
    drv.snapshot(src.paths, files)
    drv.resume(src.paths)

    clone = vms.plan(tap="tap-clone")
    second = drv.restore(clone, files, resume=False)
    message = b"gen=42\nip=10.0.0.9/24\nend\n"
    drv.reidentify(clone.paths, message)
    time.sleep(0.5)
    assert fakes.journal(clone.marker).events("vsock") == []  # paused: not taken yet
    drv.resume(clone.paths)
    deadline = time.monotonic() + 30
    while not fakes.journal(clone.marker).events("vsock"):
        assert time.monotonic() < deadline, "the identity never reached the clone's vsock"
        time.sleep(0.05)
    (got,) = fakes.journal(clone.marker).events("vsock")
    assert (got["port"], got["data"]) == (IDENT_VSOCK_PORT, message.decode())
    assert fakes.journal(src.marker).events("vsock") == []  # the source heard nothing

    for plan, ident in ((src, first), (clone, second)):
        assert drv.instance_info(plan.paths).state is InstanceState.RUNNING
        assert drv.stop(plan.paths, ident, grace_s=10)
        drv.cleanup(plan.paths)
    for plan in (src, clone):
        assert fakes.journal(plan.marker).errors() == []
    loaded = bodies(fakes, clone, second.pid)[("PUT", "/snapshot/load")]
    assert loaded["snapshot_path"] == "/restore.state"  # type: ignore[index]
    assert loaded["network_overrides"] == [  # type: ignore[index]
        {"iface_id": "eth0", "host_dev_name": "tap-clone"}]


def test_refused_request_kills_and_cleans_up(tmp_path: Path, spec_path: Path, vms: VMs) -> None:
    fault = "Unable to open the block device backing file: Permission denied"
    fakes = write_fakes(tmp_path / "bin", spec_path, fail_on=("PUT", "/drives/work", fault))
    drv = driver_for(fakes, vms)
    plan = vms.plan()
    p = plan.paths
    with pytest.raises(VMMError) as exc:
        drv.launch(plan)
    assert "PUT /drives/work" in exc.value.message and fault in exc.value.message
    assert exc.value.details["fault_message"] == fault
    assert exc.value.details["method"] == "PUT" and exc.value.details["path"] == "/drives/work"
    assert str(p.vmm_log) in exc.value.hint
    assert find_by_marker(plan.marker) == {}
    for gone in (p.api_socket, p.vsock_socket, p.pid_file, p.metrics):
        assert not gone.exists(), gone
    journal = fakes.journal(plan.marker)
    assert ("PUT", "/actions") not in journal.calls()
    assert journal.calls()[-1] == ("PUT", "/drives/work")
    assert journal.errors() == []


def test_vmm_dying_at_start_is_reported_with_its_output(tmp_path: Path, spec_path: Path,
                                                         vms: VMs) -> None:
    fakes = write_fakes(tmp_path / "bin", spec_path, crash="Error: KVM is not available")
    drv = driver_for(fakes, vms)
    plan = vms.plan()
    with pytest.raises(VMMError) as exc:
        drv.launch(plan)
    assert "KVM is not available" in exc.value.message
    assert find_by_marker(plan.marker) == {}
    assert not plan.paths.pid_file.exists()


def test_invalid_body_is_caught_by_the_fake(fakes: FakeInstall, vms: VMs) -> None:
    """The harness can fail: a malformed request is refused and journalled as an error."""
    drv = driver_for(fakes, vms)
    plan = vms.plan()
    ident = drv.launch(plan)
    try:
        with FirecrackerAPI(plan.paths.api_socket) as api, pytest.raises(VMMError) as exc:
            api.request("PUT", "/actions", {"action_type": "Reboot"})
        assert "PUT /actions" in exc.value.message
        assert "request rejected by the API spec" in exc.value.details["fault_message"]
        errors = fakes.journal(plan.marker).errors()
        assert len(errors) == 1 and "'Reboot' is not one of" in errors[0]
    finally:
        assert kill(ident)
        drv.cleanup(plan.paths)


def test_request_shutdown_only_reaches_the_live_vmm(fakes: FakeInstall, vms: VMs) -> None:
    drv = driver_for(fakes, vms)
    plan = vms.plan()
    ident = drv.launch(plan)
    assert drv.request_shutdown(plan.paths, ident) is True
    assert wait_gone(ident, 10)
    assert drv.request_shutdown(plan.paths, ident) is False  # gone: nothing sent
    drv.cleanup(plan.paths)
    calls = fakes.journal(plan.marker).calls()
    assert calls.count(("PUT", "/actions")) == 2  # InstanceStart + one SendCtrlAltDel


def test_client_operations_are_all_in_the_spec(spec: FirecrackerSpec) -> None:
    """Every (method, path template) the client can send exists in the spec."""
    used = {("GET", "/"), ("PUT", "/actions"), ("PUT", "/boot-source"),
            ("PUT", "/drives/{drive_id}"), ("PUT", "/logger"), ("PUT", "/machine-config"),
            ("PUT", "/metrics"), ("PUT", "/network-interfaces/{iface_id}"),
            ("PUT", "/snapshot/create"), ("PUT", "/snapshot/load"), ("PATCH", "/vm"),
            ("PUT", "/vsock")}
    assert used <= spec.operations()


def test_unix_socket_api_path_is_checked_before_start(fakes: FakeInstall, vms: VMs) -> None:
    """A runtime dir too deep for sun_path fails before any process starts."""
    drv = driver_for(fakes, vms)
    plan = vms.plan()
    deep = VMPaths(plan.paths.state, vms.layout.runtime_dir / ("x" * 100) / plan.vm_id)
    with pytest.raises(BadRequest, match=r"the limit is 107"):
        drv.launch(LaunchPlan(**{**plan.__dict__, "paths": deep}))
    assert fakes.journal(plan.marker).entries == []
    assert not deep.run.exists()

