"""VM lifecycle: create, start, stop, restart, kill, delete, and their views.

Every operation follows the same shape: take ``vm_locks[id]`` just long enough
to validate the current state and record the transition in the store, release
it, do the slow part (disks, VMM boot, guest I/O) unlocked, then take the lock
again to record the outcome. A VM in a busy state (creating, starting,
stopping, deleting) refuses other lifecycle operations, except that stop,
kill and delete cancel an in-flight boot first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal as signal_mod
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from banger.api import Model, OpView, SSHInfo, VMSpec, VMState, VMView, WorkspaceView
from banger.config import parse_size
from banger.daemon import images, kernels
from banger.daemon.core import error_of, new_id
from banger.daemon.dmsnap import CowHandle, strategy_for
from banger.daemon.handles import VMHandles
from banger.daemon.imagemgr import WORK_LABEL
from banger.daemon.network import allocate_ip, gateway, mac_for_ip, prefixlen
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, VMRecord
from banger.daemon.vmmselect import resolve_vmm
from banger.errors import (
    AlreadyExists,
    BadRequest,
    BangerError,
    Cancelled,
    GuestError,
    HostError,
    InvalidState,
    NotFound,
    NotRunning,
)
from banger.fsutil import remove_tree, tail
from banger.names import check_name, generate_name
from banger.proc import ProcessIdentity, find_by_marker, identify, matches, send_signal, wait_gone
from banger.runner import CancelToken
from banger.sshopts import GUEST_USER, forget_host
from banger.vmm import LaunchPlan, vm_marker

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.vms")

# Budgets for stopping a guest. Under TCG a systemd shutdown takes 3-8 s; 30 s
# covers a slow guest without making `vm stop` on a wedged one feel hung.
GUEST_POWEROFF_S = 30.0
ACPI_POWEROFF_S = 5.0
SIGTERM_S = 5.0
SIGKILL_S = 10.0
CANCEL_BOOT_S = 60.0  # how long stop/delete wait for a cancelled boot to unwind

CREATE_STAGES = ["reserve", "image", "disk", "network", "boot", "wait-ssh"]


class CreateParams(Model):
    name: str | None = None
    image: str | None = None
    vcpu: int | None = Field(default=None, ge=1, le=64)
    memory_mib: int | None = Field(default=None, ge=128, le=262144)
    disk_size: str | int | None = None
    work_disk_size: str | int | None = None
    vmm: str = "auto"
    start: bool = True


# ------------------------------------------------------------------ lookup & views


def resolve(d: Daemon, ref: str) -> VMRecord:
    """A VM by name or id, with a hint when it does not exist."""
    if not isinstance(ref, str) or not ref:
        raise BadRequest("a VM name is required")
    vm = d.db.find_vm(ref)
    if vm is None:
        raise NotFound(f"no VM named {ref!r}", hint="see `banger vm list`")
    return vm


def view(d: Daemon, vm: VMRecord) -> dict[str, Any]:
    """A VM as the CLI shows it (``VMView``): the row plus live pid/TAP from the handle cache."""
    h = d.handles.get(vm.id)
    ws = vm.workspace
    return VMView(
        id=vm.id, name=vm.name, state=vm.state, spec=vm.spec, vmm=vm.vmm, ip=vm.ip,
        mac=vm.mac, created_at=vm.created_at, updated_at=vm.updated_at,
        pid=h.process.pid if h and h.process else None,
        tap=h.tap if h else None,
        last_error=vm.runtime.get("last_error"),
        stop_reason=vm.runtime.get("stop_reason"),
        workspace=WorkspaceView.model_validate(
            {k: v for k, v in ws.items() if k in WorkspaceView.model_fields}) if ws else None,
    ).model_dump(mode="json")


def transition(d: Daemon, vm_id: str, to: VMState, *, expect: set[VMState] | None = None,
               **runtime: Any) -> VMRecord:
    """Move a VM to state ``to`` under its lock; ``runtime`` keys are merged (None deletes)."""
    with d.vm_locks.held(vm_id):
        vm = d.db.get_vm(vm_id)
        if expect is not None and vm.state not in expect:
            raise _wrong_state(vm, to)
        # No implicit "already there": moving into a busy state is how an operation
        # claims the VM, and two claimants must not both succeed.
        if not vm.state.can_become(to):
            raise _wrong_state(vm, to)
        return d.db.update_vm(vm, state=to, runtime=merge_runtime(vm.runtime, runtime))


def update_runtime(d: Daemon, vm_id: str, **runtime: Any) -> VMRecord:
    """Merge ``runtime`` keys into the VM row under its lock (None deletes a key)."""
    with d.vm_locks.held(vm_id):
        vm = d.db.get_vm(vm_id)
        return d.db.update_vm(vm, runtime=merge_runtime(vm.runtime, runtime))


def merge_runtime(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s keys set (a None value deletes the key)."""
    out = dict(old)
    for k, v in new.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _wrong_state(vm: VMRecord, to: VMState) -> InvalidState:
    verbs = {VMState.STARTING: "start", VMState.STOPPING: "stop", VMState.DELETING: "delete",
             VMState.RUNNING: "run", VMState.STOPPED: "stop"}
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
    mirror = vm.runtime.get("teardown") or {}
    cow = mirror.get("cow") or vm.runtime.get("cow")
    proc = mirror.get("process")
    return VMHandles(
        vmm=mirror.get("vmm") or vm.vmm,
        process=ProcessIdentity.from_json(proc) if proc else None,
        tap=mirror.get("tap"),
        cow=CowHandle.from_json(cow) if cow else None,
    )


