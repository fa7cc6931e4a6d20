"""Per-VM cgroups: memory, pids and CPU weight for one VMM process tree.

Each VM gets ``banger-<install tag>/<vm id>`` at the root of the cgroup
hierarchy. cgroup v2 is used when a ``cgroup2`` mount offers the three
controllers banger needs (memory, pids, cpu); otherwise the v1 hierarchy, with
one directory per controller at that controller's mount (hosts with v1 and an
empty v2 ``unified`` mount beside it get v1). A host with neither is refused
with a clear error, never run unconfined.

Directories sit at the hierarchy's root, not under bangerd's own cgroup: under
v2 a cgroup that holds processes (a service's) cannot hand controllers to
children, and a VM must outlive ``bangerd.service`` being stopped.

The VMM joins its cgroup before it starts: QEMU's launcher writes its own pid
to ``cgroup.procs`` and then forks QEMU; Firecracker's jailer makes the cgroup
from ``--cgroup``/``--parent-cgroup`` (:func:`limit_files`, :func:`install_group`)
and joins it before it execs Firecracker. Either way every thread the VMM ever
has is inside. Both drivers get the same limits (:func:`limits_for`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from banger.errors import HostError
from banger.fsutil import mount_field

MOUNTS = Path("/proc/self/mounts")
CONTROLLERS = ("memory", "pids", "cpu")
# cgroup v2's cpu.weight: 100 is the default, 1..10000 the range (cgroup-v2.rst);
# v1's cpu.shares equivalent of the default weight is 1024.
CPU_WEIGHT_DEFAULT = 100
CPU_WEIGHT_MAX = 10000
V1_SHARES_PER_WEIGHT = 1024 / CPU_WEIGHT_DEFAULT

# Memory a VMM itself needs beyond the guest's RAM: QEMU's device model, block and
# network buffers, the guest's firmware and kernel images, and under TCG the
# translated-code cache (bounded by qemuproc.confine.TCG_TB_SIZE_MIB); Firecracker
# needs far less, and gets the same bound. A VMM that grows past guest RAM + this
# allowance is killed by the kernel's OOM killer inside its own cgroup, not the host's.
VMM_MEMORY_ALLOWANCE_MIB = 512
# Tasks in a VM's cgroup: QEMU's block I/O thread pool is at most 64 workers
# (util/thread-pool.c), plus one thread per vCPU and a few helpers (RCU, main loop,
# monitor); Firecracker has one thread per vCPU plus its VMM and API threads. QEMU's
# seccomp filter already stops it forking; this bounds a runaway either way.
VMM_PIDS_MAX = 256
# The kernel takes an exiting task out of its cgroup a moment after /proc shows it
# gone: removing a VM's cgroup right after its VMM died is retried for this long.
RELEASE_WAIT_S = 2.0


class CgroupVersion(StrEnum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class Limits:
    """What one VM's cgroup allows: memory in bytes, tasks, CPU weight (v2 scale)."""

    memory_bytes: int
    pids_max: int
    cpu_weight: int

    def to_json(self) -> dict[str, int]:
        """The limits as a JSON object (``vm show``)."""
        return {"memory_bytes": self.memory_bytes, "pids_max": self.pids_max,
                "cpu_weight": self.cpu_weight}


def limits_for(memory_mib: int, vcpu: int) -> Limits:
    """A VM's cgroup limits, for either VMM: guest memory + the VMM allowance, tasks,
    and a CPU weight proportional to its vCPUs (the default weight per vCPU)."""
    return Limits(
        memory_bytes=(memory_mib + VMM_MEMORY_ALLOWANCE_MIB) << 20,
        pids_max=VMM_PIDS_MAX,
        cpu_weight=min(CPU_WEIGHT_DEFAULT * vcpu, CPU_WEIGHT_MAX),
    )


def limit_files(version: CgroupVersion, limits: Limits) -> dict[str, str]:
    """The control files that hold ``limits`` and their values, named as the kernel does.

    Every name is ``<controller>.<property>``, the form the jailer's ``--cgroup``
    takes too. v2: ``memory.max``, ``pids.max``, ``cpu.weight``; v1:
    ``memory.limit_in_bytes``, ``pids.max``, ``cpu.shares`` (1024 per 100 of weight).
    """
    if version == CgroupVersion.V2:
        return {"memory.max": str(limits.memory_bytes),
                "pids.max": str(limits.pids_max),
                "cpu.weight": str(limits.cpu_weight)}
    return {"memory.limit_in_bytes": str(limits.memory_bytes),
            "pids.max": str(limits.pids_max),
            "cpu.shares": str(round(limits.cpu_weight * V1_SHARES_PER_WEIGHT))}


