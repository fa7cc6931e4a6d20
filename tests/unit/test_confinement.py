"""The confined VMM: cgroups (v1 and v2, on fake trees), QEMU's confined command
line and launch spec, the launcher script, the VMM user, doctor and ``vm show``."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from banger import vmmuser
from banger.api.params import CreateParams
from banger.cli import output
from banger.config import Config, parse_config
from banger.daemon import reconcile, vmcreate, vmpower
from banger.daemon.core import Daemon
from banger.daemon.qemuproc import QemuDriver, build_argv, launch_request
from banger.daemon.vms import view
from banger.errors import BadRequest, HostError, Refused
from banger.hostops import ops
from banger.hostops.cgroups import (
    VMM_MEMORY_ALLOWANCE_MIB,
    CgroupHost,
    CgroupVersion,
    Limits,
    detect,
    limit_files,
    limits_for,
    vm_group,
)
from banger.hostops.client import HostOps
from banger.hostops.confine import SANDBOX, privilege_drop
from banger.hostops.executor import Executor
from banger.hostops.nft import FirewallSettings
from banger.hostops.policy import Policy
from banger.layout import VMPaths
from banger.runner import Result
from banger.vmm import LaunchPlan
from banger.vmmuser import VMMUser, check_unprivileged, ensure_user
from tests.conftest import FakeWorld
from tests.fakes import FakeRunner, FakeVMM

doctor = importlib.import_module("banger.daemon.doctor")  # the package re-exports a function
GOLDEN = Path(__file__).parent.parent / "golden"
USER = VMMUser("banger-vmm", 990, 985)
SPAWN = Path(__file__).parents[2] / "src/banger/hostops/vmm_spawn.py"
FIREWALL = FirewallSettings(table="banger_abc123", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtabc123")


def plan(tmp_path: Path, initrd: bool = True) -> LaunchPlan:
    return LaunchPlan(
        vm_id="0123456789ab", name="web", vcpu=2, memory_mib=512,
        kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img") if initrd else None,
        cmdline="console=ttyS0", rootfs="/s/rootfs.ext4", work_disk="/s/work.ext4",
        tap="bgt00000001", mac="06:00:ac:1d:00:02",
        paths=VMPaths(tmp_path / "s", tmp_path / "r"),
    )


# ------------------------------------------------------------------ cgroups


def v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("cpu\n")
    return root


def mounts(tmp_path: Path, lines: list[str]) -> Path:
    f = tmp_path / "mounts"
    f.write_text("".join(line + "\n" for line in lines))
    return f


def v1_mounts(tmp_path: Path) -> list[str]:
    out = []
    for c in ("memory", "pids", "cpu,cpuacct"):
        d = tmp_path / c.replace(",", "_")
        d.mkdir()
        out.append(f"cgroup {d} cgroup rw,relatime,{c} 0 0")
    return out


def test_detect_prefers_v2_with_the_controllers(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    host = detect(mounts(tmp_path, [*v1_mounts(tmp_path), f"cgroup2 {root} cgroup2 rw 0 0"]))
    assert host.version == CgroupVersion.V2 and set(host.roots.values()) == {root}


def test_detect_uses_v1_beside_an_empty_unified_mount(tmp_path: Path) -> None:
    # This host's shape: v1 controllers, and a cgroup2 "unified" mount with none.
    root = v2_tree(tmp_path, controllers="")
    host = detect(mounts(tmp_path, [f"cgroup2 {root} cgroup2 rw 0 0", *v1_mounts(tmp_path)]))
    assert host.version == CgroupVersion.V1
    assert host.roots["cpu"] == tmp_path / "cpu_cpuacct"
    assert host.roots["memory"] == tmp_path / "memory"


def test_detect_refuses_a_host_without_the_controllers(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, controllers="cpu io")
    with pytest.raises(HostError) as info:
        detect(mounts(tmp_path, [f"cgroup2 {root} cgroup2 rw 0 0",
                                 f"cgroup {tmp_path} cgroup rw,memory 0 0"]))
    assert "pids, cpu" in info.value.message and "controllers: cpu io" in info.value.message
    assert info.value.hint


LIMITS = Limits(memory_bytes=1536 << 20, pids_max=256, cpu_weight=200)


def test_v2_cgroup_create_limits_adopt_remove(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    host = CgroupHost(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})
    group = host.group(vm_group("abc123", "0123456789ab"))
    group.create(LIMITS)
    d = root / "banger-abc123/0123456789ab"
    assert (d / "memory.max").read_text() == str(1536 << 20)
    assert (d / "pids.max").read_text() == "256"
    assert (d / "cpu.weight").read_text() == "200"
    # controllers handed down from the root and from banger's parent
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (root / "banger-abc123/cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert group.limits() == LIMITS and group.describe() == str(d)
    assert group.procs_files == [d / "cgroup.procs"]
    assert not group.holds(4242)
    group.adopt(4242)
    assert group.holds(4242)
    assert group.to_json() == {"version": "v2", "path": str(d), "limits": LIMITS.to_json()}
    # kernfs removes a cgroup's own files with it; a fake tree needs them gone first
    for f in [*d.iterdir(), d.parent / "cgroup.subtree_control"]:
        f.unlink()
    group.remove()
    assert not d.exists() and not d.parent.exists()  # the last VM takes the parent along
    group.remove()  # idempotent


def test_v1_cgroup_one_dir_per_controller(tmp_path: Path) -> None:
    roots = {c: tmp_path / c for c in ("memory", "pids", "cpu")}
    for r in roots.values():
        r.mkdir()
    host = CgroupHost(CgroupVersion.V1, roots)
    group = host.group("banger-abc123/0123456789ab")
    group.create(LIMITS)
    rel = Path("banger-abc123/0123456789ab")
    assert (roots["memory"] / rel / "memory.limit_in_bytes").read_text() == str(1536 << 20)
    assert (roots["pids"] / rel / "pids.max").read_text() == "256"
    assert (roots["cpu"] / rel / "cpu.shares").read_text() == "2048"  # weight 200 in v1 units
    assert group.limits() == LIMITS
    assert group.describe() == "memory,pids,cpu:/banger-abc123/0123456789ab"
    assert len(group.procs_files) == 3
    group.adopt(77)
    assert group.holds(77)
    (roots["memory"] / rel / "pids.max").write_text("max")  # unreadable values: no limits


def test_cgroup_remove_reports_a_busy_cgroup(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    group = CgroupHost(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")}).group(
        "banger-x/vm")
    group.create(LIMITS)
    with pytest.raises(HostError, match="cannot remove cgroup"):
        group.remove()  # a fake tree's files stand in for a live process: not empty


def test_limits_for_adds_the_vmm_allowance() -> None:
    lim = limits_for(1024, 2)
    assert lim.memory_bytes == (1024 + VMM_MEMORY_ALLOWANCE_MIB) << 20
    assert lim == Limits(memory_bytes=1536 << 20, pids_max=256, cpu_weight=200)
    assert limits_for(1024, 200).cpu_weight == 10000  # cgroup v2's maximum


def test_limit_files_name_each_limit_for_its_version() -> None:
    """One computation for both drivers: QEMU's cgroup writes these, the jailer gets them."""
    lim = limits_for(256, 3)
    assert limit_files(CgroupVersion.V2, lim) == {
        "memory.max": str(768 << 20), "pids.max": "256", "cpu.weight": "300"}
    assert limit_files(CgroupVersion.V1, lim) == {
        "memory.limit_in_bytes": str(768 << 20), "pids.max": "256", "cpu.shares": "3072"}