# ------------------------------------------------------------------ create


def begin_create(d: Daemon, params: CreateParams) -> Operation:
    """Validate and reserve synchronously, then finish the create on a worker thread.

    Name and IP are reserved under ``create_vm_mu`` (inserting the VM row in state
    ``creating``), so a duplicate name fails here, before any slow work, and two
    concurrent creates never get the same address.
    """
    cfg = d.cfg
    defaults = cfg.vm_defaults
    image = params.image or cfg.default_image_name
    check_name(image, "image")
    if params.name is not None:
        check_name(params.name)
    img = d.db.find_image(image)
    if img is None:
        images.recipe_or_missing(image)
    vmm = resolve_vmm(cfg, params.vmm, lambda v: kernels.suits(d, img, v))
    if img is not None:
        kernels.boot_files(d, img, vmm)  # raises the precise refusal
    elif not kernels.suits(d, img, vmm):
        raise BadRequest(f"the built-in image {image!r} cannot boot under {vmm}",
                         hint="build a kernel for it (`banger kernel build`) or use --vmm qemu")
    spec = VMSpec(
        image=image,
        vcpu=params.vcpu if params.vcpu is not None else defaults.vcpu,
        memory_mib=params.memory_mib if params.memory_mib is not None else defaults.memory_mib,
        disk_size=parse_size(params.disk_size or defaults.disk_size),
        work_disk_size=parse_size(params.work_disk_size or defaults.work_disk_size),
        vmm=params.vmm,
    )
    if spec.work_disk_size < 64 << 20:
        raise BadRequest("work disk must be at least 64M")

    with d.create_vm_mu:
        name = params.name or generate_name(d.db.used_names())
        if d.db.find_vm(name) is not None:
            raise AlreadyExists(f"a VM named {name!r} already exists",
                                hint="pick another --name, or delete it with `banger vm delete`")
        ip = allocate_ip(cfg.bridge_cidr, d.db.used_ips())
        vm = VMRecord(id=new_id(), name=name, image=image, spec=spec, vmm=vmm,
                      state=VMState.CREATING, ip=ip, mac=mac_for_ip(ip))
        op = Operation(kind="vm.create", target=vm.name, stages=list(CREATE_STAGES))
        # Registered before the row exists: a delete that sees "creating" can always cancel.
        d.register_inflight(vm.id, op.cancel)
        try:
            d.db.add_vm(vm)
        except BaseException:
            d.end_inflight(vm.id, op.cancel)
            raise
    log.info("vm %s (%s): reserved %s", vm.name, vm.id, vm.ip)
    op.enter("reserve")
    d.create_ops.run(op, lambda o: _create(d, o, vm, params.start), name=f"create-{vm.name}")
    return op


