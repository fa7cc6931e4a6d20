"""VM capability hooks: optional per-VM features that follow the lifecycle.

Each capability hears ``started`` (also on re-adoption after a daemon restart and
after a suspended VM's restore), ``stopped``, ``suspended`` and ``deleted``. A
failing hook is logged and never fails the lifecycle operation that triggered it.
"""

from __future__ import annotations

import logging

from banger.daemon.core import Daemon, VMCap
from banger.daemon.forwards import ForwardCap
from banger.daemon.sessions import SessionCap
from banger.daemon.store import VMRecord
from banger.daemon.vms import user_vms
from banger.fsutil import atomic_write

log = logging.getLogger("banger.caps")


class DNSCap:
    """``<name>.vm`` resolves while the VM runs."""

    name = "dns"

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def started(self, vm: VMRecord) -> None:
        """Make ``<name>.vm`` resolve to the VM's IP (when the DNS server runs)."""
        if self.d.vm_dns is not None:
            self.d.vm_dns.register(vm.name, vm.ip)

    def stopped(self, vm: VMRecord) -> None:
        """Stop resolving ``<name>.vm``; also used on delete."""
        if self.d.vm_dns is not None:
            self.d.vm_dns.unregister(vm.name)

    deleted = suspended = stopped


class SSHConfigCap:
    """Keeps ``state_dir/ssh/config`` listing every VM as ``Host <name>.vm``."""

    name = "ssh-config"

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def _rewrite(self, vm: VMRecord) -> None:
        write_ssh_config(self.d)

    started = stopped = deleted = _rewrite

    def suspended(self, vm: VMRecord) -> None:
        """The VM keeps its name and address: nothing to rewrite."""


def write_ssh_config(d: Daemon) -> None:
    """Rewrite ``ssh/config`` with a ``Host <name>.vm`` block for every VM in the store."""
    lay = d.layout
    lines = [
        "# Written by banger; do not edit. Add to ~/.ssh/config:",
        f"#   Include {lay.ssh_config}",
        "",
    ]
    for vm in user_vms(d):
        lines += [
            f"Host {vm.name}.vm",
            f"  HostName {vm.ip}",
            "  User root",
            f"  IdentityFile {lay.key_path}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {lay.known_hosts}",
            "  StrictHostKeyChecking accept-new",
            "",
        ]
    atomic_write(lay.ssh_config, "\n".join(lines).encode(), 0o644)


def default_caps(d: Daemon) -> list[VMCap]:
    """The capabilities every daemon runs: DNS names, the SSH config file, port forwards,
    guest sessions."""
    return [DNSCap(d), SSHConfigCap(d), ForwardCap(d), SessionCap(d)]


def _each(d: Daemon, event: str, vm: VMRecord) -> None:
    for cap in d.vm_caps:
        try:
            getattr(cap, event)(vm)
        except Exception:
            log.exception("capability %s failed on %s for %s", cap.name, event, vm.name)


def started(d: Daemon, vm: VMRecord) -> None:
    """Tell every capability that ``vm`` runs; hook failures are only logged."""
    _each(d, "started", vm)


def stopped(d: Daemon, vm: VMRecord) -> None:
    """Tell every capability that ``vm`` stopped; hook failures are only logged."""
    _each(d, "stopped", vm)


def suspended(d: Daemon, vm: VMRecord) -> None:
    """Tell every capability that ``vm`` is being saved; hook failures are only logged."""
    _each(d, "suspended", vm)


def deleted(d: Daemon, vm: VMRecord) -> None:
    """Tell every capability that ``vm`` is gone; hook failures are only logged."""
    _each(d, "deleted", vm)