# ------------------------------------------------------------------ QEMU command line


def test_argv_is_sandboxed_and_names_no_path(tmp_path: Path) -> None:
    argv = build_argv("qemu-system-x86_64", plan(tmp_path), "tcg", 2596128)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert SANDBOX == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    # QEMU cannot -daemonize or -runas under that filter: the launcher does both
    assert "-daemonize" not in argv and "-runas" not in argv and "-pidfile" not in argv
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=256"
    assert argv[argv.index("-kernel") + 1] == "/proc/self/fd/{fd:kernel}"
    assert argv[argv.index("-initrd") + 1] == "/proc/self/fd/{fd:initrd}"
    joined = " ".join(argv)
    assert "tap,id=net0,fd={fd:tap}" in joined
    assert "socket,id=qmp,fd={fd:qmp},server=on,wait=off" in joined
    # nothing under banger's state or runtime dirs is opened by QEMU by path
    assert str(tmp_path) not in joined and "/s/" not in joined and "/img/" not in joined


def test_extra_disks_follow_the_work_disk_by_descriptor(tmp_path: Path) -> None:
    """Image finalize's helper VM: its third disk is ``/dev/vdc``, opened by descriptor."""
    p = dataclasses.replace(plan(tmp_path), extra_disks=("/s/pulled.ext4",))
    argv = build_argv("qemu-system-x86_64", p, "tcg", 2596128)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert [d.split(",")[0] for d in drives] == ["id=root", "id=work", "id=extra0"]
    assert "file=/proc/self/fd/{fd:extra0}" in drives[2]
    assert launch_request(p, argv[1:], "tcg").files["extra0"] == ops.VMFile(
        path="/s/pulled.ext4", mode="rw", give=True)
    assert "/s/pulled" not in " ".join(argv)