def _create(d: Daemon, op: Operation, vm: VMRecord, start: bool) -> dict[str, Any]:
    try:
        d.checkpoint("create.reserve")
        op.enter("image")
        img = images.ensure_image(d, vm.image, op)
        d.checkpoint("create.image")
        op.enter("disk")
        make_disks(d, vm, img, op.cancel)
        d.checkpoint("create.disk")
        if not start:
            vm = transition(d, vm.id, VMState.STOPPED, stop_reason="created with --no-start")
            return view(d, vm)
        # The VM stays "creating" through its first boot: if bangerd dies now, the
        # restart removes it instead of keeping a VM nobody finished creating.
        vm = boot(d, d.db.get_vm(vm.id), img, op.cancel, op)
        return view(d, vm)
    except BaseException as exc:
        log.warning("vm %s: create failed, rolling back: %s", vm.name, exc)
        try:
            destroy(d, vm.id, reason=f"create failed: {exc}")
        except Exception as cleanup:
            # Report why the create failed, not why the clean-up did (that is logged,
            # and the VM is left in "error" for `vm delete` to retry).
            log.error("vm %s: rollback incomplete: %s", vm.name, cleanup)
            exc.add_note(f"rollback incomplete: {cleanup}")
        if isinstance(exc, Cancelled):
            raise Cancelled(f"creation of {vm.name!r} was cancelled; nothing was kept") from exc
        raise
    finally:
        d.end_inflight(vm.id, op.cancel)


def make_disks(d: Daemon, vm: VMRecord, img: ImageRecord, cancel: CancelToken) -> None:
    """The VM's copy-on-write root disk (grown to ``disk_size``) and its work disk."""
    assert d.cow is not None
    paths = d.layout.vm(vm.id)
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.state.chmod(0o700)
    # Record the intent first so a crash mid-copy still knows what to remove.
    update_runtime(d, vm.id, cow={"strategy": d.cow.name, "path": str(paths.rootfs)})
    cow = d.cow.create(Path(img.rootfs), paths.rootfs)
    update_runtime(d, vm.id, cow=cow.to_json())
    cancel.check()
    if cow.strategy != "dmsnap":
        grow_ext4(d, paths.rootfs, vm.spec.disk_size)
    cancel.check()
    make_work_disk(d, vm, img, paths.work_disk)


def grow_ext4(d: Daemon, image: Path, size: int) -> None:
    """Grow an unmounted ext4 image file to ``size`` bytes (refuses to shrink it)."""
    current = image.stat().st_size
    if size < current:
        raise BadRequest(
            f"disk size {size >> 20}M is smaller than the image ({current >> 20}M)",
            hint=f"use --disk-size {(current + (1 << 30) - 1) >> 30}G or more",
        )
    if size == current:
        return
    with image.open("r+b") as fh:
        fh.truncate(size)
    # e2fsck -p (preen) is required by resize2fs after the image's last write; ~1 s.
    d.runner.run(["e2fsck", "-p", "-f", str(image)], desc="check the root disk", timeout=300,
                 check=False)
    d.runner.run(["resize2fs", str(image)], desc="grow the root disk", timeout=300)


def make_work_disk(d: Daemon, vm: VMRecord, img: ImageRecord, target: Path) -> None:
    """ext4 from the image's work-seed plus the install's authorized_key."""
    pubkey = d.layout.public_key.read_text()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".seed-") as tmp:
        seed = Path(tmp) / "root"
        if img.workseed and Path(img.workseed).is_dir():
            shutil.copytree(img.workseed, seed, symlinks=True)
        else:
            seed.mkdir()
        seed.chmod(0o700)
        write_authorized_key(seed, pubkey)
        d.runner.run(
            ["mkfs.ext4", "-q", "-F", "-L", WORK_LABEL, "-E", "root_owner=0:0",
             "-d", str(seed), str(target), f"{vm.spec.work_disk_size // 1024}k"],
            desc="make the work disk", timeout=300,
        )


