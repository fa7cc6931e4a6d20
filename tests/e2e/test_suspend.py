"""vm pause / resume / suspend on real QEMU guests: the guest's processes, memory-only
files and boot survive a suspend to disk, its clock is set on restore, and a daemon
killed at each step of a suspend or a restore leaves a VM that is either running on
or suspended with its saved state whole, never half of each."""

from __future__ import annotations

import time

import pytest

from tests.e2e.checker import assert_consistent
from tests.e2e.conftest import Host
from tests.e2e.test_faults import crash_at

pytestmark = pytest.mark.e2e

# A process that only lives in the guest's memory: a counter in /dev/shm (tmpfs).
TICKER = ("nohup setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/tick; "
          "sleep 0.2; done' </dev/null >/dev/null 2>&1 & echo $!")


def guest(host: Host, vm: str, script: str) -> str:
    return host.ok("vm", "exec", vm, "--", "sh", "-c", script).strip()


def start_ticker(host: Host, vm: str) -> str:
    pid = guest(host, vm, TICKER)
    guest(host, vm, "echo only-in-memory > /dev/shm/secret")
    return pid


def ticks(host: Host, vm: str) -> int:
    """The ticker's count. Its shell truncates the file before it writes the next one, so
    a read between the two finds it empty: read again."""
    for _ in range(20):
        out = guest(host, vm, "cat /dev/shm/tick")
        if out:
            return int(out)
        time.sleep(0.1)
    raise AssertionError("the ticker's file stays empty")


def assert_same_guest_runs_on(host: Host, vm: str, pid: str, boot_id: str) -> None:
    """The guest is the one that was saved, its processes alive and counting."""
    assert guest(host, vm, "cat /proc/sys/kernel/random/boot_id") == boot_id
    assert guest(host, vm, "cat /dev/shm/secret") == "only-in-memory"
    assert guest(host, vm, f"kill -0 {pid} && echo alive") == "alive"
    before = ticks(host, vm)
    deadline = time.monotonic() + 60
    while ticks(host, vm) <= before:
        assert time.monotonic() < deadline, "the ticker does not count on"
        time.sleep(0.5)


def test_pause_resume_suspend_and_start_where_it_was(host: Host, running_vm: str) -> None:
    vm = running_vm
    pid = start_ticker(host, vm)
    boot_id = guest(host, vm, "cat /proc/sys/kernel/random/boot_id")
    shown = host.json("vm", "show", vm)
    vmm_pid, tap = shown["pid"], shown["tap"]

    # pause: the VMM stays, guest work is refused with the way out
    assert host.ok("vm", "pause", vm) == f"paused {vm}\n"
    paused = host.json("vm", "show", vm)
    assert paused["state"] == "paused" and paused["pid"] == vmm_pid
    refused = host.cli("vm", "exec", vm, "--", "true")
    assert refused.returncode == 125 and f"banger vm resume {vm}" in refused.stderr
    assert host.ok("vm", "resume", vm) == f"resumed {vm}\n"
    assert_same_guest_runs_on(host, vm, pid, boot_id)

    # suspend: memory and devices to disk, the VMM and its TAP gone
    guest(host, vm, "date -u -s 2001-01-01 >/dev/null")  # only a restore's clock set fixes it
    res = host.cli("vm", "suspend", vm)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"suspended {vm}\n"
    suspended = host.json("vm", "show", vm)
    assert suspended["state"] == "suspended" and suspended["pid"] is None
    saved = host.state / "vms" / suspended["id"] / "saved"
    on_disk = sum(f.stat().st_size for f in saved.iterdir())
    assert suspended["suspended"]["bytes"] == on_disk > 1 << 20
    assert "`vm start` resumes it" in host.ok("vm", "show", vm)
    assert vmm_pid not in host.vmm_pids() and tap not in host.taps()
    assert_consistent(host)
    refused = host.cli("vm", "exec", vm, "--", "true")
    assert refused.returncode == 125 and f"banger vm start {vm}" in refused.stderr
    refused = host.cli("vm", "stop", vm)
    assert refused.returncode == 125 and "discard its saved processes" in refused.stderr

    # start restores it where it was: same boot, same processes, memory-only files
    res = host.cli("vm", "start", vm)
    assert res.returncode == 0, res.stderr
    assert "[2/3] restore" in res.stderr, res.stderr
    assert not saved.exists()
    assert_same_guest_runs_on(host, vm, pid, boot_id)
    assert abs(int(guest(host, vm, "date +%s")) - time.time()) < 120
    assert host.json("vm", "show", vm)["suspended"] is None
    assert_consistent(host)

    # a paused VM stops cleanly (run again for its poweroff), and boots fresh after
    host.ok("vm", "pause", vm)
    host.ok("vm", "stop", vm)
    assert host.json("vm", "show", vm)["stop_reason"].startswith("stopped by")
    host.ok("vm", "start", vm)
    assert guest(host, vm, "cat /proc/sys/kernel/random/boot_id") != boot_id
    assert_consistent(host)


@pytest.mark.parametrize("stage,after", [
    ("suspend.saved", "running"),         # the save was written, not committed
    ("suspend.committed", "suspended"),   # committed: the suspend finishes
    ("start.restored", "suspended"),      # loaded, the saved state not yet consumed
])
def test_a_daemon_killed_mid_suspend_or_restore(host: Host, running_vm: str, stage: str,
                                                after: str) -> None:
    vm = running_vm
    pid = start_ticker(host, vm)
    boot_id = guest(host, vm, "cat /proc/sys/kernel/random/boot_id")
    if stage.startswith("start."):
        host.ok("vm", "suspend", vm)
        crash_at(host, stage, "vm", "start", vm)
    else:
        crash_at(host, stage, "vm", "suspend", vm)
    (shown,) = host.wait_settled()
    assert shown["state"] == after, shown
    assert_consistent(host)
    if after == "suspended":
        host.ok("vm", "start", vm)
    assert_same_guest_runs_on(host, vm, pid, boot_id)
    assert_consistent(host)
