"""The unprivileged account every VMM process runs as (config ``vmm_user``).

Both drivers use it: QEMU drops to it through ``setpriv``
(``banger.daemon.qemuproc``), a jailed Firecracker through the jailer's
``--uid``/``--gid`` (``banger.daemon.fcproc``). A top-level module so that
both subpackages may import it.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from banger.errors import BadRequest, HostError
from banger.runner import Runner

# Kernels and initrds in the registries: the VMM user must read them; they hold no secrets.
BOOT_FILE_MODE = 0o644


@dataclass(frozen=True)
class VMMUser:
    """The unprivileged account VMM processes run as."""

    name: str
    uid: int
    gid: int

    def describe(self) -> str:
        """``name (uid:gid)``, as ``banger doctor`` prints it."""
        return f"{self.name} ({self.uid}:{self.gid})"


def lookup_user(name: str) -> VMMUser | None:
    """The account ``name``, or None when it does not exist."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return VMMUser(name, pw.pw_uid, pw.pw_gid)


def check_unprivileged(user: VMMUser) -> VMMUser:
    """Return ``user`` if it is neither uid 0 nor gid 0.

    A VMM running as root, or in root's group, would be confined by nothing but
    its own code: banger refuses to start one.

    Raises:
        BadRequest: uid 0 or gid 0.
    """
    if user.uid == 0 or user.gid == 0:
        raise BadRequest(f"vmm_user {user.name!r} is root (uid {user.uid}, gid {user.gid})",
                         hint="set vmm_user to an unprivileged account, e.g. banger-vmm, "
                              "whose primary group is not root's")
    return user


def ensure_user(runner: Runner, name: str) -> VMMUser:
    """The VMM account, created as a system user without a home or a login shell if missing.

    Raises:
        BadRequest: ``name`` is uid 0 or its primary group is gid 0 (see
            :func:`check_unprivileged`).
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
    return check_unprivileged(user)
