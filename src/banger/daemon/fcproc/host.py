"""Finding Firecracker and the jailer on this host, and checking what was found."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from banger.config import Config
from banger.errors import HostError
from banger.runner import Runner

from .jail import JailerSettings

MIN_VERSION = (1, 4, 0)

# The jailer is usually installed beside Firecracker in a root-only directory.
_EXTRA_PATH = ":/usr/sbin:/sbin"


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


def check_version(runner: Runner, binary: str) -> tuple[bool, str]:
    """(supported, description) from ``firecracker --version``."""
    res = runner.run([binary, "--version"], desc="firecracker version", timeout=10, check=False)
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", res.out)
    if not m:
        return False, f"{binary}: cannot read a version from {res.out.strip()[:60]!r}"
    version = tuple(int(x) for x in m.groups())
    want = ".".join(map(str, MIN_VERSION))
    ok = version >= MIN_VERSION
    return ok, f"{binary}: v{'.'.join(map(str, version))} (minimum {want})"


def jail_owner(cfg: Config) -> tuple[int, int]:
    """The uid:gid a jailed Firecracker drops to: the owner of ``state_dir``.

    The VM's disks and logs live there and the jail chowns the ones
    Firecracker writes to this owner, so they stay with the installation's
    owner. Before the state directory exists, the daemon's own ids.
    """
    try:
        st = os.stat(cfg.state_dir)
    except OSError:
        return os.geteuid(), os.getegid()
    return st.st_uid, st.st_gid


def _jailer_label(cfg: Config) -> str:
    return cfg.jailer_bin or "jailer"


def jailer_settings(cfg: Config, euid: int | None = None) -> JailerSettings | None:
    """How to jail Firecracker, or None to run it unjailed.

    ``jailer_enabled`` None ("auto") jails when the jailer binary is found and
    banger runs as root (the jailer needs root to chroot, mknod and change
    ids); True insists and fails when either is missing; False never jails.

    Args:
        cfg: The configuration.
        euid: The effective uid to judge by (default: this process's).

    Raises:
        HostError: ``jailer_enabled = true`` but the jailer cannot run.
    """
    if cfg.jailer_enabled is False:
        return None
    euid = os.geteuid() if euid is None else euid
    binary = find_jailer(cfg)
    if cfg.jailer_enabled is None and (binary is None or euid != 0):
        return None
    if binary is None:
        raise HostError(
            f"jailer_enabled = true but the jailer ({_jailer_label(cfg)}) is not installed",
            hint="install the jailer from the same Firecracker release and set jailer_bin, "
                 "or set jailer_enabled = false",
        )
    if euid != 0:
        raise HostError("jailer_enabled = true but bangerd is not running as root",
                        hint="the jailer needs root; run bangerd as root or disable the jailer")
    uid, gid = jail_owner(cfg)
    return JailerSettings(binary, cfg.jailer_chroot_base, uid, gid)


def jailer_status(cfg: Config, euid: int | None = None) -> tuple[bool, str]:
    """For ``banger doctor``: (Firecracker VMs will run jailed, one-line explanation).

    False is not necessarily an error: it may be ``jailer_enabled = false``
    or auto mode without a jailer. The text says which, and says so plainly
    when ``jailer_enabled = true`` cannot be honoured (VM starts will fail).

    Args:
        cfg: The configuration.
        euid: The effective uid to judge by (default: this process's).
    """
    label = _jailer_label(cfg)
    if cfg.jailer_enabled is False:
        return False, "jailer disabled (jailer_enabled = false): Firecracker runs unjailed"
    try:
        settings = jailer_settings(cfg, euid)
    except HostError as exc:
        return False, f"{exc.message}: Firecracker VMs will not start"
    if settings is None:
        found = find_jailer(cfg)
        if found is None:
            return False, f"jailer ({label}) not found: Firecracker runs unjailed"
        return False, f"jailer {found} found, but not running as root: Firecracker runs unjailed"
    return True, (f"jailer {settings.binary}: Firecracker runs jailed under "
                  f"{settings.chroot_base} as {settings.uid}:{settings.gid}")
