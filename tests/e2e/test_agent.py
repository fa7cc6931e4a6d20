"""The guest agent (banger.agent) on a real QEMU guest: commands without an SSH login.

A booted VM is found ready through its agent, `vm exec` runs through it (no SSH
session: no SSH_CONNECTION) with argv, stdin, stdout, stderr, exit status and signals
as over SSH; a command that holds the agent sends a second one over SSH instead; a
client that dies ends its command; `vm ssh` stays SSH. Firecracker has no virtio-serial
port: its VMs use SSH, as the rest of the suite shows.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, CachedImage, Host, open_host

pytestmark = pytest.mark.e2e

WHO = 'if [ -n "${SSH_CONNECTION:-}" ]; then echo ssh; else echo agent; fi'


@pytest.fixture
def qhost(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage
          ) -> Iterator[Host]:
    yield from open_host(request, tmp_path, test_image, "qemu")


def readiness(host: Host, vm: str) -> str:
    """How the daemon found ``vm`` ready: "agent" or "ssh" (its log's last word on it)."""
    said = [ln for ln in (host.state / "bangerd.log").read_text().splitlines()
            if f"vm {vm}: " in ln and " ready after " in ln]
    assert said, f"no readiness line for {vm}"
    return said[-1].split(f"vm {vm}: ", 1)[1].split()[0]


def wait_gone(host: Host, vm: str, pattern: str, timeout: float = 30) -> None:
    """Wait until no guest process matches ``pattern`` (asked over SSH; a pattern that
    does not match itself, such as ``slee[p] 1``)."""
    deadline = time.monotonic() + timeout
    while True:
        left = host.cli("vm", "ssh", vm, "--", f"pgrep -f '{pattern}' || true").stdout.strip()
        if not left:
            return
        assert time.monotonic() < deadline, f"still running in the guest: {left}"
        time.sleep(0.5)


def test_vm_exec_runs_through_the_agent_as_it_would_over_ssh(qhost: Host) -> None:
    host = qhost
    host.ok("vm", "create", "--name", "a")
    assert readiness(host, "a") == "agent"  # a boot: no login to find it ready
    assert host.json("vm", "show", "a")["agent"] is True
    assert "guest agent" in host.ok("vm", "show", "a")

    res = host.cli("vm", "exec", "a", "--", "sh", "-c", f"{WHO}; echo oops >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, "agent\n", "oops\n")
    # argv arrives unchanged, in the login shell's environment, at /root
    out = host.ok("vm", "exec", "a", "--", "printf", "%s|", "a b", "$HOME", "it's")
    assert out == "a b|$HOME|it's|"
    assert host.ok("vm", "exec", "a", "--", "sh", "-c", "echo $HOME $PATH; pwd").split() == [
        "/root", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/root"]
    # stdin whole, both ways
    data = os.urandom(3 << 20)
    res = subprocess.run(host.netns(str(BIN / "banger"), "vm", "exec", "a", "--", "sha256sum"),
                         input=data, capture_output=True, env=host.env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # vm ssh stays SSH
    assert host.ok("vm", "ssh", "a", "--", WHO).strip() == "ssh"


def test_signals_and_a_dying_client_end_the_guest_command(qhost: Host) -> None:
    host = qhost
    host.ok("vm", "create", "--name", "a")
    # Ctrl-C reaches the command: it dies of SIGINT, and the client says 130
    proc = host.popen("vm", "exec", "a", "--", "sh", "-c", "echo started; exec sleep 301")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    wait_gone(host, "a", "slee[p] 301")

    # a client killed outright: the guest's command ends with its connection
    proc = host.popen("vm", "exec", "a", "--", "sh", "-c", "echo started; exec sleep 302")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.kill()
    proc.communicate(timeout=30)
    wait_gone(host, "a", "slee[p] 302")


def test_a_busy_agent_sends_the_next_command_over_ssh(qhost: Host) -> None:
    host = qhost
    host.ok("vm", "create", "--name", "a")
    holder = host.popen("vm", "exec", "a", "--", "sh", "-c", f"{WHO}; sleep 20")
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "agent"
    # while the agent runs that one, another command still runs at once, over ssh
    res = host.cli("vm", "exec", "a", "--", "sh", "-c", WHO)
    assert (res.returncode, res.stdout.strip()) == (0, "ssh"), res.stderr
    holder.communicate(timeout=60)
    assert holder.returncode == 0
    # and once it is free, the agent again
    assert host.ok("vm", "exec", "a", "--", "sh", "-c", WHO).strip() == "agent"
