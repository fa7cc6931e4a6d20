"""Finding Firecracker and the jailer on this host, and checking what was found."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from banger.config import Config
from banger.errors import BangerError, HostError
from banger.hostops.cgroups import MOUNTS, CgroupHost, detect, install_group
from banger.layout import install_tag
from banger.runner import Runner
from banger.vmmuser import check_unprivileged, ensure_user, lookup_user

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


def _jailer_label(cfg: Config) -> str:
    return cfg.jailer_bin or "jailer"


def jailer_binary(cfg: Config, euid: int | None = None) -> str | None:
    """The jailer to run Firecracker under, or None to run it unjailed.

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
    return binary


def jailer_settings(cfg: Config, runner: Runner, euid: int | None = None, *,
                    cgroups: CgroupHost | None = None) -> JailerSettings | None:
    """How to jail Firecracker, or None to run it unjailed (see :func:`jailer_binary`).

    A jailed Firecracker drops to the VMM user (config ``vmm_user``, the
    account QEMU runs as), created like QEMU's driver creates it when missing;
    it runs in a cgroup under this install's ``banger-<install tag>``.

    Args:
        cfg: The configuration.
        runner: Runs ``useradd`` when the VMM user does not exist yet.
        euid: The effective uid to judge by (default: this process's).
        cgroups: The cgroup hierarchy (default: this host's,
            :func:`~banger.hostops.cgroups.detect`).

    Raises:
        HostError: ``jailer_enabled = true`` but the jailer cannot run; the VMM
            user cannot be created; no cgroup hierarchy has memory, pids and cpu.
        BadRequest: The VMM user is uid 0 or gid 0.
    """
    binary = jailer_binary(cfg, euid)
    if binary is None:
        return None
    user = ensure_user(runner, cfg.vmm_user)
    return JailerSettings(binary, cfg.jailer_chroot_base, user,
                          cgroups if cgroups is not None else detect(),
                          install_group(install_tag(cfg.state_dir)))


@dataclass(frozen=True)
class JailerStatus:
    """What ``banger doctor`` says about the jailer.

    Attributes:
        jailed: Firecracker VMs will run jailed.
        detail: One line: the jailer, the user and ids, the cgroup version; or
            why Firecracker runs unjailed, or why its VMs will not start.
        blocks_vms: Firecracker VMs will not start (``jailer_enabled = true``
            that cannot be honoured, a VMM user that is root, no usable cgroup
            hierarchy): never an unjailed or unconfined fallback.
        hint: How to fix a blocking problem.
    """

    jailed: bool
    detail: str
    blocks_vms: bool = False
    hint: str = ""


def jailer_status(cfg: Config, euid: int | None = None, *,
                  mounts: Path = MOUNTS) -> JailerStatus:
    """For ``banger doctor``: will Firecracker VMs run jailed, as whom, in which cgroups.

    Reads the host only: a VMM user that does not exist yet is reported as
    one bangerd will create.

    Args:
        cfg: The configuration.
        euid: The effective uid to judge by (default: this process's).
        mounts: The mount table to find the cgroup hierarchy in.
    """
    label = _jailer_label(cfg)
    if cfg.jailer_enabled is False:
        return JailerStatus(False, "jailer disabled (jailer_enabled = false): "
                                   "Firecracker runs unjailed")
    try:
        binary = jailer_binary(cfg, euid)
        if binary is None:
            found = find_jailer(cfg)
            if found is None:
                return JailerStatus(False, f"jailer ({label}) not found: Firecracker runs unjailed")
            return JailerStatus(False, f"jailer {found} found, but not running as root: "
                                       "Firecracker runs unjailed")
        user = lookup_user(cfg.vmm_user)
        if user is None:
            who = f"{cfg.vmm_user} (not created yet: bangerd creates it at the first VM)"
        else:
            who = check_unprivileged(user).describe()
        host = detect(mounts)
    except BangerError as exc:
        return JailerStatus(False, f"{exc.message}: Firecracker VMs will not start",
                            blocks_vms=True, hint=exc.hint)
    parent = install_group(install_tag(cfg.state_dir))
    return JailerStatus(True, f"jailer {binary}: Firecracker runs jailed under "
                              f"{cfg.jailer_chroot_base} as {who}, in a cgroup "
                              f"{host.version.value} under {parent} (memory, pids and cpu "
                              "limits)")
