"""The two VMM launchers, run for real as bangerd runs them (``python -I <script>``): both
detach their command through :mod:`banger.detach` and report its pid or why exec failed.

The "VMM" is a Python ``sleep`` whose command line carries a VM marker, so it is found
with :func:`banger.proc.identify` and killed through its identity.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger import hostops
from banger.daemon import fcproc
from banger.proc import ProcessIdentity, identify, send_signal, wait_gone
from banger.vmm import vm_marker

FC_SPAWN = Path(fcproc.__file__).with_name("_spawn.py")
QEMU_SPAWN = Path(hostops.__file__).with_name("vmm_spawn.py")
SPAWN_TIMEOUT_S = 30  # a generous bound for a Python start-up and two forks
SLEEPER = ("import sys, time; print('console', flush=True); "
           "print('oops', file=sys.stderr, flush=True); time.sleep(60)")

# A launcher: (command, output file) -> the finished launcher process.
Launch = Callable[[list[str], Path], "subprocess.CompletedProcess[bytes]"]


def launch_firecracker(command: list[str], out: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-I", str(FC_SPAWN), "--output", str(out), "--",
                           *command], capture_output=True, timeout=SPAWN_TIMEOUT_S)


def launch_qemu(command: list[str], out: Path) -> subprocess.CompletedProcess[bytes]:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        spec = {"command": command, "fds": {}, "stderr_fd": fd}
        return subprocess.run([sys.executable, "-I", str(QEMU_SPAWN)],
                              input=json.dumps(spec).encode(), capture_output=True,
                              timeout=SPAWN_TIMEOUT_S, pass_fds=(fd,))
    finally:
        os.close(fd)


LAUNCHERS = [pytest.param(launch_firecracker, id="firecracker"),
             pytest.param(launch_qemu, id="qemu")]


@pytest.fixture
def started() -> Iterator[list[ProcessIdentity]]:
    """Processes a test started; killed at the end whatever happens."""
    idents: list[ProcessIdentity] = []
    yield idents
    for ident in idents:
        send_signal(ident, signal.SIGKILL)
        assert wait_gone(ident, 5)


def ppid(pid: int) -> int:
    status = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    return int(status["PPid"])


@pytest.mark.parametrize("launch", LAUNCHERS)
def test_launcher_detaches_and_reports_the_pid(launch: Launch, tmp_path: Path,
                                               started: list[ProcessIdentity]) -> None:
    marker = vm_marker(secrets.token_hex(6))
    out = tmp_path / "out.log"
    res = launch([sys.executable, "-c", SLEEPER, marker], out)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout)
    ident = identify(pid, marker)  # the reported pid is the exec'd command itself
    assert ident is not None
    started.append(ident)
    assert ppid(pid) != os.getpid()         # re-parented: neither we...
    with pytest.raises(ChildProcessError):  # ...nor anything of ours will reap it
        os.waitpid(pid, os.WNOHANG)
    assert os.getsid(pid) != os.getsid(0)   # its own session...
    assert os.getsid(pid) != pid            # ...but not its leader (no tty regained)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(out)
    assert os.readlink(f"/proc/{pid}/fd/2") == str(out)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    deadline = time.monotonic() + 5  # bounded: a Python start-up and two prints
    while "oops" not in out.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert out.read_text().splitlines() == ["console", "oops"]


@pytest.mark.parametrize("launch", LAUNCHERS)
def test_launcher_reports_why_exec_failed(launch: Launch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-binary"
    res = launch([str(missing), "arg"], tmp_path / "out.log")
    assert res.returncode == 127
    assert res.stdout == b""
    assert res.stderr.decode() == f"cannot execute {missing}: No such file or directory\n"

    not_executable = tmp_path / "plain-file"
    not_executable.write_text("")
    res = launch([str(not_executable)], tmp_path / "out.log")
    assert res.returncode == 127
    assert res.stderr.decode() == f"cannot execute {not_executable}: Permission denied\n"
