"""``vm pause``, ``vm resume`` and ``vm suspend``: a guest held where it is.

Pause stops the guest's vCPUs in the running VMM (memory stays, in RAM); resume runs
them again. Suspend writes the guest's memory and device state to disk
(:mod:`savedstate`) and ends the VMM, releasing its memory, TAP and disk mapping
like a stop; ``vm start`` then restores the guest where it was, its processes and
all (``vmboot.boot``).

Pause and resume hold the VM's lock across one QMP/API request to the local VMM
(bounded by the driver's timeout), so that two of them cannot interleave their
request and their record. Suspend claims the VM (``suspending``) and works on a
worker, like a stop; a suspend that fails leaves the guest as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import caps, savedstate
from banger.daemon.guest import end_masters
from banger.daemon.handles import VMHandles
from banger.daemon.opstate import Operation
from banger.daemon.store import VMRecord
from banger.daemon.vms import handles_of, resolve, transition, view, wait_op, wrong_state
from banger.daemon.vmteardown import teardown
from banger.errors import BangerError, HostError, InvalidState, NotRunning
from banger.proc import matches

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")

SUSPEND_STAGES = ["save", "teardown"]


def pause(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm.pause``: stop a running guest's vCPUs; the VM's view.

    Raises:
        InvalidState / NotRunning: the VM is not running (a paused one is no error).
        VMMError: the VMM refused; the VM stays running.
    """
    return _switch(d, ref, VMState.RUNNING, VMState.PAUSED, lambda vm: _not_running(vm, "pause"))


def resume(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm.resume``: run a paused guest's vCPUs again; the VM's view.

    Raises:
        InvalidState: the VM is not paused (a running one is no error; a suspended one
            is resumed by ``vm start``).
        VMMError: the VMM refused; the VM stays paused.
    """
    def refuse(vm: VMRecord) -> BangerError:
        if vm.state == VMState.SUSPENDED:
            return InvalidState(f"VM {vm.name!r} is suspended to disk",
                                hint=f"`banger vm start {vm.name}` resumes it where it was")
        return wrong_state(vm, VMState.RUNNING)

    return _switch(d, ref, VMState.PAUSED, VMState.RUNNING, refuse)


def _switch(d: Daemon, ref: str, frm: VMState, to: VMState,
            refuse: Callable[[VMRecord], BangerError]) -> dict[str, Any]:
    """Pause (``to`` paused) or resume a VM in state ``frm`` through its VMM, under its
    lock; already ``to`` is no error, any other state is ``refuse``'s error."""
    vm = resolve(d, ref)
    with d.vm_locks.held(vm.id):
        vm = d.db.get_vm(vm.id)
        if vm.state == to:
            return view(d, vm)
        if vm.state != frm:
            raise refuse(vm)
        drv, paths = d.driver(vm.vmm), d.layout.vm(vm.id)
        if to == VMState.PAUSED:
            drv.pause(paths)
        else:
            drv.resume(paths)
        vm = d.db.update_vm(vm, state=to)
    log.info("vm %s: %s", vm.name, to.value)
    return view(d, vm)


def _not_running(vm: VMRecord, verb: str) -> BangerError:
    if vm.state in (VMState.STOPPED, VMState.SUSPENDED):
        return NotRunning(f"VM {vm.name!r} is {vm.state.value}; cannot {verb} it")
    return wrong_state(vm, VMState.PAUSED if verb == "pause" else VMState.SUSPENDING)


def begin_suspend(d: Daemon, ref: str) -> Operation:
    """``vm.suspend.begin``: claim a running or paused VM now, save it on a worker.

    The op's result is the VM's view (``suspended``). Not cancellable: the guest is
    stopped for the whole save, and a save cut short is thrown away anyway.
    """
    vm = resolve(d, ref)
    op = Operation(kind="vm.suspend", target=vm.name, stages=list(SUSPEND_STAGES),
                   cancellable=False)
    with d.vm_locks.held(vm.id):
        current = d.db.get_vm(vm.id)
        if current.state not in (VMState.RUNNING, VMState.PAUSED):
            raise _not_running(current, "suspend")
        claimed = d.db.update_vm(current, state=VMState.SUSPENDING,
                                 runtime=current.runtime.merged(suspend_from=current.state))
    return d.power_ops.run(op, lambda o: view(d, _suspend(d, claimed, o)),
                           name=f"vm.suspend-{vm.name}")


def suspend(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm.suspend``: :func:`begin_suspend` and wait for it; the VM's view or the error."""
    result: dict[str, Any] = wait_op(begin_suspend(d, ref))
    return result


def _suspend(d: Daemon, vm: VMRecord, op: Operation) -> VMRecord:
    """Save a claimed (``suspending``) VM, end its VMM and release what it held.

    The shared ssh master and the session attachments end first, while the guest
    still answers, so the saved guest holds no connection to a host that forgot it.
    """
    paths = d.layout.vm(vm.id)
    h = handles_of(d, vm)
    drv = d.driver(vm.vmm)
    was = vm.runtime.suspend_from or VMState.RUNNING
    op.enter("save")
    try:
        end_masters(d.runner, paths.ssh_dir)
        caps.suspended(d, vm)
        into = savedstate.begin(paths)
        size = drv.save(paths, into, lambda n: op.report(f"{n / 2**20:.0f} MiB"))
        d.checkpoint("suspend.saved")
        savedstate.commit(paths)
    except BaseException as exc:
        savedstate.discard_partial(paths)
        _back_to(d, vm, was, h, exc)
        raise
    d.checkpoint("suspend.committed")
    op.enter("teardown")
    problems = teardown(d, vm.id, h)  # ends the VMM, which holds a saved guest now
    saved = savedstate.record(size, drv.name, vm.runtime)
    if problems:
        transition(d, vm.id, VMState.ERROR, last_error="; ".join(problems), suspended=saved,
                   suspend_from=None)
        raise HostError(f"VM {vm.name!r} was saved, but cleanup was incomplete: "
                        + "; ".join(problems),
                        hint="`banger vm start` clears it and resumes the saved guest")
    log.info("vm %s: suspended (%d MiB saved)", vm.name, size >> 20)
    return transition(d, vm.id, VMState.SUSPENDED, expect={VMState.SUSPENDING},
                      suspended=saved, suspend_from=None, stop_reason=None)


def _back_to(d: Daemon, vm: VMRecord, was: VMState, h: VMHandles, exc: BaseException
             ) -> None:
    """After a failed save: the guest runs (or stays paused) as before, with its
    attachments back; failed if its VMM is gone."""
    err = d.error_of(exc, "vm.suspend")
    try:
        if h.process is None or not matches(h.process):
            raise HostError("the VMM is gone")
        if was == VMState.RUNNING:
            d.driver(vm.vmm).resume(d.layout.vm(vm.id))
        back = transition(d, vm.id, was, expect={VMState.SUSPENDING}, suspend_from=None,
                          last_error=f"suspend failed: {err.message}")
        caps.started(d, back)
    except BangerError as again:
        log.error("vm %s: after a failed suspend: %s", vm.name, again.message)
        transition(d, vm.id, VMState.ERROR, suspend_from=None,
                   last_error=f"suspend failed: {err.message}; then: {again.message}")