def write_authorized_key(seed: Path, pubkey: str) -> None:
    """Put ``pubkey`` at ``seed/.ssh/authorized_keys`` without following any symlink.

    The seed comes from an image, which is untrusted: its ``.ssh`` or
    ``authorized_keys`` may be a symlink (normal inside a guest, and aimed at
    ``/etc/shadow`` by a hostile one). Anything in the way is replaced, never
    written through, since bangerd is root on the host.
    """
    ssh = seed / ".ssh"
    if ssh.is_symlink() or (ssh.exists() and not ssh.is_dir()):
        ssh.unlink()
    ssh.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh, 0o700, follow_symlinks=False)
    keys = ssh / "authorized_keys"
    remove_tree(keys)
    fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(pubkey if pubkey.endswith("\n") else pubkey + "\n")


def create_sync(d: Daemon, params: CreateParams) -> dict[str, Any]:
    """``vm.create``: begin a create and wait for it; returns the VM view or raises its error."""
    op = begin_create(d, params)
    op.wait()
    if op.error is not None:
        raise op.error
    result: dict[str, Any] = op.result
    return result


def op_view(op: Operation) -> dict[str, Any]:
    """An operation as JSON for the CLI (``OpView``)."""
    return OpView.model_validate(op.view()).model_dump(mode="json")


# ------------------------------------------------------------------ boot


def kernel_cmdline(d: Daemon, vm: VMRecord) -> str:
    """The guest kernel command line: console, root disk, and the ``banger.*`` network args
    that ``banger-init`` reads in the guest (plus Firecracker's reboot/i8042 args)."""
    gw = gateway(d.cfg.bridge_cidr)
    args = [
        "console=ttyS0", "root=/dev/vda", "rw", "loglevel=4", "panic=1",
        f"banger.ip={vm.ip}/{prefixlen(d.cfg.bridge_cidr)}", f"banger.gw={gw}",
        f"banger.hostname={vm.name}",
    ]
    if d.cfg.dns_enabled:
        args.append(f"banger.dns={gw}")
    if vm.vmm == "firecracker":
        args += ["reboot=k", "pci=off", "i8042.noaux", "i8042.nomux", "i8042.dumbkbd"]
    return " ".join(args)


