"""The jailer: layout and argv (pure), and building jails on a real filesystem.

The jail is the root helper's (:mod:`banger.hostops.jail`); the daemon only names
the files it holds (:func:`banger.daemon.fcproc.driver.jail_files`). The side-effect
tests need root (mknod, chown to another uid), like the jailer.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.daemon.fcproc.driver import (
    SnapshotFiles,
    configure,
    direct_view,
    firecracker_argv,
    jail_files,
    jailed_view,
)
from banger.errors import BadRequest, HostError
from banger.hostops import ops
from banger.hostops.cgroups import CgroupHost, CgroupVersion, Limits, limits_for
from banger.hostops.jail import (
    JAIL_FILES,
    JAIL_METRICS,
    JAIL_RESTORE_MEM,
    JAIL_RESTORE_STATE,
    JAIL_SNAPSHOT_MEM,
    JAIL_SNAPSHOT_STATE,
    MAX_EXTRA_DISKS,
    JailerSettings,
    JailLayout,
    check_exec_file,
    check_jail_id,
    jailer_argv,
    move_out,
    place,
    prepare_jail,
    readable_by,
    remove_jail,
)
from banger.layout import Layout, VMPaths
from banger.vmm import LaunchPlan
from banger.vmmuser import VMMUser

NOBODY = 65534
NOBODY_USER = VMMUser("nobody", NOBODY, NOBODY)
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


def opened(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of ``path``, as the root helper opens a VM's file."""
    return os.open(path, flags | os.O_CLOEXEC)


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


def test_argv_joins_the_vms_own_network_namespace_when_given_one() -> None:
    plain = jailer_argv(settings(), "/usr/bin/firecracker", "banger-0a1b", LIMITS)
    argv = jailer_argv(settings(), "/usr/bin/firecracker", "banger-0a1b", LIMITS,
                       Path("/run/netns/banger-abc123-0a1b2c3d4e5f"))
    sep = argv.index("--")
    assert argv[:sep] == [*plain[:plain.index("--")],
                          "--netns", "/run/netns/banger-abc123-0a1b2c3d4e5f"]
    assert argv[sep:] == plain[plain.index("--"):]  # Firecracker's own arguments unchanged
    assert "--netns" not in plain


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
    assert direct.tap == "tap-1"
    jailed = jailed_view(plan, netns=False)
    assert jailed.jailed
    assert (jailed.api_socket, jailed.kernel, jailed.initrd, jailed.rootfs, jailed.work_disk,
            jailed.log, jailed.metrics, jailed.vsock, jailed.tap) == (
        "/fc.sock", "/vmlinux", "/initrd", "/rootfs", "/work", "/vmm.log", "/fc.metrics",
        "/vsock.sock", "tap-1")
    assert jailed_view(make_plan(paths, initrd=None), netns=False).initrd is None
    # In a namespace of its own, the TAP Firecracker opens is the one made there.
    assert jailed_view(plan, netns=True).tap == "tap0"


