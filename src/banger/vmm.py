"""The VMM driver seam: what the daemon needs from Firecracker or QEMU.

A driver turns a :class:`LaunchPlan` into a running process and returns its
:class:`~banger.proc.ProcessIdentity`; everything after that (liveness,
signals, waiting) works on the identity, so a re-adopted VMM after a daemon
restart is handled exactly like one launched by this daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from banger.errors import CommandFailed, HostError
from banger.layout import VMPaths
from banger.proc import ProcessIdentity
from banger.runner import Runner

# The identity channel (``banger.daemon.identity``) of a VMM without a virtio-serial port
# (Firecracker): this guest vsock port, where ``banger-ident`` listens for the host.
IDENT_VSOCK_PORT = 10500


def vm_marker(vm_id: str) -> str:
    """The string every VMM command line for ``vm_id`` contains (identity + sweeps)."""
    return f"banger-{vm_id}"


@dataclass(frozen=True)
class LaunchPlan:
    vm_id: str
    name: str
    vcpu: int
    memory_mib: int
    kernel: Path
    initrd: Path | None
    cmdline: str
    rootfs: str
    work_disk: str
    tap: str
    mac: str
    paths: VMPaths
    extra: dict[str, str] = field(default_factory=dict)
    # Disks after the work disk (``/dev/vdc`` on): only image finalize's helper VM has any.
    extra_disks: tuple[str, ...] = ()
    # A saved-state directory (``VMMDriver.save``): the VMM loads the guest from it instead
    # of booting the kernel, and leaves its vCPUs stopped until ``resume``.
    restore: Path | None = None
    # The host-to-guest identity channel (``banger.daemon.identity``): a device a restored
    # clone learns its new identity through. A guest saved without it is restored without
    # it (the device set must match the saved one).
    ident_channel: bool = True
    # The guest agent's port (``banger.agent``): commands without an SSH login. It comes
    # with the identity channel (a device set with both), for the same reason only when
    # the saved guest being restored had it.
    agent_channel: bool = True

    @property
    def agent_port(self) -> bool:
        """Whether the guest gets the agent's port: it comes only with the identity
        channel (one virtio-serial device carries both)."""
        return self.ident_channel and self.agent_channel

    @property
    def marker(self) -> str:
        """The ``banger-<vm id>`` string the VMM's command line must carry."""
        return vm_marker(self.vm_id)


class VMMDriver(Protocol):
    """One VMM. Implementations: ``qemuproc.QemuDriver``, ``fcproc.FirecrackerDriver``."""

    name: str
    # True: the launch makes the VM's port on the bridge itself, under the name
    # ``plan.tap`` (the daemon names one instead of taking a TAP from its pool).
    own_port: bool
    # True: the VM gets the guest agent's port when ``plan.agent_channel`` says so.
    agent_port: bool

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        """Start the VM; return once the VMM process runs (not when the guest booted)."""
        ...

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        """Ask the guest to power off through the VMM (ACPI / Ctrl-Alt-Del); True if sent."""
        ...

    def cleanup(self, plan_paths: VMPaths) -> None:
        """Remove the VMM's runtime files (sockets, pid file) after the process is gone."""
        ...

    def pause(self, plan_paths: VMPaths) -> None:
        """Stop the guest's vCPUs; memory and devices stay. Pausing a paused guest is fine."""
        ...

    def resume(self, plan_paths: VMPaths) -> None:
        """Run the guest's vCPUs again. Resuming a running guest is fine."""
        ...

    def save(self, plan_paths: VMPaths, into: Path,
             progress: Callable[[int], None] | None = None) -> int:
        """Write a paused guest's memory and device state into the empty directory ``into``
        (a later :class:`LaunchPlan` ``restore``); the VMM stays, paused. Returns the bytes
        written; ``progress`` hears the bytes written so far."""
        ...

    def version(self) -> str:
        """The VMM's version line: a saved guest restores only into the VMM that saved it.

        Raises:
            HostError: the VMM would not say.
        """
        ...

    def reidentify(self, plan_paths: VMPaths, message: bytes) -> None:
        """Hand ``message`` (``identity.encode``) to the guest's identity channel, where
        ``banger-ident`` applies it once the vCPUs run (QEMU: written into the paused
        guest's virtio-serial port; Firecracker: delivered over vsock in the background
        once :meth:`resume` ran them).

        Raises:
            VMMError: the guest's channel is not there.
        """
        ...

    def check_clonable(self) -> None:
        """Refuse, before any snapshot is taken, if this VMM cannot restore a snapshot
        as a separate machine (with disks and an identity of its own).

        Raises:
            BadRequest: it cannot, with a hint.
        """
        ...


@runtime_checkable
class ConfinedVMM(Protocol):
    """A driver that confines its VMM (user, seccomp, cgroup): ``qemuproc.QemuDriver``."""

    def confinement(self, vm_id: str, pid: int | None = None) -> dict[str, Any]:
        """How the VM's VMM is confined (``vm show``): one just launched, or (``pid``)
        one found running."""
        ...

    def readopt(self, vm_id: str, pid: int) -> dict[str, Any]:
        """After a daemon restart: put a live VMM back in its cgroup; its confinement."""
        ...


def binary_version(runner: Runner, binary: str, name: str) -> str:
    """The first line of ``binary --version`` (at most 200 characters): what
    ``VMMDriver.version`` reports.

    Raises:
        HostError: the binary would not run.
    """
    try:
        res = runner.run([binary, "--version"], desc=f"ask {name} its version", timeout=30)
    except CommandFailed as exc:
        raise HostError(f"cannot read {name}'s version: {exc.message}") from exc
    lines = res.out.strip().splitlines()
    return lines[0].strip()[:200] if lines else "unknown"
