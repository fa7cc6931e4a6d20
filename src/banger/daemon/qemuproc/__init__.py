"""QEMU process primitives: the ``-M microvm`` command line, launch, QMP.

QEMU is banger's second VMM: it runs where Firecracker or a usable KVM is
missing (TCG), and it is how our own test machines boot real guests.
Devices are virtio-mmio (block, net), the serial console goes to a file and
control goes through QMP on a Unix socket. QEMU runs confined
(:mod:`banger.hostops.confine`): as the VMM user, under seccomp, in the VM's
cgroup, with its files handed over as descriptors. What needs root (the files,
the TAP, the cgroup, the launch itself) is a ``qemu.launch`` request to the host
operations (:mod:`banger.hostops`), whose launcher starts QEMU detached, so the
VMM outlives a daemon restart; the launch waits for QMP to answer, so errors in
device set-up (a busy tap, an unreadable file) come back from
:meth:`QemuDriver.launch`.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger.agent import wire
from banger.config import Config
from banger.daemon.qemuproc.qmp import QMPSession, qmp_command, wait_qmp_ready, wait_status
from banger.errors import HostError, VMMError
from banger.fsutil import atomic_write, tail
from banger.hostops import ops
from banger.hostops.cgroups import RELEASE_WAIT_S, CgroupHost, VMCgroup, detect, vm_group
from banger.hostops.client import HostOps
from banger.hostops.confine import SANDBOX, TCG_TB_SIZE_MIB, check_readable_by
from banger.layout import VMPaths, install_tag
from banger.proc import ProcessIdentity, cmdline, identify, matches
from banger.runner import Runner
from banger.vmm import LaunchPlan, binary_version
from banger.vmmuser import VMMUser, ensure_user

log = logging.getLogger("banger.qemu")

# A saved guest (QemuDriver.save) is QEMU's migration stream in this file of the
# saved-state directory, read back through the launcher descriptor RESTORE_FD.
MIGRATION_FILE = "qemu.migration"
RESTORE_FD = "restore"
SAVE_FD = "banger-save"  # the name the descriptor for `migrate` gets on the monitor
SAVE_BANDWIDTH = 16 << 30  # bytes/s: QEMU's default (32 MiB/s) is for live migration
SAVE_TIMEOUT_S = 600.0
RESTORE_TIMEOUT_S = 300.0  # reading the stream back; seconds for a GiB of memory
# The identity channel (LaunchPlan.ident_channel): a virtio-serial port the guest's
# banger-ident reads. Its QEMU end is a pipe chardev on a FIFO the launcher opens: QEMU
# reads what the daemon writes there (``reidentify``) and passes it to the guest.
IDENT_PORT = "org.banger.ident"
IDENT_FD = "ident"
AGENT_PORT = wire.PORT_NAME
LAUNCH_TIMEOUT_S = 30.0  # QMP answers after device init: seconds even under TCG


def machine_args(accel: str) -> list[str]:
    """``-M microvm`` with the legacy timers a stock distro kernel needs.

    Without the PIT a Debian kernel stalls calibrating the TSC under TCG; the
    PIC and RTC keep it off slow fallback paths.
    """
    cpu = "host" if accel == "kvm" else "max"
    return ["-M", "microvm,pit=on,pic=on,rtc=on", "-accel", accel, "-cpu", cpu]


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host TSC frequency in kHz (``cpu MHz`` of the first CPU), if readable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def tcg_kernel_args(tsc_khz: int | None) -> list[str]:
    """Kernel arguments a guest needs under TCG.

    A stock kernel calibrates its TSC against the PIT. Under TCG on a busy host
    that calibration fails often (measured here: 3 of 6 boots), the kernel then
    marks the TSC unstable and stalls silently before printing anything more.
    TCG's TSC runs at the host's rate, so handing the guest the host's frequency
    skips the calibration (10 of 10 boots reached userspace).
    """
    return [f"tsc_early_khz={tsc_khz}"] if tsc_khz else []


def build_argv(qemu_bin: str, plan: LaunchPlan, accel: str,
               tsc_khz: int | None = None) -> list[str]:
    """The QEMU command line for ``plan``.

    Every file, the TAP and the QMP socket are ``{fd:NAME}`` placeholders the
    host operations' launcher replaces with descriptors opened as root (see
    :func:`launch_request`): QEMU, running as the VMM user, opens nothing under
    banger's directories by path.
    """
    cmdline = plan.cmdline
    if accel == "tcg":
        cmdline = " ".join([cmdline, *tcg_kernel_args(tsc_khz)])
        accel_arg = f"tcg,tb-size={TCG_TB_SIZE_MIB}"  # bounded: the cgroup counts it
    else:
        accel_arg = accel
    machine = machine_args(accel)
    machine[machine.index("-accel") + 1] = accel_arg
    argv = [
        qemu_bin,
        # -name carries the marker that /proc identity checks and sweeps look for.
        "-name", f"{plan.marker},debug-threads=off",
        *machine,
        "-m", str(plan.memory_mib),
        "-smp", str(plan.vcpu),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-sandbox", SANDBOX,
        "-kernel", _fd("kernel"),
    ]
    if plan.initrd is not None:
        argv += ["-initrd", _fd("initrd")]
    argv += [
        "-append", cmdline,
        "-drive", f"id=root,file={_fd('rootfs')},format=raw,if=none,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=work,file={_fd('work')},format=raw,if=none,cache=writeback,discard=unmap",
        "-device", "virtio-blk-device,drive=work",
    ]
    for i, _ in enumerate(plan.extra_disks):
        argv += [
            "-drive", f"id=extra{i},file={_fd(f'extra{i}')},format=raw,if=none,cache=writeback",
            "-device", f"virtio-blk-device,drive=extra{i}",
        ]
    argv += [
        "-netdev", "tap,id=net0,fd={fd:tap}",
        "-device", f"virtio-net-device,netdev=net0,mac={plan.mac}",
        *(_channel_args(agent=plan.agent_port) if plan.ident_channel else []),
        "-serial", f"file:{_fd('serial')}",
        "-chardev", "socket,id=qmp,fd={fd:qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if plan.restore is not None:
        # Load the saved guest instead of booting the kernel (the -kernel above only
        # sizes the machine like the one that was saved), and keep its vCPUs stopped.
        argv += ["-incoming", "fd:{fd:" + RESTORE_FD + "}", "-S"]
    return argv


def _channel_args(*, agent: bool) -> list[str]:
    """The identity channel's devices, and the agent's port with ``agent``.

    The identity channel is a pipe chardev, which opens ``<path>.in``/``.out``, else
    ``path`` itself read-write: here the FIFO, through the launcher's descriptor. What a
    guest writes to its port comes back to it (QEMU reads the same FIFO); nothing on the
    host reads it. The agent's port is a socket QEMU serves (bound by the launcher, like
    QMP's), one client at a time. A guest saved with one port is restored with one:
    ``max_ports`` is part of the saved device state.
    """
    args = [
        "-device", f"virtio-serial-device,max_ports={3 if agent else 2}",
        "-chardev", f"pipe,id=ident,path={_fd(IDENT_FD)}",
        "-device", f"virtserialport,chardev=ident,name={IDENT_PORT}",
    ]
    if agent:
        args += [
            "-chardev", "socket,id=agent,fd={fd:agent},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        ]
    return args


def _own_netns(pid: int) -> bool:
    """Whether process ``pid`` is in another network namespace than this process (False
    when that cannot be read: a QEMU started before banger gave it one of its own, or
    not ours to look at)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def _fd(name: str) -> str:
    """A file QEMU re-opens through the descriptor the launcher holds for it."""
    return "/proc/self/fd/{fd:" + name + "}"


