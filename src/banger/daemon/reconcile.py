"""Start-up reconciliation, leak sweeps, and noticing VMs that exited on their own.

bangerd may die at any instant (kill -9, OOM, host crash). On the next start
every VM is checked against the host: a VMM that is still the same process
(``/proc`` pid + start time + command line marker) is re-adopted, anything
else is torn down and the VM marked stopped with the reason. Half-created or
half-deleted VMs are removed. Then host resources that look like banger's but
belong to no VM (TAPs, loop devices, dm targets, VMM processes, runtime files,
empty cgroups) are swept. Restarting bangerd never stops a running VM.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon import (
    caps,
    savedstate,
    snapshots,
    vmboot,
    vmdelete,
    vmpower,
    vms,
    vmteardown,
    workspaces,
)
from banger.daemon.dmsnap import dm_snapshot_supported
from banger.daemon.firewall import guest_rule
from banger.daemon.guest import find_masters, stop_master
from banger.daemon.handles import VMHandles
from banger.daemon.store import VMRecord
from banger.errors import BangerError, HostError
from banger.fsutil import remove_trash, remove_tree
from banger.hostops.cgroups import in_vm_group
from banger.proc import find_by_marker, identify, matches, open_files
from banger.vmm import vm_marker

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.reconcile")

_MARKER = re.compile(r"^banger-([0-9a-f]{12})(,|$)")
# A VM's cgroup under the install's: named after its id or its marker (banger-<id>).
_CGROUP_NAME = re.compile(r"^(?:banger-)?([0-9a-f]{12})$")


def ensure_ssh_key(d: Daemon) -> None:
    """The install's ed25519 key, generated on first use."""
    key = d.layout.key_path
    if key.exists() and d.layout.public_key.exists():
        return
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key.unlink(missing_ok=True)
    d.layout.public_key.unlink(missing_ok=True)
    d.runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "banger", "-f", str(key)],
                 desc="generate banger's SSH key", timeout=30)
    log.info("generated SSH key %s", key)


def reconcile(d: Daemon) -> None:
    """Bring the host back in line with the store at daemon start-up.

    Ensures the SSH key, removes staging debris, reconciles each VM (a failure is
    logged, not raised), sweeps unowned host resources and rewrites the SSH config.
    """
    ensure_ssh_key(d)
    remove_tree(d.layout.staging_dir)  # half-built images, workspace packs: a previous life
    d.blobs.sweep_partial()  # downloads a dead daemon left half-done
    snapshots.sweep(d)  # snapshots a dead daemon was taking: never cloned from
    for registry in (d.layout.images_dir, d.layout.kernels_dir, d.layout.kernel_build_cache):
        remove_trash(registry)  # deletes a crash interrupted after the rename
    for vm in d.db.list_vms():
        try:
            if vm.spec.extra_disks:  # an image finalize helper: its pull died with the daemon
                vmdelete.destroy(d, vm.id, reason="image finalize helper of a previous daemon")
                continue
            reconcile_vm(d, vm)
        except Exception:
            log.exception("reconcile of %s failed", vm.name)
    # Tables a dead daemon left while no VM runs now: no guest needs them.
    d.firewall.unload_if_idle()
    sweep(d)
    caps.write_ssh_config(d)


def _live_handles(d: Daemon, vm: VMRecord) -> tuple[VMHandles, bool]:
    """Rebuild handles and say whether the VMM is alive (finding it by marker if needed)."""
    h = vms.handles_of(d, vm)
    if h.process is not None and matches(h.process):
        return h, True
    marker = vm_marker(vm.id)
    for pid, argv in find_by_marker(marker).items():
        if _ours(d, argv, pid, vm.id):
            ident = identify(pid, marker)
            if ident is not None:
                return h.with_(process=ident), True
    return h, False


