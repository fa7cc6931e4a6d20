"""Firecracker's jailer: per-VM chroot layout, its command line, and building the jail.

The jailer (a separate binary shipped with Firecracker) creates
``<chroot_base>/<exec_file_name>/<id>/root``, copies the Firecracker binary
into it, ``pivot_root``s there in a new mount namespace, creates
``/dev/kvm`` and ``/dev/net/tun``, drops to ``uid:gid`` and execs Firecracker
with ``--id=<id>`` plus whatever follows ``--`` on its command line. Before
that it makes the VM's cgroup, ``<hierarchy>/<parent cgroup>/<id>``, writes each
``--cgroup file=value`` into it and joins it. banger passes the VMM user
(config ``vmm_user``, never root) as ``uid:gid`` and the same cgroup limits a
QEMU VM gets, under this install's ``banger-<install tag>`` cgroup. Inside
the jail Firecracker sees only that directory, so everything it opens must be
put there first: the root helper hard-links the kernel, initrd, disks and log
into the root from descriptors it opened itself (a block device gets a fresh
device node instead), and hands the daemon connections to the API and vsock
sockets inside (``fc.connect``): the jail is the VMM user's, never the daemon's.

This is the root side (:mod:`banger.hostops.executor` uses it; so does the
daemon for the names and the pure argv). The first half is pure (paths and
argv, unit-tested without privileges); :func:`prepare_jail`,
:func:`remove_jail` and :func:`move_out` do the work and need root, like the
jailer itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from banger.config import Config
from banger.errors import BadRequest, HostError
from banger.hostops.cgroups import (
    CgroupHost,
    CgroupVersion,
    Limits,
    VMCgroup,
    limit_files,
)
from banger.vmmuser import VMMUser, check_unprivileged

log = logging.getLogger("banger.hostops")

# The jailer accepts ids of alphanumerics and hyphens, at most 64 characters
# (Firecracker docs/jailer.md, "Jailer Usage").
JAIL_ID_MAX = 64
_JAIL_ID = re.compile(r"[A-Za-z0-9-]+")

# What the jailed Firecracker sees, at the root of its chroot. The names are
# fixed, so a snapshot taken in one jail restores in another: its recorded
# drive paths stay valid whatever the host paths are.
JAIL_API_SOCKET = "/fc.sock"
JAIL_VSOCK = "/vsock.sock"
JAIL_KERNEL = "/vmlinux"
JAIL_INITRD = "/initrd"
JAIL_ROOTFS = "/rootfs"
JAIL_WORK_DISK = "/work"
JAIL_LOG = "/vmm.log"
JAIL_METRICS = "/fc.metrics"
JAIL_SNAPSHOT_STATE = "/snapshot.state"
JAIL_SNAPSHOT_MEM = "/snapshot.mem"
# A snapshot to load has names of its own: the files are the daemon's (linked in,
# read-only to the VMM), and a restored VM must still be able to write a new snapshot.
JAIL_RESTORE_STATE = "/restore.state"
JAIL_RESTORE_MEM = "/restore.mem"

# The jailer's --cgroup-version takes "1" or "2" (docs/jailer.md, "Jailer Usage").
JAILER_CGROUP_VERSION = {CgroupVersion.V1: "1", CgroupVersion.V2: "2"}


@dataclass(frozen=True)
class JailerSettings:
    """How to run Firecracker under the jailer (from the config and the host).

    Attributes:
        binary: The jailer executable.
        chroot_base: ``--chroot-base-dir``.
        user: The account Firecracker drops to (``--uid``/``--gid``): the VMM
            user, never uid 0 or gid 0 (refused when the settings are made).
        cgroups: The host's cgroup hierarchy: ``--cgroup-version`` and the
            limit files' names.
        parent_cgroup: ``--parent-cgroup``, this install's cgroup
            (:func:`banger.hostops.cgroups.install_group`), relative to the
            hierarchy's root.

    Raises:
        BadRequest: ``user`` is uid 0 or gid 0.
    """

    binary: str
    chroot_base: Path
    user: VMMUser
    cgroups: CgroupHost
    parent_cgroup: str

    def __post_init__(self) -> None:
        check_unprivileged(self.user)
        parts = Path(self.parent_cgroup).parts
        if not parts or Path(self.parent_cgroup).is_absolute() or ".." in parts:
            raise ValueError(f"--parent-cgroup must be a relative path, "
                             f"not {self.parent_cgroup!r}")

    @property
    def uid(self) -> int:
        """``--uid``: the VMM user's."""
        return self.user.uid

    @property
    def gid(self) -> int:
        """``--gid``: the VMM user's primary group."""
        return self.user.gid

    def cgroup(self, jail_id: str) -> VMCgroup:
        """The cgroup the jailer makes for ``jail_id``: ``<parent_cgroup>/<jail_id>``."""
        return self.cgroups.group(f"{self.parent_cgroup}/{jail_id}")