def launch_request(plan: LaunchPlan, args: list[str], accel: str) -> ops.QemuLaunch:
    """The ``qemu.launch`` request for ``plan``: ``args`` (QEMU's command line after the
    binary) and the files QEMU gets as descriptors; the disks, the serial log and the
    identity FIFO are handed to the VMM user."""
    p = plan.paths
    files: dict[str, ops.VMFile] = {
        "kernel": ops.VMFile(path=str(plan.kernel), mode="r"),
        "rootfs": ops.VMFile(path=plan.rootfs, mode="rw", give=True),
        "work": ops.VMFile(path=plan.work_disk, mode="rw", give=True),
        "serial": ops.VMFile(path=str(p.serial_log), mode="rw", give=True)}
    if plan.initrd is not None:
        files["initrd"] = ops.VMFile(path=str(plan.initrd), mode="r")
    if plan.restore is not None:
        files[RESTORE_FD] = ops.VMFile(path=str(plan.restore / MIGRATION_FILE), mode="r")
    if plan.ident_channel:
        # a FIFO: read-write never blocks
        files[IDENT_FD] = ops.VMFile(path=str(p.ident_fifo), mode="rw", give=True)
    for i, disk in enumerate(plan.extra_disks):
        files[f"extra{i}"] = ops.VMFile(path=disk, mode="rw", give=True)
    return ops.QemuLaunch(vm_id=plan.vm_id, args=args, files=files, tap=plan.tap,
                          qmp=str(p.qmp_socket), stderr=str(p.vmm_log),
                          agent=str(p.agent_socket) if plan.agent_port else None,
                          memory_mib=plan.memory_mib, vcpu=plan.vcpu,
                          accel=accel)  # type: ignore[arg-type]


