"""The confined VMM, on real QEMU guests: an unprivileged user, seccomp, no
capabilities, no path into banger's directories, and a cgroup per VM with its
limits, through stop, start, delete and a daemon restart."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from banger.hostops.cgroups import VMCgroup, detect, limits_for, vm_group
from banger.layout import install_tag
from banger.vmmuser import lookup_user
from tests.e2e.conftest import MEMORY_MIB, VCPU, Host

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _qemu_only(vmm: str) -> None:
    if vmm != "qemu":
        pytest.skip("the Firecracker jailer confines Firecracker (tests/contract)")


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def cgroup_of(host: Host, vm: dict[str, Any]) -> VMCgroup:
    return detect().group(vm_group(install_tag(host.state), vm["id"]))


def as_vmm_user(*argv: str) -> subprocess.CompletedProcess[str]:
    user = lookup_user("banger-vmm")
    assert user is not None
    return subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                           "--clear-groups", "--", *argv], capture_output=True, text=True,
                          timeout=30)


def assert_confined(host: Host, vm: dict[str, Any]) -> None:
    pid = vm["pid"]
    st = status(pid)
    uids = st["Uid"].split()
    assert len(uids) == 4 and all(u == uids[0] for u in uids) and uids[0] != "0", st["Uid"]
    assert st["Gid"].split()[0] != "0" and st["Groups"] == ""
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
    for caps in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, (caps, st[caps])
    # An empty network namespace of its own: only a loopback, not the daemon's links
    # (the guest's network is the TAP descriptor QEMU was handed).
    vmm_netns = os.readlink(f"/proc/{pid}/ns/net")
    assert vmm_netns not in (f"net:[{os.stat(f'/run/netns/{host.ns}').st_ino}]",
                             os.readlink("/proc/self/ns/net"))
    links = [line.split(":")[0].strip()
             for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]]
    assert links == ["lo"]
    group = cgroup_of(host, vm)
    assert group.holds(pid)
    assert group.limits() == limits_for(MEMORY_MIB, VCPU)  # the host's vm_defaults
    conf = vm["confinement"]
    assert conf["user"] == "banger-vmm" and str(conf["uid"]) == uids[0]
    assert conf["netns"] == "own"
    assert conf["cgroup"]["path"] == group.describe()
    assert conf["cgroup"]["limits"] == limits_for(MEMORY_MIB, VCPU).to_json()


def test_vmm_is_confined_and_its_cgroup_goes_with_the_vm(host: Host, running_vm: str) -> None:
    vm = host.json("vm", "show", running_vm)
    assert_confined(host, vm)
    shown = host.ok("vm", "show", running_vm)
    assert "vmm user:" in shown and "cgroup:" in shown and "limits:" in shown
    assert host.ok("vm", "exec", running_vm, "--", "echo", "alive") == "alive\n"

    # The VMM user's group may write the VM's disks (the daemon keeps them), but the
    # VMM user reaches nothing under the state dir by path.
    user = lookup_user("banger-vmm")
    assert user is not None
    vm_dir = host.state / "vms" / vm["id"]
    st = (vm_dir / "work.ext4").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, user.gid, 0o660)
    for path in (host.state / "banger.db", vm_dir / "work.ext4", vm_dir / "handles.json"):
        res = as_vmm_user("head", "-c1", str(path))
        assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)

    host.ok("vm", "stop", running_vm)
    assert not cgroup_of(host, vm).exists()
    assert host.json("vm", "show", running_vm)["confinement"] is None

    host.ok("vm", "start", running_vm)
    again = host.json("vm", "show", running_vm)
    assert again["pid"] != vm["pid"]
    assert_confined(host, again)
    assert host.ok("vm", "exec", running_vm, "--", "echo", "back") == "back\n"

    host.ok("vm", "delete", running_vm)
    assert not cgroup_of(host, again).exists()
    assert host.vmm_pids() == []


def test_reconcile_readopts_the_cgroup(host: Host, running_vm: str) -> None:
    vm = host.json("vm", "show", running_vm)
    group = cgroup_of(host, vm)
    host.kill_daemon()
    # Take the VMM out of its cgroup and remove it, as a host admin (or an older
    # banger) might have: the next daemon puts it back with its limits.
    for procs in group.procs_files:
        root_procs = procs.parents[2] / "cgroup.procs"
        root_procs.write_text(str(vm["pid"]))
    group.remove()
    host.start_daemon()
    host.wait_settled()
    after = host.json("vm", "show", running_vm)
    assert after["state"] == "running" and after["pid"] == vm["pid"]
    assert_confined(host, after)
    assert host.ok("vm", "exec", running_vm, "--", "echo", "adopted") == "adopted\n"