class Launch:
    """A VM's files under a state and a runtime dir of the test's own, and an executor
    whose launcher run is captured instead of run."""

    def __init__(self, tmp_path: Path) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state, self.run = tmp_path / "s", tmp_path / "r"
        self.root = v2_tree(tmp_path)
        self.cgroups = CgroupHost(CgroupVersion.V2,
                                  {c: self.root for c in ("memory", "pids", "cpu")})
        self.policy = Policy(FIREWALL, state_dir=self.state, runtime_dir=self.run,
                             install_tag="abc123", vmm_user="nobody",
                             qemu_bin="/usr/bin/qemu-system-x86_64", daemon_uid=os.getuid())
        self.specs: list[dict[str, Any]] = []
        self.runner = FakeRunner()
        self.runner.on([sys.executable], self._spawned)
        self.executor = Executor(self.policy, self.runner, cgroups=lambda: self.cgroups,
                                 open_tap=lambda name: os.open("/dev/null", os.O_RDWR))
        self.plan = dataclasses.replace(
            plan(tmp_path), vm_id="0123456789ab",
            kernel=self.state / "images" / "vmlinuz", initrd=None,
            rootfs=str(self.state / "vms/0123456789ab/rootfs.ext4"),
            work_disk=str(self.state / "vms/0123456789ab/work.ext4"),
            tap="bgtabc123aa00ff", paths=VMPaths(self.state / "vms/0123456789ab",
                                                 self.run / "vms/0123456789ab"))
        for d in (self.plan.paths.state, self.plan.paths.run, self.state / "images"):
            d.mkdir(parents=True, exist_ok=True)
        for f in (self.plan.kernel, Path(self.plan.rootfs), Path(self.plan.work_disk),
                  self.plan.paths.serial_log):
            f.write_bytes(b"x")
        os.mkfifo(self.plan.paths.ident_fifo)

    def _spawned(self, argv: list[str]) -> Result:
        return Result(argv, 0, b"4242\n", b"")

    def request(self, **changes: Any) -> ops.QemuLaunch:
        args = build_argv("qemu-system-x86_64", self.plan, "tcg", None)[1:]
        req = launch_request(self.plan, args, "tcg")
        return req.model_copy(update=changes)

    def launch(self, req: ops.QemuLaunch | None = None) -> dict[str, Any]:
        captured: list[bytes] = []
        real = self.runner.run

        def run(argv: Any, **kw: Any) -> Result:
            captured.append(kw.get("input") or b"")
            return real(argv, **kw)

        self.runner.run = run  # type: ignore[method-assign]
        try:
            assert HostOps.local(self.executor).qemu_launch(req or self.request()) == 4242
        finally:
            self.runner.run = real  # type: ignore[method-assign]
        return dict(json.loads(captured[-1]))


