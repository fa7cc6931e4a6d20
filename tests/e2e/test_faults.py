"""kill -9 bangerd at every stage of create/start/stop/delete, restart it, check nothing leaked.

The daemon's test hook (``BANGER_TEST_PAUSE_AT``) parks the operation at a named
stage; the test then kills the daemon outright and starts a fresh one, which must
reconcile: running VMs keep running and answer SSH, half-made VMs are finished or
removed, and no VMM process, TAP, loop device, runtime file or IP lease leaks.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.e2e.checker import assert_consistent
from tests.e2e.conftest import Host

pytestmark = pytest.mark.e2e


def crash_at(host: Host, stage: str, *args: str) -> None:
    """Run ``banger *args`` against a daemon paused at ``stage``, then kill -9 the daemon."""
    host.stop_daemon()
    host.start_daemon(pause_at=stage)
    cli = host.popen(*args)
    host.wait_paused(stage)
    host.kill_daemon(9)
    cli.kill()
    cli.communicate()
    host.start_daemon()


@pytest.mark.parametrize("stage", ["create.reserve", "create.image", "create.disk",
                                   "start.network", "start.boot", "start.wait-ssh"])
def test_crash_during_create_removes_the_half_made_vm(host: Host, stage: str) -> None:
    crash_at(host, stage, "vm", "create", "--name", "victim")
    vms = host.wait_settled()
    assert [v["name"] for v in vms] == []
    assert_consistent(host)
    # the name and address are usable again
    assert host.json("vm", "create", "--name", "victim", "--no-start")["ip"] == "172.29.0.2"


@pytest.mark.parametrize("stage", ["start.network", "start.boot", "start.wait-ssh"])
def test_crash_during_start_finishes_or_stops(host: Host, stage: str) -> None:
    host.ok("vm", "create", "--name", "v", "--no-start")
    crash_at(host, stage, "vm", "start", "v")
    (vm,) = host.wait_settled()
    if stage == "start.network":
        # the VMM never ran: the VM is stopped and says why
        assert vm["state"] == "stopped" and "restarted" in vm["stop_reason"]
    else:
        # the VMM was already running: the new daemon adopts it and finishes the boot
        assert vm["state"] == "running"
        assert host.ok("vm", "exec", "v", "--", "hostname").strip() == "v"
    assert_consistent(host)


@pytest.mark.parametrize("stage", ["stop.marked", "stop.poweroff"])
def test_crash_during_stop_completes_the_stop(host: Host, running_vm: str, stage: str) -> None:
    host.ok("vm", "exec", running_vm, "--", "sh", "-c", "echo before > /root/f; sync")
    crash_at(host, stage, "vm", "stop", running_vm)
    (vm,) = host.wait_settled()
    assert vm["state"] == "stopped"
    assert_consistent(host)
    host.ok("vm", "start", running_vm)
    assert host.ok("vm", "exec", running_vm, "--", "cat", "/root/f") == "before\n"
    assert_consistent(host)


def test_crash_during_delete_finishes_the_delete(host: Host, running_vm: str) -> None:
    crash_at(host, "delete.marked", "vm", "delete", running_vm)
    assert host.wait_settled() == []
    assert_consistent(host)


def test_running_vm_survives_daemon_death_even_without_handles(host: Host,
                                                               running_vm: str) -> None:
    vm = host.json("vm", "show", running_vm)
    handles = host.state / "vms" / vm["id"] / "handles.json"
    for damage in ("none", "deleted", "corrupt"):
        host.kill_daemon(9)
        if damage == "deleted":
            handles.unlink()
        elif damage == "corrupt":
            handles.write_text('{"vmm": "qemu", "process": {"pid": "not a pid"')
        host.start_daemon()
        after = host.json("vm", "show", running_vm)
        assert after["state"] == "running", damage
        assert after["pid"] == vm["pid"], damage  # the same process, re-adopted
        assert after["tap"] == vm["tap"], damage
        assert host.ok("vm", "exec", running_vm, "--", "true") == "", damage
        assert json.loads(handles.read_text())["process"]["pid"] == vm["pid"]
        assert_consistent(host)
    # teardown still works from the rebuilt handles
    host.ok("vm", "stop", running_vm)
    assert_consistent(host)


def test_ctrl_c_cancels_a_create_cleanly(host: Host) -> None:
    cli = host.popen("vm", "create", "--name", "interrupted")
    for _ in range(1200):  # wait until the VMM is booting (the slowest, most stateful stage)
        vms = host.json("vm", "list")
        if vms and vms[0]["state"] == "creating" and host.vmm_pids():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the create never reached its boot")
    cli.send_signal(signal.SIGINT)
    _out, err = cli.communicate(timeout=300)
    assert cli.returncode == 130, err
    assert "cancelling" in err and "error: creation of 'interrupted' was cancelled" in err
    assert host.json("vm", "list") == []
    assert_consistent(host)