@dataclass(frozen=True)
class JailLayout:
    """Where one VM's jail lives on the host.

    Attributes:
        chroot_base: The jailer's ``--chroot-base-dir``.
        exec_name: Last path component of the Firecracker binary (the jailer
            names a directory after it).
        jail_id: The jailer's ``--id`` (banger passes the VM marker).
    """

    chroot_base: Path
    exec_name: str
    jail_id: str

    @classmethod
    def for_vm(cls, chroot_base: Path, firecracker_bin: str, jail_id: str) -> JailLayout:
        """The layout the jailer will use for ``jail_id``, after validating inputs.

        Raises:
            BadRequest: The id or the binary name is one the jailer refuses.
        """
        check_jail_id(jail_id)
        exec_name = check_exec_file(firecracker_bin)
        return cls(chroot_base, exec_name, jail_id)

    @property
    def jail_dir(self) -> Path:
        """``<base>/<exec>/<id>``: everything of this VM's jail, removed as one."""
        return self.chroot_base / self.exec_name / self.jail_id

    @property
    def root(self) -> Path:
        """``<base>/<exec>/<id>/root``: ``/`` for the jailed Firecracker."""
        return self.jail_dir / "root"

    def host_path(self, jailed: str) -> Path:
        """The host path of ``jailed``, a path as the jailed Firecracker sees it."""
        if not jailed.startswith("/"):
            raise ValueError(f"in-jail paths are absolute, got {jailed!r}")
        return self.root / jailed.lstrip("/")


def check_jail_id(jail_id: str) -> str:
    """Return ``jail_id`` if the jailer accepts it.

    Raises:
        BadRequest: Not 1-64 characters of letters, digits and hyphens.
    """
    if len(jail_id) > JAIL_ID_MAX or not _JAIL_ID.fullmatch(jail_id):
        raise BadRequest(
            f"jailer id {jail_id!r} is not 1-{JAIL_ID_MAX} letters, digits and hyphens")
    return jail_id


def check_exec_file(firecracker_bin: str) -> str:
    """The binary's file name, if the jailer will exec it.

    Older jailer releases refuse an ``--exec-file`` whose name lacks
    ``firecracker`` (their docs/jailer.md says so); requiring it everywhere
    costs nothing and keeps the chroot at ``<base>/firecracker...``.

    Raises:
        BadRequest: The path is relative or its name lacks ``firecracker``.
    """
    path = Path(firecracker_bin)
    if not path.is_absolute():
        raise BadRequest(f"the jailer needs an absolute Firecracker path, got {firecracker_bin!r}")
    if "firecracker" not in path.name:
        raise BadRequest(
            f"the jailer only execs a binary whose name contains 'firecracker', "
            f"not {path.name!r}",
            hint="rename or symlink the binary, e.g. /usr/local/bin/firecracker",
        )
    return path.name


def jailer_argv(settings: JailerSettings, firecracker_bin: str, jail_id: str,
                limits: Limits, netns: Path | None = None) -> list[str]:
    """The jailer command line that runs Firecracker in ``jail_id``'s chroot and cgroup.

    No ``--daemonize`` (it would point the serial console at /dev/null; banger
    detaches the process itself) and no ``--new-pid-ns`` (the jailer's pid
    must stay Firecracker's pid, which banger records and signals). The
    jailer adds ``--id=<id>`` to Firecracker's arguments, so the VM marker is
    on the final command line too.

    The jailer makes ``<parent_cgroup>/<jail_id>`` in the hierarchy of each
    controller a ``--cgroup`` names (one ``cgroup2`` mount under v2), writes
    each value there and joins it before it execs Firecracker
    (docs/jailer.md, "Jailer Operation"). Every limit of ``limits`` is one
    ``--cgroup <file>=<value>``, named for the host's cgroup version.

    Args:
        settings: Jailer binary, chroot base, the VMM user, the cgroup
            hierarchy and this install's parent cgroup.
        firecracker_bin: Absolute path of the Firecracker binary to exec.
        jail_id: The jail (and Firecracker instance) id.
        limits: The VM's cgroup limits (:func:`banger.hostops.cgroups.limits_for`).
        netns: The network namespace the jailer joins before it execs Firecracker
            (``--netns``, a path ``ip netns`` made), or None: the helper's own.
    """
    argv = [
        settings.binary,
        "--id", jail_id,
        "--exec-file", firecracker_bin,
        "--uid", str(settings.uid),
        "--gid", str(settings.gid),
        "--chroot-base-dir", str(settings.chroot_base),
        "--cgroup-version", JAILER_CGROUP_VERSION[settings.cgroups.version],
        "--parent-cgroup", settings.parent_cgroup,
    ]
    for name, value in limit_files(settings.cgroups.version, limits).items():
        argv += ["--cgroup", f"{name}={value}"]
    if netns is not None:
        argv += ["--netns", str(netns)]
    return [*argv, "--", "--api-sock", JAIL_API_SOCKET]


