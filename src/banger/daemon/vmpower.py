"""Powering VMs on and off: ``vm start``/``stop``/``restart``/``kill``.

Each claims the VM (a refusal is immediate) and does the slow part on a worker; the
boot itself is :mod:`vmboot`, the release of what a VM holds :mod:`vmteardown`.
"""

from __future__ import annotations

import contextlib
import logging
import signal as signal_mod
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import caps, savedstate
from banger.daemon.handles import VMHandles
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, VMRecord
from banger.daemon.vmboot import boot
from banger.daemon.vms import (
    LIVE,
    handles_of,
    resolve,
    transition,
    update_runtime,
    view,
    wait_op,
    wrong_state,
)
from banger.daemon.vmteardown import SIGKILL_S, teardown
from banger.errors import (
    BadRequest,
    BangerError,
    GuestError,
    HostError,
    InvalidState,
    NotFound,
    NotRunning,
)
from banger.proc import ProcessIdentity, matches, wait_gone
from banger.runner import CancelToken

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")

# Budgets for stopping a guest. Under TCG a systemd shutdown takes 3-8 s; 30 s
# covers a slow guest without making `vm stop` on a wedged one feel hung.
GUEST_POWEROFF_S = 30.0
ACPI_POWEROFF_S = 5.0
CANCEL_BOOT_S = 60.0  # how long stop/delete wait for a cancelled boot to unwind

# The stages `vm start`, `vm stop` and `vm restart` show (a start's are the boot
# stages `vm create` shows). A start of a failed VM first clears what it left.
START_STAGES = ["network", "boot", "wait-ssh"]
RESTORE_STAGES = ["network", "restore", "wait-ssh"]  # a suspended VM's start
CLEANUP_STAGE = "cleanup"
STOP_STAGES = ["poweroff", "wait-poweroff", "teardown"]
STOP_REASON = "stopped by `banger vm stop`"


def begin_start(d: Daemon, ref: str) -> Operation:
    """``vm.start.begin``: claim the VM now (a refusal is immediate), boot it on a worker.

    The op's result is the VM's view; on failure the VM is stopped with the reason.
    """
    vm = resolve(d, ref)
    img = d.db.get_image(vm.image)
    op = Operation(kind="vm.start", target=vm.name, stages=list(START_STAGES))
    vm, leftovers = claim_start(d, vm.id, op.cancel)
    if savedstate.complete(d.layout.vm(vm.id)) is not None:
        op.stages = list(RESTORE_STAGES)
    if leftovers:
        op.stages.insert(0, CLEANUP_STAGE)
    return _run(d, op, lambda o: view(d, run_start(d, vm, img, o.cancel,
                                                   leftovers=leftovers, op=o)))


