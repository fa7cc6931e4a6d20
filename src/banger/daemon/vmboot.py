"""Booting a claimed VM: network, VMM launch (a kernel boot, or a restore of a saved
guest), the wait for SSH; and the kernel command line every VM gets.

:func:`boot` takes a VM its caller has claimed (``starting``, or ``creating`` for a
first boot) to ``running``; on failure it tears down what it started
(:func:`vmteardown.teardown`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from banger.api import VMState
from banger.daemon import caps, identity, kernels, savedstate, workspaces
from banger.daemon.dmsnap import CowHandle
from banger.daemon.firewall import guest_rule
from banger.daemon.handles import VMHandles
from banger.daemon.network import gateway, prefixlen
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, SnapshotRecord, VMRecord
from banger.daemon.vms import save_handles, transition, update_runtime
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
# type; both VMMs give a guest one serial port, so the kernel sets up one, not four.
BOOT_ARGS = ("console=ttyS0", "root=/dev/vda", "rw", "loglevel=4", "panic=1",
             "rootfstype=ext4", "8250.nr_uarts=1")


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
    def stage(name: str, progress: str = "") -> None:
        cancel.check()
        if op is not None:
            op.enter(name, progress)

    drv = d.driver(vm.vmm)
    paths = d.layout.vm(vm.id)
    cow_json = vm.runtime.get("cow")
    if not cow_json:
        raise HostError(f"VM {vm.name!r} has no root disk record", hint="delete and recreate it")
    h = VMHandles(vmm=drv.name, cow=CowHandle.from_json(cow_json))
    try:
        stage("network")
        d.ensure_network()
        tap = d.tap_pool.acquire()
        h = h.with_(tap=tap)
        save_handles(d, vm.id, h)
        # Before the VMM runs: until admitted, every frame from the TAP is dropped.
        d.firewall.admit(guest_rule(vm, tap))
        d.checkpoint("start.network")
        restore = savedstate.complete(paths)
        snap = d.layout.snapshot(fork.id) if fork is not None else None
        stage("boot" if restore is None and snap is None else "restore")
        assert h.cow is not None
        pending = h

        def record(partial: CowHandle) -> None:
            save_handles(d, vm.id, pending.with_(cow=partial))

        cow = d.cow_for(h.cow).activate(h.cow, Path(img.rootfs), vm.id, record)
        h = h.with_(cow=cow)
        save_handles(d, vm.id, h)
        if snap is not None:
            boot_files = kernels.BootFiles(
                snap.kernel, snap.initrd if snap.initrd.exists() else None)
        else:
            boot_files = kernels.boot_files(d, img, vm.vmm)
        plan = LaunchPlan(
            vm_id=vm.id, name=vm.name, vcpu=vm.spec.vcpu, memory_mib=vm.spec.memory_mib,
            kernel=boot_files.kernel, initrd=boot_files.initrd,
            cmdline=kernel_cmdline(d, vm), rootfs=cow.disk, work_disk=str(paths.work_disk),
            tap=h.tap or "", mac=vm.mac, paths=paths, extra_disks=tuple(vm.spec.extra_disks),
            restore=restore or (snap.dir if snap is not None else None),
            ident_channel=restore is None or savedstate.had_ident_channel(vm.runtime),
        )
        own = _clone_identity(d, vm) if snap is not None else None
        ident = drv.launch(plan)
        h = h.with_(process=ident)
        save_handles(d, vm.id, h)
        if own is not None:
            d.checkpoint("create.restored")
            drv.reidentify(paths, identity.encode(own))
            drv.resume(paths)
        elif restore is not None:
            d.checkpoint("start.restored")
            savedstate.consume(drv, paths)
        update_runtime(d, vm.id, ident_channel=plan.ident_channel or None,
                       confinement=drv.confinement(vm.id)
                       if isinstance(drv, ConfinedVMM) else None)
        log.info("vm %s: %s running as pid %d", vm.name, drv.name, ident.pid)
        d.checkpoint("start.boot")
        stage("wait-ssh")
        guest = d.dial(vm.id, vm.ip)
        # A clone is ready once its identity is applied whole (the probe checks), and
        # reachable only from then: it says so on its console, and is probed at once.
        clone = {} if own is None else {
            "probe": identity.applied_probe(own),
            "announced": identity.announced(paths.serial_log, own)}
        waited = d.seams.wait_for_ssh(
            guest, budget_s=d.cfg.boot_timeout_s, alive=lambda: matches(ident), cancel=cancel,
            on_wait=(lambda s: op.report(f"{s:.0f}s")) if op is not None else None,
            serial_tail=lambda: tail(paths.serial_log, 2000), new_host_key=own is not None,
            **clone)
        log.info("vm %s: ssh ready after %.1fs", vm.name, waited)
        if restore is not None and own is None:
            warning = savedstate.set_clock(guest, vm.name)
            if warning is not None and op is not None:
                op.report(warning)
        for warning in workspaces.sync_files(d, vm):
            if op is not None:
                op.report(warning)
        d.checkpoint("start.wait-ssh")
        vm = mark_running(d, vm.id, expect={VMState.STARTING, VMState.CREATING})
    except BaseException as exc:
        try:
            teardown(d, vm.id, h)
        except Exception as cleanup:  # keep the boot's own error, which says what went wrong
            log.error("vm %s: teardown after a failed boot: %s", vm.name, cleanup)
            exc.add_note(f"teardown incomplete: {cleanup}")
        raise
    caps.started(d, vm)
    return vm


def _clone_identity(d: Daemon, vm: VMRecord) -> identity.Identity:
    """A clone's own identity, its host key already trusted at its address."""
    own = identity.fresh(
        d.runner, d.layout.staging_dir, ip_cidr=f"{vm.ip}/{prefixlen(d.cfg.bridge_cidr)}",
        gateway=gateway(d.cfg.bridge_cidr), mac=vm.mac, hostname=vm.name)
    identity.trust_host_key(d.layout.known_hosts, vm.ip, own.host_key_pub)
    return own


def mark_running(d: Daemon, vm_id: str, expect: set[VMState]) -> VMRecord:
    """The end of every successful boot: running, with no stale error, stop reason or
    saved-state record. A restored guest keeps the time it first booted."""
    vm = d.db.get_vm(vm_id)
    booted = vm.runtime.get("booted_at") if vm.runtime.get("suspended") else None
    return transition(d, vm_id, VMState.RUNNING, expect=expect, last_error=None,
                      stop_reason=None, suspended=None, booted_at=booted or time.time())


