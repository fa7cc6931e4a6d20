"""Choosing a VMM driver and QEMU accelerator from the config and the host."""

from __future__ import annotations

from collections.abc import Callable

from banger.config import Config
from banger.daemon.fcproc import jailer_binary
from banger.daemon.hostinfo import kvm_status, which
from banger.daemon.qemuproc import QemuDriver
from banger.errors import BadRequest, HostError
from banger.hostops.client import HostOps
from banger.hostops.jail import find_firecracker
from banger.runner import Runner
from banger.vmm import VMMDriver


def firecracker_binary(cfg: Config) -> str | None:
    """The Firecracker binary the config names or PATH has, or None."""
    return find_firecracker(cfg)


def firecracker_blockers(cfg: Config) -> list[str]:
    """Every reason Firecracker cannot run VMs on this host (empty: it can)."""
    reasons = []
    try:
        jailer_binary(cfg)  # a daemon that is not root needs the jailer
    except HostError as exc:
        reasons.append(exc.message)
    if firecracker_binary(cfg) is None:
        reasons.append(f"no Firecracker binary ({cfg.firecracker_bin or 'firecracker'} "
                       "is not on PATH)")
    kvm = kvm_status()
    if not kvm.usable:
        reasons.append(kvm.reason)
    return reasons


def resolve_vmm(cfg: Config, requested: str,
                image_suits: Callable[[str], bool] = lambda vmm: True) -> str:
    """``auto`` is Firecracker when its binary exists, KVM runs guests and the image
    has a kernel Firecracker can boot; else QEMU."""
    choice = requested if requested != "auto" else cfg.vmm.value
    if choice == "auto":
        if not firecracker_blockers(cfg) and image_suits("firecracker"):
            return "firecracker"
        return "qemu"
    if choice not in ("qemu", "firecracker"):
        raise BadRequest(f"unknown VMM {choice!r}", hint="use auto, qemu or firecracker")
    return choice


def resolve_accel(cfg: Config) -> str:
    """The QEMU accelerator to use: ``kvm`` or ``tcg`` (``auto``: KVM when usable).

    Raises:
        HostError: ``qemu_accel = kvm`` but ``/dev/kvm`` cannot run guests.
    """
    if cfg.qemu_accel.value == "auto":
        return "kvm" if kvm_status().usable else "tcg"
    if cfg.qemu_accel.value == "kvm" and not kvm_status().usable:
        raise HostError(f"qemu_accel = kvm but {kvm_status().reason}",
                        hint="set qemu_accel = auto (TCG works everywhere, slower)")
    return cfg.qemu_accel.value


def make_driver(cfg: Config, runner: Runner, name: str, host: HostOps) -> VMMDriver:
    """Build the VMM driver called ``name`` (``qemu`` or ``firecracker``); ``host`` does
    what needs root for it.

    Raises:
        HostError: the VMM's binary is missing or unusable.
        BadRequest: unknown VMM name, or a jailer set-up that cannot work.
    """
    if name == "qemu":
        qemu = which(cfg.qemu_bin)
        if qemu is None:
            raise HostError(f"QEMU ({cfg.qemu_bin}) is not installed",
                            hint="apt-get install qemu-system-x86")
        return QemuDriver.from_config(cfg, runner, qemu, resolve_accel(cfg), host)
    if name == "firecracker":
        # Imported here, on purpose: the driver's API client (httpx) costs a daemon about
        # 9 MiB, which only a daemon running Firecracker VMs should carry.
        from banger.daemon.fcproc.driver import FirecrackerDriver

        return FirecrackerDriver.from_config(cfg, runner, host)
    raise BadRequest(f"unknown VMM {name!r}", hint="use auto, qemu or firecracker")
