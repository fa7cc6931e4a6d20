"""The jailer: layout and argv (pure), and building jails on a real filesystem.

The side-effect tests need root (mknod, chown to another uid), like the jailer.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.daemon.fcproc import JailerSettings, JailLayout, direct_view, jailed_view
from banger.daemon.fcproc.driver import configure
from banger.daemon.fcproc.jail import (
    Exposure,
    check_exec_file,
    check_jail_id,
    expose,
    firecracker_argv,
    jailer_argv,
    move_out,
    plan_exposures,
    prepare_jail,
    readable_by,
    remove_jail,
    socket_links,
)
from banger.errors import BadRequest, HostError
from banger.hostops.cgroups import CgroupHost, CgroupVersion, Limits, limits_for
from banger.layout import Layout, VMPaths
from banger.vmm import LaunchPlan
from banger.vmmuser import VMMUser

NOBODY = 65534
VMM = VMMUser("banger-vmm", 990, 985)
V1 = CgroupHost(CgroupVersion.V1, {c: Path("/sys/fs/cgroup") / c for c in ("memory", "pids",
                                                                             "cpu")})
V2 = CgroupHost(CgroupVersion.V2, {c: Path("/sys/fs/cgroup") for c in ("memory", "pids", "cpu")})


def settings(user: VMMUser = VMM, cgroups: CgroupHost = V2,
             base: Path = Path("/srv/jailer")) -> JailerSettings:
    return JailerSettings("/usr/bin/jailer", base, user, cgroups, "banger-abc123")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")


def make_plan(paths: VMPaths, *, initrd: Path | None = Path("/img/initrd"),
              kernel: Path = Path("/img/vmlinux"), rootfs: str = "/dev/mapper/banger-0a1b",
              extra_disks: tuple[str, ...] = ()) -> LaunchPlan:
    return LaunchPlan(vm_id="0a1b2c3d4e5f", name="box", vcpu=2, memory_mib=512,
                      kernel=kernel, initrd=initrd, cmdline="console=ttyS0",
                      rootfs=rootfs, work_disk=str(paths.work_disk),
                      tap="tap-1", mac="06:00:00:00:00:01", paths=paths, extra_disks=extra_disks)


# ------------------------------------------------------------------ pure


def test_layout_follows_the_jailer() -> None:
    layout = JailLayout.for_vm(Path("/srv/jailer"), "/usr/local/bin/firecracker",
                               "banger-0a1b2c3d4e5f")
    assert layout.jail_dir == Path("/srv/jailer/firecracker/banger-0a1b2c3d4e5f")
    assert layout.root == Path("/srv/jailer/firecracker/banger-0a1b2c3d4e5f/root")
    assert layout.host_path("/fc.sock") == layout.root / "fc.sock"
    with pytest.raises(ValueError, match="absolute"):
        layout.host_path("fc.sock")
    # The directory is named after the binary, as the jailer names it.
    other = JailLayout.for_vm(Path("/j"), "/opt/fc/firecracker-v1.7.0-x86_64", "banger-1")
    assert other.root == Path("/j/firecracker-v1.7.0-x86_64/banger-1/root")


@pytest.mark.parametrize("bad", ["", "banger_1", "banger.1", "a" * 65, "banger 1", "../x"])
def test_jail_id_is_checked(bad: str) -> None:
    with pytest.raises(BadRequest, match="letters, digits and hyphens"):
        check_jail_id(bad)


def test_jail_id_limits() -> None:
    assert check_jail_id("a" * 64) == "a" * 64
    assert check_jail_id("banger-0a1b2c3d4e5f") == "banger-0a1b2c3d4e5f"


def test_exec_file_is_checked() -> None:
    assert check_exec_file("/usr/bin/firecracker") == "firecracker"
    with pytest.raises(BadRequest, match="absolute"):
        check_exec_file("bin/firecracker")
    with pytest.raises(BadRequest, match="contains 'firecracker'") as exc:
        check_exec_file("/usr/bin/fc")
    assert "symlink" in exc.value.hint


LIMITS = Limits(memory_bytes=768 << 20, pids_max=256, cpu_weight=200)


def test_argv_cgroup_v2() -> None:
    assert jailer_argv(settings(), "/usr/bin/firecracker", "banger-0a1b", LIMITS) == [
        "/usr/bin/jailer", "--id", "banger-0a1b", "--exec-file", "/usr/bin/firecracker",
        "--uid", "990", "--gid", "985", "--chroot-base-dir", "/srv/jailer",
        "--cgroup-version", "2", "--parent-cgroup", "banger-abc123",
        "--cgroup", "memory.max=805306368", "--cgroup", "pids.max=256",
        "--cgroup", "cpu.weight=200",
        "--", "--api-sock", "/fc.sock",
    ]


def test_argv_cgroup_v1() -> None:
    argv = jailer_argv(settings(cgroups=V1), "/usr/bin/firecracker", "banger-0a1b",
                       limits_for(512, 1))
    own = argv[:argv.index("--")]
    assert own[own.index("--cgroup-version") + 1] == "1"
    assert own[own.index("--parent-cgroup") + 1] == "banger-abc123"
    assert [own[i + 1] for i, a in enumerate(own) if a == "--cgroup"] == [
        f"memory.limit_in_bytes={(512 + 512) << 20}", "pids.max=256", "cpu.shares=1024"]
    assert argv[argv.index("--") + 1:] == ["--api-sock", "/fc.sock"]


def test_settings_refuse_root_and_name_the_vm_cgroup() -> None:
    for uid, gid in ((0, 0), (0, 985), (990, 0)):
        with pytest.raises(BadRequest, match="is root") as exc:
            settings(user=VMMUser("toor", uid, gid))
        assert "unprivileged" in exc.value.hint
    s = settings(cgroups=V1)
    assert (s.uid, s.gid) == (990, 985)
    group = s.cgroup("banger-0a1b")
    assert group.rel == "banger-abc123/banger-0a1b"  # <parent>/<id>, as the jailer makes it
    assert group.dirs == [Path("/sys/fs/cgroup") / c / "banger-abc123/banger-0a1b"
                          for c in ("memory", "pids", "cpu")]
    for bad in ("", "/abs", "../up", "a/../../b"):
        with pytest.raises(ValueError, match="relative path"):
            JailerSettings("/usr/bin/jailer", Path("/j"), VMM, V2, bad)


def test_unjailed_argv() -> None:
    assert firecracker_argv("/usr/bin/firecracker", "/run/banger/vms/x/fc.sock",
                            "banger-x") == [
        "/usr/bin/firecracker", "--api-sock", "/run/banger/vms/x/fc.sock", "--id", "banger-x"]


def test_views(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "r", tmp_path / "k")
    paths = layout.vm("0a1b2c3d4e5f")
    plan = make_plan(paths)
    direct = direct_view(plan)
    assert (direct.api_socket, direct.kernel, direct.initrd, direct.rootfs, direct.log,
            direct.metrics, direct.vsock) == (
        str(paths.api_socket), "/img/vmlinux", "/img/initrd", "/dev/mapper/banger-0a1b",
        str(paths.vmm_log), str(paths.metrics), str(paths.vsock_socket))
    assert not direct.jailed
    jailed = jailed_view(plan)
    assert jailed.jailed
    assert (jailed.api_socket, jailed.kernel, jailed.initrd, jailed.rootfs, jailed.work_disk,
            jailed.log, jailed.metrics, jailed.vsock) == (
        "/fc.sock", "/vmlinux", "/initrd", "/rootfs", "/work", "/vmm.log", "/fc.metrics",
        "/vsock.sock")
    assert jailed_view(make_plan(paths, initrd=None)).initrd is None


def test_exposures_mark_what_firecracker_writes(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    items = plan_exposures(make_plan(paths, initrd=None, kernel=Path("/k"), rootfs="/r",
                                     extra_disks=("/x",)))
    assert [(str(i.source), i.jailed, i.writable) for i in items] == [
        ("/k", "/vmlinux", False), ("/r", "/rootfs", True),
        (str(paths.work_disk), "/work", True), (str(paths.vmm_log), "/vmm.log", True),
        ("/x", "/extra0", True)]
    assert jailed_view(make_plan(paths, extra_disks=("/x", "/y"))).extra_disks == (
        "/extra0", "/extra1")


def test_socket_links_are_short_and_point_into_the_jail(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "s", Path("/run/banger/vms/0a1b2c3d4e5f"))
    layout = JailLayout(Path("/srv/" + "deep/" * 30), "firecracker", "banger-0a1b2c3d4e5f")
    links = socket_links(layout, paths)
    assert links == {
        paths.api_socket: layout.root / "fc.sock",
        paths.vsock_socket: layout.root / "vsock.sock",
        paths.metrics: layout.root / "fc.metrics",
    }
    assert all(len(str(link).encode()) < 108 for link in links)
    assert len(str(layout.root / "fc.sock").encode()) >= 108  # the reason for the links


# (file mode, file owner, file group, reader uid, reader gid, readable)
@pytest.mark.parametrize("case", [
    (0o600, 1000, 1000, 1000, 1000, True),
    (0o200, 1000, 1000, 1000, 1000, False),  # owner without read bit
    (0o640, 0, 1000, 1000, 1000, True),      # via group
    (0o600, 0, 1000, 1000, 1000, False),
    (0o644, 0, 0, 1000, 1000, True),         # via other
    (0o640, 0, 0, 1000, 1000, False),
    (0o000, 5, 5, 0, 0, True),               # root reads anything
])
def test_readable_by(case: tuple[int, int, int, int, int, bool]) -> None:
    mode, owner, group, uid, gid, ok = case
    st = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, owner, group, 0, 0, 0, 0))
    assert readable_by(st, uid, gid) is ok


# ------------------------------------------------------------------ side effects


@pytest.fixture
def jail_root(tmp_path: Path) -> Path:
    root = tmp_path / "jail" / "root"
    root.mkdir(parents=True)
    return root


@needs_root
def test_writable_file_is_hard_linked_and_chowned(tmp_path: Path, jail_root: Path) -> None:
    disk = tmp_path / "work.ext4"
    disk.write_bytes(b"disk")
    disk.chmod(0o644)
    target = expose(Exposure(disk, "/work", writable=True), jail_root, NOBODY, NOBODY)
    assert target == jail_root / "work"
    assert target.stat().st_ino == disk.stat().st_ino  # writes reach the original
    assert (disk.stat().st_uid, disk.stat().st_gid) == (NOBODY, NOBODY)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600  # the VMM user's alone


@needs_root
def test_readable_file_is_linked_without_changing_its_owner(tmp_path: Path,
                                                            jail_root: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    target = expose(Exposure(kernel, "/vmlinux", writable=False), jail_root, NOBODY, NOBODY)
    assert target.stat().st_ino == kernel.stat().st_ino
    assert kernel.stat().st_uid == 0


@needs_root
def test_unreadable_read_only_file_is_copied_for_the_jail_user(tmp_path: Path,
                                                               jail_root: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o600)  # root only
    target = expose(Exposure(kernel, "/vmlinux", writable=False), jail_root, NOBODY, NOBODY)
    assert target.stat().st_ino != kernel.stat().st_ino
    assert target.read_bytes() == b"kernel"
    assert (target.stat().st_uid, kernel.stat().st_uid) == (NOBODY, 0)


@needs_root
def test_block_device_gets_its_own_node(tmp_path: Path, jail_root: Path) -> None:
    dev = tmp_path / "dm-7"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(253, 7))
    link = tmp_path / "banger-root"  # like /dev/mapper/<name> -> ../dm-7
    link.symlink_to(dev)
    target = expose(Exposure(link, "/rootfs", writable=True), jail_root, NOBODY, NOBODY)
    st = target.lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(253, 7)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert dev.stat().st_uid == 0  # the host's node is untouched


def test_other_file_kinds_and_missing_files_are_refused(tmp_path: Path,
                                                        jail_root: Path) -> None:
    with pytest.raises(HostError, match="not a regular file or block device"):
        expose(Exposure(Path("/dev/null"), "/rootfs", writable=True), jail_root, 0, 0)
    with pytest.raises(HostError, match="No such file"):
        expose(Exposure(tmp_path / "missing", "/rootfs", writable=True), jail_root, 0, 0)


@pytest.fixture
def other_fs() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    d = Path(tempfile.mkdtemp(prefix="bfj-", dir=shm))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


@needs_root
def test_cross_filesystem_files(other_fs: Path, jail_root: Path) -> None:
    disk = other_fs / "work.ext4"
    disk.write_bytes(b"disk")
    with pytest.raises(HostError, match="another filesystem") as exc:
        expose(Exposure(disk, "/work", writable=True), jail_root, NOBODY, NOBODY)
    assert "same filesystem as state_dir" in exc.value.hint
    kernel = other_fs / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    target = expose(Exposure(kernel, "/vmlinux", writable=False), jail_root, NOBODY, NOBODY)
    assert target.read_bytes() == b"kernel" and target.stat().st_ino != kernel.stat().st_ino


@needs_root
def test_prepare_and_remove_jail(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "r", tmp_path / "k")
    paths = layout.vm("0a1b2c3d4e5f")
    paths.state.mkdir(parents=True)
    paths.run.mkdir(parents=True)
    for f in (paths.rootfs, paths.work_disk, paths.vmm_log):
        f.write_bytes(b"x")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    kernel.chmod(0o644)
    nobody = settings(user=VMMUser("nobody", NOBODY, NOBODY), base=tmp_path / "jails")
    jail = JailLayout.for_vm(nobody.chroot_base, "/usr/bin/firecracker", "banger-0a1b2c3d4e5f")
    (jail.root / "stale").mkdir(parents=True)  # left by a crashed run

    items = plan_exposures(make_plan(paths, initrd=None, kernel=kernel,
                                     rootfs=str(paths.rootfs)))
    prepare_jail(jail, nobody, paths, items)
    assert sorted(os.listdir(jail.root)) == ["fc.metrics", "rootfs", "vmlinux", "vmm.log",
                                             "work"]
    assert jail.host_path("/fc.metrics").stat().st_uid == NOBODY
    assert os.readlink(paths.api_socket) == str(jail.root / "fc.sock")
    assert os.readlink(paths.vsock_socket) == str(jail.root / "vsock.sock")
    assert os.readlink(paths.metrics) == str(jail.root / "fc.metrics")

    assert remove_jail(jail) is True
    assert not jail.jail_dir.exists() and jail.jail_dir.parent.is_dir()
    assert paths.rootfs.read_bytes() == b"x" and kernel.exists()  # originals survive
    assert remove_jail(jail) is False  # idempotent


def test_remove_jail_never_follows_a_symlinked_jail(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    (precious / "root").mkdir(parents=True)
    layout = JailLayout(tmp_path / "jails", "firecracker", "banger-1")
    layout.jail_dir.parent.mkdir(parents=True)
    layout.jail_dir.symlink_to(precious)
    assert remove_jail(layout) is False
    assert (precious / "root").is_dir()


def test_move_out(tmp_path: Path, other_fs: Path) -> None:
    src = tmp_path / "snapshot.mem"
    src.write_bytes(b"memory")
    move_out(src, tmp_path / "out" / "vm.mem")
    assert (tmp_path / "out" / "vm.mem").read_bytes() == b"memory" and not src.exists()
    src.write_bytes(b"again")
    move_out(src, other_fs / "vm.mem")  # across filesystems: copy + unlink
    assert (other_fs / "vm.mem").read_bytes() == b"again" and not src.exists()
    with pytest.raises(HostError, match="cannot move"):
        move_out(tmp_path / "missing", tmp_path / "out" / "x")


def test_symlink_reaches_a_socket_whose_own_path_is_too_long(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """connect() through the short runtime-dir link works where the jail path cannot."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    target = deep / "fc.sock"
    assert len(str(target).encode()) >= 108
    monkeypatch.chdir(deep)  # bind relative to the jail root, as the chrooted VMM does
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind("fc.sock")
        srv.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as direct, \
                pytest.raises(OSError, match="too long"):
            direct.connect(str(target))
        link = Path(tempfile.mkdtemp(prefix="bfl-", dir="/tmp")) / "fc.sock"
        link.symlink_to(target)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as cli:
                cli.connect(str(link))
                conn, _ = srv.accept()
                with conn:
                    cli.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
        finally:
            link.unlink()
            link.parent.rmdir()


def test_configure_adds_extra_disks_after_the_work_disk(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    class Recorder:
        def put_drive(self, drive_id: str, path: str, **_: object) -> None:
            calls.append((drive_id, path))

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    plan = make_plan(paths, extra_disks=("/x",))
    configure(Recorder(), plan, jailed_view(plan))  # type: ignore[arg-type]
    assert calls == [("rootfs", "/rootfs"), ("work", "/work"), ("extra0", "/extra0")]
    calls.clear()
    configure(Recorder(), plan, direct_view(plan))  # type: ignore[arg-type]
    assert calls[2] == ("extra0", "/x")