def test_jail_files_mark_what_firecracker_writes(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    plan = make_plan(paths, initrd=None, kernel=Path("/k"), rootfs="/r", extra_disks=("/x",))
    assert jail_files(plan) == {
        "kernel": ops.VMFile(path="/k", mode="r"),
        "rootfs": ops.VMFile(path="/r", mode="rw", give=True),
        "work": ops.VMFile(path=str(paths.work_disk), mode="rw", give=True),
        "log": ops.VMFile(path=str(paths.vmm_log), mode="rw", give=True),
        "extra0": ops.VMFile(path="/x", mode="rw", give=True),
    }
    restore = SnapshotFiles(state=tmp_path / "fc.state", memory=tmp_path / "fc.mem")
    files = jail_files(make_plan(paths), restore)
    assert files["initrd"] == ops.VMFile(path="/img/initrd", mode="r")
    assert files["kernel"].give is False and files["initrd"].give is False
    assert files["snapshot_state"] == ops.VMFile(path=str(restore.state), mode="r", give=True)
    assert files["snapshot_mem"] == ops.VMFile(path=str(restore.memory), mode="r", give=True)
    assert set(files) <= set(JAIL_FILES)


def test_jail_files_land_where_the_jailed_view_looks(tmp_path: Path) -> None:
    """The helper places each file at JAIL_FILES[name]; Firecracker is told the view's."""
    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    plan = make_plan(paths, extra_disks=("/x", "/y"))
    view = jailed_view(plan, netns=False)
    files = jail_files(plan)
    assert {name: JAIL_FILES[name] for name in files} == {
        "kernel": view.kernel, "initrd": view.initrd, "rootfs": view.rootfs,
        "work": view.work_disk, "log": view.log, "extra0": view.extra_disks[0],
        "extra1": view.extra_disks[1]}
    assert view.extra_disks == ("/extra0", "/extra1")
    assert view.metrics == JAIL_METRICS
    # A snapshot to load has names of its own: a new snapshot of the restored VM is
    # written at JAIL_SNAPSHOT_*, which must not be the loaded (read-only) files.
    loaded = (JAIL_FILES["snapshot_state"], JAIL_FILES["snapshot_mem"])
    assert loaded == (JAIL_RESTORE_STATE, JAIL_RESTORE_MEM)
    assert not set(loaded) & {JAIL_SNAPSHOT_STATE, JAIL_SNAPSHOT_MEM}


def test_jail_files_refuse_more_extra_disks_than_a_jail_holds(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    most = tuple(f"/x{i}" for i in range(MAX_EXTRA_DISKS))
    assert f"extra{MAX_EXTRA_DISKS - 1}" in jail_files(make_plan(paths, extra_disks=most))
    with pytest.raises(BadRequest, match=f"at most {MAX_EXTRA_DISKS} extra disks"):
        jail_files(make_plan(paths, extra_disks=(*most, "/one-more")))


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


def place_path(path: Path, jailed: str, root: Path, *, writable: bool,
               flags: int = os.O_RDONLY) -> Path:
    """``place`` the file at ``path`` through a descriptor, closed afterwards."""
    fd = opened(path, flags)
    try:
        return place(fd, jailed, root, NOBODY_USER, writable=writable)
    finally:
        os.close(fd)


@needs_root
def test_writable_file_is_hard_linked_as_it_is(tmp_path: Path, jail_root: Path) -> None:
    disk = tmp_path / "work.ext4"
    disk.write_bytes(b"disk")
    os.chown(disk, 0, NOBODY)  # the caller gave it to the VMM group already
    disk.chmod(0o660)
    target = place_path(disk, "/work", jail_root, writable=True, flags=os.O_RDWR)
    assert target == jail_root / "work"
    assert target.stat().st_ino == disk.stat().st_ino  # writes reach the original
    st = disk.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY, 0o660)
    assert st.st_nlink == 2


@needs_root
def test_readable_file_is_linked_without_changing_its_owner(tmp_path: Path,
                                                            jail_root: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    target = place_path(kernel, "/vmlinux", jail_root, writable=False)
    assert target.stat().st_ino == kernel.stat().st_ino
    assert kernel.stat().st_uid == 0 and stat.S_IMODE(kernel.stat().st_mode) == 0o644


@needs_root
def test_link_follows_the_descriptor_not_the_name(tmp_path: Path, jail_root: Path) -> None:
    """A name swapped after the helper opened it does not change what the jail gets."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    fd = opened(kernel)
    try:
        kernel.rename(tmp_path / "vmlinux.old")
        kernel.write_bytes(b"swapped")
        target = place(fd, "/vmlinux", jail_root, NOBODY_USER, writable=False)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"kernel"
    assert target.stat().st_ino == (tmp_path / "vmlinux.old").stat().st_ino


@needs_root
def test_unreadable_read_only_file_is_copied_for_the_jail_user(tmp_path: Path,
                                                               jail_root: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o600)  # root only
    target = place_path(kernel, "/vmlinux", jail_root, writable=False)
    assert target.stat().st_ino != kernel.stat().st_ino
    assert target.read_bytes() == b"kernel"
    assert (target.stat().st_uid, kernel.stat().st_uid) == (NOBODY, 0)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@needs_root
def test_block_device_gets_its_own_node(tmp_path: Path, jail_root: Path) -> None:
    dev = tmp_path / "dm-7"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(253, 7))
    os.chown(dev, 0, 6)  # as the host's dm nodes: root:disk
    dev.chmod(0o660)
    # O_PATH: the node needs no device behind it to be stat'ed through its descriptor.
    target = place_path(dev, "/rootfs", jail_root, writable=True, flags=os.O_PATH)
    st = target.lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(253, 7)
    assert st.st_ino != dev.stat().st_ino
    # root's, the VMM user's group's: an owner could chmod the node or link it out of
    # the jail, and keep a name for whatever device gets its number next.
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOBODY, 0o660)
    host = dev.stat()  # the host's node is untouched
    assert (host.st_uid, host.st_gid, stat.S_IMODE(host.st_mode)) == (0, 6, 0o660)


@needs_root
def test_place_never_replaces_what_is_in_the_jail(tmp_path: Path, jail_root: Path) -> None:
    """A name already in the jail (say a symlink the VMM user left) is never written through."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    (jail_root / "vmlinux").symlink_to(precious)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o600)  # would be copied
    with pytest.raises(HostError, match="cannot put vmlinux in the jail"):
        place_path(kernel, "/vmlinux", jail_root, writable=False)
    kernel.chmod(0o644)  # would be linked
    with pytest.raises(HostError, match="cannot put vmlinux in the jail"):
        place_path(kernel, "/vmlinux", jail_root, writable=False)
    assert precious.read_bytes() == b"precious" and precious.stat().st_uid == 0


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
        place_path(disk, "/work", jail_root, writable=True, flags=os.O_RDWR)
    assert "jailer_chroot_base" in exc.value.hint
    assert not (jail_root / "work").exists()
    kernel = other_fs / "vmlinux"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    target = place_path(kernel, "/vmlinux", jail_root, writable=False)
    assert target.read_bytes() == b"kernel" and target.stat().st_ino != kernel.stat().st_ino
    assert target.stat().st_uid == NOBODY


@needs_root
def test_prepare_and_remove_jail(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "r", tmp_path / "k")
    paths = layout.vm("0a1b2c3d4e5f")
    paths.state.mkdir(parents=True)
    for f in (paths.rootfs, paths.work_disk, paths.vmm_log):
        f.write_bytes(b"x")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    kernel.chmod(0o644)
    nobody = settings(user=NOBODY_USER, base=tmp_path / "jails")
    jail = JailLayout.for_vm(nobody.chroot_base, "/usr/bin/firecracker", "banger-0a1b2c3d4e5f")
    (jail.root / "stale").mkdir(parents=True)  # left by a crashed run

    files = jail_files(make_plan(paths, initrd=None, kernel=kernel, rootfs=str(paths.rootfs)))
    fds = {name: opened(Path(f.path), os.O_RDWR if f.mode == "rw" else os.O_RDONLY)
           for name, f in files.items()}
    try:
        prepare_jail(jail, NOBODY_USER, {JAIL_FILES[name]: (fds[name], f.mode == "rw")
                                         for name, f in files.items()})
    finally:
        for fd in fds.values():
            os.close(fd)
    assert sorted(os.listdir(jail.root)) == ["fc.metrics", "rootfs", "vmlinux", "vmm.log",
                                             "work"]
    assert stat.S_IMODE(jail.root.stat().st_mode) & 0o027 == 0  # not the group's, nor others'
    metrics = jail.host_path(JAIL_METRICS).lstat()
    assert stat.S_ISREG(metrics.st_mode) and metrics.st_size == 0
    assert (metrics.st_uid, metrics.st_gid, stat.S_IMODE(metrics.st_mode)) == (
        NOBODY, NOBODY, 0o600)
    assert jail.host_path("/work").stat().st_ino == paths.work_disk.stat().st_ino
    assert not paths.api_socket.exists() and not paths.api_socket.is_symlink()  # no links

    assert remove_jail(jail) is True
    assert not jail.jail_dir.exists() and jail.jail_dir.parent.is_dir()
    assert paths.rootfs.read_bytes() == b"x" and kernel.exists()  # originals survive
    assert paths.work_disk.stat().st_nlink == 1
    assert remove_jail(jail) is False  # idempotent


def test_remove_jail_never_follows_a_symlinked_jail(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    (precious / "root").mkdir(parents=True)
    layout = JailLayout(tmp_path / "jails", "firecracker", "banger-1")
    layout.jail_dir.parent.mkdir(parents=True)
    layout.jail_dir.symlink_to(precious)
    assert remove_jail(layout) is False
    assert (precious / "root").is_dir()


@pytest.fixture
def jail(tmp_path: Path) -> JailLayout:
    layout = JailLayout(tmp_path / "jails", "firecracker", "banger-1")
    layout.root.mkdir(parents=True)
    return layout


def move(layout: JailLayout, jailed: str, target_dir: Path, name: str,
         owner: tuple[int, int]) -> None:
    """``move_out`` into ``target_dir`` through a descriptor, closed afterwards."""
    dfd = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        move_out(layout, jailed, dfd, name, owner)
    finally:
        os.close(dfd)


@needs_root
def test_move_out(tmp_path: Path, jail: JailLayout, other_fs: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    src = jail.host_path(JAIL_SNAPSHOT_MEM)
    src.write_bytes(b"memory")
    src.chmod(0o644)
    ino = src.stat().st_ino
    move(jail, JAIL_SNAPSHOT_MEM, out, "vm.mem", (NOBODY, NOBODY))
    st = (out / "vm.mem").stat()
    assert (out / "vm.mem").read_bytes() == b"memory" and not src.exists()
    assert st.st_ino == ino  # renamed, not copied
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert sorted(os.listdir(out)) == ["vm.mem"]  # no temporary left

    src.write_bytes(b"again")
    move(jail, JAIL_SNAPSHOT_MEM, other_fs, "vm.mem", (NOBODY, NOBODY))  # copy + unlink
    st = (other_fs / "vm.mem").stat()
    assert (other_fs / "vm.mem").read_bytes() == b"again" and not src.exists()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert sorted(os.listdir(other_fs)) == ["vm.mem"]


def test_move_out_replaces_an_older_file(tmp_path: Path, jail: JailLayout) -> None:
    own = (os.getuid(), os.getgid())
    jail.host_path(JAIL_SNAPSHOT_STATE).write_bytes(b"new")
    (tmp_path / "vm.state").write_bytes(b"old")
    move(jail, JAIL_SNAPSHOT_STATE, tmp_path, "vm.state", own)
    assert (tmp_path / "vm.state").read_bytes() == b"new"


def test_move_out_refuses_a_missing_file(tmp_path: Path, jail: JailLayout) -> None:
    with pytest.raises(HostError, match="cannot read"):
        move(jail, JAIL_SNAPSHOT_MEM, tmp_path, "vm.mem", (os.getuid(), os.getgid()))
    assert not (tmp_path / "vm.mem").exists()


def test_move_out_refuses_a_symlink_in_the_jail(tmp_path: Path, jail: JailLayout) -> None:
    """The VMM user owns the jail: a symlink it planted must not move the host's file."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    jail.host_path(JAIL_SNAPSHOT_MEM).symlink_to(precious)
    with pytest.raises(HostError, match="cannot read"):
        move(jail, JAIL_SNAPSHOT_MEM, out, "vm.mem", (os.getuid(), os.getgid()))
    assert precious.read_bytes() == b"precious"
    assert os.listdir(out) == []
    assert jail.host_path(JAIL_SNAPSHOT_MEM).is_symlink()


def test_move_out_refuses_a_hard_linked_file(tmp_path: Path, jail: JailLayout) -> None:
    """A link to a file elsewhere (say one of the host's) is not a file Firecracker wrote."""
    precious = tmp_path / "precious"
    precious.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    os.link(precious, jail.host_path(JAIL_SNAPSHOT_MEM))
    with pytest.raises(HostError, match="not a plain file"):
        move(jail, JAIL_SNAPSHOT_MEM, out, "vm.mem", (os.getuid(), os.getgid()))
    assert precious.read_bytes() == b"precious" and precious.stat().st_nlink == 2
    assert os.listdir(out) == []


def test_move_out_refuses_a_fifo(tmp_path: Path, jail: JailLayout) -> None:
    """Not a regular file: refused without blocking on the open."""
    os.mkfifo(jail.host_path(JAIL_SNAPSHOT_MEM))
    with pytest.raises(HostError, match="not a plain file"):
        move(jail, JAIL_SNAPSHOT_MEM, tmp_path, "vm.mem", (os.getuid(), os.getgid()))
    assert not (tmp_path / "vm.mem").exists()


def test_configure_adds_extra_disks_after_the_work_disk(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    class Recorder:
        def put_drive(self, drive_id: str, path: str, **_: object) -> None:
            calls.append((drive_id, path))

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    paths = VMPaths(tmp_path / "s", tmp_path / "r")
    plan = make_plan(paths, extra_disks=("/x",))
    configure(Recorder(), plan, jailed_view(plan, netns=False))  # type: ignore[arg-type]
    assert calls == [("rootfs", "/rootfs"), ("work", "/work"), ("extra0", "/extra0")]
    calls.clear()
    configure(Recorder(), plan, direct_view(plan))  # type: ignore[arg-type]
    assert calls[2] == ("extra0", "/x")


@needs_root
def test_place_refuses_a_jail_root_that_is_not_roots_own(tmp_path: Path,
                                                          jail_root: Path) -> None:
    """Once the jailer gave the root to the VMM user, its names can be swapped under
    the helper: it builds only in a directory of root's own."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    os.chown(jail_root, NOBODY, NOBODY)
    with pytest.raises(HostError, match="not root's own directory"):
        place_path(kernel, "/vmlinux", jail_root, writable=False, flags=os.O_RDONLY)
    assert os.listdir(jail_root) == []
