"""Finding Firecracker and the jailer on this host, and checking what was found."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from banger.config import Config
from banger.errors import BangerError, HostError
from banger.hostops.cgroups import MOUNTS, detect, install_group
from banger.hostops.jail import find_jailer
from banger.layout import install_tag
from banger.runner import Runner
from banger.vmmuser import check_unprivileged, lookup_user

MIN_VERSION = (1, 4, 0)


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

    The jail is built and the jailer started by the root helper (in process when
    bangerd is root). ``jailer_enabled`` None ("auto") jails when the jailer is found,
    and runs Firecracker unjailed otherwise, which only a root daemon may; True insists
    on the jailer; False never jails, so it too needs a root daemon.

    Args:
        cfg: The configuration.
        euid: The effective uid to judge by (default: this process's).

    Raises:
        HostError: the jailer is needed (``jailer_enabled = true``, or bangerd is not
            root) but not installed; or it is switched off and bangerd is not root.
    """
    root = (os.geteuid() if euid is None else euid) == 0
    if cfg.jailer_enabled is False:
        if not root:
            raise HostError("jailer_enabled = false, and an unjailed Firecracker needs a "
                            "daemon running as root",
                            hint="remove jailer_enabled (the root helper jails Firecracker), "
                                 "or use vmm = qemu")
        return None
    binary = find_jailer(cfg)
    if binary is None and (cfg.jailer_enabled or not root):
        why = "jailer_enabled = true" if cfg.jailer_enabled else "bangerd is not root"
        raise HostError(
            f"{why}, so Firecracker runs under its jailer, and the jailer "
            f"({_jailer_label(cfg)}) is not installed",
            hint="install the jailer from the same Firecracker release and set jailer_bin, "
                 "or use vmm = qemu",
        )
    return binary


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
        return _unjailed(cfg, "jailer disabled (jailer_enabled = false)")
    try:
        binary = jailer_binary(cfg, euid)
        if binary is None:
            return _unjailed(cfg, f"jailer ({label}) not found")
        user = lookup_user(cfg.vmm_user)
        if user is None:
            who = (f"{cfg.vmm_user} (not created yet: bangerd creates it at the first VM, "
                   "or `banger system install`)")
        else:
            who = check_unprivileged(user).describe()
        host = detect(mounts)
    except BangerError as exc:
        return JailerStatus(False, f"{exc.message}: Firecracker VMs will not start",
                            blocks_vms=True, hint=exc.hint)
    parent = install_group(install_tag(cfg.state_dir))
    netns = ("; each VM in a network namespace of its own (jailer_netns)"
             if cfg.jailer_netns else "")
    return JailerStatus(True, f"jailer {binary}: Firecracker runs jailed under "
                              f"{cfg.jailer_chroot_base} as {who}, in a cgroup "
                              f"{host.version.value} under {parent} (memory, pids and cpu "
                              f"limits){netns}")


def _unjailed(cfg: Config, why: str) -> JailerStatus:
    """No jailer: Firecracker runs unjailed, or (``jailer_netns``) not at all."""
    if cfg.jailer_netns:
        return JailerStatus(False, f"{why}, and jailer_netns needs it: Firecracker VMs "
                                   "will not start", blocks_vms=True,
                            hint="install Firecracker's jailer (jailer_bin) and leave "
                                 "jailer_enabled on, or turn jailer_netns off")
    return JailerStatus(False, f"{why}: Firecracker runs unjailed")
