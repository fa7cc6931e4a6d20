"""``vm delete`` and :func:`destroy`, which removes a VM and everything it owns
(also the rollback of a failed create and of a create interrupted by a crash)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import caps
from banger.daemon.store import VMRecord
from banger.daemon.vmpower import ACPI_POWEROFF_S, GUEST_POWEROFF_S, cancel_boot
from banger.daemon.vms import handles_of, resolve, transition
from banger.daemon.vmteardown import SIGKILL_S, teardown
from banger.errors import HostError, InvalidState
from banger.fsutil import remove_tree
from banger.sshopts import forget_host

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")


def delete(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm delete``: cancel a boot or create in progress, then :func:`destroy` the VM."""
    vm = resolve(d, ref)
    gone = {"deleted": vm.name, "id": vm.id}
    fresh = cancel_boot(d, vm, "deleted by the user")
    if fresh is None:  # the cancelled create rolled itself back
        return gone
    fresh = wait_settled(d, fresh)  # a stop (or the exit watcher) finishes first
    if fresh is None:  # another delete removed it meanwhile
        return gone
    vm = transition(d, fresh.id, VMState.DELETING,
                    expect={VMState.STOPPED, VMState.RUNNING, VMState.ERROR, VMState.PAUSED,
                            VMState.SUSPENDED})
    d.checkpoint("delete.marked")
    destroy(d, vm.id, reason="deleted by the user")
    return gone


def wait_settled(d: Daemon, vm: VMRecord) -> VMRecord | None:
    """Wait (bounded) while another operation has ``vm`` stopping or deleting."""
    deadline = time.monotonic() + GUEST_POWEROFF_S + ACPI_POWEROFF_S + SIGKILL_S + 30
    while vm.state in (VMState.STOPPING, VMState.DELETING):
        if time.monotonic() > deadline:
            raise InvalidState(f"VM {vm.name!r} is still {vm.state.value}",
                               hint="retry in a moment")
        time.sleep(0.1)
        fresh = d.db.find_vm(vm.id)
        if fresh is None:
            return None
        vm = fresh
    return vm


def destroy(d: Daemon, vm_id: str, reason: str) -> None:
    """Remove a VM and everything it owns: process, TAP, disks, files, IP lease, row."""
    vm = d.db.find_vm(vm_id)
    if vm is None:
        return
    h = handles_of(d, vm)
    problems = teardown(d, vm_id, h)
    if problems:
        transition(d, vm_id, VMState.ERROR, last_error="; ".join(problems))
        raise HostError(f"could not remove VM {vm.name!r}: " + "; ".join(problems),
                        hint="`banger vm delete` again retries")
    if h.cow is not None:
        d.cow_for(h.cow).remove(h.cow)
    paths = d.layout.vm(vm_id)
    remove_tree(paths.state)
    remove_tree(paths.run)
    forget_host(d.layout.known_hosts, vm.ip)
    caps.deleted(d, vm)
    d.db.delete_vm(vm_id)
    # vm_locks/workspace_locks entries are kept: a thread may still hold the old lock
    # object, and a fresh one made by forget() + get() would let two holders in. Ids are
    # never reused, so the cost is one small Lock per VM ever created.
    log.info("vm %s (%s): removed (%s)", vm.name, vm.id, reason)


