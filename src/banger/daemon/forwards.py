"""``vm forward``: host ports relayed to a running guest (the sockets: :mod:`forwarder`).

A VM's forwards are of two kinds, both ``[HOST_ADDR:]HOST_PORT:GUEST_PORT``:

* ``spec.forwards`` - given at creation (``vm create/run -p``): opened at every start;
* ``runtime["forwards"]`` - added to the running VM with ``vm forward``: they last
  until the VM stops (then the host port is free again) or ``vm forward --rm``.

:class:`ForwardCap` follows the lifecycle: it opens both kinds when the VM starts
and when a restarted daemon re-adopts it, and closes them on stop and delete. A
forward that cannot be opened then (its host port taken meanwhile) is logged and
shown as not open by ``vm forward list``; it never fails the start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from banger.api import ForwardView, VMState
from banger.daemon.forwarder import ForwardSpec, parse
from banger.daemon.store import VMRecord
from banger.daemon.vms import resolve, resolve_running, user_vms
from banger.errors import BadRequest, BangerError, NotFound, NotRunning

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.forwards")

MAX_FORWARDS = 64  # per VM


def wanted(vm: VMRecord) -> list[ForwardSpec]:
    """Every forward VM ``vm`` should have open while it runs, sorted, without repeats."""
    specs = {parse(text) for text in vm.spec.forwards}
    specs.update(ForwardSpec.from_json(f) for f in vm.runtime.forwards or [])
    return sorted(specs)


def _running(d: Daemon, ref: str) -> VMRecord:
    return resolve_running(d, ref, "forwards reach running VMs")


def add(d: Daemon, ref: str, text: str) -> dict[str, Any]:
    """``vm forward VM SPEC``: open the forward now and keep it until the VM stops.

    Raises:
        BadRequest: a bad forward, or too many for one VM.
        NotFound: no such VM.
        NotRunning: the VM is not running.
        AlreadyExists: the host port is in use (by a forward or any other program).
    """
    spec = parse(text)
    vm = _running(d, ref)
    if len(wanted(vm)) >= MAX_FORWARDS:
        raise BadRequest(f"VM {vm.name} has {MAX_FORWARDS} forwards, the most it may have",
                         hint="remove one with `banger vm forward --rm`")
    d.forwards.open(vm.id, spec, vm.ip, vm.name)  # binds now: a busy port fails here
    try:
        with d.vm_locks.held(vm.id):
            row = d.db.get_vm(vm.id)
            if row.state != VMState.RUNNING:
                raise NotRunning(f"VM {vm.name!r} stopped while the forward was opened")
            kept = [f for f in row.runtime.forwards or []
                    if ForwardSpec.from_json(f) != spec]
            d.db.update_vm(row, runtime=row.runtime.merged(forwards=[*kept, spec.to_json()]))
    except BaseException:
        d.forwards.close(vm.id, spec)
        raise
    log.info("vm %s: forwarding %s", vm.name, spec)
    return view(d, d.db.get_vm(vm.id), spec)


def remove(d: Daemon, ref: str, text: str) -> dict[str, Any]:
    """``vm forward --rm VM SPEC``: close a forward and forget it (a ``-p`` one too,
    until the VM's next start).

    Raises:
        NotFound: no such VM, or it has no such forward.
    """
    spec = parse(text)
    vm = resolve(d, ref)
    with d.vm_locks.held(vm.id):
        row = d.db.get_vm(vm.id)
        runtime = list(row.runtime.forwards or [])
        kept = [f for f in runtime if ForwardSpec.from_json(f) != spec]
        if len(kept) != len(runtime):
            d.db.update_vm(row, runtime=row.runtime.merged(forwards=kept))
    closed = d.forwards.close(vm.id, spec)
    if not closed and len(kept) == len(runtime):
        raise NotFound(f"VM {vm.name} has no forward {spec}",
                       hint=f"see `banger vm forward list {vm.name}`")
    log.info("vm %s: forward %s removed", vm.name, spec)
    return {"name": vm.name, "removed": str(spec)}


def view(d: Daemon, vm: VMRecord, spec: ForwardSpec) -> dict[str, Any]:
    """One forward as the CLI shows it."""
    return ForwardView(name=vm.name, host_addr=spec.host_addr, host_port=spec.host_port,
                       guest_port=spec.guest_port, guest=f"{vm.ip}:{spec.guest_port}",
                       open=spec in d.forwards.opened(vm.id),
                       from_create=str(spec) in vm.spec.forwards).model_dump(mode="json")


def list_forwards(d: Daemon, ref: str | None) -> list[dict[str, Any]]:
    """``vm forward list [VM]``: every forward of one VM or of all, open or not."""
    vms = [resolve(d, ref)] if ref else user_vms(d)
    return [view(d, vm, spec) for vm in vms for spec in wanted(vm)]


class ForwardCap:
    """Opens a VM's forwards while it runs (a capability hook, see :mod:`caps`)."""

    name = "forwards"

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def started(self, vm: VMRecord) -> None:
        """Open every forward the VM should have (start, or re-adoption)."""
        for spec in wanted(vm):
            try:
                self.d.forwards.open(vm.id, spec, vm.ip, vm.name)
            except BangerError as exc:
                log.warning("vm %s: forward %s not opened: %s", vm.name, spec, exc.message)

    def stopped(self, vm: VMRecord) -> None:
        """Close them; the ones added while it ran are forgotten (host ports freed)."""
        self.d.forwards.close_vm(vm.id)
        with self.d.vm_locks.held(vm.id):
            try:
                row = self.d.db.get_vm(vm.id)
            except NotFound:
                return
            if row.runtime.forwards:
                self.d.db.update_vm(row, runtime=row.runtime.merged(forwards=None))

    def deleted(self, vm: VMRecord) -> None:
        """Close them (the row is gone with the VM)."""
        self.d.forwards.close_vm(vm.id)

    def suspended(self, vm: VMRecord) -> None:
        """Close them, remembering them all: the restored guest gets them back."""
        self.d.forwards.close_vm(vm.id)
