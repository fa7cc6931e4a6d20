"""banger as a system service: the two systemd units and what installing them takes.

``banger system install --owner USER`` (:mod:`banger.cli.system`) runs bangerd as
``USER`` (``bangerd.service``) and the few things that need root in
``banger-helper.service``, which answers only that user's processes
(:mod:`banger.hostops.server`). Both units are hardened: no new privileges, a
read-only system with only banger's directories writable, private /tmp, a narrow
set of socket families and system calls, and a capability bounding set that holds
only what each one needs (none at all for the daemon).

Rendering is pure (:func:`daemon_unit`, :func:`helper_unit`, :func:`system_config`);
the checks that the owner can run the installed banger are :func:`runnable_by`'s.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest
from banger.hostops.netlink import NETNS_DIR

DAEMON_UNIT = "bangerd.service"
HELPER_UNIT = "banger-helper.service"
UNIT_DIR = Path("etc/systemd/system")  # below the install root
HELPER_SOCKET = Path("/run/banger-helper/helper.sock")
SYSTEM_STATE = Path("/var/lib/banger")
SYSTEM_CACHE = Path("/var/cache/banger")
SYSTEM_RUNTIME = Path("/run/banger")
# What the helper does as root (banger.hostops.executor), and so all it may keep:
# links, TAPs and nftables (NET_ADMIN); a VM's files handed to the VMM user's group
# (CHOWN, FOWNER) below the daemon's 0700 directories (DAC_OVERRIDE,
# DAC_READ_SEARCH); QEMU started as the VMM user with no capabilities (SETUID,
# SETGID, SETPCAP); signals to VMMs (KILL); cgroups (SYS_ADMIN for v1's mounts and
# moving a process between them); the .vm DNS server's port 53 (NET_BIND_SERVICE),
# bound for the daemon and handed over.
HELPER_CAPABILITIES = ("CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_FOWNER",
                       "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_SETUID", "CAP_SETGID",
                       "CAP_SETPCAP", "CAP_KILL", "CAP_SYS_ADMIN")
# What Firecracker's jailer needs beyond that, only where it was found at install time:
# device nodes in the jail (MKNOD: /dev/kvm, /dev/net/tun; a VM's dm device) and its
# chroot (SYS_CHROOT), after a pivot_root in a mount namespace of its own (@mount).
JAILER_CAPABILITIES = ("CAP_MKNOD", "CAP_SYS_CHROOT")


@dataclass(frozen=True)
class Install:
    """What the units are made of."""

    owner: str
    group: str
    config: Path
    bin_dir: Path  # bangerd and banger-helper
    state_dir: Path = SYSTEM_STATE
    cache_dir: Path = SYSTEM_CACHE
    runtime_dir: Path = SYSTEM_RUNTIME
    # Where Firecracker's jails live when its jailer was found (None: no Firecracker).
    jail_base: Path | None = None


def system_config(state_dir: Path = SYSTEM_STATE, cache_dir: Path = SYSTEM_CACHE,
                  runtime_dir: Path = SYSTEM_RUNTIME) -> str:
    """The config a fresh system install writes (every other key keeps its default)."""
    return (
        "# Written by `banger system install`; bangerd.service and\n"
        "# banger-helper.service read it (restart both after a change:\n"
        "# `banger system restart`).\n"
        f'state_dir = "{state_dir}"\n'
        f'cache_dir = "{cache_dir}"\n'
        f'runtime_dir = "{runtime_dir}"\n'
        f'helper_socket = "{HELPER_SOCKET}"\n'
    )


def _common_hardening() -> list[str]:
    return [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
    ]


def daemon_unit(i: Install) -> str:
    """``bangerd.service``: the daemon as its owner, after the helper."""
    writable = " ".join(str(p) for p in (i.state_dir, i.cache_dir, i.runtime_dir))
    return "\n".join([
        "[Unit]",
        "Description=banger daemon: microVM sandboxes (runs as its owner)",
        f"Requires={HELPER_UNIT}",
        f"After={HELPER_UNIT} network.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={i.owner}",
        f"Group={i.group}",
        f"ExecStart={i.bin_dir / 'bangerd'} --config {i.config}",
        "Restart=on-failure",
        # VMs outlive a daemon restart: never take their processes with it.
        "KillMode=process",
        f"ReadWritePaths={writable}",
        # Repositories live in home directories: the daemon reads them, writes nothing.
        "ProtectHome=read-only",
        "ProtectKernelTunables=yes",
        "ProtectControlGroups=yes",
        *_common_hardening(),
        # Image builds run in a user namespace of the daemon's own (ids mapped by the
        # helper), where debootstrap mounts /proc and /dev and chroots.
        "SystemCallFilter=@mount",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        # None at all: everything that needs one is the helper's.
        "CapabilityBoundingSet=",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def helper_unit(i: Install) -> str:
    """``banger-helper.service``: root, for what needs it, for the owner's daemon only."""
    writable = " ".join(str(p) for p in (
        i.state_dir, i.runtime_dir, Path("/sys/fs/cgroup"),
        Path("/proc/sys/net/ipv4/ip_forward")))
    caps: tuple[str, ...] = HELPER_CAPABILITIES
    jailer: list[str] = []
    if i.jail_base is not None:
        # `system install` makes the jail base; `ip netns` names VMs' own network
        # namespaces (jailer_netns) in /run/netns, a tmpfs directory made at each start.
        writable += f" {i.jail_base} {NETNS_DIR}"
        caps += JAILER_CAPABILITIES
        jailer = ["# Firecracker's jailer: a mount namespace, pivot_root, device nodes.",
                  "SystemCallFilter=@mount",
                  f"ExecStartPre=+/bin/mkdir -p {NETNS_DIR}"]
    return "\n".join([
        "[Unit]",
        "Description=banger root helper: bridge, TAPs, nftables, VMM launches",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={i.bin_dir / 'banger-helper'} --config {i.config} --owner {i.owner}",
        "Restart=on-failure",
        # QEMU processes it launched are in cgroups of their own and outlive it.
        "KillMode=process",
        # What it holds itself (requests are bounded; nft and the launcher are brief).
        "MemoryMax=1G",
        "TasksMax=256",
        "RuntimeDirectory=banger-helper",
        "RuntimeDirectoryMode=0755",
        f"ReadWritePaths={writable}",
        "ProtectHome=yes",
        *_common_hardening(),
        *jailer,
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
        f"CapabilityBoundingSet={' '.join(caps)}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def runnable_by(path: Path, uid: int, gids: set[int]) -> str | None:
    """Why ``uid`` (with ``gids``) cannot reach and execute ``path``, or None if it can.

    Every directory on the way (after symlinks are resolved) must be searchable by it
    and the file executable: a venv under root's 0700 home is not.
    """
    real = Path(os.path.realpath(path))
    for d in [*reversed(real.parents), real]:
        try:
            st = d.stat()
        except OSError as exc:
            return f"{d}: {exc.strerror}"
        need = stat.S_IXUSR if st.st_uid == uid else (
            stat.S_IXGRP if st.st_gid in gids else stat.S_IXOTH)
        if uid != 0 and not st.st_mode & need:
            return f"{d} is not {'searchable' if d != real else 'executable'} by uid {uid}"
    return None


def check_runnable(paths: list[Path], owner: str, uid: int, gids: set[int]) -> None:
    """Refuse an install whose owner could not run banger's programs.

    Raises:
        BadRequest: naming the first path in the way.
    """
    for p in paths:
        why = runnable_by(p, uid, gids)
        if why is not None:
            raise BadRequest(f"{owner} cannot run {p}: {why}",
                             hint="install banger where that user can run it (for example "
                                  "a venv under /opt), then run `banger system install` "
                                  "from there")
