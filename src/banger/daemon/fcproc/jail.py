"""Firecracker's jailer: per-VM chroot layout, command lines, and building the jail.

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
put there first: banger hard-links the kernel, initrd, disks and log into the
root (a block device gets a fresh device node instead), and reaches the API
and vsock sockets through short symlinks in the VM's runtime directory.

The first half of this module is pure (paths and argv, unit-tested without
privileges); :func:`prepare_jail` and :func:`remove_jail` do the work and need
root, like the jailer itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest, HostError
from banger.hostops.cgroups import (
    CgroupHost,
    CgroupVersion,
    Limits,
    VMCgroup,
    limit_files,
)
from banger.layout import VMPaths
from banger.vmm import LaunchPlan
from banger.vmmuser import VMMUser, check_unprivileged

log = logging.getLogger("banger.fcproc")

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


def firecracker_argv(binary: str, api_socket: str, vm_id_marker: str) -> list[str]:
    """The command line of an unjailed Firecracker.

    Args:
        binary: The Firecracker executable.
        api_socket: Where it creates its API socket.
        vm_id_marker: ``--id``; also the marker identity checks look for in
            ``/proc/<pid>/cmdline``.
    """
    return [binary, "--api-sock", api_socket, "--id", vm_id_marker]


def jailer_argv(settings: JailerSettings, firecracker_bin: str, jail_id: str,
                limits: Limits) -> list[str]:
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


@dataclass(frozen=True)
class Exposure:
    """One host file to make visible inside the jail."""

    source: Path
    jailed: str
    writable: bool


def jail_extra_disk(index: int) -> str:
    """Where extra disk ``index`` (after the work disk) sits in the jail."""
    return f"/extra{index}"


def plan_exposures(plan: LaunchPlan) -> list[Exposure]:
    """What ``plan``'s jail must contain, and whether Firecracker writes to it."""
    items = [Exposure(plan.kernel, JAIL_KERNEL, writable=False)]
    if plan.initrd is not None:
        items.append(Exposure(plan.initrd, JAIL_INITRD, writable=False))
    items += [
        Exposure(Path(plan.rootfs), JAIL_ROOTFS, writable=True),
        Exposure(Path(plan.work_disk), JAIL_WORK_DISK, writable=True),
        Exposure(plan.paths.vmm_log, JAIL_LOG, writable=True),
    ]
    items += [Exposure(Path(disk), jail_extra_disk(i), writable=True)
              for i, disk in enumerate(plan.extra_disks)]
    return items


def socket_links(layout: JailLayout, paths: VMPaths) -> dict[Path, Path]:
    """Short runtime-dir symlink -> socket or file inside the jail.

    The jail root can be deep (``/srv/jailer/firecracker/banger-<id>/root``
    plus a long base) and ``sun_path`` holds 108 bytes; ``connect()``
    resolves symlinks, so the daemon connects through a link whose own path
    was checked by :class:`~banger.layout.VMPaths`.
    """
    return {
        paths.api_socket: layout.host_path(JAIL_API_SOCKET),
        paths.vsock_socket: layout.host_path(JAIL_VSOCK),
        paths.metrics: layout.host_path(JAIL_METRICS),
    }


# ------------------------------------------------------------------ side effects


def expose(item: Exposure, root: Path, uid: int, gid: int) -> Path:
    """Put ``item.source`` inside the jail root, usable by ``uid:gid``.

    A block device (a device-mapper COW snapshot) gets a new device node with
    the same major:minor, ``uid:gid``'s and mode 0600. A regular file is
    hard-linked, so writes land in the original; when Firecracker must write
    it the link is made ``uid:gid``'s with mode 0600, which changes the
    original too (same inode), as the QEMU driver does with a VM's disks. A
    read-only file that ``uid:gid`` cannot read, or one on another filesystem,
    is copied instead (the copy is ``uid:gid``'s).

    Returns:
        The host path of the new entry.

    Raises:
        HostError: The source is missing or of another kind, or a file
            Firecracker writes is on another filesystem than the jail (a hard
            link cannot cross filesystems and a copy would lose the writes).
    """
    target = root / item.jailed.lstrip("/")
    try:
        st = os.stat(item.source)
    except OSError as exc:
        raise HostError(f"cannot put {item.source} in the jail: {exc.strerror}") from exc
    target.unlink(missing_ok=True)
    try:
        if stat.S_ISBLK(st.st_mode):
            os.mknod(target, stat.S_IFBLK | 0o600, st.st_rdev)
            os.chown(target, uid, gid)
            return target
        if not stat.S_ISREG(st.st_mode):
            raise HostError(f"cannot put {item.source} in the jail: "
                            "not a regular file or block device")
        if not item.writable and not readable_by(st, uid, gid):
            _copy_owned(item.source, target, uid, gid)
            return target
        try:
            os.link(item.source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            if item.writable:
                raise HostError(
                    f"{item.source} is on another filesystem than the jail {root}; "
                    "Firecracker writes to it, so it must be hard-linked, not copied",
                    hint="put jailer_chroot_base on the same filesystem as state_dir",
                ) from exc
            _copy_owned(item.source, target, uid, gid)
            return target
        if item.writable:
            os.chown(target, uid, gid)
            os.chmod(target, 0o600)
    except OSError as exc:
        raise HostError(f"cannot put {item.source} in the jail at {target}: {exc.strerror}",
                        hint="the jailer needs root (CAP_MKNOD, CAP_CHOWN)") from exc
    return target


def _copy_owned(source: Path, target: Path, uid: int, gid: int) -> None:
    shutil.copyfile(source, target)
    os.chown(target, uid, gid)


def prepare_jail(layout: JailLayout, settings: JailerSettings, paths: VMPaths,
                 items: Sequence[Exposure]) -> None:
    """Build a fresh jail for one launch: root dir, files, runtime-dir symlinks.

    A jail left by an earlier run of this VM is removed first: the VM's
    process is gone (the daemon kills it before starting the VM again) and
    stale sockets inside would make Firecracker's ``bind`` fail.

    Raises:
        HostError: A file could not be put in the jail.
    """
    remove_jail(layout)
    layout.root.mkdir(parents=True, mode=0o750)
    for item in items:
        expose(item, layout.root, settings.uid, settings.gid)
    metrics = layout.host_path(JAIL_METRICS)
    metrics.write_bytes(b"")
    try:
        os.chown(metrics, settings.uid, settings.gid)
        os.chmod(metrics, 0o600)
    except OSError as exc:
        raise HostError(f"cannot chown {metrics}: {exc.strerror}") from exc
    for link, target in socket_links(layout, paths).items():
        link.unlink(missing_ok=True)
        link.symlink_to(target)


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


def move_out(source: Path, target: Path) -> None:
    """Move a file Firecracker wrote inside the jail to ``target`` on the host.

    A rename when both are on one filesystem; otherwise copy, then unlink.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise HostError(f"cannot move {source} to {target}: {exc.strerror}") from exc
        try:
            shutil.copyfile(source, target)
        except OSError as copy_exc:
            raise HostError(f"cannot copy {source} to {target}: {copy_exc.strerror}") from copy_exc
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
    log.debug("moved %s out of the jail to %s", source, target)