@dataclass(frozen=True)
class CgroupHost:
    """Where the hierarchy is: one v2 mount, or one v1 mount per controller."""

    version: CgroupVersion
    roots: dict[str, Path]  # controller -> mount point (v2: every controller -> the mount)

    def group(self, rel: str) -> VMCgroup:
        """The cgroup ``rel`` (``banger-<tag>/<vm id>``) on this host."""
        return VMCgroup(self, rel)

    def install_groups(self, install_tag: str) -> dict[str, VMCgroup]:
        """The cgroups that exist under install ``install_tag``'s, by name.

        A name counts when its directory exists under any controller's root (a
        v1 cgroup may be half made or half removed).

        Raises:
            HostError: the install's directory exists but cannot be listed.
        """
        parent = install_group(install_tag)
        names: set[str] = set()
        for root in dict.fromkeys(self.roots.values()):  # v2: one root for all
            try:
                with os.scandir(root / parent) as entries:
                    names.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise HostError(f"cannot list {root / parent}: {exc.strerror}") from exc
        return {name: self.group(f"{parent}/{name}") for name in sorted(names)}


def install_group(install_tag: str) -> str:
    """This install's cgroup, ``banger-<install tag>``: the parent of all its VMs' cgroups."""
    return f"banger-{install_tag}"


def vm_group(install_tag: str, name: str) -> str:
    """The cgroup of one VM, relative to the hierarchy's root: ``banger-<tag>/<name>``.

    ``name`` is the VM id for QEMU; the jailer names a Firecracker VM's cgroup
    after its ``--id``, the VM marker (``banger-<vm id>``).
    """
    return f"{install_group(install_tag)}/{name}"


def in_vm_group(pid: int, install_tag: str, vm_id: str, proc: Path = Path("/proc")) -> bool:
    """``pid`` is in VM ``vm_id``'s cgroup of this install (QEMU's, named by the id, or a
    jailed Firecracker's, by its marker), on any hierarchy. ``/proc/<pid>/cgroup`` is
    readable by every user: a daemon that is not root can tell its VMMs this way."""
    ours = (f"/{vm_group(install_tag, vm_id)}", f"/{vm_group(install_tag, 'banger-' + vm_id)}")
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return False
    return any(line.rstrip().endswith(ours) for line in lines)


