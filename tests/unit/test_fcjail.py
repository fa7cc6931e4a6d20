"""The root helper's Firecracker jails (``fc.*`` requests): what the policy refuses, and
what the helper will and will not connect to or move out of a jail the VMM user owns.

A full launch through the (fake) jailer is the contract suite's
(tests/contract/test_firecracker_driver.py); these tests need root (chown, sockets of
another uid), like the helper.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.errors import HostError, Refused
from banger.hostops import fcjail, ops
from banger.hostops.cgroups import CONTROLLERS, CgroupHost, CgroupVersion
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.jail import JailLayout
from banger.hostops.nft import FirewallSettings
from banger.hostops.policy import Policy
from banger.vmm import vm_marker
from banger.vmmuser import lookup_user
from tests.fakes import FakeNet, FakeRunner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the root helper's work needs root")

VM = "0a1b2c3d4e5f"
SETTINGS = FirewallSettings(table="banger_t1", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtt1", dns_port=53)


class Jail:
    """A policy with a (fake) jailer, a state dir, and VM ``VM``'s jail root, as the
    jailer leaves it: the VMM user's (nobody here)."""

    def __init__(self, tmp: Path, *, jailer_netns: bool = False) -> None:
        user = lookup_user("nobody")
        if user is None:
            pytest.skip("needs the 'nobody' account")
        self.user = user
        self.state = tmp / "state"
        (self.state / "vms" / VM).mkdir(parents=True)
        self.base = tmp / "jails"
        self.cgroups = CgroupHost(CgroupVersion.V2, dict.fromkeys(CONTROLLERS, tmp / "cg"))
        self.policy = Policy(SETTINGS, state_dir=self.state, runtime_dir=tmp / "run",
                             install_tag="t1", vmm_user="nobody",
                             firecracker_bin="/usr/bin/firecracker", jailer_bin="/usr/bin/jailer",
                             jailer_chroot_base=self.base, jailer_netns=jailer_netns,
                             daemon_uid=4242, daemon_gid=4343)
        self.executor = Executor(self.policy, FakeRunner(), FakeNet(), tmp / "fwd",
                                 cgroups=lambda: self.cgroups)
        self.host = HostOps.local(self.executor)
        self.layout = JailLayout.for_vm(self.base, "/usr/bin/firecracker", vm_marker(VM))
        self.root = self.layout.root
        self.root.mkdir(parents=True)
        os.chown(self.root, user.uid, user.gid)

    def listen(self, name: str, owner: int | None = None) -> socket.socket:
        """A listening socket at ``name`` in the jail, the VMM user's unless ``owner``."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        try:
            srv.bind(f"/proc/self/fd/{dfd}/{name}")  # the jail's path is too long to bind
        finally:
            os.close(dfd)
        os.chown(self.root / name, self.user.uid if owner is None else owner, -1)
        srv.listen(4)
        return srv


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Jail]:
    yield Jail(tmp_path)


# ----------------------------------------------------------------- the policy


def launch(**over: Any) -> ops.FcLaunch:
    fields: dict[str, Any] = {
        "vm_id": VM, "serial": "/STATE/vms/0a1b2c3d4e5f/serial.log", "memory_mib": 256,
        "vcpu": 1, "files": {"kernel": ops.VMFile(path="/STATE/images/i/vmlinux", mode="r")}}
    return ops.FcLaunch(**{**fields, **over})


REFUSED = [
    ("a file no jail holds", launch(files={"firecracker": ops.VMFile(
        path="/STATE/vms/0a1b2c3d4e5f/x", mode="r")})),
    ("a file outside the state and runtime dirs", launch(files={"kernel": ops.VMFile(
        path="/etc/shadow", mode="r")})),
    ("a path climbing out", launch(files={"rootfs": ops.VMFile(
        path="/STATE/vms/../../etc/passwd", mode="rw", give=True)})),
    ("another install's dm device", launch(files={"rootfs": ops.VMFile(
        path="/dev/mapper/bgr-other0a1b2c3d4e5f", mode="rw")})),
    ("the console log in another VM's directory", launch(
        serial="/STATE/vms/ffffffffffff/serial.log")),
    ("a port where this install has jailer_netns off", launch(port="bgtt1a0b1c2")),
    ("a snapshot moved out of the state dir", ops.FcSnapshotOut(
        vm_id=VM, state="/STATE/vms/0a1b2c3d4e5f/s", memory="/root/mem")),
]


@pytest.mark.parametrize(("why", "req"), REFUSED, ids=[w for w, _ in REFUSED])
def test_out_of_policy_jail_requests_are_refused_and_do_nothing(jail: Jail, why: str,
                                                                req: Any) -> None:
    state = str(jail.state)
    req = type(req).model_validate_json(req.model_dump_json().replace("/STATE", state))
    with pytest.raises(Refused):
        jail.executor.handle(req)
    assert os.listdir(jail.root) == [], why


def test_a_helper_without_a_jailer_runs_no_firecracker(jail: Jail, tmp_path: Path) -> None:
    bare = Executor(Policy(SETTINGS, state_dir=jail.state, install_tag="t1"), FakeRunner(),
                    FakeNet(), tmp_path / "fwd")
    req = launch(serial=f"{jail.state}/vms/{VM}/serial.log",
                 files={"kernel": ops.VMFile(path=f"{jail.state}/k", mode="r")})
    with pytest.raises(Refused, match="no Firecracker with its jailer"):
        bare.handle(req)
    with pytest.raises(Refused, match="runs no Firecracker"):
        bare.handle(ops.FcConnect(vm_id=VM, socket="api"))
    bare.handle(ops.FcCleanup(vm_id=VM))  # nothing was ever made: nothing to remove
    # What a daemon that is not root asks before it picks Firecracker:
    assert HostOps.local(bare).fc_status() == ("", "")
    assert jail.host.fc_status() == ("/usr/bin/firecracker", "/usr/bin/jailer")


# ----------------------------------------------------------------- connecting


def test_the_api_socket_is_connected_to_and_handed_over(jail: Jail) -> None:
    # The jail's path is too long for sun_path: the helper connects through a descriptor.
    assert len(str(jail.root / "fc.sock").encode()) > 108
    with jail.listen("fc.sock") as srv:
        client = jail.host.fc_connect(VM, "api")
        with client, srv.accept()[0] as server_side:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert server_side.recv(64).startswith(b"GET / ")


def test_a_symlink_or_a_socket_not_the_vmm_users_is_refused(jail: Jail, tmp_path: Path) -> None:
    """The VMM user owns the jail: it could put a link to any socket there (one root may
    reach, as the system bus). Neither a symlink nor a socket of another uid (a hard
    link keeps its owner) is connected to."""
    with jail.listen("vsock.sock", owner=0) as foreign:
        foreign.setblocking(False)
        with pytest.raises(Refused, match="not a socket of the VMM user's own"):
            jail.host.fc_connect(VM, "vsock")
        os.symlink(jail.root / "vsock.sock", jail.root / "fc.sock")
        with pytest.raises(Refused, match="not a socket of the VMM user's own"):
            jail.host.fc_connect(VM, "api")
        with pytest.raises(BlockingIOError):
            foreign.accept()  # nobody connected


def test_a_missing_or_deaf_socket_is_a_host_error(jail: Jail) -> None:
    with pytest.raises(HostError, match="has no Firecracker api socket"):
        jail.host.fc_connect(VM, "api")
    with jail.listen("fc.sock"):
        pass  # closed: the name stays, nothing listens
    with pytest.raises(HostError, match="does not accept"):
        jail.host.fc_connect(VM, "api")


# ----------------------------------------------------------------- snapshots and clean-up


def test_a_snapshot_is_moved_out_and_made_the_daemons(jail: Jail) -> None:
    for name, data in (("snapshot.state", b"state"), ("snapshot.mem", b"memory" * 1000)):
        (jail.root / name).write_bytes(data)
        os.chown(jail.root / name, jail.user.uid, jail.user.gid)
    into = jail.state / "vms" / VM / "saved"
    into.mkdir()
    jail.host.fc_snapshot_out(VM, into / "fc.state", into / "fc.mem")
    assert (into / "fc.state").read_bytes() == b"state"
    assert (into / "fc.mem").read_bytes() == b"memory" * 1000
    for moved in ("fc.state", "fc.mem"):
        st = (into / moved).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4343, 0o600)
    assert sorted(os.listdir(into)) == ["fc.mem", "fc.state"]  # no temporary left
    assert not (jail.root / "snapshot.state").exists()


def test_a_planted_snapshot_is_not_moved(jail: Jail, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's")
    os.symlink(secret, jail.root / "snapshot.state")
    into = jail.state / "vms" / VM
    with pytest.raises(HostError):
        jail.host.fc_snapshot_out(VM, into / "fc.state", into / "fc.mem")
    assert not (into / "fc.state").exists() and secret.read_bytes() == b"root's"
    assert [n for n in os.listdir(into) if n.startswith(".")] == []


def test_cleanup_removes_the_jail_and_the_jailers_cgroup(jail: Jail) -> None:
    group = jail.cgroups.group(f"banger-t1/{vm_marker(VM)}")
    for d in group.dirs:
        d.mkdir(parents=True)
    (jail.root / "rootfs").write_bytes(b"x")
    jail.host.fc_cleanup(VM)
    assert not jail.layout.jail_dir.exists()
    assert not group.exists()
    jail.host.fc_cleanup(VM)  # again: nothing left, no error


# ----------------------------------------------------------------- a namespace of its own


def test_a_launch_with_a_port_puts_the_vm_in_a_network_namespace_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jailer_netns``: the helper makes the VM's namespace (its TAP the VMM user's, its
    port on the bridge), the jailer joins it, and then its name goes (the VMM holds it);
    a failed start and the cleanup leave none behind. The real namespace and its frames:
    tests/integration/test_vm_netns.py; a real join: tests/contract."""
    jail = Jail(tmp_path, jailer_netns=True)
    net = jail.executor.net
    assert isinstance(net, FakeNet)
    net.ensure_bridge("br-t", SETTINGS.cidr)
    kernel = jail.state / "vmlinux"
    kernel.write_bytes(b"kernel")
    serial = jail.state / "vms" / VM / "serial.log"
    serial.write_bytes(b"")
    for path in (kernel, serial):
        os.chown(path, jail.policy.daemon_uid, jail.policy.daemon_gid)
    started: list[list[str]] = []

    def spawn(what: str, spec: dict[str, Any], fds: list[int]) -> int:
        started.append(list(spec["command"]))
        return 4242

    jails = jail.executor.jails
    jails._spawn = spawn
    jails._joined = lambda pid, netns: pid == 4242 and netns in net.namespaces
    req = launch(serial=f"{jail.state}/vms/{VM}/serial.log", port="bgtt1a0b1c2",
                 files={"kernel": ops.VMFile(path=str(kernel), mode="r")})
    assert jail.host.fc_launch(req) == 4242
    ns = f"banger-t1-{VM}"
    assert net.made == [(ns, "bgtt1a0b1c2", (jail.user.uid, jail.user.gid))]
    argv = started[-1]
    assert argv[argv.index("--netns") + 1] == f"/run/netns/{ns}"
    assert argv.index("--netns") < argv.index("--")  # the jailer's option, not Firecracker's
    # Joined: the name is dropped, the namespace (and the port) live on with the VMM.
    assert net.unnamed == [ns] and net.namespaces == {} and "bgtt1a0b1c2" in net.links()
    assert jail.host.fc_netns_vms() == []

    # A name a crashed launch left behind is replaced by the next launch.
    net.create_vm_netns(ns, "bgtt1d0d0d0", "br-t", (1, 1))
    assert jail.host.fc_launch(req.model_copy(update={"port": "bgtt1a1a1a1"})) == 4242
    assert net.made[-1] == (ns, "bgtt1a1a1a1", (jail.user.uid, jail.user.gid))
    assert "bgtt1d0d0d0" not in net.links()

    # A jailer that ends, or never joins, takes its namespace with it.
    def gone(pid: int, netns: str) -> bool:
        raise ProcessLookupError(pid)

    jails._joined = gone
    with pytest.raises(HostError, match="ended before it joined"):
        jail.host.fc_launch(req.model_copy(update={"port": "bgtt1b1b1b1"}))
    assert net.namespaces == {} and "bgtt1b1b1b1" not in net.links()
    jails._joined = lambda pid, netns: False
    monkeypatch.setattr(fcjail, "JOIN_WAIT_S", 0.05)
    with pytest.raises(HostError, match="did not join"):
        jail.host.fc_launch(req.model_copy(update={"port": "bgtt1c1c1c1"}))
    assert net.namespaces == {} and "bgtt1c1c1c1" not in net.links()

    def fail(what: str, spec: dict[str, Any], fds: list[int]) -> int:
        raise HostError("the jailer did not start")

    jails._spawn = fail
    with pytest.raises(HostError, match="did not start"):
        jail.host.fc_launch(req.model_copy(update={"port": "bgtt1e1e1e1"}))
    assert net.namespaces == {} and "bgtt1e1e1e1" not in net.links()

    # The cleanup removes a name left behind, and goes on to the jail after a failure.
    net.create_vm_netns(ns, "bgtt1f1f1f1", "br-t", (1, 1))
    assert jail.host.fc_netns_vms() == [VM]
    jail.host.fc_cleanup(VM)
    assert net.namespaces == {} and jail.host.fc_netns_vms() == []
    jail.layout.root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(net, "delete_netns", lambda name: (_ for _ in ()).throw(
        HostError("cannot delete it")))
    with pytest.raises(HostError, match="cannot delete it"):
        jail.host.fc_cleanup(VM)
    assert not jail.layout.jail_dir.exists()  # the jail went all the same


def test_jailer_netns_is_the_helpers_rule_not_the_daemons(tmp_path: Path) -> None:
    """With jailer_netns on, a launch must name a port of this install: a daemon cannot
    drop the namespace, nor name another install's link."""
    jail = Jail(tmp_path, jailer_netns=True)
    serial = f"{jail.state}/vms/{VM}/serial.log"
    kernel = {"kernel": ops.VMFile(path=f"{jail.state}/k", mode="r")}
    for port, why in ((None, "names no port"), ("eth0", "not one of this install's TAPs"),
                      ("bgtt2a0b1c2", "not one of this install's TAPs")):
        with pytest.raises(Refused, match=why):
            jail.executor.handle(launch(serial=serial, files=kernel, port=port))
    assert os.listdir(jail.root) == []
