"""The Firecracker VMM driver: launch, configure over the API, stop, snapshot.

A launch is: prepare the runtime files (and the jail, when jailed), start
Firecracker detached with ``--api-sock`` and ``--id <marker>``, record its
pid, wait for the API to answer, ``PUT`` the logger, metrics, machine,
kernel, drives, NIC and vsock, then ``InstanceStart``. If any step fails the
process is killed and its files removed before the error reaches the caller,
so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from banger.config import Config
from banger.errors import BadRequest, CommandFailed, HostError, InvalidState, VMMError
from banger.fsutil import atomic_write, tail
from banger.hostops.cgroups import RELEASE_WAIT_S, CgroupHost, limits_for
from banger.layout import VMPaths
from banger.proc import ProcessIdentity, identify, matches, send_signal, wait_gone
from banger.runner import Runner
from banger.vmm import IDENT_VSOCK_PORT, LaunchPlan, VMMDriver, binary_version, vm_marker

from . import vsock
from .api import FirecrackerAPI, InstanceInfo, InstanceState, SnapshotType
from .host import check_version, find_firecracker, jailer_settings
from .jail import (
    JAIL_API_SOCKET,
    JAIL_INITRD,
    JAIL_KERNEL,
    JAIL_LOG,
    JAIL_METRICS,
    JAIL_ROOTFS,
    JAIL_SNAPSHOT_MEM,
    JAIL_SNAPSHOT_STATE,
    JAIL_VSOCK,
    JAIL_WORK_DISK,
    Exposure,
    JailerSettings,
    JailLayout,
    check_exec_file,
    firecracker_argv,
    jail_extra_disk,
    jailer_argv,
    move_out,
    plan_exposures,
    prepare_jail,
    remove_jail,
)

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
        extra_disks=plan.extra_disks,
    )


def jailed_view(plan: LaunchPlan) -> VMMView:
    """What a jailed Firecracker is told: the fixed names inside its chroot."""
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
        extra_disks=tuple(jail_extra_disk(i) for i, _ in enumerate(plan.extra_disks)),
    )


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
    api.put_network_interface(IFACE, plan.tap, plan.mac)
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


def kill(ident: ProcessIdentity, wait_s: float = KILL_WAIT_S) -> bool:
    """SIGKILL the process if it is still ``ident``; True once it is gone.

    The signal goes through a pidfd opened after the identity check
    (:func:`banger.proc.send_signal`), so a recycled pid is never hit.
    """
    send_signal(ident, signal.SIGKILL)
    return wait_gone(ident, wait_s)


def press_ctrl_alt_del(api_socket: Path, ident: ProcessIdentity) -> bool:
    """Press Ctrl-Alt-Del through the API; True if Firecracker accepted it.

    Nothing is sent when ``ident`` no longer names the running VMM.
    """
    if not matches(ident):
        return False
    try:
        with FirecrackerAPI(api_socket, timeout=SHUTDOWN_REQUEST_TIMEOUT_S) as api:
            api.send_ctrl_alt_del()
    except VMMError as exc:
        log.info("Ctrl-Alt-Del to pid %d failed: %s", ident.pid, exc)
        return False
    return True


def stop_gracefully(api_socket: Path, ident: ProcessIdentity, *,
                    grace_s: float = CTRL_ALT_DEL_GRACE_S,
                    kill_wait_s: float = KILL_WAIT_S) -> bool:
    """Ctrl-Alt-Del, wait up to ``grace_s``, then SIGKILL; True when the VMM is gone.

    A process that no longer matches ``ident`` (exited, or its pid now
    belongs to someone else) counts as gone and is never signalled.

    Args:
        api_socket: The VM's API socket (or its symlink).
        ident: The Firecracker process.
        grace_s: How long the guest may take to shut down after Ctrl-Alt-Del.
        kill_wait_s: How long to wait for the process to vanish after SIGKILL.
    """
    if not matches(ident):
        return True
    if press_ctrl_alt_del(api_socket, ident):
        if wait_gone(ident, grace_s):
            return True
        log.warning("Firecracker pid %d still runs %gs after Ctrl-Alt-Del; killing it",
                    ident.pid, grace_s)
    return kill(ident, kill_wait_s)


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
        jailer: JailerSettings | None = None,
        chroot_base: Path | None = None,
        api_wait_s: float = API_SOCKET_WAIT_S,
    ) -> None:
        """A driver for one Firecracker binary.

        Args:
            runner: The subprocess chokepoint (starts the detaching helper).
            binary: Absolute path of the Firecracker executable.
            jailer: Run under the jailer with these settings; None for unjailed.
            chroot_base: Where jails live, so a jail left by an earlier
                configuration is still found and removed (default: the
                jailer's, else none).
            api_wait_s: Budget for the API socket to answer after start.

        Raises:
            BadRequest: ``jailer`` is given and the jailer cannot exec ``binary``.
        """
        if jailer is not None:
            check_exec_file(binary)  # refuse now, not at the first VM start
        self.runner = runner
        self.binary = binary
        self.jailer = jailer
        self.chroot_base = chroot_base or (jailer.chroot_base if jailer else None)
        self.api_wait_s = api_wait_s
        self._version: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, runner: Runner, *,
                    cgroups: CgroupHost | None = None) -> FirecrackerDriver:
        """Build the driver from the config, checking the binaries exist.

        Jailed, Firecracker runs as the VMM user (created if missing) in a
        cgroup of its own (see :func:`~.host.jailer_settings`).

        Args:
            cfg: The configuration.
            runner: The subprocess chokepoint.
            cgroups: The cgroup hierarchy (default: this host's).

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
        return cls(runner, binary, jailer=jailer_settings(cfg, runner, cgroups=cgroups),
                   chroot_base=cfg.jailer_chroot_base)

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
            api_socket = plan_paths.api_socket
        except BadRequest as exc:  # a path over the socket limit: nothing to press
            log.info("Ctrl-Alt-Del to pid %d failed: %s", ident.pid, exc)
            return False
        return press_ctrl_alt_del(api_socket, ident)

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
        layout = self._layout_for(plan_paths)
        if layout is not None:
            remove_jail(layout)
        if self.jailer is not None:
            self.jailer.cgroup(vm_marker(plan_paths.vm_id)).remove(wait_s=RELEASE_WAIT_S)

    # ------------------------------------------------------------ beyond the protocol

    def stop(self, plan_paths: VMPaths, ident: ProcessIdentity, *,
             grace_s: float = CTRL_ALT_DEL_GRACE_S) -> bool:
        """Ctrl-Alt-Del, bounded wait, then SIGKILL; True when the VMM is gone.

        See :func:`stop_gracefully`.
        """
        return stop_gracefully(plan_paths.api_socket, ident, grace_s=grace_s)

    def instance_info(self, plan_paths: VMPaths) -> InstanceInfo:
        """``GET /`` of the VM's Firecracker."""
        with FirecrackerAPI(plan_paths.api_socket) as api:
            return api.instance_info()

    def flush_metrics(self, plan_paths: VMPaths) -> None:
        """Make Firecracker write a metrics line to ``VMPaths.metrics`` now."""
        with FirecrackerAPI(plan_paths.api_socket) as api:
            api.flush_metrics()

    def pause(self, plan_paths: VMPaths) -> None:
        """Stop the guest's vCPUs (memory and devices stay); a paused guest stays so.

        Raises:
            InvalidState: The VM was never started.
            VMMError: Firecracker refused.
        """
        with FirecrackerAPI(plan_paths.api_socket) as api:
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
        with FirecrackerAPI(plan_paths.api_socket) as api:
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
        uds = plan_paths.vsock_socket
        if not uds.exists():
            raise VMMError(f"VM {plan_paths.vm_id} has no vsock socket ({uds}): its "
                           "clone cannot be given its own identity")
        vsock.hand_over(uds, IDENT_VSOCK_PORT, message, what=f"vm {plan_paths.vm_id} identity")

    def check_clonable(self) -> None:
        """A Firecracker snapshot restores its disks at the paths it recorded: a jailed
        VM's are fixed names inside its own jail, an unjailed one's are the snapshotted
        VM's own files, which a clone must never open.

        Raises:
            BadRequest: Firecracker runs unjailed.
        """
        if self.jailer is None:
            raise BadRequest("an unjailed Firecracker restores a snapshot onto the "
                             "snapshotted VM's own disks, so banger clones only jailed "
                             "Firecracker VMs",
                             hint="run bangerd as root with the jailer installed "
                                  "(jailer_enabled), or use --vmm qemu")

    def snapshot(self, plan_paths: VMPaths, files: SnapshotFiles, *,
                 snapshot_type: SnapshotType = SnapshotType.FULL) -> None:
        """Write a snapshot of a paused VM to ``files``; the VM stays paused.

        Raises:
            InvalidState: The VM is not paused.
            VMMError: Firecracker refused.
            HostError: A jailed snapshot could not be moved out of the jail.
        """
        layout = self._existing_jail(plan_paths)
        with FirecrackerAPI(plan_paths.api_socket) as api:
            state = api.instance_info().state
            if state is not InstanceState.PAUSED:
                raise InvalidState(f"cannot snapshot a Firecracker instance that is "
                                   f"{state.value!r}", hint="pause it first")
            if layout is None:
                files.state.parent.mkdir(parents=True, exist_ok=True)
                files.memory.parent.mkdir(parents=True, exist_ok=True)
                api.create_snapshot(str(files.state), str(files.memory),
                                    snapshot_type=snapshot_type)
                return
            api.create_snapshot(JAIL_SNAPSHOT_STATE, JAIL_SNAPSHOT_MEM,
                                snapshot_type=snapshot_type)
        move_out(layout.host_path(JAIL_SNAPSHOT_STATE), files.state)
        move_out(layout.host_path(JAIL_SNAPSHOT_MEM), files.memory)

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
            override_tap: Tell Firecracker to use ``plan.tap`` instead of the
                TAP recorded in the snapshot (banger's TAPs come from a pool,
                so the name usually differs). Needs a Firecracker release
                that knows ``network_overrides``.

        Raises:
            VMMError: Firecracker did not start or refused the load.
        """
        def load(api: FirecrackerAPI, view: VMMView, info: InstanceInfo) -> None:
            info.state.check_can_become(InstanceState.PAUSED, "restore a snapshot into")
            api.put_logger(view.log)
            api.put_metrics(view.metrics)
            state, memory = ((JAIL_SNAPSHOT_STATE, JAIL_SNAPSHOT_MEM) if view.jailed
                             else (str(files.state), str(files.memory)))
            api.load_snapshot(state, memory, resume_vm=False,
                              network_overrides={IFACE: plan.tap} if override_tap else None)
            if resume:
                api.resume()

        extra = [Exposure(files.state, JAIL_SNAPSHOT_STATE, writable=False),
                 Exposure(files.memory, JAIL_SNAPSHOT_MEM, writable=False)]
        return self._run(plan, "restore", load, extra)

    # ------------------------------------------------------------ internals

    def _run(
        self,
        plan: LaunchPlan,
        what: str,
        setup: Callable[[FirecrackerAPI, VMMView, InstanceInfo], None],
        extra: list[Exposure] | None = None,
    ) -> ProcessIdentity:
        """Prepare files, start the process, wait for its API, run ``setup``.

        On any failure the process is killed and :meth:`cleanup` runs before
        the error propagates.
        """
        p = plan.paths
        api_socket = p.api_socket  # checks the 108-byte limit before anything starts
        ident: ProcessIdentity | None = None
        try:
            self._prepare_runtime(p)
            view, argv = self._prepare_process(plan, extra or [])
            ident = self._spawn(argv, plan)
            with FirecrackerAPI(api_socket) as api:
                info = wait_for_api(api, ident, self.api_wait_s, p.serial_log)
                setup(api, view, info)
            log.info("vm %s: Firecracker pid %d (%s)", plan.name, ident.pid,
                     f"jailed as {self.jailer.user.describe()}" if self.jailer else "unjailed")
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

    def _prepare_process(self, plan: LaunchPlan, extra: list[Exposure]) -> tuple[VMMView,
                                                                                   list[str]]:
        """The jail (or its absence), the view Firecracker gets, and its argv."""
        p = plan.paths
        stale = self._layout_for(p)
        if stale is not None:
            remove_jail(stale)  # e.g. the jailer was switched off since the last run
        if self.jailer is None:
            p.metrics.write_bytes(b"")
            view = direct_view(plan)
            return view, firecracker_argv(self.binary, view.api_socket, plan.marker)
        layout = JailLayout.for_vm(self.jailer.chroot_base, self.binary, plan.marker)
        items = plan_exposures(plan) + extra
        prepare_jail(layout, self.jailer, p, items)
        # jailer_argv passes --api-sock JAIL_API_SOCKET, which the jailed view names.
        return jailed_view(plan), jailer_argv(self.jailer, self.binary, plan.marker,
                                              limits_for(plan.memory_mib, plan.vcpu))

    def _spawn(self, argv: list[str], plan: LaunchPlan) -> ProcessIdentity:
        """Start ``argv`` detached (see ``_spawn.py``); write the pid file; identify it."""
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
        atomic_write(p.pid_file, f"{pid}\n".encode(), mode=0o644)
        ident = identify(pid, plan.marker)
        if ident is None:
            raise VMMError(f"Firecracker (pid {pid}) exited right after starting"
                           + _serial_tail(p.serial_log))
        return ident

    def _abort(self, p: VMPaths, ident: ProcessIdentity | None) -> None:
        """Undo a failed start: kill the process, remove its files."""
        if ident is not None and not kill(ident):
            log.error("Firecracker pid %d survived SIGKILL for %gs", ident.pid, KILL_WAIT_S)
        try:
            self.cleanup(p)
        except HostError as exc:
            log.error("cleanup after a failed start: %s", exc)

    def _layout_for(self, p: VMPaths) -> JailLayout | None:
        """Where this VM's jail would be, if jails are possible here at all."""
        if self.chroot_base is None:
            return None
        try:
            return JailLayout.for_vm(self.chroot_base, self.binary, vm_marker(p.vm_id))
        except BadRequest:
            return None

    def _existing_jail(self, p: VMPaths) -> JailLayout | None:
        layout = self._layout_for(p)
        return layout if layout is not None and layout.root.is_dir() else None


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