def readable_by(st: os.stat_result, uid: int, gid: int) -> bool:
    """Whether a process running as ``uid:gid`` may read a file with status ``st``.

    Ignores ACLs and supplementary groups; a False answer only costs a copy.
    """
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def jail_extra_disk(index: int) -> str:
    """Where extra disk ``index`` (after the work disk) sits in the jail."""
    return f"/extra{index}"


MAX_EXTRA_DISKS = 8
# What a launch may put in a jail: the request's name for a file -> its name inside.
JAIL_FILES: dict[str, str] = {
    "kernel": JAIL_KERNEL, "initrd": JAIL_INITRD, "rootfs": JAIL_ROOTFS,
    "work": JAIL_WORK_DISK, "log": JAIL_LOG, "snapshot_state": JAIL_RESTORE_STATE,
    "snapshot_mem": JAIL_RESTORE_MEM,
    **{f"extra{i}": jail_extra_disk(i) for i in range(MAX_EXTRA_DISKS)},
}


def find_binary(name: str) -> str | None:
    """Absolute path of ``name`` (a path, or a command on PATH), or None.

    A name containing ``/`` must be executable as given; a bare name is
    looked up on PATH plus the sbin directories.
    """
    if "/" in name:
        usable = os.path.isfile(name) and os.access(name, os.X_OK)
        return str(Path(name).absolute()) if usable else None
    return shutil.which(name, path=os.environ.get("PATH", "") + _EXTRA_PATH)


def find_firecracker(cfg: Config) -> str | None:
    """The Firecracker binary: ``firecracker_bin``, else ``firecracker`` on PATH."""
    return find_binary(cfg.firecracker_bin or "firecracker")


def find_jailer(cfg: Config) -> str | None:
    """The jailer binary: ``jailer_bin``, else ``jailer`` on PATH."""
    return find_binary(cfg.jailer_bin or "jailer")


# The jailer is usually installed beside Firecracker in a root-only directory.
_EXTRA_PATH = ":/usr/sbin:/sbin"


# ------------------------------------------------------------------ side effects


def place(fd: int, jailed: str, root: Path, user: VMMUser, *, writable: bool) -> Path:
    """Put the file open at ``fd`` inside the jail ``root`` as ``jailed``.

    ``root`` must be root's own directory, as :func:`prepare_jail` makes it (the
    jailer gives it to the VMM user only later): everything is done relative to a
    descriptor of it, so no name in it can be swapped meanwhile. A block device (the
    VM's dm-snapshot disk) gets a new device node with the same major:minor, root's,
    given to the VMM user's group (0660: an owner could chmod it or link it out of
    the jail, and keep a node that names whatever device gets that number later). A
    regular file is hard-linked through its descriptor, so writes land in the
    original; the caller made a file Firecracker writes its group's. A read-only file
    the VMM user cannot read, or one on another filesystem, is copied instead (the
    copy is the VMM user's).

    Raises:
        HostError: ``root`` is not root's own directory; a file Firecracker writes is on
            another filesystem than the jail (a hard link cannot cross filesystems and
            a copy would lose the writes), or the host refused.
    """
    target = root / jailed.lstrip("/")
    name = target.name
    try:
        dfd = _own_dir(root)
    except OSError as exc:
        raise HostError(f"cannot open the jail {root}: {exc.strerror or exc}") from exc
    st = os.fstat(fd)
    try:
        if stat.S_ISBLK(st.st_mode):
            os.mknod(name, stat.S_IFBLK | 0o600, st.st_rdev, dir_fd=dfd)
            os.chown(name, 0, user.gid, dir_fd=dfd, follow_symlinks=False)
            os.chmod(name, 0o660, dir_fd=dfd)  # root's fresh node in root's own directory
            return target
        if not writable and not readable_by(st, user.uid, user.gid):
            _copy_owned(fd, dfd, name, (user.uid, user.gid))
            return target
        try:
            # linkat following /proc/self/fd (a dst_dir_fd makes Python call linkat with
            # AT_SYMLINK_FOLLOW; a plain link would link the magic link itself).
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            if writable:
                raise HostError(
                    f"{jailed.lstrip('/')} is on another filesystem than the jail {root}; "
                    "Firecracker writes to it, so it must be hard-linked, not copied",
                    hint="put jailer_chroot_base on the same filesystem as state_dir",
                ) from exc
            _copy_owned(fd, dfd, name, (user.uid, user.gid))
    except OSError as exc:
        raise HostError(f"cannot put {jailed.lstrip('/')} in the jail at {target}: "
                        f"{exc.strerror or exc}") from exc
    finally:
        os.close(dfd)
    return target