def reconcile_vm(d: Daemon, vm: VMRecord) -> None:
    """Make ``vm``'s row and its host resources agree after a daemon restart.

    A live VMM of a RUNNING, STARTING or ERROR VM is re-adopted (an interrupted boot
    finishes in the background); VMs caught mid-create or mid-delete are destroyed, and
    so is the pool a dead daemon left, members in ``error`` included (``vmpool``: the
    new one fills its own).
    Otherwise any VMM is killed, leftovers are torn down and the VM is marked
    stopped, or ERROR when teardown reports problems.
    """
    h, alive = _live_handles(d, vm)
    state = vm.state
    if state in (VMState.CREATING, VMState.DELETING, VMState.POOLED) or vm.in_pool:
        log.warning("vm %s was %s when bangerd stopped: removing it", vm.name, state.value)
        vmdelete.destroy(d, vm.id, reason=f"{state.value} interrupted by a daemon restart")
        return
    paths = d.layout.vm(vm.id)
    savedstate.discard_partial(paths)  # a save that did not finish is never used
    if state == VMState.SUSPENDING and alive and savedstate.complete(paths) is None:
        state = _back_from(d, vm, h, "suspend")
        vm = d.db.get_vm(vm.id)
    elif state == VMState.SNAPSHOTTING and alive:
        state = _back_from(d, vm, h, "snapshot")
        vm = d.db.get_vm(vm.id)
    if state in (VMState.SUSPENDING, VMState.SUSPENDED) or (
            state == VMState.STARTING and savedstate.complete(paths) is not None):
        _settle_saved(d, vm, h, alive)
        return
    if alive and state in (VMState.RUNNING, VMState.STARTING, VMState.ERROR, VMState.PAUSED):
        vms.save_handles(d, vm.id, h)
        vmteardown.readopt_confinement(d, vm, h)
        if h.tap:
            # The daemon's start reloaded the rules with no guest in them.
            d.firewall.admit(guest_rule(vm, h.tap))
        if state == VMState.STARTING:
            _finish_start(d, vm, h)
        else:
            if state == VMState.ERROR:
                vm = _force_state(d, vm.id, VMState.RUNNING)
            log.info("vm %s: re-adopted running VMM pid %d", vm.name,
                     h.process.pid if h.process else -1)
            caps.started(d, vm)
        return
    if state == VMState.STOPPING or (alive and state == VMState.STOPPED):
        vmteardown.kill_vmm(d.host, h.process)
    if state != VMState.STOPPED or alive or d.layout.vm(vm.id).handles.exists() \
            or vm.runtime.teardown:
        problems = vmteardown.teardown(d, vm.id, h)
        reason = {
            VMState.STOPPING: "stop finished after a daemon restart",
            VMState.STOPPED: "stopped",
        }.get(state, "the VMM was gone when bangerd restarted")
        if problems:
            _force_state(d, vm.id, VMState.ERROR, last_error="; ".join(problems))
        elif state != VMState.STOPPED:
            # Forwards added while it ran end with it, as at a stop (forwards.ForwardCap).
            stopped = _force_state(d, vm.id, VMState.STOPPED, stop_reason=reason,
                                   booted_at=None, forwards=None)
            log.warning("vm %s: marked stopped (%s)", vm.name, reason)
            caps.stopped(d, stopped)  # e.g. its sessions ended with it


def _back_from(d: Daemon, vm: VMRecord, h: VMHandles, what: str) -> VMState:
    """A suspend cut short before its saved state was complete, or a snapshot cut short
    (``what``), its VMM alive: the guest goes on as it was (running, or paused). The
    state it is back in. (The snapshot's partial files went in :func:`snapshots.sweep`.)"""
    was = getattr(vm.runtime, f"{what}_from") or VMState.RUNNING
    if was == VMState.RUNNING:
        try:
            d.driver(h.vmm).resume(d.layout.vm(vm.id))
        except BangerError as exc:
            log.error("vm %s: not resumed after an interrupted %s: %s", vm.name, what,
                      exc.message)
    _force_state(d, vm.id, was, **{f"{what}_from": None},
                 last_error=f"{what} interrupted by a daemon restart")
    log.warning("vm %s: %s interrupted by the restart; %s again", vm.name, what, was.value)
    return was


def _settle_saved(d: Daemon, vm: VMRecord, h: VMHandles, alive: bool) -> None:
    """A VM suspended, being suspended with its state saved, or being restored from a
    saved state not yet loaded: whatever VMM it has goes, and it is suspended if its
    saved state is complete, else stopped (its memory is lost, its disks stay)."""
    if alive:
        vmteardown.kill_vmm(d.host, h.process)
    paths = d.layout.vm(vm.id)
    problems = []
    if alive or paths.handles.exists() or vm.runtime.teardown:
        problems = vmteardown.teardown(d, vm.id, h)
    if problems:
        _force_state(d, vm.id, VMState.ERROR, last_error="; ".join(problems))
        return
    saved = savedstate.complete(paths)
    if saved is not None:
        if vm.state != VMState.SUSPENDED:
            record = vm.runtime.suspended or savedstate.record(
                savedstate.size(saved), vm.vmm, vm.runtime)
            _force_state(d, vm.id, VMState.SUSPENDED, suspended=record, suspend_from=None)
            log.warning("vm %s: suspended (its saved state is complete)", vm.name)
        return
    reason = ("suspend interrupted by a daemon restart" if vm.state == VMState.SUSPENDING
              else "its saved state is missing")
    stopped = _force_state(d, vm.id, VMState.STOPPED, stop_reason=reason, booted_at=None,
                           suspended=None, suspend_from=None, forwards=None,
                           last_error=f"{reason}: the guest's memory was lost, its disks kept")
    log.warning("vm %s: marked stopped (%s)", vm.name, reason)
    caps.stopped(d, stopped)


