"""The pool: clones of boot snapshots kept woken, then paused, taken by creates.

With ``pool_size`` set for an image (config: image name -> how many), the daemon keeps
that many clones of the image's boot snapshot (at the default VM size) made ahead of
need (``vmboot.prepare_pooled``): disks copied, the snapshot's guest restored and given
an identity of its own, run until SSH answered over a master connection that is kept,
then paused (state ``pooled``). A ``vm create``/``vm run`` that would restore that same
boot snapshot takes one instead (:func:`take`): the pooled VM becomes the new VM in one
store update (name, spec), then is admitted to the guest network with the create's
egress, resumed, and named with one command over its master (``vmboot.wake``): no
restore, no identity hand-over, no SSH login is left on the create's path.

Pool members are VMs in the store (``VMRecord.in_pool``) under a name no user can give
(``_pool-<id>``): address allocation, the leak sweep and reconcile see them like any
VM, while every command a user runs (``vm list``, name lookup, the SSH config) skips
them. A daemon that dies with a pool leaves VMs in ``pooled`` or ``creating``, which the
next start removes. The filling is :mod:`banger.daemon.vmpoolfill`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from banger.api import VMSpec, VMState
from banger.daemon.store import SnapshotRecord, VMRecord
from banger.daemon.vmdelete import destroy
from banger.daemon.vmruntime import VMRuntime
from banger.daemon.vms import handles_of, transition
from banger.errors import BangerError
from banger.proc import matches
from banger.runner import CancelToken

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.pool")

NAME_PREFIX = "_pool-"  # not a DNS label: no user's VM can have it


def members(d: Daemon) -> list[VMRecord]:
    """Every pool member, being made or ready, oldest first."""
    return [vm for vm in d.db.list_vms() if vm.in_pool]


def take(d: Daemon, snap: SnapshotRecord, name: str, spec: VMSpec,
         runtime: VMRuntime, *, cancel: CancelToken) -> VMRecord | None:
    """A ready clone of ``snap``, made the user's VM ``name`` (state ``creating``, with
    ``spec``, and ``runtime`` over what its launch recorded), or None when the pool has
    none. Called under ``create_vm_mu``, where the name was found free. ``cancel`` (the
    create's) is registered as the VM's in-flight boot before the VM gets the name, so
    a delete that sees it ``creating`` can always cancel it.

    A member whose VMM died is skipped (the pool's next pass removes it).
    """
    for vm in members(d):
        if vm.state != VMState.POOLED or vm.runtime.from_snapshot != snap.name:
            continue
        if not vmm_alive(d, vm):
            continue
        d.register_inflight(vm.id, cancel)
        adopted = vm.runtime.merged(pool=None, **runtime.model_dump(exclude_defaults=True))
        try:
            taken = d.db.adopt_pooled(vm, name, spec, adopted)
        except BaseException:
            d.end_inflight(vm.id, cancel)
            raise
        if taken is None:
            d.end_inflight(vm.id, cancel)
        else:
            log.info("pool: %s taken as vm %s (%s)", vm.name, name, vm.id)
            return taken
    return None


def vmm_alive(d: Daemon, vm: VMRecord) -> bool:
    """Whether member ``vm``'s VMM process is still the one it was launched as."""
    h = handles_of(d, vm)
    return h.process is not None and matches(h.process)


def drain(d: Daemon, which: Callable[[VMRecord], bool], why: str) -> int:
    """Remove the ready members ``which`` selects, and any a failed removal left in
    ``error``; returns how many went. A failure is logged (the member is left in
    ``error``: the next pass, or the next start, tries again)."""
    gone = 0
    for vm in members(d):
        left_by_a_failure = vm.state == VMState.ERROR
        if not (left_by_a_failure or (vm.state == VMState.POOLED and which(vm))):
            continue
        try:
            transition(d, vm.id, VMState.DELETING, expect={VMState.POOLED, VMState.ERROR})
        except BangerError:
            continue  # taken meanwhile
        try:
            destroy(d, vm.id, reason=why)
            gone += 1
            log.info("pool: %s removed: %s", vm.name, why)
        except BangerError as exc:
            log.warning("pool: %s: %s", vm.name, exc.message)
    return gone


def status(d: Daemon) -> dict[str, Any]:
    """For ``daemon status``: per image with a pool, ``size`` (wanted), ``ready`` and
    ``filling``; and each member's id, state, image, address, TAP and VMM pid."""
    images = {image: {"size": size, "ready": 0, "filling": 0}
              for image, size in d.cfg.pool_size.items() if size > 0}
    listed = []
    for vm in members(d):
        entry = images.setdefault(vm.image, {"size": 0, "ready": 0, "filling": 0})
        entry["ready" if vm.state == VMState.POOLED else "filling"] += 1
        h = d.handles.get(vm.id)
        listed.append({"id": vm.id, "state": vm.state.value, "image": vm.image, "ip": vm.ip,
                       "tap": h.tap if h else None,
                       "pid": h.process.pid if h and h.process else None})
    return {"images": images, "members": listed}
