"""QEMU process primitives: the ``-M microvm`` command line, launch, QMP.

QEMU is banger's second VMM: it runs where Firecracker or a usable KVM is
missing (TCG), and it is how our own test machines boot real guests.
Devices are virtio-mmio (block, net), the serial console goes to a file and
control goes through QMP on a Unix socket. QEMU daemonizes itself, so errors
in device set-up (a busy tap, a missing file) come back synchronously from
the launching process and the VMM outlives a daemon restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

from banger.errors import CommandFailed, VMMError
from banger.fsutil import tail
from banger.layout import VMPaths
from banger.proc import ProcessIdentity, identify
from banger.runner import Runner
from banger.vmm import LaunchPlan

log = logging.getLogger("banger.qemu")

LAUNCH_TIMEOUT_S = 30.0  # daemonize returns after device init; seconds even under TCG
QMP_TIMEOUT_S = 5.0


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
    """The full QEMU command line for ``plan``."""
    p = plan.paths
    cmdline = plan.cmdline
    if accel == "tcg":
        cmdline = " ".join([cmdline, *tcg_kernel_args(tsc_khz)])
    argv = [
        qemu_bin,
        # -name carries the marker that /proc identity checks and sweeps look for.
        "-name", f"{plan.marker},debug-threads=off",
        *machine_args(accel),
        "-m", str(plan.memory_mib),
        "-smp", str(plan.vcpu),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(plan.kernel),
    ]
    if plan.initrd is not None:
        argv += ["-initrd", str(plan.initrd)]
    argv += [
        "-append", cmdline,
        "-drive", f"id=root,file={plan.rootfs},format=raw,if=none,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=work,file={plan.work_disk},format=raw,if=none,cache=writeback,discard=unmap",
        "-device", "virtio-blk-device,drive=work",
        "-netdev", f"tap,id=net0,ifname={plan.tap},script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=net0,mac={plan.mac}",
        "-serial", f"file:{p.serial_log}",
        "-qmp", f"unix:{p.qmp_socket},server=on,wait=off",
        "-D", str(p.vmm_log),
        "-pidfile", str(p.pid_file),
        "-daemonize",
    ]
    return argv


class QemuDriver:
    """The QEMU VMM driver."""

    name = "qemu"

    def __init__(self, runner: Runner, qemu_bin: str, accel: str) -> None:
        self.runner = runner
        self.qemu_bin = qemu_bin
        self.accel = accel

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        """Start QEMU daemonized for ``plan`` and identify it from its pid file.

        Raises:
            VMMError: QEMU failed to start (reason from stderr or its ``-D`` log), left
                no pid file, or exited right after starting.
        """
        p = plan.paths
        p.run.mkdir(parents=True, exist_ok=True)
        p.state.mkdir(parents=True, exist_ok=True)
        p.pid_file.unlink(missing_ok=True)
        p.serial_log.write_bytes(b"")
        tsc_khz = host_tsc_khz() if self.accel == "tcg" else None  # only TCG uses it
        argv = build_argv(self.qemu_bin, plan, self.accel, tsc_khz)
        try:
            self.runner.run(argv, desc=f"start QEMU for {plan.name}", timeout=LAUNCH_TIMEOUT_S)
        except CommandFailed as exc:
            # With -D, QEMU reports start-up errors in the log file, not on stderr.
            log.warning("QEMU for %s failed: %s", plan.name, exc.message)
            reason = (str(exc.details.get("stderr") or "").strip()
                      or _last_line(tail(p.vmm_log, 2000))
                      or f"exit status {exc.details.get('returncode')}")
            raise VMMError(f"QEMU failed to start {plan.name}: {reason}",
                           hint=f"QEMU's log: {p.vmm_log}") from exc
        try:
            pid = int(p.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise VMMError(f"QEMU started but left no pid file at {p.pid_file}") from exc
        ident = identify(pid, plan.marker)
        if ident is None:
            raise VMMError(f"QEMU for {plan.name} exited right after starting",
                           hint=f"see {p.vmm_log} and {p.serial_log}")
        return ident

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        """Send ``system_powerdown`` (ACPI) over QMP; False if QMP did not answer."""
        try:
            qmp_command(plan_paths.qmp_socket, "system_powerdown")
        except VMMError:
            return False
        return True

    def quit(self, plan_paths: VMPaths) -> bool:
        """Ask QEMU to exit at once (like pulling the plug, but through QMP)."""
        try:
            qmp_command(plan_paths.qmp_socket, "quit")
        except VMMError:
            return False
        return True

    def cleanup(self, plan_paths: VMPaths) -> None:
        """Remove the pid file and QMP socket after QEMU is gone."""
        for f in (plan_paths.pid_file, plan_paths.run / "qmp.sock"):
            f.unlink(missing_ok=True)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def qmp_command(sock_path: Path, command: str, **arguments: Any) -> Any:
    """Run one QMP command: connect, negotiate capabilities, execute, return ``return``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(QMP_TIMEOUT_S)
            sock.connect(str(sock_path))
            reader = sock.makefile("rb")
            _qmp_read(reader)  # greeting
            _qmp_send(sock, {"execute": "qmp_capabilities"})
            _qmp_expect_return(reader)
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            _qmp_send(sock, msg)
            return _qmp_expect_return(reader)
    except (OSError, ValueError) as exc:
        raise VMMError(f"QMP {command} on {sock_path} failed: {exc}") from exc


def _qmp_send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _qmp_read(reader: Any) -> dict[str, Any]:
    line = reader.readline()
    if not line:
        raise ValueError("QMP connection closed")
    obj: dict[str, Any] = json.loads(line)
    return obj


def _qmp_expect_return(reader: Any) -> Any:
    while True:
        msg = _qmp_read(reader)
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            raise ValueError(msg["error"].get("desc", "QMP error"))
        # anything else is an asynchronous event; keep reading


def qmp_status(sock_path: Path) -> str | None:
    """The VM run state (``running``, ``paused``, ...) or None when QMP does not answer."""
    with contextlib.suppress(VMMError):
        ret = qmp_command(sock_path, "query-status")
        if isinstance(ret, dict):
            return str(ret.get("status"))
    return None