def start(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm.start``: :func:`begin_start` and wait for it; the VM's view or the error."""
    result: dict[str, Any] = wait_op(begin_start(d, ref))
    return result


def _run(d: Daemon, op: Operation, work: Callable[[Operation], Any]) -> Operation:
    return d.power_ops.run(op, work, name=f"{op.kind}-{op.target}")


def claim_start(d: Daemon, vm_id: str, token: CancelToken, *,
                restarting: bool = False) -> tuple[VMRecord, bool]:
    """Move a stopped, suspended or failed VM to ``starting``; True with it when it was
    ``error``.

    The claim comes before anything else a start does: two starts of one VM both
    see ``stopped`` or ``error``, and only the one that claims it may touch what it
    holds (a second start's cleanup would tear down the first one's fresh VMM).
    The cancel token is registered under the same lock: a stop or delete that sees
    ``starting`` can always cancel the start. With ``restarting`` the VM is one
    whose teardown the caller just finished (``stopping``): it is recorded stopped
    and claimed in one hold of the lock, so no other call takes it in between.
    """
    with d.vm_locks.held(vm_id):
        current = d.db.get_vm(vm_id)
        if restarting and current.state == VMState.STOPPING:
            current = d.db.update_vm(current, state=VMState.STOPPED, runtime=current.runtime.merged(
                stop_reason="restarting", booted_at=None))
        elif restarting or current.state not in (VMState.STOPPED, VMState.ERROR,
                                                 VMState.SUSPENDED) \
                or not current.state.can_become(VMState.STARTING):
            raise wrong_state(current, VMState.STARTING)
        vm = d.db.update_vm(current, state=VMState.STARTING)
        d.register_inflight(vm.id, token)
    return vm, current.state == VMState.ERROR


def run_start(d: Daemon, vm: VMRecord, img: ImageRecord, token: CancelToken, *,
              leftovers: bool, op: Operation | None = None) -> VMRecord:
    """Boot a VM claimed by :func:`claim_start`, first clearing what a failed VM left.

    On failure the VM is stopped with the reason, or back in ``error`` when its
    leftovers could not be cleared; the token is unregistered either way.
    """
    cleared = not leftovers
    try:
        if leftovers:
            if op is not None:
                op.enter("cleanup")
            # A failed stop or start may have left a VMM, TAP or disk mapping behind:
            # clear it first, and never boot a second VMM on the same disks.
            problems = teardown(d, vm.id, handles_of(d, vm))
            if problems:
                raise InvalidState(f"VM {vm.name!r} still holds resources: "
                                   + "; ".join(problems), hint="`banger vm delete` removes it")
            cleared = True
        return boot(d, vm, img, token, op)
    except BaseException as exc:
        err = d.error_of(exc, "vm.start")
        if cleared:
            settle_failed_start(d, vm.id, err)
        else:
            _back_to_error(d, vm.id, err)
        raise err from None
    finally:
        d.end_inflight(vm.id, token)


def _back_to_error(d: Daemon, vm_id: str, err: BangerError) -> None:
    """A start that could not clear a failed VM's leftovers leaves it failed, not stopped."""
    with contextlib.suppress(NotFound, InvalidState):
        transition(d, vm_id, VMState.ERROR, expect={VMState.STARTING}, last_error=err.message)


def settle_failed_start(d: Daemon, vm_id: str, err: BangerError) -> None:
    """After a failed start, the VM is stopped and says why (unless it was deleted), or
    suspended still when its saved state was not used."""
    suspended = savedstate.complete(d.layout.vm(vm_id)) is not None
    try:
        with d.vm_locks.held(vm_id):
            vm = d.db.get_vm(vm_id)
            if vm.state == VMState.STARTING:
                d.db.update_vm(
                    vm, state=VMState.SUSPENDED if suspended else VMState.STOPPED,
                    runtime=vm.runtime.merged(
                        last_error=err.message,
                        stop_reason=None if suspended else "start failed",
                        **({} if suspended else {"suspended": None})))
    except NotFound:
        pass


# ------------------------------------------------------------------ stop / kill / restart


def cancel_boot(d: Daemon, vm: VMRecord, reason: str) -> VMRecord | None:
    """If ``vm`` is mid-boot, cancel it and wait for it to unwind; returns the fresh row."""
    if vm.state not in (VMState.STARTING, VMState.CREATING):
        return vm
    d.cancel_inflight(vm.id, reason)
    if not d.wait_inflight_gone(vm.id, CANCEL_BOOT_S):
        raise InvalidState(f"VM {vm.name!r} is still {vm.state.value} after being cancelled",
                           hint="retry in a moment")
    return d.db.find_vm(vm.id)


def begin_stop(d: Daemon, ref: str, reason: str = STOP_REASON) -> Operation:
    """``vm.stop.begin``: cancel a boot in progress, or power the guest off cleanly
    (bounded), then release its TAP, disk mapping and runtime files, on a worker.

    A running or failed VM is claimed now (a refusal is immediate); one mid-boot is
    claimed by the worker once its cancelled boot has unwound. Once claimed, a stop
    is not cancellable: half a teardown helps nobody.
    """
    vm = resolve(d, ref)
    op = Operation(kind="vm.stop", target=vm.name, stages=list(STOP_STAGES), cancellable=False)
    if vm.state in (VMState.STARTING, VMState.CREATING):
        return _run(d, op, lambda o: _stop_a_boot(d, o, vm, reason))
    claimed = claim_stop(d, vm)
    if claimed is None:
        d.power_ops.add(op).finish(result=view(d, vm))
        return op
    return _run(d, op, lambda o: view(d, _stop_claimed(d, claimed, reason, o)))


def stop(d: Daemon, ref: str, reason: str = STOP_REASON) -> dict[str, Any]:
    """``vm.stop``: :func:`begin_stop` and wait for it; the VM's view or the error."""
    result: dict[str, Any] = wait_op(begin_stop(d, ref, reason))
    return result


def claim_stop(d: Daemon, vm: VMRecord) -> VMRecord | None:
    """Move a running, paused or failed VM to ``stopping``; None when its start failed
    (then it is already stopped, and stopping it again is not an error). A paused VM
    is marked so, for :func:`_power_off` to run it again first."""
    if vm.state == VMState.STOPPED:
        if vm.runtime.stop_reason == "start failed":
            return None
        raise NotRunning(f"VM {vm.name!r} is not running")
    if vm.state == VMState.SUSPENDED:
        raise _suspended(vm, "stop")
    return transition(d, vm.id, VMState.STOPPING, expect=LIVE | {VMState.ERROR},
                      paused=vm.state == VMState.PAUSED or None)


def _suspended(vm: VMRecord, verb: str) -> InvalidState:
    """The refusal to stop or restart a suspended VM: that would throw its saved
    processes away."""
    return InvalidState(
        f"VM {vm.name!r} is suspended to disk; {verb} would discard its saved processes",
        hint=f"`banger vm start {vm.name}` resumes it first; `banger vm delete` discards it")


def _stop_a_boot(d: Daemon, op: Operation, vm: VMRecord, reason: str) -> dict[str, Any]:
    op.enter("cancel-boot")
    fresh = cancel_boot(d, vm, "stopped by the user")
    if fresh is None:
        raise NotFound(f"VM {vm.name!r} was deleted while starting")
    claimed = claim_stop(d, fresh)
    if claimed is None:
        return view(d, fresh)
    return view(d, _stop_claimed(d, claimed, reason, op))


def _stop_claimed(d: Daemon, vm: VMRecord, reason: str, op: Operation | None) -> VMRecord:
    return finish_stop(d, vm, reason, _power_off(d, vm, op))


def _power_off(d: Daemon, vm: VMRecord, op: Operation | None) -> list[str]:
    """Poweroff and teardown of a VM this call has claimed (``stopping``); the problems."""
    d.checkpoint("stop.marked")
    h = handles_of(d, vm)
    if vm.runtime.paused:
        # A paused guest cannot sync or power off: run it again for that.
        try:
            d.driver(h.vmm).resume(d.layout.vm(vm.id))
        except BangerError as exc:
            log.warning("vm %s: not resumed for its poweroff: %s", vm.name, exc.message)
        update_runtime(d, vm.id, paused=None)
    graceful_poweroff(d, vm, h, op)
    d.checkpoint("stop.poweroff")
    if op is not None:
        op.enter("teardown")
    return teardown(d, vm.id, h)


def finish_stop(d: Daemon, vm: VMRecord, reason: str, problems: list[str]) -> VMRecord:
    """Record a stop's outcome: stopped with ``reason``, or error if teardown had ``problems``."""
    if problems:
        vm = transition(d, vm.id, VMState.ERROR, last_error="; ".join(problems))
        raise HostError(f"VM {vm.name!r} stopped, but cleanup was incomplete: "
                        + "; ".join(problems), hint="`banger vm stop` again retries the cleanup")
    vm = transition(d, vm.id, VMState.STOPPED, stop_reason=reason, booted_at=None)
    caps.stopped(d, vm)
    return vm


def graceful_poweroff(d: Daemon, vm: VMRecord, h: VMHandles, op: Operation | None = None
                      ) -> None:
    """sync + poweroff over SSH, then the VMM's power button, each with a bounded wait."""
    ident = h.process
    if ident is None or not matches(ident):
        return
    if op is not None:
        op.enter("poweroff")
    try:
        # The connection drops as the guest goes down: ssh then exits 255, which is fine.
        d.dial(vm.id, vm.ip).run("sync; (systemctl poweroff || poweroff) >/dev/null 2>&1 &",
                          timeout=15, check=False, desc="guest poweroff")
    except GuestError as exc:
        log.info("vm %s: poweroff over ssh failed: %s", vm.name, exc)
    if op is not None:
        op.enter("wait-poweroff")
    if _wait_gone_reporting(ident, GUEST_POWEROFF_S, op):
        return
    log.warning("vm %s: guest did not power off within %gs; pressing the power button",
                vm.name, GUEST_POWEROFF_S)
    if op is not None:
        op.report(f"no poweroff after {GUEST_POWEROFF_S:.0f}s; pressing the power button")
    try:
        drv = d.driver(h.vmm)
        if drv.request_shutdown(d.layout.vm(vm.id), ident) and wait_gone(ident, ACPI_POWEROFF_S):
            return
    except BangerError as exc:
        log.info("vm %s: VMM shutdown request failed: %s", vm.name, exc)


def _wait_gone_reporting(ident: ProcessIdentity, budget_s: float, op: Operation | None) -> bool:
    """:func:`wait_gone` within ``budget_s``, reporting the seconds waited about once a second."""
    started = time.monotonic()
    deadline = started + budget_s
    while (left := deadline - time.monotonic()) > 0:
        if wait_gone(ident, min(1.0, left)):
            return True
        if op is not None:
            op.report(f"{time.monotonic() - started:.0f}s")
    return wait_gone(ident, 0)


def kill(d: Daemon, ref: str, sig_name: str = "KILL") -> dict[str, Any]:
    """``vm kill``: send a signal to the VMM; a terminating one also tears the VM down."""
    sig = _signal(sig_name)
    vm = resolve(d, ref)
    vm = cancel_boot(d, vm, f"killed with SIG{sig.name.removeprefix('SIG')}") or vm
    if vm.state not in LIVE | {VMState.ERROR, VMState.STOPPING}:
        raise NotRunning(f"VM {vm.name!r} is not running")
    h = handles_of(d, vm)
    if h.process is None or not matches(h.process):
        raise NotRunning(f"VM {vm.name!r} has no live VMM process",
                         hint="`banger vm stop` cleans up what is left")
    terminating = sig in (signal_mod.SIGKILL, signal_mod.SIGTERM, signal_mod.SIGINT,
                          signal_mod.SIGQUIT)
    if not terminating or vm.state == VMState.STOPPING:
        # Only the signal: a non-terminating one leaves the VM running, and a VM
        # already stopping is torn down by the operation that is stopping it.
        d.host.signal(h.process, sig)
        return view(d, vm)
    # Claim the VM before the signal, so the exit watcher cannot tear it down as well.
    vm = transition(d, vm.id, VMState.STOPPING, expect=LIVE | {VMState.ERROR})
    # Read the handles again now that the VM is ours: a stop and start since the
    # first read gave it a new VMM and TAP, and the old TAP may be another VM's now.
    h = handles_of(d, vm)
    if h.process is not None:
        d.host.signal(h.process, sig)  # False (nothing sent) when it exited meanwhile
        wait_gone(h.process, SIGKILL_S)
    problems = teardown(d, vm.id, h)
    vm = finish_stop(d, vm, f"killed with {sig.name}", problems)
    return view(d, vm)


def _signal(name: str) -> signal_mod.Signals:
    key = name.upper()
    if key.isdigit():
        try:
            return signal_mod.Signals(int(key))
        except ValueError:
            pass
    else:
        key = key if key.startswith("SIG") else "SIG" + key
        if key in signal_mod.Signals.__members__:
            return signal_mod.Signals[key]
    raise BadRequest(f"unknown signal {name!r}", hint="e.g. KILL, TERM, INT, HUP or a number")


def begin_restart(d: Daemon, ref: str) -> Operation:
    """``vm.restart.begin``: stop a running (or failed) VM and start it again, on a worker.

    The VM is claimed now (a busy VM is refused at once, and a restart never cancels
    another call's boot) and stays claimed from the stop to the start. The stop half
    cannot be cancelled; a cancel during the start half leaves the VM stopped.
    """
    vm = resolve(d, ref)
    img = d.db.get_image(vm.image)
    op = Operation(kind="vm.restart", target=vm.name, stages=list(START_STAGES))
    if vm.state == VMState.SUSPENDED:
        raise _suspended(vm, "a restart")
    if vm.state not in LIVE | {VMState.ERROR}:
        started, leftovers = claim_start(d, vm.id, op.cancel)  # nothing to stop: a start
        if leftovers:
            op.stages.insert(0, CLEANUP_STAGE)
        return _run(d, op, lambda o: view(d, run_start(d, started, img, o.cancel,
                                                       leftovers=leftovers, op=o)))
    claimed = claim_stop(d, vm)
    assert claimed is not None  # only a stopped VM's claim is None
    op.stages = STOP_STAGES + START_STAGES
    op.cancellable = False
    return _run(d, op, lambda o: _restart(d, o, claimed, img))


def _restart(d: Daemon, op: Operation, vm: VMRecord, img: ImageRecord) -> dict[str, Any]:
    problems = _power_off(d, vm, op)
    if problems:
        finish_stop(d, vm, "restarting", problems)  # raises: the VM is left in error
    started, _ = claim_start(d, vm.id, op.cancel, restarting=True)
    caps.stopped(d, started)
    op.cancellable = True
    return view(d, run_start(d, started, img, op.cancel, leftovers=False, op=op))


def restart(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm.restart``: :func:`begin_restart` and wait for it; the VM's view or the error."""
    result: dict[str, Any] = wait_op(begin_restart(d, ref))
    return result