def _force_state(d: Daemon, vm_id: str, state: VMState, **runtime: Any) -> VMRecord:
    """Set what reconcile found to be true, on the row as it is now (re-read under the
    VM's lock: teardown just rewrote its runtime record), bypassing the transition
    table, which describes operations, not discoveries."""
    with d.vm_locks.held(vm_id):
        vm = d.db.get_vm(vm_id)
        return d.db.update_vm(vm, state=state, runtime=vm.runtime.merged(**runtime))


def _finish_start(d: Daemon, vm: VMRecord, h: VMHandles) -> None:
    """A boot interrupted by the restart: wait for SSH in the background, then mark running."""
    token = d.begin_inflight(vm.id)

    def body() -> None:
        try:
            assert h.process is not None
            ident = h.process
            restored = bool(vm.runtime.suspended)
            if restored:
                # Its saved state was loaded and deleted: the guest may still be paused.
                d.driver(h.vmm).resume(d.layout.vm(vm.id))
            guest = d.dial(vm.id, vm.ip)
            d.seams.wait_for_ssh(guest, budget_s=d.cfg.boot_timeout_s,
                                 alive=lambda: matches(ident), cancel=token)
            if restored:
                savedstate.set_clock(guest, vm.name)
            workspaces.sync_files(d, vm)
            fresh = vmboot.mark_running(d, vm.id, expect={VMState.STARTING})
            caps.started(d, fresh)
            log.info("vm %s: boot finished after daemon restart", vm.name)
        except Exception as exc:  # anything: the VM must not stay "starting" forever
            err = d.error_of(exc, f"finishing the boot of {vm.name}")
            log.warning("vm %s: boot after restart failed: %s", vm.name, err)
            vmteardown.teardown(d, vm.id, h)
            vmpower.settle_failed_start(d, vm.id, err)
        finally:
            d.end_inflight(vm.id, token)

    d.in_background(f"readopt-{vm.name}", body)


def _ours(d: Daemon, argv: list[str], pid: int, vm_id: str) -> bool:
    """A VMM process belongs to this daemon when it is in this install's cgroup for its
    VM, or its command line or open files use our directories.

    Several daemons (test runs, other state dirs) may share a host; never touch theirs.
    A confined QEMU names no path (it gets its disks and sockets as descriptors), and a
    daemon that is not root cannot read the VMM user's descriptors: its cgroup, which
    anyone may read, says whose it is.
    """
    if in_vm_group(pid, d.layout.install_tag, vm_id):
        return True
    roots = (str(d.layout.vms_dir) + "/", str(d.layout.vms_run_dir) + "/")
    if any(root in arg for arg in argv for root in roots):
        return True
    return any(target.startswith(roots) for target in open_files(pid))


def sweep(d: Daemon) -> dict[str, list[str]]:
    """Remove this install's host resources that no VM owns; returns what was removed.

    Only resources named or placed by this install are candidates: TAPs with its TAP
    prefix, VMs' network namespaces with its namespace prefix, dm targets with its dm
    prefix, cgroups under its ``banger-<tag>`` cgroup
    (all three carry the install tag, see ``banger.layout.install_tag``), loop devices
    and VMM processes over its directories. Another install's (another state dir's)
    are never touched.
    """
    removed: dict[str, list[str]] = {"processes": [], "taps": [], "netns": [], "loops": [],
                                     "dm": [], "cgroups": [], "files": []}
    known = {vm.id for vm in d.db.list_vms()}
    owned_taps: set[str] = set(d.tap_pool.owned())
    for vm_id, h in d.handles.all().items():
        if vm_id in known and h.tap:
            owned_taps.add(h.tap)
    for vm in d.db.list_vms():
        tap = (vm.runtime.teardown or {}).get("tap")
        if tap:
            owned_taps.add(tap)

    for pid, argv in find_by_marker("banger-").items():
        ids = [m.group(1) for a in argv if (m := _MARKER.match(a))]
        if not ids or ids[0] in known or not _ours(d, argv, pid, ids[0]):
            continue
        ident = identify(pid, vm_marker(ids[0]))
        if ident is not None and vmteardown.kill_vmm(d.host, ident):
            removed["processes"].append(str(pid))

    # Jailed Firecracker VMs' own network namespaces (their ports go with them), once
    # their VMMs are gone; the jails and cgroups go too.
    removed["netns"] = _removed("network namespaces", d.host.fc_netns_vms, known.__contains__,
                                d.host.fc_cleanup)
    try:
        links = d.host.links()
    except Exception as exc:
        log.warning("sweep: cannot list links: %s", exc)
        links = []
    for link in links:
        if link.startswith(d.tap_pool.prefix) and link not in owned_taps:
            try:
                d.host.delete_link(link)
                removed["taps"].append(link)
            except BangerError as exc:
                log.warning("sweep: %s", exc)

    # ssh masters of VMs this install no longer has (a teardown ends a VM's own).
    for ident, control in find_masters(d.layout.vms_run_dir):
        vm_id = control.relative_to(d.layout.vms_run_dir).parts[0]
        if vm_id not in known and stop_master(ident):
            removed["processes"].append(str(ident.pid))

    # dm snapshots of VMs gone, then the loop devices no VM's handles name (an image's
    # or a VM's file: at start-up no activation is half-way). A snapshot holds its loops.
    if dm_snapshot_supported():
        vm_ids = _removed("dm targets", d.host.dm_vms, known.__contains__, d.host.dm_remove)
        removed["dm"] = [d.dm_prefix + vm_id for vm_id in vm_ids]
    owned = {loop for h in d.handles.all().values() if h.cow is not None
             for loop in h.cow.loops}
    removed["loops"] = _removed("loop devices", lambda: [dev for dev, _ in d.host.loops()],
                                owned.__contains__, d.host.loop_detach)
    # After the VMM processes: a leaked VMM killed above has left its cgroup (or is
    # leaving it; a cgroup still busy is left for the next sweep).
    removed["cgroups"] = _sweep_cgroups(d, known)

    for parent in (d.layout.vms_run_dir, d.layout.vms_dir):
        if parent.is_dir():
            for child in parent.iterdir():
                if child.name not in known:
                    remove_tree(child)
                    removed["files"].append(str(child))
    if any(removed.values()):
        log.warning("sweep removed leftovers: %s", {k: v for k, v in removed.items() if v})
    return removed


