"""Releasing what a VM's VMM holds: :func:`teardown`, :func:`kill_vmm`, and the
re-adoption of a live VMM's confinement after a daemon restart.

Every path that ends a VM (stop, kill, a failed boot, suspend, delete, reconcile)
goes through :func:`teardown`, which releases each resource independently of the
others.
"""

from __future__ import annotations

import contextlib
import logging
import signal as signal_mod
from typing import TYPE_CHECKING

from banger.daemon.guest import end_masters
from banger.daemon.handles import VMHandles
from banger.daemon.store import VMRecord
from banger.daemon.vms import update_runtime
from banger.errors import BangerError, NotFound
from banger.fsutil import remove_tree
from banger.hostops.client import HostOps
from banger.proc import ProcessIdentity, find_by_marker, identify, matches, wait_gone
from banger.vmm import ConfinedVMM, vm_marker

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")

SIGTERM_S = 5.0
SIGKILL_S = 10.0


def kill_vmm(host: HostOps, ident: ProcessIdentity | None,
             sig: int = signal_mod.SIGKILL) -> bool:
    """Signal the VMM (through ``host``: it runs as the VMM user) and wait for it to go;
    escalates to SIGKILL. True when it is gone."""
    if ident is None or not matches(ident):
        return True
    if sig != signal_mod.SIGKILL:
        host.signal(ident, sig)
        if wait_gone(ident, SIGTERM_S):
            return True
    host.signal(ident, signal_mod.SIGKILL)
    return wait_gone(ident, SIGKILL_S)


def teardown(d: Daemon, vm_id: str, h: VMHandles | None) -> list[str]:
    """Release everything a running VM holds, in order, each step independent.

    Order: the shared ssh master (the guest sessions), the VMM process, then its
    runtime files, then the TAP, then the COW device mapping, then the handles
    file. A failing step is recorded and the next still runs, so one stuck resource
    does not leak the others.
    """
    paths = d.layout.vm(vm_id)
    # First, while the guest may still answer: the master closes its connection
    # cleanly, and no ssh process outlives the VM.
    problems = end_masters(d.runner, paths.ssh_dir)
    marker = vm_marker(vm_id)
    idents: list[ProcessIdentity] = []
    if h is not None and h.process is not None:
        idents.append(h.process)
    # A VMM launched just before a crash may not be in the handles yet: find it by marker.
    for pid in find_by_marker(marker):
        ident = identify(pid, marker)
        if ident is not None and ident not in idents:
            idents.append(ident)
    for ident in idents:
        if not kill_vmm(d.host, ident, signal_mod.SIGTERM):
            problems.append(f"VMM pid {ident.pid} would not exit")
    if h is not None:
        try:
            d.driver(h.vmm).cleanup(paths)
        except BangerError as exc:
            log.info("vmm cleanup: %s", exc)
        if h.tap:
            try:
                d.firewall.forget(h.tap)
            except BangerError as exc:
                problems.append(f"firewall {h.tap}: {exc.message}")
            try:
                d.tap_pool.release(h.tap)
            except BangerError as exc:
                problems.append(f"tap {h.tap}: {exc.message}")
        if h.cow is not None:
            try:
                d.cow_for(h.cow).deactivate(h.cow)
            except BangerError as exc:
                problems.append(f"root disk: {exc.message}")
    remove_tree(paths.run)
    if not problems:
        d.handles.drop(vm_id)
        with contextlib.suppress(NotFound):
            update_runtime(d, vm_id, teardown=None, confinement=None)
    return problems


def readopt_confinement(d: Daemon, vm: VMRecord, h: VMHandles) -> None:
    """A VMM re-adopted after a daemon restart: back in its cgroup, its confinement recorded."""
    if h.process is None:
        return
    drv = d.driver(h.vmm)
    if isinstance(drv, ConfinedVMM):
        try:
            update_runtime(d, vm.id, confinement=drv.readopt(vm.id, h.process.pid))
        except BangerError as exc:  # the VM keeps running; `vm show` says it is unconfined
            log.error("vm %s: cannot re-adopt its cgroup: %s", vm.name, exc.message)
            update_runtime(d, vm.id, confinement=None)