class QemuDriver:
    """The QEMU VMM driver: QEMU confined (user, seccomp, cgroup) and detached."""

    name = "qemu"
    own_port = False  # QEMU gets its TAP as a descriptor from the pool's
    agent_port = True  # the guest agent's virtio-serial port (LaunchPlan.agent_channel)

    def __init__(self, runner: Runner, qemu_bin: str, accel: str, *, user: VMMUser,
                 cgroups: CgroupHost, install_tag: str, host: HostOps) -> None:
        self.runner = runner
        self.host = host
        self.qemu_bin = qemu_bin
        self.accel = accel
        self.user = user
        self.cgroups = cgroups
        self.install_tag = install_tag
        self._version: str | None = None

    @classmethod
    def from_config(cls, cfg: Config, runner: Runner, qemu_bin: str, accel: str,
                    host: HostOps) -> QemuDriver:
        """The driver for ``cfg``: creates the VMM user if missing, finds the cgroup hierarchy.

        Raises:
            HostError: the user cannot be created, or no cgroup hierarchy has the
                controllers banger needs.
        """
        return cls(runner, qemu_bin, accel, user=ensure_user(runner, cfg.vmm_user),
                   cgroups=detect(), install_tag=install_tag(cfg.state_dir), host=host)

    def cgroup(self, vm_id: str) -> VMCgroup:
        """VM ``vm_id``'s cgroup (it may not exist)."""
        return self.cgroups.group(vm_group(self.install_tag, vm_id))

    def prepare(self, plan: LaunchPlan) -> None:
        """The VM's directories, fresh logs and identity FIFO; the boot files checked.

        The disks, the serial log and the FIFO are handed to the VMM user by the
        launch request (QEMU re-opens them through /proc/self/fd, which checks the
        file's own permissions); they stay in the daemon's 0700 directories, so
        nobody else reaches them by path. The boot files must be readable by it.
        """
        p = plan.paths
        p.run.mkdir(parents=True, exist_ok=True)
        p.state.mkdir(parents=True, exist_ok=True)
        os.chmod(p.run, 0o700)
        p.pid_file.unlink(missing_ok=True)
        p.vmm_log.write_bytes(b"")
        p.serial_log.write_bytes(b"")
        if plan.ident_channel:
            p.ident_fifo.unlink(missing_ok=True)
            os.mkfifo(p.ident_fifo, 0o600)
        check_readable_by(plan.kernel, self.user, "kernel")
        if plan.initrd is not None:
            check_readable_by(plan.initrd, self.user, "initrd")

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        """Start QEMU confined for ``plan`` and wait until its QMP monitor answers
        (:func:`wait_qmp_ready`: devices are set up, the guest runs).

        The host operations make the VM's cgroup with its limits, open its files and
        TAP, bind QMP and start QEMU inside the cgroup (``qemu.launch``).

        Raises:
            VMMError: QEMU failed to start (reason from its log), or exited or
                did not answer QMP within :data:`LAUNCH_TIMEOUT_S`.
            HostError: the files, the cgroup or the VMM user could not be set up.
        """
        p = plan.paths
        try:
            self.prepare(plan)
        except OSError as exc:
            raise HostError(f"cannot prepare {plan.name}'s files for QEMU: {exc.strerror} "
                            f"({exc.filename})") from exc
        tsc_khz = host_tsc_khz() if self.accel == "tcg" else None  # only TCG uses it
        args = build_argv(self.qemu_bin, plan, self.accel, tsc_khz)[1:]
        try:
            pid = self.host.qemu_launch(launch_request(plan, args, self.accel))
        except VMMError as exc:
            log.warning("QEMU for %s failed: %s", plan.name, exc.message)
            raise VMMError(f"QEMU failed to start {plan.name}: {exc.message}",
                           hint=f"QEMU's log: {p.vmm_log}") from exc
        ident = identify(pid, plan.marker)
        if ident is None or not wait_qmp_ready(p.qmp_socket, LAUNCH_TIMEOUT_S):
            # QEMU's stderr is vmm.log: a start-up error is its last line. A QEMU still
            # alive without answering is torn down by the caller (boot), like any failure.
            reason = _last_line(tail(p.vmm_log, 2000)) or (
                f"no answer on QMP within {LAUNCH_TIMEOUT_S:.0f}s"
                if ident is not None and matches(ident) else "it exited, saying nothing")
            raise VMMError(f"QEMU failed to start {plan.name}: {reason}",
                           hint=f"QEMU's log: {p.vmm_log}")
        atomic_write(p.pid_file, f"{pid}\n".encode())
        if plan.restore is not None:
            self._wait_restored(plan)
        return ident

    def _wait_restored(self, plan: LaunchPlan) -> None:
        """Wait for an ``-incoming`` QEMU to have read the saved guest (it then stays
        paused, ``-S``).

        Raises:
            VMMError: the stream did not load (QEMU exits saying why in its log), or not
                within :data:`RESTORE_TIMEOUT_S`.
        """
        try:
            with QMPSession(plan.paths.qmp_socket, timeout_s=RESTORE_TIMEOUT_S) as qmp:
                wait_status(qmp, lambda st: st != "inmigrate", RESTORE_TIMEOUT_S,
                            "loading the saved guest")
        except VMMError as exc:
            reason = _last_line(tail(plan.paths.vmm_log, 2000)) or exc.message
            raise VMMError(f"QEMU could not restore {plan.name}: {reason}",
                           hint=f"QEMU's log: {plan.paths.vmm_log}") from exc

    def confinement(self, vm_id: str, pid: int | None = None) -> dict[str, Any]:
        """How VM ``vm_id``'s VMM is confined, for ``vm show``: user, seccomp, its network
        namespace, cgroup. A VMM just launched has an empty namespace of its own (the
        launcher's ``own_netns``); one found running (``pid``) is looked at, and a VMM
        whose namespace cannot be read (a daemon that is not root) claims none."""
        conf = {"user": self.user.name, "uid": self.user.uid, "seccomp": SANDBOX,
                "cgroup": self.cgroup(vm_id).to_json()}
        if pid is None or _own_netns(pid):
            conf["netns"] = "own"
        return conf

    def readopt(self, vm_id: str, pid: int) -> dict[str, Any]:
        """A live VMM found after a daemon restart: make sure it is in its cgroup.

        A VMM started before banger confined VMs (or whose cgroup was removed by
        hand) gets its cgroup made and is moved in. Returns :meth:`confinement`.

        Raises:
            HostError: the cgroup could not be made or the process moved into it.
        """
        group = self.cgroup(vm_id)
        if not group.holds(pid):
            if not group.exists():
                memory, vcpu = _vm_size(pid)
                self.host.cgroup_create(vm_id, memory, vcpu)
            ident = identify(pid, f"banger-{vm_id}")
            if ident is None:
                raise HostError(f"VM {vm_id}'s VMM (pid {pid}) is gone")
            self.host.cgroup_adopt(ident)
            log.info("vm %s: moved VMM pid %d into cgroup %s", vm_id, pid, group.describe())
        return self.confinement(vm_id, pid)

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        """Send ``system_powerdown`` (ACPI) over QMP; False if QMP did not answer."""
        try:
            qmp_command(plan_paths.qmp_socket, "system_powerdown")
        except VMMError:
            return False
        return True

    def pause(self, plan_paths: VMPaths) -> None:
        """QMP ``stop``: the vCPUs stop where they are.

        Raises:
            VMMError: QMP failed.
        """
        qmp_command(plan_paths.qmp_socket, "stop")

    def resume(self, plan_paths: VMPaths) -> None:
        """QMP ``cont``: the vCPUs run again.

        Raises:
            VMMError: QMP failed.
        """
        qmp_command(plan_paths.qmp_socket, "cont")

    def save(self, plan_paths: VMPaths, into: Path,
             progress: Callable[[int], None] | None = None) -> int:
        """Migrate the stopped guest into ``into/qemu.migration``; the bytes written.

        The file is opened here, by the daemon, and handed to QEMU over QMP (``getfd``): QEMU,
        confined, opens nothing by path and may not spawn a helper. The guest is
        stopped first (a no-op when it already is); QEMU is left in ``postmigrate``,
        paused, for the caller to quit or resume.

        Raises:
            VMMError: QMP failed or the migration did, or took over
                :data:`SAVE_TIMEOUT_S`.
            HostError: the file could not be made.
        """
        dest = into / MIGRATION_FILE
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HostError(f"cannot create {dest}: {exc.strerror}") from exc
        try:
            with QMPSession(plan_paths.qmp_socket) as qmp:
                qmp.execute("stop")
                qmp.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})
                qmp.execute("getfd", {"fdname": SAVE_FD}, fds=(fd,))
                qmp.execute("migrate", {"uri": f"fd:{SAVE_FD}"})
                _wait_migrated(qmp, progress)
            os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def version(self) -> str:
        """``qemu --version``'s first line, asked once.

        Raises:
            HostError: the binary would not run.
        """
        if self._version is None:
            self._version = binary_version(self.runner, self.qemu_bin, "QEMU")
        return self._version

    def check_clonable(self) -> None:
        """Every QEMU guest can be cloned: its disks are named on the command line of the
        QEMU that restores it, and its identity channel is a virtio-serial port."""

    def reidentify(self, plan_paths: VMPaths, message: bytes) -> None:
        """Write ``message`` into the identity channel's FIFO in one write (at most
        ``PIPE_BUF`` bytes: never interleaved, never partial). QEMU passes it to the
        guest's port once the guest reads it; a paused guest gets it when it runs.

        Raises:
            VMMError: the VM has no identity channel (QEMU holds no reader on the FIFO),
                or the FIFO is full.
        """
        if len(message) > select.PIPE_BUF:
            raise VMMError(f"an identity message of {len(message)} bytes is over "
                           f"{select.PIPE_BUF}")
        try:
            fd = os.open(plan_paths.ident_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise VMMError(f"the guest's identity channel is not there: {exc.strerror}",
                           hint="a VM started by an older banger has none; "
                                "stop and start it to get one") from exc
        try:
            written = os.write(fd, message)
        except OSError as exc:
            raise VMMError(f"cannot write to the identity channel: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if written != len(message):
            raise VMMError("the identity channel took part of the message")

    def quit(self, plan_paths: VMPaths) -> bool:
        """Ask QEMU to exit at once (like pulling the plug, but through QMP)."""
        try:
            qmp_command(plan_paths.qmp_socket, "quit")
        except VMMError:
            return False
        return True

    def cleanup(self, plan_paths: VMPaths) -> None:
        """Remove the pid file, the QMP socket and the VM's cgroup after QEMU is gone.

        Raises:
            HostError: the cgroup still holds a process.
        """
        for f in (plan_paths.pid_file, plan_paths.run / "qmp.sock", plan_paths.ident_fifo):
            f.unlink(missing_ok=True)
        self.host.cgroup_remove(plan_paths.vm_id, wait_s=RELEASE_WAIT_S)


def _vm_size(pid: int) -> tuple[int, int]:
    """Guest memory (MiB) and vCPUs from a running QEMU's ``-m`` and ``-smp``."""
    argv = cmdline(pid)
    try:
        return int(argv[argv.index("-m") + 1]), int(argv[argv.index("-smp") + 1])
    except (ValueError, IndexError):
        raise HostError(f"cannot read -m/-smp from QEMU pid {pid}'s command line") from None


def _wait_migrated(qmp: QMPSession, progress: Callable[[int], None] | None) -> None:
    """Poll ``query-migrate`` until it completed; ``progress`` hears the bytes so far.

    Raises:
        VMMError: the migration failed or was cancelled, or took over
            :data:`SAVE_TIMEOUT_S`.
    """
    deadline = time.monotonic() + SAVE_TIMEOUT_S
    while True:
        info = qmp.execute("query-migrate")
        info = info if isinstance(info, dict) else {}
        status = str(info.get("status", ""))
        ram = info.get("ram") if isinstance(info.get("ram"), dict) else {}
        done = ram.get("transferred") if isinstance(ram, dict) else None
        if progress is not None and isinstance(done, int):
            progress(done)
        if status == "completed":
            return
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            why = str(info.get("error-desc") or status or "no status")[:200]
            raise VMMError(f"saving the guest failed: {why}")
        time.sleep(0.1)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