def _own_dir(path: Path) -> int:
    """A descriptor of directory ``path``, if it is root's and no symlink.

    Raises:
        OSError: it is missing, a symlink, not a directory, or not root's.
    """
    dfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(dfd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(dfd)
        raise OSError(errno.EPERM, "not root's own directory", str(path))
    return dfd


def _copy_owned(fd: int, dfd: int, name: str, owner: tuple[int, int]) -> None:
    """Copy the file open at ``fd`` to a new file ``name`` in directory ``dfd``, made
    ``owner``'s (uid, gid), mode 0600."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=dfd)
    try:
        os.fchown(out, *owner)
        _copy_fd(fd, out)
    finally:
        os.close(out)


def _copy_fd(src: int, dst: int) -> None:
    """Copy the whole file open at ``src`` into ``dst`` (in the kernel, from offset 0):
    ``sendfile``, as ``copy_file_range`` refuses two filesystems on some kernels."""
    offset, size = 0, os.fstat(src).st_size
    os.lseek(dst, 0, os.SEEK_SET)
    while offset < size:
        sent = os.sendfile(dst, src, offset, size - offset)
        if sent == 0:
            break
        offset += sent


def prepare_jail(layout: JailLayout, user: VMMUser, files: Mapping[str, tuple[int, bool]]
                 ) -> None:
    """Build a fresh jail for one launch: its root, ``files`` (jailed name ->
    (descriptor, writable)) and an empty metrics file the VMM user writes.

    A jail left by an earlier run of this VM is removed first: the VM's process is
    gone (the daemon kills it before starting the VM again) and stale sockets
    inside would make Firecracker's ``bind`` fail.

    Raises:
        HostError: a file could not be put in the jail.
    """
    remove_jail(layout)
    layout.root.mkdir(parents=True, mode=0o750)
    for jailed, (fd, writable) in files.items():
        place(fd, jailed, layout.root, user, writable=writable)
    metrics = layout.host_path(JAIL_METRICS)
    try:
        dfd = _own_dir(layout.root)
        try:
            fd = os.open(metrics.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            os.fchown(fd, user.uid, user.gid)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HostError(f"cannot make {metrics}: {exc.strerror}") from exc


def remove_jail(layout: JailLayout) -> bool:
    """Delete the VM's jail directory; True if there was one.

    Hard links and device nodes inside go; their originals stay. Symlinks are
    removed, never followed.
    """
    jail = layout.jail_dir
    if not (jail.is_dir() and not jail.is_symlink()):
        return False
    # Only ever delete a directory that is exactly <base>/<exec>/<id>.
    if jail.parent.parent != layout.chroot_base or jail.name != layout.jail_id:
        raise HostError(f"refusing to remove {jail}: not a jail under {layout.chroot_base}")
    shutil.rmtree(jail)
    return True


def move_out(layout: JailLayout, jailed: str, target_dir: int, name: str,
             owner: tuple[int, int]) -> None:
    """Move the file Firecracker wrote at ``jailed`` in the jail to ``name`` in the
    directory open at ``target_dir``, made ``owner``'s (uid, gid) with mode 0600.

    The jail is the VMM user's, who may swap its names at any time: the file is opened
    without following a symlink (and without waiting on a FIFO), must be a regular
    file with one link, and everything after that is done to that descriptor: it is
    made ``owner``'s and hard-linked into the target directory through it (copied from
    it across filesystems), then its name in the jail is removed.

    Raises:
        HostError: it is missing or not a plain file, or the host refused.
    """
    src = layout.host_path(jailed)
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot read {src}: {exc.strerror or exc}") from exc
    tmp = f".{name}.moving"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise HostError(f"{src} is not a plain file Firecracker wrote")
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=target_dir)
        try:
            os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=target_dir, follow_symlinks=True)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_owned(fd, target_dir, tmp, owner)
        os.rename(tmp, name, src_dir_fd=target_dir, dst_dir_fd=target_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)  # a name the VMM user swapped meanwhile is its own business
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=target_dir)
        raise HostError(f"cannot move {src} out of the jail: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    log.debug("moved %s out of the jail", src)
