"""How a QEMU process is confined: its user, its seccomp filter, its cgroup limits.

QEMU runs the guest's whole device model; a guest that escapes into it gets
whatever the QEMU process has. So QEMU runs as a dedicated unprivileged system
user (config ``vmm_user``) with no capabilities and no supplementary groups
(beyond ``/dev/kvm``'s group when it uses KVM), under QEMU's own seccomp filter,
inside a cgroup of its own. It never opens anything under banger's state or
runtime directories by path: the launcher (root) opens the disks, logs, TAP and
QMP socket and hands them over as file descriptors.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.cgroups import CPU_WEIGHT_DEFAULT, CPU_WEIGHT_MAX, Limits
from banger.errors import BadRequest, HostError
from banger.runner import Runner

# QEMU's seccomp filter (qemu-options.hx, -sandbox): deny obsolete syscalls,
# set*uid/setsid and friends, fork/exec, and scheduler/affinity changes. With
# spawn=deny and elevateprivileges=deny QEMU can neither -daemonize nor -runas,
# so the launcher starts it detached and already as the VMM user.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# Memory QEMU itself needs beyond the guest's RAM: the device model, block and
# network buffers, the guest's firmware and kernel images, and under TCG the
# translated-code cache, which TCG_TB_SIZE_MIB bounds (QEMU's default reserves
# up to 1 GiB for it). A VMM that grows past guest RAM + this allowance is
# killed by the kernel's OOM killer inside its own cgroup, not the host's.
VMM_MEMORY_ALLOWANCE_MIB = 512
TCG_TB_SIZE_MIB = 256
# Tasks in a VM's cgroup: QEMU's block I/O thread pool is at most 64 workers
# (util/thread-pool.c), plus one thread per vCPU and a few helpers (RCU, main
# loop, monitor). spawn=deny already stops it forking; this bounds a runaway.
VMM_PIDS_MAX = 256


@dataclass(frozen=True)
class VMMUser:
    """The unprivileged account VMM processes run as."""

    name: str
    uid: int
    gid: int


def limits_for(memory_mib: int, vcpu: int) -> Limits:
    """A VM's cgroup limits: guest memory + the VMM allowance, tasks, and a CPU
    weight proportional to its vCPUs (the default weight per vCPU)."""
    return Limits(
        memory_bytes=(memory_mib + VMM_MEMORY_ALLOWANCE_MIB) << 20,
        pids_max=VMM_PIDS_MAX,
        cpu_weight=min(CPU_WEIGHT_DEFAULT * vcpu, CPU_WEIGHT_MAX),
    )


def lookup_user(name: str) -> VMMUser | None:
    """The account ``name``, or None when it does not exist."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return VMMUser(name, pw.pw_uid, pw.pw_gid)


def ensure_user(runner: Runner, name: str) -> VMMUser:
    """The VMM account, created as a system user without a home or a login shell if missing.

    Raises:
        BadRequest: ``name`` is root's account (uid 0): that confines nothing.
        HostError: useradd failed.
    """
    user = lookup_user(name)
    if user is None:
        runner.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name],
                   desc=f"create the VMM user {name}", timeout=30)
        user = lookup_user(name)
        if user is None:
            raise HostError(f"useradd created no user {name!r}")
    if user.uid == 0 or user.gid == 0:
        raise BadRequest(f"vmm_user {name!r} is root (uid {user.uid}, gid {user.gid})",
                         hint="set vmm_user to an unprivileged account, e.g. banger-vmm")
    return user


def privilege_drop(user: VMMUser, groups: list[int]) -> list[str]:
    """The ``setpriv`` prefix that runs a command as ``user`` with no capabilities.

    The real, effective and saved ids all change, so no capability survives the
    exec; the inheritable and bounding sets are emptied too, and no_new_privs is
    set so no setuid binary can give any back.
    """
    group_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", group_arg,
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def kvm_groups(accel: str, dev: Path = Path("/dev/kvm")) -> list[int]:
    """The supplementary group QEMU needs to open ``/dev/kvm`` (none under TCG)."""
    if accel != "kvm":
        return []
    try:
        return [os.stat(dev).st_gid]
    except OSError as exc:
        raise HostError(f"cannot stat {dev}: {exc.strerror}") from exc


def check_readable_by(path: Path, user: VMMUser, what: str) -> None:
    """Refuse a boot file the VMM user could not read (QEMU reads it itself).

    Raises:
        VMMError-like HostError naming the file and the fix.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HostError(f"cannot stat {what} {path}: {exc.strerror}") from exc
    if st.st_mode & 0o004 or (st.st_uid == user.uid and st.st_mode & 0o400):
        return
    raise HostError(f"{what} {path} is not readable by the VMM user {user.name}",
                    hint=f"chmod o+r {path} (a kernel or initrd holds no secrets)")
