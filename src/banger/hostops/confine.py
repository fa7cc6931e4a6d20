"""How a QEMU process is confined: its user, its seccomp filter, its boot files.

QEMU runs the guest's whole device model; a guest that escapes into it gets
whatever the QEMU process has. So QEMU runs as a dedicated unprivileged system
user (config ``vmm_user``) with no capabilities and no supplementary groups
(beyond ``/dev/kvm``'s group when it uses KVM), under QEMU's own seccomp filter,
inside a cgroup of its own. It never opens anything under banger's state or
runtime directories by path: the launcher (root) opens the disks, logs, TAP and
QMP socket and hands them over as file descriptors. The account
(:mod:`banger.vmmuser`) and the cgroup limits (:func:`banger.hostops.cgroups.limits_for`)
are shared with the jailed Firecracker.
"""

from __future__ import annotations

import os
from pathlib import Path

from banger.errors import HostError
from banger.vmmuser import VMMUser

# QEMU's seccomp filter (qemu-options.hx, -sandbox): deny obsolete syscalls,
# set*uid/setsid and friends, fork/exec, and scheduler/affinity changes. With
# spawn=deny and elevateprivileges=deny QEMU can neither -daemonize nor -runas,
# so the launcher starts it detached and already as the VMM user.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# TCG's translated-code cache; QEMU's default reserves up to 1 GiB for it. Bounded
# so that it fits in the VM's cgroup allowance (cgroups.VMM_MEMORY_ALLOWANCE_MIB).
TCG_TB_SIZE_MIB = 256


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