def boot(d: Daemon, vm: VMRecord, img: ImageRecord, cancel: CancelToken,
         op: Operation | None = None) -> VMRecord:
    """Network, VMM launch and SSH wait for a VM in state ``starting``.

    On failure everything started here is torn down before the error propagates.
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
        h = h.with_(tap=d.tap_pool.acquire())
        save_handles(d, vm.id, h)
        d.checkpoint("start.network")
        stage("boot")
        assert h.cow is not None
        pending = h

        def record(partial: CowHandle) -> None:
            save_handles(d, vm.id, pending.with_(cow=partial))

        cow = strategy_for(h.cow, d.runner).activate(h.cow, Path(img.rootfs), vm.id, record)
        h = h.with_(cow=cow)
        save_handles(d, vm.id, h)
        boot_files = kernels.boot_files(d, img, vm.vmm)
        plan = LaunchPlan(
            vm_id=vm.id, name=vm.name, vcpu=vm.spec.vcpu, memory_mib=vm.spec.memory_mib,
            kernel=boot_files.kernel, initrd=boot_files.initrd,
            cmdline=kernel_cmdline(d, vm), rootfs=cow.disk, work_disk=str(paths.work_disk),
            tap=h.tap or "", mac=vm.mac, paths=paths,
        )
        ident = drv.launch(plan)
        h = h.with_(process=ident)
        save_handles(d, vm.id, h)
        log.info("vm %s: %s running as pid %d", vm.name, drv.name, ident.pid)
        d.checkpoint("start.boot")
        stage("wait-ssh")
        guest = d.dial(vm.ip)
        waited = d.seams.wait_for_ssh(
            guest, budget_s=d.cfg.boot_timeout_s, alive=lambda: matches(ident), cancel=cancel,
            on_wait=(lambda s: op.report(f"{s:.0f}s")) if op is not None else None,
            serial_tail=lambda: tail(paths.serial_log, 2000),
        )
        log.info("vm %s: ssh ready after %.1fs", vm.name, waited)
        from banger.daemon import workspaces

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
    from banger.daemon import caps

    caps.started(d, vm)
    return vm


def mark_running(d: Daemon, vm_id: str, expect: set[VMState]) -> VMRecord:
    """The end of every successful boot: running, with no stale error or stop reason."""
    return transition(d, vm_id, VMState.RUNNING, expect=expect,
                      last_error=None, stop_reason=None, booted_at=time.time())


def start(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm start``: boot a stopped (or failed) VM; on failure it is stopped with the reason."""
    vm = resolve(d, ref)
    img = d.db.get_image(vm.image)
    if vm.state == VMState.ERROR:
        # A failed stop or start may have left a VMM, TAP or disk mapping behind: clear
        # it first, and never boot a second VMM on the same disks.
        problems = teardown(d, vm.id, handles_of(d, vm))
        if problems:
            raise InvalidState(f"VM {vm.name!r} still holds resources: " + "; ".join(problems),
                               hint="`banger vm delete` removes it")
    token = CancelToken()
    with d.vm_locks.held(vm.id):
        # The cancel token is registered under the same lock that marks the VM
        # "starting": a stop or delete that sees "starting" can always cancel it.
        current = d.db.get_vm(vm.id)
        if current.state not in (VMState.STOPPED, VMState.ERROR) \
                or not current.state.can_become(VMState.STARTING):
            raise _wrong_state(current, VMState.STARTING)
        vm = d.db.update_vm(current, state=VMState.STARTING)
        d.register_inflight(vm.id, token)
    try:
        vm = boot(d, vm, img, token)
    except BaseException as exc:
        err = error_of(exc)
        _settle_failed_start(d, vm.id, err)
        raise err from None
    finally:
        d.end_inflight(vm.id, token)
    return view(d, vm)


def _settle_failed_start(d: Daemon, vm_id: str, err: BangerError) -> None:
    """After a failed start, the VM is stopped and says why (unless it was deleted)."""
    try:
        with d.vm_locks.held(vm_id):
            vm = d.db.get_vm(vm_id)
            if vm.state == VMState.STARTING:
                d.db.update_vm(vm, state=VMState.STOPPED,
                               runtime=merge_runtime(vm.runtime, {"last_error": err.message,
                                                           "stop_reason": "start failed"}))
    except NotFound:
        pass


# ------------------------------------------------------------------ stop / kill / restart


def _cancel_boot(d: Daemon, vm: VMRecord, reason: str) -> VMRecord | None:
    """If ``vm`` is mid-boot, cancel it and wait for it to unwind; returns the fresh row."""
    if vm.state not in (VMState.STARTING, VMState.CREATING):
        return vm
    d.cancel_inflight(vm.id, reason)
    if not d.wait_inflight_gone(vm.id, CANCEL_BOOT_S):
        raise InvalidState(f"VM {vm.name!r} is still {vm.state.value} after being cancelled",
                           hint="retry in a moment")
    return d.db.find_vm(vm.id)


