"""Booting a claimed VM: network, VMM launch (a kernel boot, or a restore of a saved
guest), the wait for SSH; and the kernel command line every VM gets.

:func:`boot` takes a VM its caller has claimed (``starting``, or ``creating`` for a
first boot) to ``running``; on failure it tears down what it started
(:func:`vmteardown.teardown`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import caps, identity, kernels, savedstate, workspaces
from banger.daemon.agentready import AgentProbe
from banger.daemon.console import SSH_STARTED, ConsoleWatch
from banger.daemon.dmsnap import CowHandle
from banger.daemon.firewall import guest_rule
from banger.daemon.handles import VMHandles
from banger.daemon.network import gateway, prefixlen
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, SnapshotRecord, VMRecord
from banger.daemon.vms import handles_of, save_handles, transition, update_runtime
from banger.daemon.vmteardown import teardown
from banger.errors import HostError
from banger.fsutil import tail
from banger.proc import matches
from banger.runner import CancelToken
from banger.vmm import ConfinedVMM, LaunchPlan

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")


# The kernel arguments every VM gets, whichever VMM boots it. The root is ext4 in every
# image (built, registered, pulled), so neither the kernel nor an initramfs probes for its
# type; both VMMs give a guest one serial port, so the kernel sets up one, not four. The
# crypto self-tests (cryptomgr.notests; kept under fips=1) check at every boot that the
# kernel's own cipher code computes known answers: over a second of a TCG guest's boot
# (initcall_debug: 0.74 s in crypto_kdf108_init, 0.53 s in crypto_algapi_init).
BOOT_ARGS = ("console=ttyS0", "root=/dev/vda", "rw", "loglevel=4", "panic=1",
             "rootfstype=ext4", "8250.nr_uarts=1", "cryptomgr.notests")


def kernel_cmdline(d: Daemon, vm: VMRecord) -> str:
    """The guest kernel command line: console, root disk, and the ``banger.*`` network args
    that ``banger-init`` reads in the guest (plus Firecracker's reboot/i8042 args)."""
    gw = gateway(d.cfg.bridge_cidr)
    args = [
        *BOOT_ARGS,
        f"banger.ip={vm.ip}/{prefixlen(d.cfg.bridge_cidr)}", f"banger.gw={gw}",
        f"banger.hostname={vm.name}",
    ]
    if d.cfg.dns_enabled:
        args.append(f"banger.dns={gw}")
    if vm.vmm == "firecracker":
        args += ["reboot=k", "pci=off", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd"]
    return " ".join(args)


def boot(d: Daemon, vm: VMRecord, img: ImageRecord, cancel: CancelToken,
         op: Operation | None = None, *, fork: SnapshotRecord | None = None) -> VMRecord:
    """Network, VMM launch and SSH wait for a VM in state ``starting`` (or ``creating``).

    A suspended VM's VMM loads its saved state instead of booting the kernel; the
    saved state is deleted before its vCPUs run (:func:`savedstate.consume`), and its
    clock is set before the VM is called running. A clone (``fork``: its disks are
    already the snapshot's copies) loads the snapshot's saved state the same way and
    is handed its own identity (:mod:`identity`) before its vCPUs run; its host key is
    trusted before it answers. On failure everything started here is torn down before
    the error propagates (a saved state not yet loaded stays, for another try).
    """
    stage = _stages(cancel, op)
    h = _first_handles(d, vm)
    try:
        stage("network")
        h = _network(d, vm, h)
        # Before the VMM runs: until admitted, every frame from the TAP is dropped.
        d.firewall.admit(guest_rule(vm, h.tap or ""))
        d.checkpoint("start.network")
        restore = savedstate.complete(d.layout.vm(vm.id))
        stage("boot" if restore is None and fork is None else "restore")
        own = _clone_identity(d, vm) if fork is not None else None
        h = _launch(d, vm, img, h, restore=restore, fork=fork)
        # A boot, or a clone whose snapshot's agent answered: both have the agent's
        # port wherever the driver gives one (_agent_channel).
        ask_agent = restore is None and (fork is None or fork.agent == "ready")
        vm = _wake(d, vm, h, cancel, op, own=own, restored=restore is not None,
                   ask_agent=ask_agent)
    except BaseException as exc:
        _tear_down_failed(d, vm, h, exc)
        raise
    caps.started(d, vm)
    return vm


def prepare_pooled(d: Daemon, vm: VMRecord, img: ImageRecord, fork: SnapshotRecord) -> None:
    """A clone for the pool (``vmpool``), in state ``creating``: restored from ``fork``
    like any clone, with an identity of its own (host name ``pool-<id>``), admitted to
    the guest network with none of it open (its spec's), run until SSH answers over a
    held master connection (``sshopts.HELD_MASTER``), then paused. :func:`wake` finishes
    it for a create. On failure everything started here is torn down before the error
    propagates."""
    h = _first_handles(d, vm)
    try:
        h = _network(d, vm, h)
        d.firewall.admit(guest_rule(vm, h.tap or ""))
        own = _clone_identity(d, vm, hostname=f"pool-{vm.id}")
        h = _launch(d, vm, img, h, restore=None, fork=fork)
        _run_until_ssh(d, vm, h, CancelToken(), None, own=own, restored=False, held=True)
        # Found ready over the held master (its wake-up needs it), yet the agent runs
        # as in any clone: the CLI's commands use it.
        update_runtime(d, vm.id, agent=fork.agent == "ready" or None)
        d.driver(vm.vmm).pause(d.layout.vm(vm.id))
    except BaseException as exc:
        _tear_down_failed(d, vm, h, exc)
        raise


def wake(d: Daemon, vm: VMRecord, cancel: CancelToken, op: Operation | None = None
         ) -> VMRecord:
    """A pooled clone taken by a create (``creating``, under its new name and spec):
    admitted to the guest network with that spec, its vCPUs run, then named, its clock
    set, in one command over the master it kept; running from then. On failure it is
    torn down."""
    stage = _stages(cancel, op)
    h = handles_of(d, vm)
    try:
        stage("network")
        d.firewall.admit(guest_rule(vm, h.tap or ""))
        stage("restore")
        d.driver(vm.vmm).resume(d.layout.vm(vm.id))
        stage("wait-ssh")
        d.dial(vm.id, vm.ip).run(identity.rename_script(vm.name, time.time()),
                                 timeout=identity.RENAME_TIMEOUT_S, desc="name the clone")
        vm = _running(d, vm, op, expect={VMState.CREATING})
    except BaseException as exc:
        _tear_down_failed(d, vm, h, exc)
        raise
    caps.started(d, vm)
    return vm


def _stages(cancel: CancelToken, op: Operation | None) -> Callable[[str], None]:
    def stage(name: str) -> None:
        cancel.check()
        if op is not None:
            op.enter(name)
    return stage


def _first_handles(d: Daemon, vm: VMRecord) -> VMHandles:
    cow_json = vm.runtime.cow
    if not cow_json:
        raise HostError(f"VM {vm.name!r} has no root disk record", hint="delete and recreate it")
    return VMHandles(vmm=d.driver(vm.vmm).name, cow=CowHandle.from_json(cow_json))


def _network(d: Daemon, vm: VMRecord, h: VMHandles) -> VMHandles:
    """The bridge (made on first need) and a TAP for the VM (or, for a VMM that makes
    its port itself, the port's name), recorded in its handles."""
    d.ensure_network()
    own = d.driver(vm.vmm).own_port
    h = h.with_(tap=d.tap_pool.port_name() if own else d.tap_pool.acquire())
    save_handles(d, vm.id, h)
    return h


def _launch(d: Daemon, vm: VMRecord, img: ImageRecord, h: VMHandles, *,
            restore: Path | None, fork: SnapshotRecord | None) -> VMHandles:
    """Activate the root disk and start the VMM: a kernel boot, or (``restore``: a
    suspended VM's saved state; ``fork``: a snapshot's) a guest loaded with its vCPUs
    stopped. Returns the handles with the VMM's process."""
    drv = d.driver(vm.vmm)
    paths = d.layout.vm(vm.id)
    snap = d.layout.snapshot(fork.id) if fork is not None else None
    assert h.cow is not None
    pending = h

    def record(partial: CowHandle) -> None:
        save_handles(d, vm.id, pending.with_(cow=partial))

    cow = d.cow_for(h.cow).activate(h.cow, Path(img.rootfs), vm.id, record)
    h = h.with_(cow=cow)
    save_handles(d, vm.id, h)
    if snap is not None:
        boot_files = kernels.BootFiles(snap.kernel, snap.initrd if snap.initrd.exists() else None)
    else:
        boot_files = kernels.boot_files(d, img, vm.vmm)
    plan = LaunchPlan(
        vm_id=vm.id, name=vm.name, vcpu=vm.spec.vcpu, memory_mib=vm.spec.memory_mib,
        kernel=boot_files.kernel, initrd=boot_files.initrd,
        cmdline=kernel_cmdline(d, vm), rootfs=cow.disk, work_disk=str(paths.work_disk),
        tap=h.tap or "", mac=vm.mac, paths=paths, extra_disks=tuple(vm.spec.extra_disks),
        restore=restore or (snap.dir if snap is not None else None),
        ident_channel=restore is None or savedstate.had_ident_channel(vm.runtime),
        agent_channel=drv.agent_port and _agent_channel(vm, restore=restore, fork=fork),
    )
    ident = drv.launch(plan)
    h = h.with_(process=ident)
    save_handles(d, vm.id, h)
    update_runtime(d, vm.id, ident_channel=plan.ident_channel or None,
                   agent_channel=plan.agent_port or None,
                   agent=None,
                   confinement=drv.confinement(vm.id) if isinstance(drv, ConfinedVMM) else None)
    log.info("vm %s: %s running as pid %d", vm.name, drv.name, ident.pid)
    return h


def _agent_channel(vm: VMRecord, *, restore: Path | None, fork: SnapshotRecord | None
                   ) -> bool:
    """Whether the VMM gives the guest the agent's port: always on a boot; a restored
    guest as it was saved (the device set must match)."""
    if fork is not None:
        return fork.agent != ""
    if restore is not None:
        return savedstate.had_agent_channel(vm.runtime)
    return True


def _wake(d: Daemon, vm: VMRecord, h: VMHandles, cancel: CancelToken,
          op: Operation | None, *, own: identity.Identity | None, restored: bool,
          ask_agent: bool) -> VMRecord:
    """Run a launched VM until SSH answers (:func:`_run_until_ssh`; its agent asked first
    with ``ask_agent``), copy the configured files in, and mark it running."""
    _run_until_ssh(d, vm, h, cancel, op, own=own, restored=restored, ask_agent=ask_agent)
    d.checkpoint("start.wait-ssh")
    return _running(d, vm, op, expect={VMState.STARTING, VMState.CREATING})


def _running(d: Daemon, vm: VMRecord, op: Operation | None, *, expect: set[VMState]
             ) -> VMRecord:
    """Copy the configured files into a VM that answers SSH and mark it running."""
    for warning in workspaces.sync_files(d, vm):
        if op is not None:
            op.report(warning)
    return mark_running(d, vm.id, expect=expect)


def _run_until_ssh(d: Daemon, vm: VMRecord, h: VMHandles, cancel: CancelToken,
                   op: Operation | None, *, own: identity.Identity | None, restored: bool,
                   held: bool = False, ask_agent: bool = False) -> None:
    """Run a launched VM's vCPUs (a clone's after handing it ``own``; a suspended
    VM's after consuming its saved state) and wait for SSH (over a held master with
    ``held``), or for its agent to say it is ready (``ask_agent``, when the VM has the
    agent's port: no login then); a restored guest's clock is set."""
    drv = d.driver(vm.vmm)
    paths = d.layout.vm(vm.id)
    assert h.process is not None
    ident = h.process
    if own is not None:
        d.checkpoint("create.restored")
        drv.reidentify(paths, identity.encode(own))
        drv.resume(paths)
    elif restored:
        d.checkpoint("start.restored")
        savedstate.consume(drv, paths)
    d.checkpoint("start.boot")
    _stages(cancel, op)("wait-ssh")
    guest = d.dial(vm.id, vm.ip, held=held)
    # A clone is ready once its identity is applied whole (the probe checks), and
    # reachable only from then: it says so on its console, and is probed at once. A
    # booting guest is probed at once when systemd says on its console that sshd started.
    ready: dict[str, Any]
    if own is not None:
        ready = {"probe": identity.applied_probe(own),
                 "announced": identity.announced(paths.serial_log, own)}
    elif restored:
        ready = {}  # sshd runs already: nothing is said
    else:
        ready = {"announced": ConsoleWatch(paths.serial_log, SSH_STARTED)}
    probe = None
    if ask_agent and not held and drv.agent_port:
        probe = AgentProbe(paths, own.generation if own is not None else "",
                           booting=own is None)
    waited = d.seams.wait_for_ssh(
        guest, budget_s=d.cfg.boot_timeout_s, alive=lambda: matches(ident), cancel=cancel,
        on_wait=(lambda s: op.report(f"{s:.0f}s")) if op is not None else None,
        serial_tail=lambda: tail(paths.serial_log, 2000), new_host_key=own is not None,
        agent=probe, **ready)
    via_agent = probe is not None and probe.answered
    if via_agent:
        update_runtime(d, vm.id, agent=True)
    log.info("vm %s: %s ready after %.1fs", vm.name, "agent" if via_agent else "ssh", waited)
    if restored and own is None:
        warning = savedstate.set_clock(guest, vm.name)
        if warning is not None and op is not None:
            op.report(warning)


def _tear_down_failed(d: Daemon, vm: VMRecord, h: VMHandles, exc: BaseException) -> None:
    """After a failed boot: release what it started, keeping the boot's own error
    (which says what went wrong) and noting a teardown problem on it."""
    try:
        teardown(d, vm.id, h)
    except Exception as cleanup:
        log.error("vm %s: teardown after a failed boot: %s", vm.name, cleanup)
        exc.add_note(f"teardown incomplete: {cleanup}")


def _clone_identity(d: Daemon, vm: VMRecord, hostname: str | None = None
                    ) -> identity.Identity:
    """A clone's own identity (host name: the VM's name unless given), its host key
    already trusted at its address."""
    own = identity.fresh(
        d.runner, d.layout.staging_dir, ip_cidr=f"{vm.ip}/{prefixlen(d.cfg.bridge_cidr)}",
        gateway=gateway(d.cfg.bridge_cidr), mac=vm.mac, hostname=hostname or vm.name)
    identity.trust_host_key(d.layout.known_hosts, vm.ip, own.host_key_pub)
    return own


def mark_running(d: Daemon, vm_id: str, expect: set[VMState]) -> VMRecord:
    """The end of every successful boot: running, with no stale error, stop reason or
    saved-state record. A restored guest keeps the time it first booted."""
    vm = d.db.get_vm(vm_id)
    booted = vm.runtime.booted_at if vm.runtime.suspended else None
    return transition(d, vm_id, VMState.RUNNING, expect=expect, last_error=None,
                      stop_reason=None, suspended=None, booted_at=booted or time.time())


