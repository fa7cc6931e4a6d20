"""The VM core every lifecycle module shares: lookup, views, state transitions, handles.

Every lifecycle operation (``vmcreate``, ``vmpower``, ``vmdelete``) follows the same
shape: take ``vm_locks[id]`` just long enough to validate the current state and
record the transition in the store (:func:`transition`), release it, do the slow
part (disks, VMM boot, guest I/O) unlocked, then take the lock again to record the
outcome. A VM in a busy state (creating, starting, stopping, deleting) refuses
other lifecycle operations, except that stop, kill and delete cancel an in-flight
boot first.
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from banger.api import OpView, SavedStateView, SSHInfo, VMState, VMView, WorkspaceView
from banger.daemon.dmsnap import CowHandle
from banger.daemon.handles import VMHandles
from banger.daemon.opstate import Operation
from banger.daemon.store import VMRecord
from banger.errors import BadRequest, InvalidState, NotFound, NotRunning
from banger.fsutil import tail
from banger.proc import ProcessIdentity
from banger.protocol import __version__
from banger.sshopts import GUEST_USER

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

# States in which a VM has a live VMM holding its guest (running or paused): stop, kill,
# restart and set-egress take them.
LIVE = frozenset({VMState.RUNNING, VMState.PAUSED})

log = logging.getLogger("banger.vms")


# ------------------------------------------------------------------ lookup & views


def resolve(d: Daemon, ref: str) -> VMRecord:
    """A VM by name or id, with a hint when it does not exist."""
    if not isinstance(ref, str) or not ref:
        raise BadRequest("a VM name is required")
    vm = d.db.find_vm(ref)
    if vm is None or vm.in_pool:  # the pool's clones are no user's (vmpool)
        raise NotFound(f"no VM named {ref!r}", hint="see `banger vm list`")
    return vm


def user_vms(d: Daemon) -> list[VMRecord]:
    """Every VM but the pool's clones (``vmpool``), oldest first."""
    return [vm for vm in d.db.list_vms() if not vm.in_pool]


def resolve_running(d: Daemon, ref: str, needs: str | None = None) -> VMRecord:
    """:func:`resolve`, refusing a VM that is not running (``needs``, when given: why
    it must run, e.g. ``"forwards reach running VMs"``; see :func:`not_running`)."""
    vm = resolve(d, ref)
    if vm.state != VMState.RUNNING:
        raise not_running(vm, needs)
    return vm


def not_running(vm: VMRecord, needs: str | None = None) -> NotRunning:
    """The refusal for a VM that must run and does not, with the hint that gets it
    running from where it is (``needs``, when given, says why it must run)."""
    verb = {VMState.PAUSED: "resume", VMState.SUSPENDED: "start"}.get(vm.state, "start")
    why = f"; {needs}" if needs else ", not running"
    return NotRunning(f"VM {vm.name!r} is {vm.state.value}{why}",
                      hint=f"{verb} it first: `banger vm {verb} {vm.name}`")


def view(d: Daemon, vm: VMRecord) -> dict[str, Any]:
    """A VM as the CLI shows it (``VMView``): the row plus live pid/TAP from the handle cache."""
    h = d.handles.get(vm.id)
    ws = vm.workspace
    return VMView(
        id=vm.id, name=vm.name, state=vm.state, spec=vm.spec, vmm=vm.vmm, ip=vm.ip,
        mac=vm.mac, created_at=vm.created_at, updated_at=vm.updated_at,
        pid=h.process.pid if h and h.process else None,
        tap=h.tap if h else None,
        last_error=vm.runtime.last_error,
        stop_reason=vm.runtime.stop_reason,
        confinement=vm.runtime.confinement,
        forwards=[str(s) for s in d.forwards.opened(vm.id)],
        from_snapshot=vm.runtime.from_snapshot,
        from_pool=vm.runtime.from_pool,
        agent=bool(vm.runtime.agent) and vm.state in LIVE,
        suspended=SavedStateView.model_validate(
            {k: v for k, v in saved.items() if k in SavedStateView.model_fields}) if (
            saved := vm.runtime.suspended) and vm.state == VMState.SUSPENDED else None,
        workspace=WorkspaceView.model_validate(
            {k: v for k, v in ws.items() if k in WorkspaceView.model_fields}) if ws else None,
    ).model_dump(mode="json")


def transition(d: Daemon, vm_id: str, to: VMState, *,
               expect: AbstractSet[VMState] | None = None,
               **runtime: Any) -> VMRecord:
    """Move a VM to state ``to`` under its lock; ``runtime``: fields of its
    :class:`~banger.daemon.vmruntime.VMRuntime` to set (None clears one)."""
    with d.vm_locks.held(vm_id):
        vm = d.db.get_vm(vm_id)
        if expect is not None and vm.state not in expect:
            raise wrong_state(vm, to)
        # No implicit "already there": moving into a busy state is how an operation
        # claims the VM, and two claimants must not both succeed.
        if not vm.state.can_become(to):
            raise wrong_state(vm, to)
        return d.db.update_vm(vm, state=to, runtime=vm.runtime.merged(**runtime))