def test_the_launch_drops_to_the_vmm_user_in_its_cgroup_with_descriptors(
        tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    spec = lt.launch()
    cmd = spec["command"]
    nobody = vmmuser.lookup_user("nobody")
    assert nobody is not None
    assert cmd[:cmd.index("--") + 1] == [
        "setpriv", f"--reuid={nobody.uid}", f"--regid={nobody.gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    # the binary is the helper's own, never the daemon's choice
    assert cmd[cmd.index("--") + 1] == "/usr/bin/qemu-system-x86_64"
    assert privilege_drop(USER, [108])[3] == "--groups=108"  # /dev/kvm's group under KVM
    assert set(spec["fds"]) == {"kernel", "rootfs", "work", "serial", "ident", "tap", "qmp",
                                "agent"}
    assert spec["cgroup_procs"] == [str(lt.root / "banger-abc123/0123456789ab/cgroup.procs")]
    assert spec["own_netns"] is True  # QEMU gets no network but its TAP's descriptor
    assert lt.cgroups.group("banger-abc123/0123456789ab").limits() == limits_for(512, 2)
    # what QEMU writes is its group's; the boot files are not handed over
    for f in (Path(lt.plan.rootfs), Path(lt.plan.work_disk), lt.plan.paths.serial_log,
              lt.plan.paths.ident_fifo):
        st = f.stat()
        assert (st.st_mode & 0o777, st.st_gid, st.st_uid) == (0o660, nobody.gid, os.getuid())
    assert lt.plan.kernel.stat().st_gid != nobody.gid
    for sock in (lt.plan.paths.qmp_socket, lt.plan.paths.agent_socket):
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()


LAUNCH_REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("an option banger never uses", {"args": ["-plugin", "x"]}),
    ("a monitor on stdio", {"args": ["-monitor", "stdio"]}),
    ("a drive by path", {"args": ["-drive", "file=/etc/shadow,format=raw"]}),
    ("a relative drive path", {"args": ["-drive", "file=etc/shadow,format=raw"]}),
    ("a file chardev", {"args": ["-chardev", "file,id=x,path=/tmp/x"]}),
    ("a tap with a script", {"args": ["-netdev", "tap,id=n,fd={fd:tap},script=/tmp/s"]}),
    ("a user-mode network", {"args": ["-netdev", "user,id=n"]}),
    ("a kernel by path", {"args": ["-kernel", "/boot/vmlinuz"]}),
    ("an incoming exec", {"args": ["-incoming", "exec:sh"]}),
    ("a descriptor not handed over", {"args": ["-drive", "file=/proc/self/fd/{fd:other}"]}),
    ("no seccomp filter", {"args": ["-name", "banger-0123456789ab"]}),
    ("seccomp off", {"args": ["-name", "banger-0123456789ab", "-sandbox", "off"]}),
    ("another VM's name", {"args": ["-name", "banger-ba9876543210", "-sandbox", SANDBOX]}),
    ("a file outside the state dir", {"files": {"kernel": ops.VMFile(path="/etc/shadow",
                                                                     mode="r")}}),
    ("a path with ..", {"files": {"kernel": ops.VMFile(path="/x/../etc/shadow", mode="r")}}),
    ("QMP elsewhere", {"qmp": "/tmp/qmp.sock"}),
    ("QMP in another VM's dir", {"qmp": "/RUN/vms/ba9876543210/qmp.sock"}),
    ("the agent's port elsewhere", {"agent": "/tmp/agent.sock"}),
    ("the agent's port in another VM's dir", {"agent": "/RUN/vms/ba9876543210/agent.sock"}),
    ("a file called agent", {"files": {"agent": ops.VMFile(path="/S/x", mode="r")}}),
    ("a log elsewhere", {"stderr": "/var/log/syslog"}),
    ("another VM's dm device", {"files": {"rootfs": ops.VMFile(
        path="/dev/mapper/banger-abc123-ba9876543210", mode="rw", give=True)}}),
    ("a device of the host's", {"files": {"rootfs": ops.VMFile(path="/dev/sda", mode="rw")}}),
    ("a foreign TAP", {"tap": "eth0"}),
]


@pytest.mark.parametrize(("why", "change"), LAUNCH_REFUSED, ids=[w for w, _ in LAUNCH_REFUSED])
def test_a_launch_out_of_policy_is_refused_and_starts_nothing(
        tmp_path: Path, why: str, change: dict[str, Any]) -> None:
    lt = Launch(tmp_path)
    if "qmp" in change:
        change = {"qmp": change["qmp"].replace("/RUN", str(lt.run))}
    if "agent" in change:
        change = {"agent": change["agent"].replace("/RUN", str(lt.run))}
    if "agent" in change.get("files", {}):
        change = {"files": {**lt.request().files, "agent": ops.VMFile(
            path=str(lt.state / "x"), mode="r")}}
    with pytest.raises(Refused):
        HostOps.local(lt.executor).qemu_launch(lt.request(**change))
    assert lt.runner.ran(sys.executable) == [], why
    assert not lt.cgroups.group("banger-abc123/0123456789ab").exists()


def test_the_vms_own_dm_snapshot_device_is_in_policy(tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    dev = ops.VMFile(path="/dev/mapper/banger-abc123-0123456789ab", mode="rw", give=True)
    lt.policy.check(lt.request(files={**lt.request().files, "rootfs": dev}))
    assert lt.policy.dm_device("0123456789ab") == Path(dev.path)


def test_a_launch_never_follows_a_symlink_or_takes_a_file_not_the_daemons(
        tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    rootfs = Path(lt.plan.rootfs)
    rootfs.unlink()
    rootfs.symlink_to("/etc/hostname")
    with pytest.raises(HostError, match="cannot set up QEMU"):
        HostOps.local(lt.executor).qemu_launch(lt.request())
    # a directory on the way swapped for a symlink
    lt2 = Launch(tmp_path / "2")
    vms = lt2.state / "vms"
    vms.rename(lt2.state / "elsewhere")
    vms.symlink_to(lt2.state / "elsewhere")
    with pytest.raises(HostError, match="cannot set up QEMU"):
        HostOps.local(lt2.executor).qemu_launch(lt2.request())
    assert lt.runner.ran(sys.executable) == [] and lt2.runner.ran(sys.executable) == []
    if os.geteuid() == 0:
        lt3 = Launch(tmp_path / "3")
        os.chown(lt3.plan.work_disk, 65534, 65534)
        with pytest.raises(Refused, match="not the daemon's file"):
            HostOps.local(lt3.executor).qemu_launch(lt3.request())


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    Path(lt.plan.work_disk).unlink()
    with pytest.raises(HostError, match=r"cannot set up QEMU.*work\.ext4"):
        HostOps.local(lt.executor).qemu_launch(lt.request())


def test_launcher_joins_the_cgroup_then_execs_with_descriptors(tmp_path: Path) -> None:
    """The real launcher: a shell stands in for QEMU, with the descriptors it inherits."""
    import socket

    disk = tmp_path / "disk"
    disk.write_text("disk contents\n")
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    out = tmp_path / "out"
    disk_fd = os.open(disk, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "mon.sock"))
    sock.listen(1)
    log_fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    spec = {
        "command": ["/bin/sh", "-c",
                    f"cat /proc/self/fd/{{fd:disk}} > {out}; echo err >&2; "
                    f"test -S /proc/self/fd/{{fd:mon}} && echo sock >> {out}"],
        "fds": {"disk": disk_fd, "mon": sock.fileno()},
        "stderr_fd": log_fd,
        "cgroup_procs": [str(procs)],
    }
    try:
        res = subprocess.run([sys.executable, "-I", str(SPAWN)],
                             input=json.dumps(spec).encode(), capture_output=True, check=True,
                             timeout=30, pass_fds=(disk_fd, sock.fileno(), log_fd))
    finally:
        os.close(disk_fd)
        os.close(log_fd)
        sock.close()
    pid = int(res.stdout)
    assert pid > 0
    launcher_pid = int(procs.read_text())  # the launcher wrote itself in before forking
    assert launcher_pid != pid
    for _ in range(200):  # bounded: 10 s for a shell to run two commands
        if out.exists() and "sock" in out.read_text():
            break
        time.sleep(0.05)
    assert out.read_text() == "disk contents\nsock\n"
    assert (tmp_path / "log").read_text() == "err\n"


def _can_unshare_network() -> bool:
    return os.geteuid() == 0 and subprocess.run(
        ["unshare", "--net", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_unshare_network(),
                    reason="a network namespace needs root with CAP_SYS_ADMIN (unshare --net)")
def test_launcher_puts_the_vmm_in_an_empty_network_namespace(tmp_path: Path) -> None:
    """``own_netns``: the VMM's namespace is not the launcher's and holds only ``lo``;
    a descriptor opened outside (here a socket listening on the host's loopback) still
    works in there, as QEMU's TAP does."""
    import socket

    out = tmp_path / "out"
    outside = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    outside.bind(("127.0.0.1", 0))
    outside.listen(1)
    port = outside.getsockname()[1]
    spec = {
        "command": ["/bin/bash", "-c",  # bash: /dev/tcp
                    f"readlink /proc/self/ns/net > {out}; cut -d: -f1 /proc/self/net/dev "
                    f"| tail -n +3 | tr -d ' ' >> {out}; "
                    f"test -S /proc/self/fd/{{fd:sock}} && echo inherited >> {out}; "
                    f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached >> {out}; "
                    f"echo done >> {out}"],
        "fds": {"sock": outside.fileno()}, "stderr_fd": 2, "own_netns": True,
    }
    try:
        subprocess.run([sys.executable, "-I", str(SPAWN)], input=json.dumps(spec).encode(),
                       capture_output=True, check=True, timeout=30,
                       pass_fds=(outside.fileno(),))
        for _ in range(200):  # bounded: 10 s for a shell to run a few commands
            if out.exists() and out.read_text().endswith("done\n"):
                break
            time.sleep(0.05)
    finally:
        outside.close()
    netns, *rest = out.read_text().splitlines()
    assert netns != os.readlink("/proc/self/ns/net")
    assert rest == ["lo", "inherited", "done"]  # the host's loopback is out of reach


def test_launcher_reports_a_cgroup_it_cannot_join(tmp_path: Path) -> None:
    spec = {"command": ["/bin/true"], "fds": {}, "stderr_fd": 2,
            "cgroup_procs": [str(tmp_path / "missing" / "cgroup.procs")]}
    res = subprocess.run([sys.executable, "-I", str(SPAWN)], input=json.dumps(spec).encode(),
                         capture_output=True, timeout=30)
    assert res.returncode == 1
    assert b"cannot join the VM's cgroup" in res.stderr and b"missing" in res.stderr


# ------------------------------------------------------------------ the VMM user, config


def test_ensure_user_creates_a_missing_system_user(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    monkeypatch.setattr(vmmuser, "lookup_user",
                        lambda name: USER if made else None)
    runner = FakeRunner()

    def useradd(argv: list[str]) -> Result:
        made.append(argv[-1])
        return Result(argv, 0, b"", b"")

    runner.on(["useradd"], useradd)
    assert ensure_user(runner, "banger-vmm") == USER
    assert runner.ran("useradd") == [["useradd", "--system", "--no-create-home", "--home-dir",
                                      "/nonexistent", "--shell", "/usr/sbin/nologin",
                                      "--user-group", "banger-vmm"]]
    assert ensure_user(runner, "banger-vmm") == USER and len(runner.ran("useradd")) == 1


def test_ensure_user_refuses_root() -> None:
    with pytest.raises(BadRequest) as info:
        ensure_user(FakeRunner(), "root")
    assert info.value.hint


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), (0, 985), (990, 0)])
def test_an_account_with_uid_or_gid_0_is_refused(uid: int, gid: int) -> None:
    with pytest.raises(BadRequest, match=rf"is root \(uid {uid}, gid {gid}\)") as info:
        check_unprivileged(VMMUser("toor", uid, gid))
    assert "unprivileged" in info.value.hint
    assert check_unprivileged(USER) is USER


def test_config_vmm_user() -> None:
    assert Config().vmm_user == "banger-vmm"
    assert parse_config({"vmm_user": "qemu-vms"}).vmm_user == "qemu-vms"
    for bad in ("root", "Bad User", "x" * 40, "../x"):
        with pytest.raises(BadRequest, match="vmm_user"):
            parse_config({"vmm_user": bad})


# ------------------------------------------------------------------ doctor, vm show


def test_doctor_reports_the_confinement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nSeccomp:\t0\n")
    monkeypatch.setattr(doctor, "lookup_user", lambda name: USER)
    root = v2_tree(tmp_path)
    monkeypatch.setattr(doctor, "detect_cgroups", lambda: CgroupHost(
        CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")}))
    user, seccomp, cgroup = doctor._confinement(Config(), status)
    assert user.status == doctor.Status.OK and "banger-vmm (uid 990)" in user.detail
    assert seccomp.status == doctor.Status.OK and SANDBOX in seccomp.detail
    assert cgroup.status == doctor.Status.OK and "cgroup v2" in cgroup.detail
    monkeypatch.setattr(doctor, "lookup_user", lambda name: None)
    status.write_text("Name:\tx\n")
    user, seccomp, _ = doctor._confinement(Config(), status)
    assert user.status == doctor.Status.WARN and seccomp.status == doctor.Status.FAIL


CONFINED_VM = {
    "id": "0123456789ab", "name": "web", "state": "running", "vmm": "qemu", "ip": "172.29.0.2",
    "mac": "06:00:ac:1d:00:02", "created_at": "2026-11-23T11:45:00+00:00",
    "updated_at": "2026-11-23T11:46:00+00:00", "pid": 4242, "tap": "bgt00000001",
    "last_error": None, "stop_reason": None, "workspace": None,
    "spec": {"image": "debian-bookworm", "vcpu": 2, "memory_mib": 1024, "disk_size": 4 << 30,
             "work_disk_size": 2 << 30, "vmm": "auto"},
    "confinement": {"user": "banger-vmm", "uid": 990, "seccomp": SANDBOX, "netns": "own",
                    "cgroup": {
        "version": "v1", "path": "memory,pids,cpu:/banger-abc123/0123456789ab",
        "limits": {"memory_bytes": 1536 << 20, "pids_max": 256, "cpu_weight": 200}}},
}


def test_vm_show_lists_the_confinement() -> None:
    lines = output.confinement_lines(CONFINED_VM["confinement"])  # type: ignore[arg-type]
    text = output.pairs(lines) + "\n"
    golden = GOLDEN / "vm_confinement.txt"
    if os.environ.get("BANGER_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()
    assert output.confinement_lines(None) == []


# ------------------------------------------------------------------ the daemon records it


class ConfinedFake(FakeVMM):
    """The fake VMM, plus the confinement hooks the QEMU driver has."""

    def __init__(self) -> None:
        super().__init__()
        self.readopted: list[tuple[str, int]] = []

    def confinement(self, vm_id: str, pid: int | None = None) -> dict[str, Any]:
        return {"user": "banger-vmm", "uid": 990, "seccomp": SANDBOX,
                "cgroup": {"version": "v2", "path": f"/cg/{vm_id}", "limits": None}}

    def readopt(self, vm_id: str, pid: int) -> dict[str, Any]:
        self.readopted.append((vm_id, pid))
        return self.confinement(vm_id)


def test_vm_show_carries_the_confinement_until_the_vm_stops(
        daemon: Daemon, world: FakeWorld) -> None:
    world.vmm = ConfinedFake()
    vmcreate.create_sync(daemon, CreateParams(name="c"))
    vm = daemon.db.get_vm(daemon.db.find_vm("c").id)  # type: ignore[union-attr]
    shown = view(daemon, vm)
    assert shown["confinement"]["cgroup"]["path"] == f"/cg/{vm.id}"
    # a restarted daemon re-adopts the live VMM, and its cgroup with it
    reconcile.reconcile_vm(daemon, vm)
    assert world.vmm.readopted == [(vm.id, shown["pid"])]
    vmpower.stop(daemon, "c")
    assert view(daemon, daemon.db.get_vm(vm.id))["confinement"] is None


def test_readopt_recreates_the_cgroup_and_moves_the_vmm_in(tmp_path: Path) -> None:
    """A live VMM outside its cgroup (removed, or from before confinement) is put back,
    with limits from its own -m and -smp."""
    root = v2_tree(tmp_path)
    host = CgroupHost(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})
    policy = Policy(FIREWALL, install_tag="abc123", vmm_user="nobody",
                    daemon_uid=os.getuid())
    ops_ = HostOps.local(Executor(policy, FakeRunner(), cgroups=lambda: host))
    drv = QemuDriver(FakeRunner(), "qemu", "tcg", user=USER, cgroups=host,
                     install_tag="abc123", host=ops_)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-name", "banger-0123456789ab", "-m", "768", "-smp", "3"])
    try:
        # Popen returns from inside the child's execve; its argv shows a moment later.
        for _ in range(200):  # bounded: 10 s
            if b"-smp" in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        conf = drv.readopt("0123456789ab", proc.pid)
        group = drv.cgroup("0123456789ab")
        assert group.holds(proc.pid) and group.limits() == limits_for(768, 3)
        assert conf["cgroup"]["limits"] == limits_for(768, 3).to_json()
        assert conf["user"] == "banger-vmm"
    finally:
        proc.kill()
        proc.wait()


def test_a_restore_loads_the_saved_guest_by_descriptor_and_keeps_it_paused(
        tmp_path: Path) -> None:
    saved = tmp_path / "s" / "saved"
    p = dataclasses.replace(plan(tmp_path), restore=saved)
    argv = build_argv("qemu-system-x86_64", p, "tcg", 2596128)
    assert argv[argv.index("-incoming") + 1] == "fd:{fd:restore}"
    assert "-S" in argv  # the vCPUs run only once the saved state is deleted
    assert launch_request(p, argv[1:], "tcg").files["restore"] == ops.VMFile(
        path=str(saved / "qemu.migration"), mode="r")
    assert str(saved) not in " ".join(argv)
    plain = build_argv("qemu-system-x86_64", plan(tmp_path), "tcg", 2596128)
    assert "-incoming" not in plain and "-S" not in plain


def test_kvm_launches_are_in_policy_and_what_slipped_before_is_not(tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    kvm = build_argv("qemu-system-x86_64", lt.plan, "kvm", None)[1:]
    lt.policy.check(lt.request(args=kvm, accel="kvm"))  # -cpu host, -accel kvm
    names = {*lt.request().files, "tap", "qmp"}
    for bad in (["-drive", "if=none,id=x,format=raw,file.driver=vvfat,file.dir=etc"],
                ["-display", "vnc=0.0.0.0:0"],
                ["-netdev", "tap,id=n,fd={fd:tap},vhost=on"],
                ["-device", "vhost-vsock-device,guest-cid=3"],
                ["-device", "usb-host,hostbus=1,hostaddr=2"],
                ["-M", "microvm,dumpdtb=x"],
                ["-device", "virtio-net-device,netdev=n,romfile=x"]):
        with pytest.raises(Refused):
            lt.policy.qemu_args("0123456789ab",
                                ["-name", "banger-0123456789ab", "-sandbox", SANDBOX, *bad],
                                names)
    # the executor's own descriptor names are not file names
    with pytest.raises(Refused, match="may not be called"):
        lt.policy.check(lt.request(files={**lt.request().files, "tap": ops.VMFile(
            path=str(lt.plan.rootfs), mode="rw")}))


def test_the_log_must_be_the_daemons_own_plain_file(tmp_path: Path) -> None:
    lt = Launch(tmp_path)
    log = lt.plan.paths.vmm_log
    other = lt.state / "other"
    other.write_text("")
    os.link(other, log)  # a hard link: st_nlink 2
    with pytest.raises(Refused, match="plain file"):
        HostOps.local(lt.executor).qemu_launch(lt.request())
    log.unlink()
    os.mkfifo(log)  # refused at once (ENXIO without a reader): never hangs the helper
    with pytest.raises((Refused, HostError)):
        HostOps.local(lt.executor).qemu_launch(lt.request())
    log.unlink()
    lt.launch()  # made afresh, the daemon's
    assert log.stat().st_uid == os.getuid()


def test_signals_reach_only_this_installs_vmm(tmp_path: Path) -> None:
    marker = "banger-0123456789ab"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        for _ in range(200):
            if marker.encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        from banger.proc import identify

        ident = identify(proc.pid, marker)
        assert ident is not None
        # another install's daemon (another uid, not in this install's cgroup): refused
        other = Executor(Policy(FIREWALL, install_tag="abc123", vmm_user="nobody",
                                daemon_uid=4242), FakeRunner())
        with pytest.raises(Refused, match="not a VMM of this install"):
            HostOps.local(other).signal(ident, 15)
        assert proc.poll() is None
        mine = Executor(Policy(FIREWALL, install_tag="abc123", vmm_user="nobody",
                               daemon_uid=os.getuid()), FakeRunner())
        assert HostOps.local(mine).signal(ident, 15) is True
        assert proc.wait(10) != 0
    finally:
        proc.kill()
        proc.wait()
