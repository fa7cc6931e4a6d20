"""The host operations (banger.hostops): the policy's refusals, table by table; the
helper's socket (who may connect, what an unreadable line costs); a fuzz test of its
protocol; and the in-process and socket transports agreeing."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.errors import BadRequest, DaemonUnavailable, Refused
from banger.hostops import ops
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.nft import FirewallSettings, GuestRule
from banger.hostops.policy import Policy
from banger.hostops.server import HelperServer, answer
from tests.fakes import FakeNet, FakeRunner

SETTINGS = FirewallSettings(table="banger_t1", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtt1", dns_port=53)
TAP = "bgtt1abc123"
RULE = ops.Rule(tap=TAP, ip="10.7.0.2", mac="06:00:0a:07:00:02")


class Recorder:
    """A fake host: links in a FakeNet, nft scripts kept, forwarding in a file."""

    def __init__(self, tmp: Path) -> None:
        self.net = FakeNet()
        self.runner = FakeRunner()
        self.scripts: list[str] = []
        real = self.runner.run

        def run(argv: Any, **kw: Any) -> Any:
            self.scripts.append((kw.get("input") or b"").decode())
            return real(argv, **kw)

        self.runner.run = run  # type: ignore[method-assign]
        self.fwd = tmp / "ip_forward"
        self.fwd.write_text("0\n")
        self.executor = Executor(Policy(SETTINGS), self.runner, self.net, self.fwd)

    def touched(self) -> bool:
        return bool(self.scripts or self.net.links()) or self.fwd.read_text() != "0\n"


@pytest.fixture
def rec(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


# ----------------------------------------------------------------- the policy

REFUSED: list[tuple[str, Any]] = [
    ("another bridge", ops.EnsureBridge(name="docker0", cidr="10.7.0.1/24")),
    ("another address for the bridge", ops.EnsureBridge(name="br-t", cidr="10.0.0.1/8")),
    ("a TAP without the install's prefix", ops.CreateTap(name="tap0", bridge="br-t")),
    ("another install's TAP", ops.CreateTap(name="bgtt2abc123", bridge="br-t")),
    ("a TAP name that is not prefix + 6 hex", ops.CreateTap(name="bgtt1abcxyz", bridge="br-t")),
    ("a TAP on another bridge", ops.CreateTap(name=TAP, bridge="docker0")),
    ("deleting the host's uplink", ops.DeleteLink(name="eth0")),
    ("deleting the loopback", ops.DeleteLink(name="lo")),
    ("another nft table", ops.NftDelete(table="filter")),
    ("another install's nft table", ops.NftDelete(table="banger_t2")),
    ("a guest outside the bridge's network", ops.NftAdmit(rule=RULE.model_copy(
        update={"ip": "192.168.1.5"}))),
    ("the gateway as a guest", ops.NftAdmit(rule=RULE.model_copy(update={"ip": "10.7.0.1"}))),
    ("the broadcast address as a guest", ops.NftAdmit(rule=RULE.model_copy(
        update={"ip": "10.7.0.255"}))),
    ("an address that is not one", ops.NftAdmit(rule=RULE.model_copy(
        update={"ip": "10.7.0.2 }"}))),
    ("nft text in a MAC", ops.NftAdmit(rule=RULE.model_copy(update={"mac": "06:00 } ; flus"}))),
    ("upper-case MAC (never what banger writes)", ops.NftAdmit(rule=RULE.model_copy(
        update={"mac": "06:00:0A:07:00:02"}))),
    ("a foreign TAP in an admitted rule", ops.NftAdmit(rule=RULE.model_copy(
        update={"tap": "eth0"}))),
    ("a bad egress entry", ops.NftAdmit(rule=RULE.model_copy(
        update={"allow_out": ["10.0.0.0/8 } ; flush ruleset"]}))),
    ("a foreign rule among the replaced ones", ops.NftAdmit(rule=RULE, previous=[
        ops.Stale(rule=RULE.model_copy(update={"tap": "veth0"}))])),
    ("a pin that is not an address", ops.NftForget(rule=RULE, pins=["1.2.3.4 }"])),
    ("pins for a foreign guest", ops.NftPin(guest_ip="172.17.0.2", pins={"1.1.1.1": 60})),
    ("a pin shorter than the floor", ops.NftPin(guest_ip="10.7.0.2", pins={"1.1.1.1": 1})),
    ("a pin longer than a day", ops.NftPin(guest_ip="10.7.0.2", pins={"1.1.1.1": 10**6})),
    ("a pinned name, not an address", ops.NftPin(guest_ip="10.7.0.2",
                                                 pins={"example.com": 60})),
]


@pytest.mark.parametrize(("why", "req"), REFUSED, ids=[w for w, _ in REFUSED])
def test_out_of_policy_requests_are_refused_and_do_nothing(
        rec: Recorder, why: str, req: Any) -> None:
    with pytest.raises(Refused):
        rec.executor.handle(req)
    assert not rec.touched(), why


def test_in_policy_requests_are_done(rec: Recorder) -> None:
    host = HostOps.local(rec.executor)
    host.ensure_bridge("br-t", "10.7.0.1/24")
    host.create_tap(TAP, "br-t")
    assert sorted(host.links()) == sorted(["br-t", TAP])
    host.nft_load(drop_legacy=True)
    assert rec.scripts[-1].startswith("table ip banger\ndelete table ip banger\n")
    assert "table inet banger_t1 {" in rec.scripts[-1]
    g = GuestRule(tap=TAP, ip="10.7.0.2", mac="06:00:0a:07:00:02", nat=True)
    host.nft_admit(g)
    assert f'add element bridge banger_t1 guests {{ "{TAP}" . 06:00:0a:07:00:02 . 10.7.0.2 }}' \
        in rec.scripts[-1]
    host.nft_pin("10.7.0.2", {"198.51.100.7": 60})
    assert "10.7.0.2 . 198.51.100.7 timeout 60s" in rec.scripts[-1]
    host.nft_forget(g, ["198.51.100.7"])
    assert "delete element inet banger_t1 allow_dns { 10.7.0.2 . 198.51.100.7 }" \
        in rec.scripts[-1]
    assert host.ip_forward("1") == "0" and rec.fwd.read_text() == "1\n"
    assert host.ip_forward() == "1"
    host.delete_link(TAP)
    host.delete_link("br-t")
    host.nft_delete("banger_t1")
    assert host.links() == []


def test_the_policy_comes_from_the_config(tmp_path: Path) -> None:
    from banger.config import parse_config
    from banger.layout import install_tag

    cfg = parse_config({"state_dir": str(tmp_path), "bridge_name": "br-q",
                        "bridge_cidr": "10.9.0.1/24"})
    p = Policy.from_config(cfg)
    tag = install_tag(tmp_path)
    assert p.firewall.bridge == "br-q" and p.firewall.cidr == "10.9.0.1/24"
    assert p.firewall.table == f"banger_{tag}" and p.firewall.tap_prefix == f"bgt{tag}"
    p.check(ops.CreateTap(name=f"bgt{tag}00ff00", bridge="br-q"))
    with pytest.raises(Refused):
        p.check(ops.CreateTap(name="bgt000000ff00ff", bridge="br-q"))


# ----------------------------------------------------------------- shapes

BAD_SHAPES = [
    ({"v": 1, "id": 1, "req": {"op": "shell", "argv": ["sh"]}}, "req"),
    ({"v": 1, "id": 1, "req": {"op": "tap.create", "name": TAP, "bridge": "br-t",
                               "owner": 0}}, "owner"),
    ({"v": 1, "id": 1, "req": {"op": "tap.create", "name": "x" * 16, "bridge": "br-t"}},
     "name"),
    ({"v": 1, "id": 1, "req": {"op": "ip_forward", "set": 1}}, "set"),
    ({"v": 1, "id": 1, "req": {"op": "ip_forward", "set": "2"}}, "set"),
    ({"v": 2, "id": 1, "req": {"op": "link.list"}}, "v"),
    ({"id": 1, "req": {"op": "link.list"}}, "v"),
    ({"v": 1, "id": 1, "req": {"op": "nft.pin", "guest_ip": "10.7.0.2",
                               "pins": {"1.1.1.1": "60"}}}, "pins"),
]


@pytest.mark.parametrize(("frame", "field"), BAD_SHAPES)
def test_unknown_shapes_are_refused_before_any_check(
        rec: Recorder, frame: dict[str, Any], field: str) -> None:
    reply = answer(rec.executor, json.dumps(frame).encode())
    assert reply.error is not None and reply.error.code == BadRequest.code
    assert field in reply.error.message and reply.id in (1, -1)
    assert not rec.touched()


# ----------------------------------------------------------------- fuzz

TRICKY = st.sampled_from([
    "br-t", "docker0", TAP, "bgtt1", "bgtt1abc12", "eth0", "banger_t1", "banger", "filter",
    "10.7.0.2", "10.7.0.1", "0.0.0.0", "255.255.255.255", "10.7.0.1/24", "06:00:0a:07:00:02",
    "}", '"', "\n", ";", "flush ruleset", "*", "../../etc", "", "a" * 300, "é", "\x00",
    "/dev/loop0", "/dev/loop7", "/dev/sda", "/etc/shadow", "/nonexistent/state/vms/x",
    "0123456789ab",
])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) | st.floats(allow_nan=False)
    | TRICKY | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=12)
OPS = st.sampled_from(["bridge.ensure", "tap.create", "link.delete", "link.list", "nft.load",
                       "nft.admit", "nft.forget", "nft.pin", "nft.delete", "ip_forward",
                       "loop.attach", "loop.detach", "loop.list", "dm.snapshot", "dm.remove",
                       "dm.list", "exec", "", "NFT.LOAD"])
FIELDS = st.sampled_from(["name", "cidr", "bridge", "rule", "previous", "pins", "guest_ip",
                          "table", "set", "drop_legacy", "tap", "ip", "mac", "allow_out",
                          "nat", "argv", "path", "read_only", "device", "vm_id", "origin",
                          "cow"])
RULES = st.fixed_dictionaries({"tap": TRICKY, "ip": TRICKY, "mac": TRICKY},
                              optional={"allow_out": st.lists(TRICKY, max_size=3),
                                        "nat": VALUES})
REQUESTS = st.builds(
    lambda op, fields, rule: {"op": op, **fields, **({"rule": rule} if rule else {})},
    OPS, st.dictionaries(FIELDS, VALUES | TRICKY, max_size=4), st.none() | RULES)
FRAMES = st.one_of(
    st.binary(max_size=200),
    VALUES.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda v, i, r: json.dumps({"v": v, "id": i, "req": r}).encode(),
              st.sampled_from([1, 1, 1, 2, "1", None]), st.integers(-5, 2**60), REQUESTS),
)


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=FRAMES)
def test_fuzzed_frames_get_a_reply_and_never_leave_the_policy(
        rec: Recorder, frame: bytes) -> None:
    reply = answer(rec.executor, frame)
    assert (reply.error is None) or reply.error.code in (
        "bad_request", "refused", "host_error", "command_failed"), reply
    # Whatever got through was this install's: its bridge and TAP names only, and nft
    # scripts about its own tables.
    for link in rec.net.links():
        assert link == "br-t" or (link.startswith("bgtt1") and len(link) == 11), link
    for script in rec.scripts:
        for word in script.split():
            assert not word.startswith("banger_") or word == "banger_t1", script
    # Loop devices and dm targets: nothing attached outside the state dir, no target
    # made, only this install's removed.
    for argv in rec.runner.calls:
        assert argv[:2] not in (["losetup", "--find"], ["dmsetup", "create"]), argv
        if argv[:2] == ["dmsetup", "remove"]:
            assert argv[-1].startswith(rec.executor.policy.dm_name("")), argv


# ----------------------------------------------------------------- the socket


@pytest.fixture
def helper(rec: Recorder, tmp_path: Path) -> Iterator[tuple[Path, HelperServer]]:
    path = tmp_path / "helper.sock"
    server = HelperServer(rec.executor, path, os.getuid(), os.getgid())
    stop = threading.Event()
    t = threading.Thread(target=server.serve_until, args=(stop,), daemon=True)
    t.start()
    yield path, server
    stop.set()
    t.join(5)
    server.close()


def test_the_socket_transport_does_what_the_local_one_does(
        helper: tuple[Path, HelperServer], rec: Recorder) -> None:
    path, _ = helper
    assert (path.stat().st_mode & 0o777) == 0o600 and path.stat().st_uid == os.getuid()
    host = HostOps.connect(path)
    host.ensure_bridge("br-t", "10.7.0.1/24")
    host.create_tap(TAP, "br-t")
    assert sorted(host.links()) == sorted(["br-t", TAP])
    host.nft_admit(GuestRule(tap=TAP, ip="10.7.0.2", mac="06:00:0a:07:00:02"))
    assert TAP in rec.scripts[-1]
    # a refusal comes back as the same error, with its code
    with pytest.raises(Refused, match="not one of this install's TAPs"):
        host.create_tap("eth1", "br-t")
    # a host failure too (FakeNet refuses a TAP that exists)
    with pytest.raises(Exception, match="exists"):
        host.create_tap(TAP, "br-t")


def test_a_helper_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match="root helper") as exc:
        HostOps.connect(tmp_path / "none.sock").links()
    assert "banger system status" in exc.value.hint


def test_long_and_broken_lines_cost_a_reply_not_the_helper(
        helper: tuple[Path, HelperServer]) -> None:
    path, _ = helper
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"{not json\n")
        first = json.loads(s.makefile("rb").readline())
        assert first["id"] == -1 and first["error"]["code"] == "bad_request"
        s.sendall(b"x" * (ops.MAX_REQUEST + 10) + b"\n")
        line = s.makefile("rb").readline()
        assert b"longer than" in line
    # still serving
    assert HostOps.connect(path).links() == []


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="needs root (to connect as another user) and /usr/bin/python3")
def test_a_foreign_uid_is_closed_without_a_reply(rec: Recorder) -> None:
    nobody = pwd.getpwnam("nobody")
    # A directory nobody can reach, and a socket file it may open: the peer check is
    # what must stop it.
    where = Path(tempfile.mkdtemp(prefix="banger-helper-test-", dir="/tmp"))
    os.chmod(where, 0o755)
    path = where / "helper.sock"
    server = HelperServer(rec.executor, path, os.getuid(), os.getgid())
    os.chmod(path, 0o666)
    stop = threading.Event()
    t = threading.Thread(target=server.serve_until, args=(stop,), daemon=True)
    t.start()
    request = json.dumps({"v": 1, "id": 1, "req": {"op": "bridge.ensure", "name": "br-t",
                                                   "cidr": "10.7.0.1/24"}}) + "\n"
    # The helper may close before the request is even sent: a reset or broken pipe at
    # any step is the same "closed, not answered".
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        "try:\n"
        f"    s.sendall({request.encode()!r})\n"
        "    print(repr(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    print('reset')\n"
    )
    try:
        res = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True,
                             text=True, timeout=30, user=nobody.pw_uid, group=nobody.pw_gid,
                             extra_groups=[], cwd="/")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() in ("b''", "reset")  # closed, not answered
        assert not rec.touched()
        # the owner, on the same socket, is answered
        HostOps.connect(path).ensure_bridge("br-t", "10.7.0.1/24")
        assert rec.net.links() == ["br-t"]
    finally:
        stop.set()
        t.join(5)
        server.close()
        shutil.rmtree(where, ignore_errors=True)


def test_doctor_checks_the_helper_answers_and_refuses(
        helper: tuple[Path, HelperServer], tmp_path: Path) -> None:
    import importlib

    from banger.config import parse_config

    doctor = importlib.import_module("banger.daemon.doctor")
    path, _ = helper
    ok = doctor._helper(parse_config({"helper_socket": str(path)}))
    assert ok.status == doctor.Status.OK and "refuses" in ok.detail
    gone = doctor._helper(parse_config({"helper_socket": str(tmp_path / "none.sock")}))
    assert gone.status == doctor.Status.FAIL and "root helper" in gone.detail
    none = doctor._helper(parse_config({}))
    assert none.status == doctor.Status.OK


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", ["local", "socket"])
def test_dns_sockets_are_bound_by_the_host_operations_and_handed_over(
        tmp_path: Path, transport: str) -> None:
    port = _free_port()
    settings = FirewallSettings(table="banger_t1", bridge="br-t", cidr="127.0.0.1/8",
                                tap_prefix="bgtt1", dns_port=port)
    executor = Executor(Policy(settings), FakeRunner(), FakeNet(), tmp_path / "fwd")
    stop = threading.Event()
    server = None
    if transport == "local":
        host = HostOps.local(executor)
    else:
        server = HelperServer(executor, tmp_path / "h.sock", os.getuid(), os.getgid())
        threading.Thread(target=server.serve_until, args=(stop,), daemon=True).start()
        host = HostOps.connect(tmp_path / "h.sock")
    try:
        udp, tcp = host.dns_sockets()
        with udp, tcp:
            assert udp.getsockname() == ("127.0.0.1", port)
            assert tcp.getsockname() == ("127.0.0.1", port)
            assert udp.type == socket.SOCK_DGRAM and tcp.type == socket.SOCK_STREAM
            # they are live: a datagram sent to the port arrives on the handed-over socket
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.sendto(b"ping", ("127.0.0.1", port))
            udp.settimeout(5)
            assert udp.recvfrom(16)[0] == b"ping"
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
    finally:
        stop.set()
        if server is not None:
            server.close()