def update_runtime(d: Daemon, vm_id: str, **runtime: Any) -> VMRecord:
    """Set fields of the VM's runtime record under its lock (None clears one)."""
    with d.vm_locks.held(vm_id):
        vm = d.db.get_vm(vm_id)
        return d.db.update_vm(vm, runtime=vm.runtime.merged(**runtime))


def wrong_state(vm: VMRecord, to: VMState) -> InvalidState:
    """The refusal for moving ``vm`` to ``to`` from its current state, worded for the user."""
    verbs = {VMState.STARTING: "start", VMState.STOPPING: "stop", VMState.DELETING: "delete",
             VMState.RUNNING: "run", VMState.STOPPED: "stop", VMState.PAUSED: "pause",
             VMState.SUSPENDING: "suspend", VMState.SNAPSHOTTING: "snapshot"}
    verb = verbs.get(to, to.value)
    if vm.state.busy:
        return InvalidState(f"VM {vm.name!r} is {vm.state.value}; cannot {verb} it now",
                            hint="wait for the current operation to finish")
    if to == VMState.STARTING and vm.state == VMState.RUNNING:
        return InvalidState(f"VM {vm.name!r} is already running")
    if to == VMState.STOPPING and vm.state == VMState.STOPPED:
        return NotRunning(f"VM {vm.name!r} is not running")
    return InvalidState(f"VM {vm.name!r} is {vm.state.value}; cannot {verb} it")


def save_handles(d: Daemon, vm_id: str, h: VMHandles) -> None:
    """Persist handles (file first, then memory) and mirror the teardown identity."""
    d.handles.put(vm_id, h)
    update_runtime(d, vm_id, teardown=h.teardown_identity())


def handles_of(d: Daemon, vm: VMRecord) -> VMHandles:
    """Cached handles, else ``handles.json``, else the mirrored teardown identity."""
    h = d.handles.get(vm.id) or d.handles.load(vm.id)
    if h is not None:
        return h
    mirror = vm.runtime.teardown or {}
    cow = mirror.get("cow") or vm.runtime.cow
    proc = mirror.get("process")
    return VMHandles(
        vmm=mirror.get("vmm") or vm.vmm,
        process=ProcessIdentity.from_json(proc) if proc else None,
        tap=mirror.get("tap"),
        cow=CowHandle.from_json(cow) if cow else None,
    )



def wait_op(op: Operation) -> Any:
    """Wait for ``op`` to end (the synchronous RPC methods); its result, or raise its error."""
    op.wait()
    if op.error is not None:
        raise op.error
    return op.result


def op_view(op: Operation) -> dict[str, Any]:
    """An operation as JSON for the CLI (``OpView``)."""
    return OpView.model_validate(op.view()).model_dump(mode="json")


# ------------------------------------------------------------------ queries


def list_vms(d: Daemon) -> list[dict[str, Any]]:
    """``vm list``: every VM's view, oldest first."""
    return [view(d, vm) for vm in user_vms(d)]


def show(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm show``: one VM's view, by name or id, and the guest changes a workspace
    re-prepare saved (``workspace_backups``, oldest first: the names sort by time)."""
    vm = resolve(d, ref)
    saved = d.layout.vm(vm.id).workspace_backups
    backups = sorted(str(p) for p in saved.glob("*.patch")) if saved.is_dir() else []
    return {**view(d, vm), "workspace_backups": backups}


def ssh_info(d: Daemon, ref: str) -> dict[str, Any]:
    """What the CLI needs to run the system ssh into a running VM (and its workspace dir)."""
    vm = resolve_running(d, ref)
    ws = vm.workspace or {}
    return SSHInfo(name=vm.name, ip=vm.ip, user=GUEST_USER, key_path=str(d.layout.key_path),
                   known_hosts=str(d.layout.known_hosts),
                   workdir=ws.get("guest_path") if ws.get("prepared") else None,
                   control_path=str(control) if (control := d.ssh_control(vm.id)) else None,
                   agent_dir=str(d.layout.vm(vm.id).run) if vm.runtime.agent else None,
                   daemon_version=__version__, config_sha256=d.config_sha256,
                   ).model_dump(mode="json")


def logs(d: Daemon, ref: str, max_bytes: int = 128 * 1024) -> dict[str, Any]:
    """The serial log's path and its last ``max_bytes`` (``vm logs -f`` follows the path).

    128 KiB: JSON escaping can grow console bytes (escape codes) up to six-fold, and the
    reply must fit in one 1 MiB frame.
    """
    vm = resolve(d, ref)
    path = d.layout.vm(vm.id).serial_log
    return {"name": vm.name, "path": str(path), "content": tail(path, max_bytes)}