def _removed(what: str, listed: Callable[[], Iterable[str]], keep: Callable[[str], bool],
             remove: Callable[[str], None]) -> list[str]:
    """Remove each listed ``what`` that ``keep`` does not hold on to; those removed.

    A failure to list or to remove one is logged and the sweep goes on.
    """
    try:
        names = list(listed())
    except BangerError as exc:
        log.warning("sweep: cannot list %s: %s", what, exc.message)
        return []
    gone = []
    for name in names:
        if keep(name):
            continue
        try:
            remove(name)
        except BangerError as exc:
            log.warning("sweep: %s", exc.message)
            continue
        gone.append(name)
    return gone


def _sweep_cgroups(d: Daemon, known: set[str]) -> list[str]:
    """Remove this install's VM cgroups that no VM owns, when empty; returns their paths.

    A cgroup that still holds processes is left and logged: nothing is killed here
    (a VMM of this install was killed above; anything else in it is not ours to kill).
    """
    try:
        host = d.seams.cgroups()
        groups = host.install_groups(d.layout.install_tag)
    except HostError as exc:  # no usable hierarchy: no VM of ours can have a cgroup
        log.debug("sweep: no cgroups: %s", exc.message)
        return []
    gone = []
    for name, group in groups.items():
        m = _CGROUP_NAME.match(name)
        if m is None or m.group(1) in known:
            continue  # not a VM's cgroup, or a VM's that still exists
        try:
            members = group.members()
            if members:
                log.warning("sweep: cgroup %s belongs to no VM but holds pids %s: left in "
                            "place", group.describe(), " ".join(map(str, members)))
                continue
            if name == m.group(1):
                d.host.cgroup_remove(name)  # a QEMU VM's, named by its id
            else:
                group.remove()  # a jailed Firecracker's (banger-<id>): the jailer's name
        except BangerError as exc:
            log.warning("sweep: %s", exc.message)
            continue
        gone.append(group.describe())
    return gone


def reap_exited(d: Daemon) -> None:
    """Mark running or paused VMs whose VMM exited (guest poweroff, crash) as stopped."""
    for vm in d.db.list_vms():
        if vm.state not in vms.LIVE:
            continue
        h = d.handles.get(vm.id)
        if h is None or h.process is None or matches(h.process):
            continue
        with d.vm_locks.held(vm.id):
            # Checked again under the lock that claims the VM: a stop and start since
            # the first look gave it a fresh VMM, which must not be torn down. Under
            # the lock, "running" means the cached handles are this boot's.
            current = d.db.find_vm(vm.id)
            h = d.handles.get(vm.id)
            if current is None or current.state not in vms.LIVE or h is None \
                    or h.process is None or matches(h.process):
                continue  # someone else is handling it, or it runs again
            stopping = d.db.update_vm(current, state=VMState.STOPPING)
        problems = vmteardown.teardown(d, vm.id, h)
        try:
            vmpower.finish_stop(d, stopping, "the guest powered off or its VMM exited", problems)
        except BangerError as exc:
            log.warning("vm %s: %s", vm.name, exc)
        log.info("vm %s: VMM exited on its own; marked stopped", vm.name)
