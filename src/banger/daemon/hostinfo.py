"""Facts about the host that decide how VMs can run (shared by doctor and VMM selection)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SYS_MODULE = Path("/sys/module")


@dataclass(frozen=True)
class KVMStatus:
    usable: bool
    reason: str


def kvm_status(dev: Path = Path("/dev/kvm"), sys_module: Path = SYS_MODULE) -> KVMStatus:
    """Whether ``/dev/kvm`` can run a standard (unmodified) guest kernel.

    Opening the device is not enough: a host whose only KVM module is ``kvm_pvm``
    (Pagetable-based Virtual Machine, for nested clouds without VT-x) serves
    /dev/kvm, but a normal guest kernel hangs on it. Hardware virtualisation
    shows as ``kvm_intel`` or ``kvm_amd``.
    """
    if not dev.exists():
        return KVMStatus(False, f"{dev} does not exist (no KVM module loaded)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KVMStatus(False, f"{dev} is not readable and writable by this user")
    hw = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if hw:
        return KVMStatus(True, f"{dev} backed by {hw[0]}")
    if (sys_module / "kvm_pvm").exists():
        return KVMStatus(False, f"{dev} is served by kvm_pvm only (PVM): a standard guest "
                                "kernel hangs on it")
    return KVMStatus(False, f"{dev} exists but neither kvm_intel nor kvm_amd is loaded")


def which(binary: str) -> str | None:
    """Absolute path of ``binary`` (a name on PATH or a path), or None."""
    if "/" in binary:
        return binary if os.access(binary, os.X_OK) else None
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
