"""The Firecracker VMM driver: launch, configure over the API, stop, snapshot.

A launch is: prepare the runtime files, start Firecracker detached with
``--api-sock`` and ``--id <marker>``, record its pid, wait for the API to answer,
``PUT`` the logger, metrics, machine, kernel, drives, NIC and vsock, then
``InstanceStart``. If any step fails the process is killed and its files removed
before the error reaches the caller, so a failed start leaves nothing behind.

Jailed (the production set-up), everything that needs root goes through the host
operations (:mod:`banger.hostops`, the root helper or, in a root daemon, the same
code in process): the helper builds the jail from the VM's files and starts the
jailer (``fc.launch``), hands over connections to the API and vsock sockets in the
jail (``fc.connect``), moves snapshots out of it and removes it. Unjailed (a root
daemon without the jailer, for development) the driver starts Firecracker itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from banger.config import Config
from banger.errors import (
    BadRequest,
    BangerError,
    CommandFailed,
    HostError,
    InvalidState,
    VMMError,
)
from banger.fsutil import atomic_write, tail
from banger.hostops import ops
from banger.hostops.cgroups import RELEASE_WAIT_S
from banger.hostops.client import HostOps
from banger.hostops.jail import (
    JAIL_API_SOCKET,
    JAIL_FILES,
    JAIL_INITRD,
    JAIL_KERNEL,
    JAIL_LOG,
    JAIL_METRICS,
    JAIL_RESTORE_MEM,
    JAIL_RESTORE_STATE,
    JAIL_ROOTFS,
    JAIL_SNAPSHOT_MEM,
    JAIL_SNAPSHOT_STATE,
    JAIL_VSOCK,
    JAIL_WORK_DISK,
    MAX_EXTRA_DISKS,
    check_exec_file,
    find_firecracker,
    jail_extra_disk,
)
from banger.hostops.netlink import VM_NETNS_TAP
from banger.layout import VMPaths
from banger.proc import ProcessIdentity, identify, matches, send_signal, wait_gone
from banger.runner import Runner
from banger.vmm import IDENT_VSOCK_PORT, LaunchPlan, VMMDriver, binary_version
from banger.vmmuser import check_unprivileged, ensure_user, lookup_user

from . import vsock
from .api import (
    REQUEST_TIMEOUT_S,
    FirecrackerAPI,
    HandedSocketTransport,
    InstanceInfo,
    InstanceState,
    SnapshotType,
)
from .host import check_version, jailer_binary

log = logging.getLogger("banger.fcproc")

# Firecracker binds its API socket a few milliseconds after exec; under the
# jailer it first copies its ~3 MiB binary into the chroot. Ten seconds
# covers a heavily loaded host; a process that dies sooner is noticed at once.
API_SOCKET_WAIT_S = 10.0
API_POLL_S = 0.02
# One probe of a socket that exists but is not answering yet.
API_PROBE_TIMEOUT_S = 1.0

# The detaching helper returns as soon as Firecracker (or the jailer) has been
# exec'd: an interpreter start-up and two forks, well under a second.
SPAWN_TIMEOUT_S = 15.0

# After Ctrl-Alt-Del a guest booted with reboot=k runs its shutdown (systemd
# stops units, syncs disks) and resets through the keyboard controller, which
# ends Firecracker. A few seconds normally; beyond 20 it is stuck.
CTRL_ALT_DEL_GRACE_S = 20.0

# SIGKILL cannot be ignored; the kernel still has to free guest memory, which
# takes a moment for a large VM.
KILL_WAIT_S = 5.0

# Pressing the power button is one small request; a VMM that does not answer it
# within 10 s is wedged and gets killed. (3 s proved too tight on a loaded 2-core
# host: the request timed out and a healthy VMM was SIGKILLed instead of shut down.)
SHUTDOWN_REQUEST_TIMEOUT_S = 10.0

# Firecracker accepts 1 to 32 vCPUs (swagger: MachineConfiguration.vcpu_count).
MAX_VCPUS = 32

# Firecracker's vsock is backed by a Unix socket per VM, not the host's
# vhost-vsock, so guest CIDs never collide across VMs; 3 is the first CID
# that is not reserved (0-2 are hypervisor, local and host).
GUEST_CID = 3

ROOT_DRIVE = "rootfs"
WORK_DRIVE = "work"
IFACE = "eth0"


@dataclass(frozen=True)
class VMMView:
    """The paths a Firecracker process is told about, as it sees them.

    Unjailed these are host paths; jailed they are fixed names at the root
    of the chroot (see :mod:`.jail`).
    """

    jailed: bool
    api_socket: str
    kernel: str
    initrd: str | None
    rootfs: str
    work_disk: str
    log: str
    metrics: str
    vsock: str
    tap: str
    extra_disks: tuple[str, ...] = ()


def direct_view(plan: LaunchPlan) -> VMMView:
    """What an unjailed Firecracker is told: the host paths of ``plan``."""
    p = plan.paths
    return VMMView(
        jailed=False,
        api_socket=str(p.api_socket),
        kernel=str(plan.kernel),
        initrd=str(plan.initrd) if plan.initrd is not None else None,
        rootfs=plan.rootfs,
        work_disk=plan.work_disk,
        log=str(p.vmm_log),
        metrics=str(p.metrics),
        vsock=str(p.vsock_socket),
        tap=plan.tap,
        extra_disks=plan.extra_disks,
    )


def jailed_view(plan: LaunchPlan, netns: bool) -> VMMView:
    """What a jailed Firecracker is told: the fixed names inside its chroot (and, in a
    network namespace of the VM's own, the TAP's name there)."""
    return VMMView(
        jailed=True,
        api_socket=JAIL_API_SOCKET,
        kernel=JAIL_KERNEL,
        initrd=JAIL_INITRD if plan.initrd is not None else None,
        rootfs=JAIL_ROOTFS,
        work_disk=JAIL_WORK_DISK,
        log=JAIL_LOG,
        metrics=JAIL_METRICS,
        vsock=JAIL_VSOCK,
        tap=VM_NETNS_TAP if netns else plan.tap,
        extra_disks=tuple(jail_extra_disk(i) for i, _ in enumerate(plan.extra_disks)),
    )


def firecracker_argv(binary: str, api_socket: str, vm_id_marker: str) -> list[str]:
    """The command line of an unjailed Firecracker.

    Args:
        binary: The Firecracker executable.
        api_socket: Where it creates its API socket.
        vm_id_marker: ``--id``; also the marker identity checks look for in
            ``/proc/<pid>/cmdline``.
    """
    return [binary, "--api-sock", api_socket, "--id", vm_id_marker]


def jail_files(plan: LaunchPlan, restore: SnapshotFiles | None = None) -> dict[str, ops.VMFile]:
    """What ``plan``'s jail holds, by the names ``fc.launch`` takes (see
    :data:`banger.hostops.jail.JAIL_FILES`): the boot files read-only, the disks and
    the log Firecracker writes given to the VMM user's group, and a snapshot to load
    given read-only (so the helper links it rather than copying gigabytes).

    Raises:
        BadRequest: more extra disks than a jail holds.
    """
    if len(plan.extra_disks) > MAX_EXTRA_DISKS:
        raise BadRequest(f"a jailed Firecracker VM has at most {MAX_EXTRA_DISKS} extra disks")
    files = {"kernel": ops.VMFile(path=str(plan.kernel), mode="r")}
    if plan.initrd is not None:
        files["initrd"] = ops.VMFile(path=str(plan.initrd), mode="r")
    written = {"rootfs": plan.rootfs, "work": plan.work_disk, "log": str(plan.paths.vmm_log),
               **{f"extra{i}": disk for i, disk in enumerate(plan.extra_disks)}}
    files.update({name: ops.VMFile(path=path, mode="rw", give=True)
                  for name, path in written.items()})
    if restore is not None:
        files["snapshot_state"] = ops.VMFile(path=str(restore.state), mode="r", give=True)
        files["snapshot_mem"] = ops.VMFile(path=str(restore.memory), mode="r", give=True)
    assert set(files) <= set(JAIL_FILES)
    return files


def check_machine(plan: LaunchPlan) -> None:
    """Refuse, before starting anything, a machine Firecracker cannot run.

    Raises:
        BadRequest: More vCPUs than Firecracker supports.
    """
    if not 1 <= plan.vcpu <= MAX_VCPUS:
        raise BadRequest(f"Firecracker runs 1 to {MAX_VCPUS} vCPUs; {plan.name} asks for "
                         f"{plan.vcpu}", hint="use fewer vCPUs, or vmm = qemu")


def configure(api: FirecrackerAPI, plan: LaunchPlan, view: VMMView) -> None:
    """Send every pre-boot request for ``plan``; the caller sends InstanceStart.

    Logger and metrics go first so Firecracker's log explains any refusal
    that follows. The root drive is added before the work disk so the guest
    sees them as ``/dev/vda`` and ``/dev/vdb``, as under QEMU.
    """
    api.put_logger(view.log)
    api.put_metrics(view.metrics)
    api.put_machine_config(plan.vcpu, plan.memory_mib)
    api.put_boot_source(view.kernel, plan.cmdline, view.initrd)
    # Root: no flushes to the host (a COW scratch disk); work: guest fsyncs are honoured.
    api.put_drive(ROOT_DRIVE, view.rootfs, is_root_device=True, cache_type="Unsafe")
    api.put_drive(WORK_DRIVE, view.work_disk, is_root_device=False, cache_type="Writeback")
    for i, disk in enumerate(view.extra_disks):
        api.put_drive(f"extra{i}", disk, is_root_device=False, cache_type="Writeback")
    api.put_network_interface(IFACE, view.tap, plan.mac)
    api.put_vsock(GUEST_CID, view.vsock)


def wait_for_api(api: FirecrackerAPI, ident: ProcessIdentity, budget_s: float,
                 serial_log: Path | None = None) -> InstanceInfo:
    """Poll ``GET /`` until Firecracker answers; bounded by ``budget_s`` seconds.

    Gives up at once if the process is no longer ``ident``.

    Raises:
        VMMError: The process exited, or did not answer within the budget.
    """
    deadline = time.monotonic() + budget_s
    last: VMMError | None = None
    while True:
        if not matches(ident):  # an exec (jailer -> Firecracker) still matches
            raise VMMError(
                f"Firecracker (pid {ident.pid}) exited before answering on {api.socket_path}"
                + _serial_tail(serial_log))
        try:
            return InstanceInfo.from_json(api.request("GET", "/", timeout=API_PROBE_TIMEOUT_S))
        except VMMError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise VMMError(f"Firecracker (pid {ident.pid}) did not answer on {api.socket_path} "
                           f"within {budget_s:g}s: {last}")
        time.sleep(API_POLL_S)


def _serial_tail(serial_log: Path | None) -> str:
    text = tail(serial_log, 800).strip() if serial_log is not None else ""
    return f"; its output ends with:\n{text}" if text else ""


# Sends a signal to a VMM if it still is the process named (False: it is gone):
# banger.proc.send_signal, or the root helper's for a jailed VMM (HostOps.signal).
SignalSender = Callable[[ProcessIdentity, int], bool]
# Opens the VM's API with the given per-request timeout.
APIOpener = Callable[[float], FirecrackerAPI]


def kill(ident: ProcessIdentity, wait_s: float = KILL_WAIT_S,
         send: SignalSender = send_signal) -> bool:
    """SIGKILL the process if it is still ``ident``; True once it is gone.

    The signal goes through a pidfd opened after the identity check
    (:func:`banger.proc.send_signal`, or the helper's own), so a recycled pid is
    never hit.
    """
    send(ident, signal.SIGKILL)
    return wait_gone(ident, wait_s)


def press_ctrl_alt_del(open_api: APIOpener, ident: ProcessIdentity) -> bool:
    """Press Ctrl-Alt-Del through the API; True if Firecracker accepted it.

    Nothing is sent when ``ident`` no longer names the running VMM.
    """
    if not matches(ident):
        return False
    try:
        with open_api(SHUTDOWN_REQUEST_TIMEOUT_S) as api:
            api.send_ctrl_alt_del()
    except VMMError as exc:
        log.info("Ctrl-Alt-Del to pid %d failed: %s", ident.pid, exc)
        return False
    return True


def stop_gracefully(open_api: APIOpener, ident: ProcessIdentity, *,
                    grace_s: float = CTRL_ALT_DEL_GRACE_S,
                    kill_wait_s: float = KILL_WAIT_S,
                    send: SignalSender = send_signal) -> bool:
    """Ctrl-Alt-Del, wait up to ``grace_s``, then SIGKILL; True when the VMM is gone.

    A process that no longer matches ``ident`` (exited, or its pid now
    belongs to someone else) counts as gone and is never signalled.

    Args:
        open_api: Opens the VM's API.
        ident: The Firecracker process.
        grace_s: How long the guest may take to shut down after Ctrl-Alt-Del.
        kill_wait_s: How long to wait for the process to vanish after SIGKILL.
    """
    if not matches(ident):
        return True
    if press_ctrl_alt_del(open_api, ident):
        if wait_gone(ident, grace_s):
            return True
        log.warning("Firecracker pid %d still runs %gs after Ctrl-Alt-Del; killing it",
                    ident.pid, grace_s)
    return kill(ident, kill_wait_s, send)


@dataclass(frozen=True)
class SnapshotFiles:
    """A snapshot on the host: device/vCPU state and guest memory."""

    state: Path
    memory: Path


def saved_files(into: Path) -> SnapshotFiles:
    """Where :meth:`FirecrackerDriver.save` puts a snapshot in a saved-state directory."""
    return SnapshotFiles(state=into / "firecracker.state", memory=into / "firecracker.memory")


class FirecrackerDriver:
    """The Firecracker VMM driver (implements :class:`banger.vmm.VMMDriver`)."""

    name = "firecracker"

    def __init__(
        self,
        runner: Runner,
        binary: str,
        *,
        jail: HostOps | None = None,
        netns: bool = False,
        api_wait_s: float = API_SOCKET_WAIT_S,
    ) -> None:
        """A driver for one Firecracker binary.

        Args:
            runner: The subprocess chokepoint (starts the detaching helper).
            binary: Absolute path of the Firecracker executable.
            jail: Run Firecracker under the jailer through these host operations
                (the root helper's, or in process); None: unjailed, started here.
            netns: Jailed, each VM in a network namespace of its own (the jailer's
                ``--netns``), its TAP joined to the bridge through the port the
                launch makes.
            api_wait_s: Budget for the API socket to answer after start.

        Raises:
            BadRequest: jailed, and the jailer cannot exec ``binary``; ``netns``
                without the jailer.
        """
        if jail is not None:
            check_exec_file(binary)  # refuse now, not at the first VM start
        elif netns:
            raise BadRequest("jailer_netns puts each VM in a network namespace through "
                             "Firecracker's jailer, and the jailer is off",
                             hint="turn jailer_enabled on (and install the jailer), or "
                                  "jailer_netns off")
        self.runner = runner
        self.binary = binary
        self.jail = jail
        self.own_port = netns
        self.agent_port = False  # no virtio-serial: commands go over SSH
        self.api_wait_s = api_wait_s
        self._version: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, runner: Runner, host: HostOps) -> FirecrackerDriver:
        """Build the driver from the config, checking the binaries exist.

        Jailed (:func:`~.host.jailer_binary`), ``host`` builds the jail and starts the
        jailer, which runs Firecracker as the VMM user (created here if missing when
        bangerd is root; ``banger system install`` makes it for a service) in a cgroup
        of its own.

        Args:
            cfg: The configuration.
            runner: The subprocess chokepoint.
            host: The host operations (the root helper, or in process).

        Raises:
            HostError: Firecracker is missing or too old; the jailer is
                required (``jailer_enabled = true``) but cannot run; the VMM
                user cannot be created; no cgroup hierarchy has the controllers.
            BadRequest: The jailer is on and cannot exec this binary (its
                name lacks ``firecracker``), or the VMM user is root.
        """
        binary = find_firecracker(cfg)
        if binary is None:
            raise HostError(
                f"Firecracker ({cfg.firecracker_bin or 'firecracker'}) is not installed",
                hint="install a Firecracker release binary and set firecracker_bin in "
                     "config.toml, or set vmm = qemu",
            )
        ok, detail = check_version(runner, binary)
        if not ok:
            raise HostError(f"unsupported Firecracker: {detail}",
                            hint="install a newer Firecracker release, or set vmm = qemu")
        if os.geteuid() == 0:
            jailed = jailer_binary(cfg) is not None
        else:
            if cfg.jailer_enabled is False:
                jailer_binary(cfg)  # refuses: an unjailed Firecracker needs root
            # The helper's jailer (it may sit where this user cannot look), or none.
            found, jailer = host.fc_status()
            if not (found and jailer):
                raise HostError(
                    "bangerd is not root, so Firecracker runs under its jailer, and the "
                    "root helper found no Firecracker and jailer when it started",
                    hint="install both (firecracker_bin, jailer_bin) and restart the "
                         "helper (`banger system install` again gives it what jails "
                         "need), or use vmm = qemu")
            jailed = True
        if jailed:
            # The in-process helper of a root daemon runs it as that user: made here.
            user = (ensure_user(runner, cfg.vmm_user) if os.geteuid() == 0
                    else lookup_user(cfg.vmm_user))
            if user is not None:
                check_unprivileged(user)
        return cls(runner, binary, jail=host if jailed else None, netns=cfg.jailer_netns)

    # ------------------------------------------------------------ VMMDriver

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        """Start Firecracker for ``plan`` and boot the guest, or load it paused from
        ``plan.restore`` (a :meth:`save`).

        Returns once InstanceStart (or the snapshot load) was accepted (the guest is
        booting, not booted).

        Raises:
            BadRequest: The plan asks for something Firecracker cannot do, or
                a socket path is too long.
            HostError: The jail could not be built.
            VMMError: Firecracker did not start or refused a request; the
                message names the request and Firecracker's fault_message.
        """
        check_machine(plan)
        if plan.restore is not None:
            return self.restore(plan, saved_files(plan.restore), resume=False)

        def boot(api: FirecrackerAPI, view: VMMView, info: InstanceInfo) -> None:
            info.state.check_can_become(InstanceState.RUNNING, "boot")
            configure(api, plan, view)
            api.instance_start()

        return self._run(plan, "start", boot)

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        """Press Ctrl-Alt-Del (see :func:`press_ctrl_alt_del`)."""
        try:
            return press_ctrl_alt_del(self._opener(plan_paths), ident)
        except BadRequest as exc:  # a path over the socket limit: nothing to press
            log.info("Ctrl-Alt-Del to pid %d failed: %s", ident.pid, exc)
            return False

    def cleanup(self, plan_paths: VMPaths) -> None:
        """Remove sockets, symlinks, metrics, the pid file, the jail and its cgroup.

        Call once the process is gone. Idempotent; the serial and VMM logs
        in the state directory are kept. The jailer leaves the cgroup it made
        behind (docs/jailer.md: cleanup is up to its caller), so it goes here.

        Raises:
            HostError: The jail directory could not be removed, or the cgroup
                still holds a process.
        """
        for path in _runtime_files(plan_paths):
            path.unlink(missing_ok=True)
        if self.jail is not None:
            self.jail.fc_cleanup(plan_paths.vm_id, wait_s=RELEASE_WAIT_S)

    # ------------------------------------------------------------ beyond the protocol

    def stop(self, plan_paths: VMPaths, ident: ProcessIdentity, *,
             grace_s: float = CTRL_ALT_DEL_GRACE_S) -> bool:
        """Ctrl-Alt-Del, bounded wait, then SIGKILL; True when the VMM is gone.

        See :func:`stop_gracefully`.
        """
        return stop_gracefully(self._opener(plan_paths), ident, grace_s=grace_s, send=self._signal)

    def instance_info(self, plan_paths: VMPaths) -> InstanceInfo:
        """``GET /`` of the VM's Firecracker."""
        with self._api(plan_paths) as api:
            return api.instance_info()

    def flush_metrics(self, plan_paths: VMPaths) -> None:
        """Make Firecracker write a metrics line to ``VMPaths.metrics`` now."""
        with self._api(plan_paths) as api:
            api.flush_metrics()

    def pause(self, plan_paths: VMPaths) -> None:
        """Stop the guest's vCPUs (memory and devices stay); a paused guest stays so.

        Raises:
            InvalidState: The VM was never started.
            VMMError: Firecracker refused.
        """
        with self._api(plan_paths) as api:
            state = api.instance_info().state
            if state is InstanceState.PAUSED:
                return
            state.check_can_become(InstanceState.PAUSED, "pause")
            api.pause()

    def resume(self, plan_paths: VMPaths) -> None:
        """Run a paused guest's vCPUs again; a running guest stays so.

        Raises:
            InvalidState: The VM was never started.
            VMMError: Firecracker refused.
        """
        with self._api(plan_paths) as api:
            state = api.instance_info().state
            if state is InstanceState.RUNNING:
                return
            state.check_can_become(InstanceState.RUNNING, "resume")
            api.resume()

    def save(self, plan_paths: VMPaths, into: Path,
             progress: Callable[[int], None] | None = None) -> int:
        """Pause the guest and write a full snapshot into ``into`` (:func:`saved_files`);
        the bytes written. Firecracker writes it in one request: ``progress`` hears
        only the total.

        Raises:
            InvalidState: The VM was never started.
            VMMError: Firecracker refused.
            HostError: A jailed snapshot could not be moved out of the jail.
        """
        self.pause(plan_paths)
        files = saved_files(into)
        self.snapshot(plan_paths, files)
        total = files.state.stat().st_size + files.memory.stat().st_size
        if progress is not None:
            progress(total)
        return total

    def version(self) -> str:
        """``firecracker --version``'s first line, asked once.

        Raises:
            HostError: the binary would not run.
        """
        if self._version is None:
            self._version = binary_version(self.runner, self.binary, "Firecracker")
        return self._version

    def reidentify(self, plan_paths: VMPaths, message: bytes) -> None:
        """Hand ``message`` to ``banger-ident``, which listens on guest vsock port
        ``IDENT_VSOCK_PORT``: a host-initiated connection through the VM's vsock socket
        (:mod:`.vsock`), made in the background since the guest accepts it only once
        :meth:`resume` ran its vCPUs.

        Raises:
            VMMError: the VM has no vsock socket.
        """
        what = f"vm {plan_paths.vm_id} identity"
        if self.jail is not None:
            host, vm_id = self.jail, plan_paths.vm_id
            vsock.hand_over(lambda: host.fc_connect(vm_id, "vsock"), IDENT_VSOCK_PORT, message,
                            what=what)
            return
        uds = plan_paths.vsock_socket
        if not uds.exists():
            raise VMMError(f"VM {plan_paths.vm_id} has no vsock socket ({uds}): its "
                           "clone cannot be given its own identity")
        vsock.hand_over(uds, IDENT_VSOCK_PORT, message, what=what)

    def check_clonable(self) -> None:
        """A Firecracker snapshot restores its disks at the paths it recorded: a jailed
        VM's are fixed names inside its own jail, an unjailed one's are the snapshotted
        VM's own files, which a clone must never open.

        Raises:
            BadRequest: Firecracker runs unjailed.
        """
        if self.jail is None:
            raise BadRequest("an unjailed Firecracker restores a snapshot onto the "
                             "snapshotted VM's own disks, so banger clones only jailed "
                             "Firecracker VMs",
                             hint="install Firecracker's jailer (jailer_bin) and leave "
                                  "jailer_enabled on, or use --vmm qemu")

    def snapshot(self, plan_paths: VMPaths, files: SnapshotFiles, *,
                 snapshot_type: SnapshotType = SnapshotType.FULL) -> None:
        """Write a snapshot of a paused VM to ``files``; the VM stays paused.

        Raises:
            InvalidState: The VM is not paused.
            VMMError: Firecracker refused.
            HostError: A jailed snapshot could not be moved out of the jail.
        """
        files.state.parent.mkdir(parents=True, exist_ok=True)
        files.memory.parent.mkdir(parents=True, exist_ok=True)
        with self._api(plan_paths) as api:
            state = api.instance_info().state
            if state is not InstanceState.PAUSED:
                raise InvalidState(f"cannot snapshot a Firecracker instance that is "
                                   f"{state.value!r}", hint="pause it first")
            if self.jail is None:
                api.create_snapshot(str(files.state), str(files.memory),
                                    snapshot_type=snapshot_type)
                return
            api.create_snapshot(JAIL_SNAPSHOT_STATE, JAIL_SNAPSHOT_MEM,
                                snapshot_type=snapshot_type)
        self.jail.fc_snapshot_out(plan_paths.vm_id, files.state, files.memory)

    def restore(self, plan: LaunchPlan, files: SnapshotFiles, *, resume: bool = True,
                override_tap: bool = True) -> ProcessIdentity:
        """Start a fresh Firecracker from a snapshot (a warm start).

        The plan's disks must be where they were when the snapshot was taken
        (jailed, they always are: the in-jail names are fixed). Only the
        logger and metrics are configured before the load, as Firecracker
        requires; the load leaves the VM paused and ``resume`` runs it.

        Args:
            plan: The VM to restore; its TAP and runtime paths are used.
            files: The snapshot.
            resume: Run the vCPUs after loading.
            override_tap: Tell Firecracker to use the VM's TAP instead of the
                TAP recorded in the snapshot (banger's TAPs come from a pool,
                so the name usually differs; in a namespace of its own it is the
                same). Needs a Firecracker release that knows ``network_overrides``.

        Raises:
            VMMError: Firecracker did not start or refused the load.
        """
        def load(api: FirecrackerAPI, view: VMMView, info: InstanceInfo) -> None:
            info.state.check_can_become(InstanceState.PAUSED, "restore a snapshot into")
            api.put_logger(view.log)
            api.put_metrics(view.metrics)
            state, memory = ((JAIL_RESTORE_STATE, JAIL_RESTORE_MEM) if view.jailed
                             else (str(files.state), str(files.memory)))
            api.load_snapshot(state, memory, resume_vm=False,
                              network_overrides={IFACE: view.tap} if override_tap else None)
            if resume:
                api.resume()

        return self._run(plan, "restore", load, restore=files)

    # ------------------------------------------------------------ internals

    def _run(
        self,
        plan: LaunchPlan,
        what: str,
        setup: Callable[[FirecrackerAPI, VMMView, InstanceInfo], None],
        restore: SnapshotFiles | None = None,
    ) -> ProcessIdentity:
        """Prepare files, start the process, wait for its API, run ``setup``.

        On any failure the process is killed and :meth:`cleanup` runs before
        the error propagates.
        """
        p = plan.paths
        if self.jail is None:
            view = direct_view(plan)  # its api_socket checks the 108-byte limit first
        ident: ProcessIdentity | None = None
        try:
            self._prepare_runtime(p)
            if self.jail is None:
                p.metrics.write_bytes(b"")
                ident = self._spawn(firecracker_argv(self.binary, view.api_socket, plan.marker),
                                    plan)
            else:
                view = jailed_view(plan, self.own_port)
                pid = self.jail.fc_launch(ops.FcLaunch(
                    vm_id=p.vm_id, files=jail_files(plan, restore), serial=str(p.serial_log),
                    memory_mib=plan.memory_mib, vcpu=plan.vcpu,
                    port=plan.tap if self.own_port else None))
                ident = self._identify(pid, plan)
            with self._api(p) as api:
                info = wait_for_api(api, ident, self.api_wait_s, p.serial_log)
                setup(api, view, info)
            log.info("vm %s: Firecracker pid %d (%s)", plan.name, ident.pid,
                     "jailed" if self.jail is not None else "unjailed")
            return ident
        except VMMError as exc:
            self._abort(p, ident)
            raise VMMError(f"cannot {what} Firecracker for {plan.name}: {exc.message}",
                           hint=f"see {p.vmm_log} and {p.serial_log}", **exc.details) from exc
        except OSError as exc:
            self._abort(p, ident)
            where = f" ({exc.filename})" if exc.filename else ""
            raise HostError(f"cannot {what} Firecracker for {plan.name}: "
                            f"{exc.strerror or exc}{where}") from exc
        except BaseException:
            self._abort(p, ident)
            raise

    def _api(self, p: VMPaths, timeout: float = REQUEST_TIMEOUT_S) -> FirecrackerAPI:
        """The VM's API: its socket, or (jailed) connections the helper hands over."""
        if self.jail is None:
            return FirecrackerAPI(p.api_socket, timeout=timeout)
        host, vm_id = self.jail, p.vm_id
        return FirecrackerAPI(Path(f"<the jail of vm {vm_id}>{JAIL_API_SOCKET}"),
                              timeout=timeout,
                              transport=HandedSocketTransport(
                                  lambda: host.fc_connect(vm_id, "api")))

    def _signal(self, ident: ProcessIdentity, sig: int) -> bool:
        """Signal the VMM: a jailed one (the VMM user's) through the helper."""
        if self.jail is not None:
            return self.jail.signal(ident, sig)
        return send_signal(ident, sig)

    def _opener(self, p: VMPaths) -> APIOpener:
        return lambda timeout: self._api(p, timeout)

    def _prepare_runtime(self, p: VMPaths) -> None:
        p.run.mkdir(parents=True, exist_ok=True)
        p.state.mkdir(parents=True, exist_ok=True)
        # Leftovers of an earlier run: Firecracker's bind() fails on a stale socket.
        for path in _runtime_files(p):
            path.unlink(missing_ok=True)
        # Each run starts fresh logs (as QEMU's -D does); Firecracker opens,
        # never creates, its log and metrics files, so they must exist.
        p.serial_log.write_bytes(b"")
        p.vmm_log.write_bytes(b"")

    def _spawn(self, argv: list[str], plan: LaunchPlan) -> ProcessIdentity:
        """Start ``argv`` detached (see ``_spawn.py``) and identify it."""
        p = plan.paths
        helper = Path(__file__).with_name("_spawn.py")
        try:
            res = self.runner.run(
                [sys.executable, "-I", str(helper), "--output", str(p.serial_log), "--", *argv],
                desc=f"start Firecracker for {plan.name}", timeout=SPAWN_TIMEOUT_S,
            )
        except CommandFailed as exc:
            raise VMMError(f"Firecracker did not start: "
                           f"{exc.details.get('stderr') or exc.message}") from exc
        try:
            pid = int(res.out.strip())
        except ValueError as exc:
            raise VMMError(f"the Firecracker launcher printed {res.out.strip()[:80]!r} "
                           "instead of a pid") from exc
        return self._identify(pid, plan)

    def _identify(self, pid: int, plan: LaunchPlan) -> ProcessIdentity:
        """Write the pid file and identify the process (its marker and start time)."""
        p = plan.paths
        atomic_write(p.pid_file, f"{pid}\n".encode(), mode=0o644)
        ident = identify(pid, plan.marker)
        if ident is None:
            raise VMMError(f"Firecracker (pid {pid}) exited right after starting"
                           + _serial_tail(p.serial_log))
        return ident

    def _abort(self, p: VMPaths, ident: ProcessIdentity | None) -> None:
        """Undo a failed start: kill the process, remove its files."""
        if ident is not None:
            try:
                if not kill(ident, send=self._signal):
                    log.error("Firecracker pid %d survived SIGKILL for %gs", ident.pid,
                              KILL_WAIT_S)
            except BangerError as exc:  # a refusal must not hide the first error
                log.error("killing Firecracker pid %d after a failed start: %s",
                          ident.pid, exc)
        try:
            self.cleanup(p)
        except BangerError as exc:
            log.error("cleanup after a failed start: %s", exc)


def _runtime_files(p: VMPaths) -> list[Path]:
    """The VM's Firecracker files in the runtime dir (sockets may be jail symlinks)."""
    files = [p.pid_file, p.metrics]
    sockets: tuple[Callable[[], Path], ...] = (lambda: p.api_socket, lambda: p.vsock_socket)
    for socket_path in sockets:
        # A path too long for a socket was never created; nothing to remove.
        with contextlib.suppress(BadRequest):
            files.append(socket_path())
    return files


if TYPE_CHECKING:
    def _satisfies_protocol(driver: FirecrackerDriver) -> VMMDriver:
        """Never called: lets mypy prove FirecrackerDriver is a VMMDriver."""
        return driver