def stop(d: Daemon, ref: str, reason: str = "stopped by `banger vm stop`") -> dict[str, Any]:
    """``vm stop``: cancel a boot in progress, or power the guest off cleanly (bounded),
    then release its TAP, disk mapping and runtime files."""
    vm = resolve(d, ref)
    fresh = _cancel_boot(d, vm, "stopped by the user")
    if fresh is None:
        raise NotFound(f"VM {vm.name!r} was deleted while starting")
    vm = fresh
    if vm.state == VMState.STOPPED:
        if vm.runtime.get("stop_reason") == "start failed":
            return view(d, vm)
        raise NotRunning(f"VM {vm.name!r} is not running")
    vm = transition(d, vm.id, VMState.STOPPING, expect={VMState.RUNNING, VMState.ERROR})
    d.checkpoint("stop.marked")
    h = handles_of(d, vm)
    graceful_poweroff(d, vm, h)
    d.checkpoint("stop.poweroff")
    problems = teardown(d, vm.id, h)
    vm = _finish_stop(d, vm, reason, problems)
    return view(d, vm)


def _finish_stop(d: Daemon, vm: VMRecord, reason: str, problems: list[str]) -> VMRecord:
    from banger.daemon import caps

    if problems:
        vm = transition(d, vm.id, VMState.ERROR, last_error="; ".join(problems))
        raise HostError(f"VM {vm.name!r} stopped, but cleanup was incomplete: "
                        + "; ".join(problems), hint="`banger vm stop` again retries the cleanup")
    vm = transition(d, vm.id, VMState.STOPPED, stop_reason=reason, booted_at=None)
    caps.stopped(d, vm)
    return vm


def graceful_poweroff(d: Daemon, vm: VMRecord, h: VMHandles) -> None:
    """sync + poweroff over SSH, then the VMM's power button, each with a bounded wait."""
    ident = h.process
    if ident is None or not matches(ident):
        return
    try:
        # The connection drops as the guest goes down: ssh then exits 255, which is fine.
        d.dial(vm.ip).run("sync; (systemctl poweroff || poweroff) >/dev/null 2>&1 &",
                          timeout=15, check=False, desc="guest poweroff")
    except GuestError as exc:
        log.info("vm %s: poweroff over ssh failed: %s", vm.name, exc)
    if wait_gone(ident, GUEST_POWEROFF_S):
        return
    log.warning("vm %s: guest did not power off within %gs; pressing the power button",
                vm.name, GUEST_POWEROFF_S)
    try:
        drv = d.driver(h.vmm)
        if drv.request_shutdown(d.layout.vm(vm.id), ident) and wait_gone(ident, ACPI_POWEROFF_S):
            return
    except BangerError as exc:
        log.info("vm %s: VMM shutdown request failed: %s", vm.name, exc)


def kill_vmm(ident: ProcessIdentity | None, sig: int = signal_mod.SIGKILL) -> bool:
    """Signal and reap the VMM; escalates to SIGKILL. True when it is gone."""
    if ident is None or not matches(ident):
        return True
    if sig != signal_mod.SIGKILL:
        send_signal(ident, sig)
        if wait_gone(ident, SIGTERM_S):
            return True
    send_signal(ident, signal_mod.SIGKILL)
    return wait_gone(ident, SIGKILL_S)


def teardown(d: Daemon, vm_id: str, h: VMHandles | None) -> list[str]:
    """Release everything a running VM holds, in order, each step independent.

    Order: VMM process, then its runtime files, then the TAP, then the COW
    device mapping, then the handles file. A failing step is recorded and the
    next still runs, so one stuck resource does not leak the others.
    """
    problems: list[str] = []
    paths = d.layout.vm(vm_id)
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
        if not kill_vmm(ident, signal_mod.SIGTERM):
            problems.append(f"VMM pid {ident.pid} would not exit")
    if h is not None:
        try:
            d.driver(h.vmm).cleanup(paths)
        except BangerError as exc:
            log.info("vmm cleanup: %s", exc)
        if h.tap:
            try:
                d.tap_pool.release(h.tap)
            except BangerError as exc:
                problems.append(f"tap {h.tap}: {exc.message}")
        if h.cow is not None:
            try:
                strategy_for(h.cow, d.runner).deactivate(h.cow)
            except BangerError as exc:
                problems.append(f"root disk: {exc.message}")
    remove_tree(paths.run)
    if not problems:
        d.handles.drop(vm_id)
        with contextlib.suppress(NotFound):
            update_runtime(d, vm_id, teardown=None)
    return problems


