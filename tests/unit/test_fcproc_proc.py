"""Starting, identifying and stopping Firecracker processes, with real processes.

Nothing here needs the Firecracker API spec: the "VMMs" are ``sleep`` and
small scripts, which is enough to prove that a recycled pid is never
signalled, that launches detach, and that failed launches leave nothing.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.daemon.fcproc.api import FirecrackerAPI
from banger.daemon.fcproc.driver import FirecrackerDriver, kill, stop_gracefully
from banger.errors import BadRequest, VMMError
from banger.layout import Layout
from banger.proc import ProcessIdentity, find_by_marker, identify, matches
from banger.runner import SubprocessRunner
from banger.vmm import LaunchPlan, vm_marker


@pytest.fixture
def short_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bfp-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def marked_sleep() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``sleep`` whose command line carries a VM marker (argv[0])."""
    marker = vm_marker(secrets.token_hex(6))
    proc = subprocess.Popen([marker, "60"], executable=shutil.which("sleep"))
    deadline = time.monotonic() + 5
    while identify(proc.pid, marker) is None:  # until exec has replaced the command line
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc, marker
    proc.kill()
    proc.wait()


def alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def dead(pid: int) -> bool:
    """Exited: reaped, or a zombie waiting for its parent (this test process)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line[stat_line.rfind(")") + 2] in "ZX"


# ------------------------------------------------------------------ identity


def test_recycled_pid_is_never_signalled(marked_sleep: tuple[subprocess.Popen[bytes], str],
                                         short_root: Path) -> None:
    proc, marker = marked_sleep
    real = identify(proc.pid, marker)
    assert real is not None
    # Same pid and marker, another start time: what a recorded identity looks
    # like after the VMM died and the kernel handed its pid to a new process.
    recycled = ProcessIdentity(proc.pid, real.start_time - 1, marker)
    assert not matches(recycled)
    never = lambda t: FirecrackerAPI(short_root / "fc.sock", timeout=t)  # noqa: E731
    assert stop_gracefully(never, recycled, grace_s=0.1) is True  # "gone"
    assert kill(recycled, 0.1) is True
    time.sleep(0.2)
    assert alive(proc)


def test_another_programs_pid_is_never_signalled(
        marked_sleep: tuple[subprocess.Popen[bytes], str], short_root: Path) -> None:
    proc, marker = marked_sleep
    real = identify(proc.pid, marker)
    assert real is not None
    stranger = ProcessIdentity(proc.pid, real.start_time, vm_marker("ffffffffffff"))
    assert kill(stranger, 0.1) is True
    drv = FirecrackerDriver(SubprocessRunner(), "/usr/bin/firecracker")
    paths = Layout(short_root, short_root, short_root, short_root / "k").vm("ffffffffffff")
    assert drv.request_shutdown(paths, stranger) is False
    time.sleep(0.2)
    assert alive(proc)


def test_request_shutdown_sends_nothing_for_a_recycled_pid(
        marked_sleep: tuple[subprocess.Popen[bytes], str], short_root: Path) -> None:
    proc, marker = marked_sleep
    real = identify(proc.pid, marker)
    assert real is not None
    paths = Layout(short_root, short_root, short_root, short_root / "k").vm("0a1b")
    paths.run.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(paths.api_socket))
        srv.listen(4)
        srv.setblocking(False)
        drv = FirecrackerDriver(SubprocessRunner(), "/usr/bin/firecracker")
        recycled = ProcessIdentity(proc.pid, real.start_time + 1, marker)
        assert drv.request_shutdown(paths, recycled) is False
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected


def test_unresponsive_vmm_is_killed_after_the_request_fails(
        marked_sleep: tuple[subprocess.Popen[bytes], str], short_root: Path) -> None:
    proc, marker = marked_sleep
    ident = identify(proc.pid, marker)
    assert ident is not None
    started = time.monotonic()
    # No API socket: Ctrl-Alt-Del cannot be sent, so no grace period is spent.
    absent = lambda t: FirecrackerAPI(short_root / "fc.sock", timeout=t)  # noqa: E731
    assert stop_gracefully(absent, ident, grace_s=30, kill_wait_s=5) is True
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 2  # "gone" can be reported while the kernel still tears down
    while not dead(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------ failed launches


def script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return str(path)


def plan_in(root: Path) -> LaunchPlan:
    vm_id = secrets.token_hex(6)
    paths = Layout(root / "s", root / "c", root / "r", root / "k").vm(vm_id)
    return LaunchPlan(vm_id=vm_id, name="box", vcpu=1, memory_mib=128,
                      kernel=root / "vmlinux", initrd=None, cmdline="console=ttyS0",
                      rootfs=str(root / "rootfs"), work_disk=str(paths.work_disk),
                      tap="tap-x", mac="06:00:00:00:00:01", paths=paths)


def assert_nothing_left(plan: LaunchPlan) -> None:
    assert find_by_marker(plan.marker) == {}
    p = plan.paths
    for gone in (p.pid_file, p.api_socket, p.vsock_socket, p.metrics):
        assert not gone.exists(), gone


def test_vmm_that_exits_at_once_is_reported_with_its_output(short_root: Path) -> None:
    binary = script(short_root / "firecracker",
                    "import sys; print('Error: cannot open /dev/kvm', file=sys.stderr); "
                    "sys.exit(1)")
    plan = plan_in(short_root)
    with pytest.raises(VMMError) as exc:
        FirecrackerDriver(SubprocessRunner(), binary).launch(plan)
    assert exc.value.message.startswith("cannot start Firecracker for box: ")
    assert "cannot open /dev/kvm" in exc.value.message
    assert str(plan.paths.serial_log) in exc.value.hint
    assert_nothing_left(plan)


def test_vmm_that_never_answers_is_killed_after_the_budget(short_root: Path) -> None:
    binary = script(short_root / "firecracker", "import time; time.sleep(60)")
    plan = plan_in(short_root)
    drv = FirecrackerDriver(SubprocessRunner(), binary, api_wait_s=0.5)
    started = time.monotonic()
    with pytest.raises(VMMError, match=r"did not answer on .*fc\.sock within 0\.5s"):
        drv.launch(plan)
    assert time.monotonic() - started < 5
    assert_nothing_left(plan)


def test_missing_binary_is_reported(short_root: Path) -> None:
    plan = plan_in(short_root)
    drv = FirecrackerDriver(SubprocessRunner(), str(short_root / "firecracker"))
    with pytest.raises(VMMError, match="Firecracker did not start: cannot execute"):
        drv.launch(plan)
    assert_nothing_left(plan)


def test_too_many_vcpus_are_refused_before_starting(short_root: Path) -> None:
    plan = plan_in(short_root)
    plan = LaunchPlan(**{**plan.__dict__, "vcpu": 33})
    with pytest.raises(BadRequest, match="1 to 32 vCPUs") as exc:
        FirecrackerDriver(SubprocessRunner(), "/nonexistent/firecracker").launch(plan)
    assert "vmm = qemu" in exc.value.hint
    assert not plan.paths.run.exists()