def detect(mounts: Path = MOUNTS) -> CgroupHost:
    """The cgroup hierarchy to use on this host.

    Raises:
        HostError: neither a v2 mount with memory, pids and cpu nor v1 mounts
            of all three exist.
    """
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise HostError(f"cannot read {mounts}: {exc.strerror}") from exc
    v1: dict[str, Path] = {}
    v2_seen: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = Path(mount_field(fields[1])), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            try:
                available = (point / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if all(c in available for c in CONTROLLERS):
                return CgroupHost(CgroupVersion.V2, {c: point for c in CONTROLLERS})
            v2_seen.append(f"{point} (controllers: {' '.join(available) or 'none'})")
        elif fstype == "cgroup":
            for c in CONTROLLERS:
                if c in options:
                    v1.setdefault(c, point)
    if all(c in v1 for c in CONTROLLERS):
        return CgroupHost(CgroupVersion.V1, {c: v1[c] for c in CONTROLLERS})
    missing = [c for c in CONTROLLERS if c not in v1]
    seen = "; cgroup2 at " + ", ".join(v2_seen) if v2_seen else ""
    raise HostError(f"no cgroup hierarchy offers {', '.join(CONTROLLERS)}: v1 lacks "
                    f"{', '.join(missing)}{seen}",
                    hint="mount cgroup2 at /sys/fs/cgroup with those controllers enabled")


@dataclass(frozen=True)
class VMCgroup:
    """One VM's cgroup: a directory per controller (v1) or one directory (v2)."""

    host: CgroupHost
    rel: str

    @property
    def dirs(self) -> list[Path]:
        """The directories that make up this cgroup (v1 co-mounted controllers share one)."""
        out: list[Path] = []
        for c in CONTROLLERS:
            d = self.host.roots[c] / self.rel
            if d not in out:
                out.append(d)
        return out

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process is written to, to join this cgroup."""
        return [d / "cgroup.procs" for d in self.dirs]

    def describe(self) -> str:
        """The cgroup as ``vm show`` prints it: the v2 path, or ``ctrl,ctrl:/rel`` for v1."""
        if self.host.version == CgroupVersion.V2:
            return str(self.host.roots["memory"] / self.rel)
        return f"{','.join(CONTROLLERS)}:/{self.rel}"

    def _file(self, controller: str, name: str) -> Path:
        return self.host.roots[controller] / self.rel / name

    def create(self, limits: Limits) -> None:
        """Make the directories (parents too) and write ``limits``.

        Raises:
            HostError: the cgroup filesystem refused a directory or a limit.
        """
        try:
            if self.host.version == CgroupVersion.V2:
                root = self.host.roots["memory"]
                parent = (root / self.rel).parent
                parent.mkdir(exist_ok=True)
                # v2 hands a controller to children only when every ancestor lists
                # it in cgroup.subtree_control; the root's is the host's, ours is ours.
                for d in (root, parent):
                    _enable_controllers(d)
                (root / self.rel).mkdir(exist_ok=True)
            else:
                for d in self.dirs:
                    d.mkdir(parents=True, exist_ok=True)
            for name, value in limit_files(self.host.version, limits).items():
                _write(self._file(name.split(".", 1)[0], name), value)
        except OSError as exc:
            raise HostError(f"cannot set up cgroup {self.describe()}: "
                            f"{exc.strerror or exc} ({exc.filename})") from exc

    def exists(self) -> bool:
        """True when every directory of this cgroup exists."""
        return all(d.is_dir() for d in self.dirs)

    def limits(self) -> Limits | None:
        """The limits the cgroup holds now, or None when it is gone or unreadable."""
        try:
            if self.host.version == CgroupVersion.V2:
                mem = _read_max(self._file("memory", "memory.max"))
                cpu = int(self._file("cpu", "cpu.weight").read_text())
            else:
                mem = _read_max(self._file("memory", "memory.limit_in_bytes"))
                shares = int(self._file("cpu", "cpu.shares").read_text())
                cpu = round(shares / V1_SHARES_PER_WEIGHT)
            pids = _read_max(self._file("pids", "pids.max"))
        except (OSError, ValueError):
            return None
        return Limits(mem, pids, cpu)

    def holds(self, pid: int) -> bool:
        """True when ``pid`` is a member in every directory of this cgroup."""
        try:
            return all(str(pid) in f.read_text().split() for f in self.procs_files)
        except OSError:
            return False

    def members(self) -> list[int]:
        """The processes in any of this cgroup's directories (none when it is gone).

        Raises:
            HostError: a ``cgroup.procs`` file exists but cannot be read.
        """
        pids: set[int] = set()
        for f in self.procs_files:
            try:
                pids.update(int(p) for p in f.read_text().split())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                raise HostError(f"cannot read {f}: {exc}") from exc
        return sorted(pids)

    def adopt(self, pid: int) -> None:
        """Move ``pid`` into this cgroup (re-adoption of a VMM started without one).

        Raises:
            HostError: the kernel refused the move.
        """
        for f in self.procs_files:
            try:
                _write(f, str(pid))
            except OSError as exc:
                raise HostError(f"cannot move pid {pid} into {f}: {exc.strerror}") from exc

    def remove(self, wait_s: float = 0.0) -> None:
        """Remove the cgroup's directories (absent ones are fine).

        Args:
            wait_s: How long to retry while a directory is still busy (a VMM that
                just exited; see :data:`RELEASE_WAIT_S`).

        Raises:
            HostError: a directory still holds processes (EBUSY) or cannot be removed.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._remove_once()
                return
            except HostError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _remove_once(self) -> None:
        problems = []
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = "a process is still in it" if exc.errno == errno.EBUSY else exc.strerror
                problems.append(f"{d}: {why}")
            else:
                # The install's parent goes when its last VM does; another VM's
                # cgroup in it (ENOTEMPTY/EBUSY) keeps it.
                with contextlib.suppress(OSError):
                    d.parent.rmdir()
        if problems:
            raise HostError("cannot remove cgroup: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """What ``vm show`` reports: version, path and the limits read back from the files."""
        lim = self.limits()
        return {"version": self.host.version.value, "path": self.describe(),
                "limits": lim.to_json() if lim else None}


def _enable_controllers(d: Path) -> None:
    control = d / "cgroup.subtree_control"
    enabled = control.read_text().split() if control.exists() else []
    wanted = [c for c in CONTROLLERS if c not in enabled]
    if wanted:
        _write(control, " ".join(f"+{c}" for c in wanted))


def _write(path: Path, value: str) -> None:
    # One write(2) per value: a cgroup file takes one value per write.
    path.write_text(value)


def _read_max(path: Path) -> int:
    # "max" (v2) means no limit; v1 reports a huge number instead.
    raw = path.read_text().strip()
    return -1 if raw == "max" else int(raw)