def kill(d: Daemon, ref: str, sig_name: str = "KILL") -> dict[str, Any]:
    """``vm kill``: send a signal to the VMM; a terminating one also tears the VM down."""
    sig = _signal(sig_name)
    vm = resolve(d, ref)
    vm = _cancel_boot(d, vm, f"killed with SIG{sig.name.removeprefix('SIG')}") or vm
    if vm.state not in (VMState.RUNNING, VMState.ERROR, VMState.STOPPING):
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
        send_signal(h.process, sig)
        return view(d, vm)
    # Claim the VM before the signal, so the exit watcher cannot tear it down as well.
    vm = transition(d, vm.id, VMState.STOPPING, expect={VMState.RUNNING, VMState.ERROR})
    send_signal(h.process, sig)
    wait_gone(h.process, SIGKILL_S)
    problems = teardown(d, vm.id, h)
    vm = _finish_stop(d, vm, f"killed with {sig.name}", problems)
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


def restart(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm restart``: stop if running (or failed), then start."""
    vm = resolve(d, ref)
    if vm.state in (VMState.RUNNING, VMState.ERROR):
        stop(d, vm.id, reason="restarting")
    return start(d, vm.id)


# ------------------------------------------------------------------ delete


def delete(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm delete``: cancel a boot or create in progress, then :func:`destroy` the VM."""
    vm = resolve(d, ref)
    gone = {"deleted": vm.name, "id": vm.id}
    fresh = _cancel_boot(d, vm, "deleted by the user")
    if fresh is None:  # the cancelled create rolled itself back
        return gone
    fresh = _wait_settled(d, fresh)  # a stop (or the exit watcher) finishes first
    if fresh is None:  # another delete removed it meanwhile
        return gone
    vm = transition(d, fresh.id, VMState.DELETING,
                    expect={VMState.STOPPED, VMState.RUNNING, VMState.ERROR})
    d.checkpoint("delete.marked")
    destroy(d, vm.id, reason="deleted by the user")
    return gone


def _wait_settled(d: Daemon, vm: VMRecord) -> VMRecord | None:
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
    from banger.daemon import caps

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
        strategy_for(h.cow, d.runner).remove(h.cow)
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


# ------------------------------------------------------------------ queries


def list_vms(d: Daemon) -> list[dict[str, Any]]:
    """``vm list``: every VM's view, oldest first."""
    return [view(d, vm) for vm in d.db.list_vms()]


def show(d: Daemon, ref: str) -> dict[str, Any]:
    """``vm show``: one VM's view, by name or id."""
    return view(d, resolve(d, ref))


def ssh_info(d: Daemon, ref: str) -> dict[str, Any]:
    """What the CLI needs to run the system ssh into a running VM (and its workspace dir)."""
    vm = resolve(d, ref)
    if vm.state != VMState.RUNNING:
        raise NotRunning(f"VM {vm.name!r} is {vm.state.value}, not running",
                         hint=f"start it with `banger vm start {vm.name}`")
    ws = vm.workspace or {}
    return SSHInfo(name=vm.name, ip=vm.ip, user=GUEST_USER, key_path=str(d.layout.key_path),
                   known_hosts=str(d.layout.known_hosts),
                   workdir=ws.get("guest_path") if ws.get("prepared") else None,
                   ).model_dump(mode="json")


def logs(d: Daemon, ref: str, max_bytes: int = 128 * 1024) -> dict[str, Any]:
    """The serial log's path and its last ``max_bytes`` (``vm logs -f`` follows the path).

    128 KiB: JSON escaping can grow console bytes (escape codes) up to six-fold, and the
    reply must fit in one 1 MiB frame.
    """
    vm = resolve(d, ref)
    path = d.layout.vm(vm.id).serial_log
    return {"name": vm.name, "path": str(path), "content": tail(path, max_bytes)}

