"""The guests' nftables policy: the ruleset text, nft's own verdict on it (in a network
namespace of the test's own), and the daemon admitting and forgetting VMs."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from banger import egress
from banger.api.params import CreateParams, EgressParams
from banger.cli.output import network_policy, vm_detail
from banger.daemon import vmcreate, vmegress, vmpower
from banger.daemon.core import Daemon
from banger.daemon.firewall import GuestFirewall
from banger.errors import BadRequest, CommandFailed
from banger.hostops.nft import (
    CLOSED_V4,
    PIN_MIN_S,
    PINS_PER_ANSWER,
    FirewallSettings,
    GuestRule,
    admit_script,
    forget_script,
    ruleset,
    table_name,
)
from banger.runner import Result
from tests.conftest import FakeWorld
from tests.fakes import local_hostops, ok

SETTINGS = FirewallSettings(table="banger_t1", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtt1", dns_port=53)
GUEST = GuestRule(tap="bgtt1aaaaaa", ip="10.7.0.2", mac="06:00:0a:07:00:02")
NAT_GUEST = GuestRule(tap="bgtt1bbbbbb", ip="10.7.0.3", mac="06:00:0a:07:00:03", nat=True)
OPEN_GUEST = GuestRule(tap="bgtt1cccccc", ip="10.7.0.4", mac="06:00:0a:07:00:04", nat=True,
                       allow_private=True)


# ----------------------------------------------------------------- the text


def test_ruleset_closes_everything_but_dns_replies_and_nat() -> None:
    rules = ruleset(SETTINGS)
    # idempotent: each table is replaced, never duplicated
    assert rules.startswith("table bridge banger_t1\ndelete table bridge banger_t1\n"
                            "table inet banger_t1\ndelete table inet banger_t1\n")
    # anti-spoofing: every frame from this install's TAPs needs its own tap.mac.ip
    assert 'iifname "bgtt1*" jump from_guest' in rules
    assert "iifname . ether saddr . ip saddr @guests return" in rules
    assert "arp saddr ether . arp saddr ip @guests_arp return" in rules
    # between guests: dropped on the bridge and when routed
    assert 'iifname "bgtt1*" oifname "bgtt1*" drop' in rules
    assert 'oifname "br-t" drop' in rules
    # the host: only DNS on the gateway, and replies
    assert "ip daddr 10.7.0.1 udp dport 53 accept" in rules
    assert "ip daddr 10.7.0.1 tcp dport 53 accept" in rules
    assert "ct state established,related accept" in rules
    assert 'iifname "br-t" ip saddr 10.7.0.0/24 jump from_guest' in rules
    # out: only NAT guests, never the closed ranges unless allowed, masquerade NAT only
    assert "ip saddr != @nat_guests drop" in rules
    assert rules.index("@private_guests accept") < rules.index("ip daddr @closed drop")
    assert 'oifname != "br-t" ip saddr @nat_guests masquerade' in rules
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                 "169.254.0.0/16", "127.0.0.0/8"):
        assert cidr in CLOSED_V4 and cidr in rules
    # the benchmark range stays open to NAT guests (the e2e "outside" lives there)
    assert "198.18" not in rules


def test_vm_to_vm_opens_only_the_guest_to_guest_rules() -> None:
    closed, opened = ruleset(SETTINGS), ruleset(FirewallSettings(
        table="banger_t1", bridge="br-t", cidr="10.7.0.1/24", tap_prefix="bgtt1",
        vm_to_vm=True))
    assert 'iifname "bgtt1*" oifname "bgtt1*" accept' in opened
    assert 'oifname "br-t" accept' in opened
    assert closed.replace('"bgtt1*" drop', '"bgtt1*" accept').replace(
        'oifname "br-t" drop', 'oifname "br-t" accept') == opened


def test_admit_resets_egress_and_adds_only_what_the_spec_allows() -> None:
    plain = admit_script(SETTINGS, GUEST)
    assert 'add element bridge banger_t1 guests { "bgtt1aaaaaa" . 06:00:0a:07:00:02 . 10.7.0.2 }' \
        in plain
    # stale egress elements for this address are removed, none is added back
    assert plain.strip().endswith("delete element inet banger_t1 allowlisted { 10.7.0.2 }")
    assert "add element inet banger_t1 nat_guests { 10.7.0.2 }\ndelete" in plain
    assert admit_script(SETTINGS, NAT_GUEST).strip().endswith(
        "add element inet banger_t1 nat_guests { 10.7.0.3 }")
    assert admit_script(SETTINGS, OPEN_GUEST).strip().endswith(
        "add element inet banger_t1 private_guests { 10.7.0.4 }")
    gone = forget_script(SETTINGS, NAT_GUEST)
    assert gone.count("delete element") == 5 and gone.count("add element") == 5
    allowed = admit_script(SETTINGS, GuestRule(
        tap="bgtt1cccccc", ip="10.7.0.4", mac="06:00:0a:07:00:04", nat=True,
        allowlist=egress.parse(["198.51.100.0/24", "203.0.113.9", "ok.test"])))
    assert allowed.strip().endswith("add element inet banger_t1 allow_net "
                                    "{ 10.7.0.4 . 198.51.100.0/24, 10.7.0.4 . 203.0.113.9/32 }")
    assert "add element inet banger_t1 allowlisted { 10.7.0.4 }" in allowed


@pytest.mark.parametrize("bad", [
    {"tap": 'x" accept; #'}, {"tap": "a" * 16}, {"ip": "10.7.0.2 }"}, {"mac": "06:00:0a:07:00"},
    {"mac": "06:00:0a:07:00:02 . 1"},
])
def test_guest_rules_refuse_what_would_change_the_ruleset(bad: dict[str, str]) -> None:
    fields = {"tap": GUEST.tap, "ip": GUEST.ip, "mac": GUEST.mac, **bad}
    with pytest.raises(ValueError):
        GuestRule(**fields)  # type: ignore[arg-type]


def test_settings_refuse_bad_names() -> None:
    with pytest.raises(ValueError):
        FirewallSettings(table="banger-x", bridge="br", cidr="10.7.0.1/24", tap_prefix="bgt")
    with pytest.raises(ValueError):
        FirewallSettings(table="banger_x", bridge='br"', cidr="10.7.0.1/24", tap_prefix="bgt")
    assert table_name("0123ab") == "banger_0123ab"


# ----------------------------------------------------------------- real nft


class NamespaceRunner:
    """Runs argv inside the network namespace of process ``pid`` (the test's own)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def run(self, argv: Sequence[str], *, desc: str, timeout: float = 60.0,
            input: bytes | None = None, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Result:
        full = ["nsenter", "-t", str(self.pid), "-n", *argv]
        proc = subprocess.run(full, input=input, capture_output=True, timeout=timeout)
        res = Result(list(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandFailed(f"{desc} failed", stderr=res.err)
        return res

    def nft(self, *args: str) -> str:
        return self.run(["nft", *args], desc="nft").out


@pytest.fixture
def netns() -> Iterator[NamespaceRunner]:
    """An empty network namespace of this test's own (nothing on the host is touched)."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"):
        pytest.skip("needs root, nft and unshare")
    holder = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    try:
        runner = NamespaceRunner(holder.pid)
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            pytest.fail("unshare did not make a network namespace")
        yield runner
    finally:
        holder.kill()
        holder.wait()


def test_nft_accepts_the_ruleset_and_admit_forget_are_idempotent(
        netns: NamespaceRunner, tmp_path: Path) -> None:
    fwd = tmp_path / "ip_forward"
    fwd.write_text("0\n")
    fw = GuestFirewall(local_hostops(netns, SETTINGS, ip_forward=fwd), SETTINGS,
                       tmp_path / "host-network.json")
    assert netns.nft("list", "tables").strip() == ""  # nothing until the first guest
    for _ in range(2):
        fw.admit(NAT_GUEST)
        fw.admit(GUEST)
    assert netns.nft("list", "tables").split() == ["table", "bridge", "banger_t1",
                                                   "table", "inet", "banger_t1"]
    guests = netns.nft("list", "set", "bridge", "banger_t1", "guests")
    assert '"bgtt1aaaaaa" . 06:00:0a:07:00:02 . 10.7.0.2' in guests
    assert '"bgtt1bbbbbb" . 06:00:0a:07:00:03 . 10.7.0.3' in guests
    nat = netns.nft("list", "set", "inet", "banger_t1", "nat_guests")
    assert "10.7.0.3" in nat and "10.7.0.2" not in nat
    assert fwd.read_text() == "1\n"
    # The same address admitted again without NAT (a new VM on a freed IP) loses it.
    fw.admit(GuestRule(tap="bgtt1dddddd", ip="10.7.0.3", mac="06:00:0a:07:00:03"))
    assert "10.7.0.3" not in netns.nft("list", "set", "inet", "banger_t1", "nat_guests")
    assert "bgtt1bbbbbb" not in netns.nft("list", "set", "bridge", "banger_t1", "guests")
    fw.forget("bgtt1aaaaaa")
    fw.forget("bgtt1aaaaaa")  # not admitted any more: nothing to do
    assert "bgtt1aaaaaa" not in netns.nft("list", "set", "bridge", "banger_t1", "guests")
    assert set(fw.admitted()) == {"bgtt1dddddd"}
    # forget's own transaction is idempotent too (a retried teardown)
    netns.run(["nft", "-f", "-"], input=forget_script(SETTINGS, GUEST).encode(), desc="again")
    # the last guest takes the tables with it, and the record says none is left
    fw.forget("bgtt1dddddd")
    assert netns.nft("list", "tables").strip() == ""
    from banger.daemon.network import HostChanges, restore_host
    from tests.fakes import FakeNet

    changes = HostChanges.load(tmp_path / "host-network.json")
    assert changes.nft_table is None
    fw.admit(GUEST)  # loaded again with the next guest
    host = local_hostops(netns, SETTINGS, FakeNet(), fwd)
    assert restore_host(host, HostChanges.load(tmp_path / "host-network.json")) == []
    assert netns.nft("list", "tables").strip() == ""
    assert fwd.read_text() == "0\n"


ALLOWED = GuestRule(tap="bgtt1eeeeee", ip="10.7.0.6", mac="06:00:0a:07:00:06", nat=True,
                    allowlist=egress.parse(["198.51.100.0/24", "ok.test"]))


def test_allowlists_and_pins_in_real_nft(netns: NamespaceRunner, tmp_path: Path) -> None:
    fwd = tmp_path / "ip_forward"
    fwd.write_text("0\n")
    now = [1000.0]
    fw = GuestFirewall(local_hostops(netns, SETTINGS, ip_forward=fwd), SETTINGS,
                       tmp_path / "host-network.json", clock=lambda: now[0])
    fw.admit(ALLOWED)
    fw.admit(NAT_GUEST)
    assert "10.7.0.6" in netns.nft("list", "set", "inet", "banger_t1", "allowlisted")
    assert "10.7.0.6 . 198.51.100.0/24" in netns.nft("list", "set", "inet", "banger_t1",
                                                     "allow_net")
    # an answer for the allowlisted guest: public addresses pinned with their TTL
    # (at least PIN_MIN_S), private ones not (no allow_private)
    assert fw.pin("10.7.0.6", [("198.18.0.2", 3600), ("198.18.0.3", 1),
                               ("169.254.169.254", 60), ("10.1.2.3", 60)]) == \
        ["198.18.0.2", "198.18.0.3"]
    pins = netns.nft("list", "set", "inet", "banger_t1", "allow_dns")
    assert "10.7.0.6 . 198.18.0.2 timeout 1h" in pins
    assert f"10.7.0.6 . 198.18.0.3 timeout {PIN_MIN_S}s" in pins
    assert "169.254" not in pins and "10.1.2.3" not in pins
    # pinned again: the new timeout counts
    fw.pin("10.7.0.6", [("198.18.0.2", 120)])
    assert "10.7.0.6 . 198.18.0.2 timeout 2m" in netns.nft("list", "set", "inet", "banger_t1",
                                                           "allow_dns")
    # a guest without an allowlist, or an unknown address, pins nothing
    assert fw.pin("10.7.0.3", [("198.18.0.2", 60)]) == []
    assert fw.pin("10.7.0.99", [("198.18.0.2", 60)]) == []
    # a bounded number per answer
    many = [(f"198.18.1.{i}", 60) for i in range(1, 100)]
    assert len(fw.pin("10.7.0.6", many)) == PINS_PER_ANSWER
    # set-egress: the same TAP re-admitted with another allowlist loses the old one's
    # networks and pins
    fw.admit(GuestRule(tap=ALLOWED.tap, ip=ALLOWED.ip, mac=ALLOWED.mac, nat=True,
                       allowlist=egress.parse(["203.0.113.0/24"])))
    assert "198.51.100" not in netns.nft("list", "set", "inet", "banger_t1", "allow_net")
    assert "10.7.0.6" not in netns.nft("list", "set", "inet", "banger_t1", "allow_dns")
    fw.forget(ALLOWED.tap)
    for name in ("allowlisted", "allow_net", "allow_dns"):
        assert "10.7.0.6" not in netns.nft("list", "set", "inet", "banger_t1", name)


def test_dns_policy_follows_the_guests_spec(tmp_path: Path) -> None:
    fw = GuestFirewall(local_hostops(ok_runner(), SETTINGS, ip_forward=tmp_path / "fwd"),
                       SETTINGS, tmp_path / "hn.json")
    (tmp_path / "fwd").write_text("0\n")
    for g in (GUEST, NAT_GUEST, ALLOWED):
        fw.admit(g)
    closed = fw.dns_policy(GUEST.ip)
    assert closed is not None and not closed.forward
    everything = fw.dns_policy(NAT_GUEST.ip)
    assert everything is not None and everything.forward and everything.allows is None
    listed = fw.dns_policy(ALLOWED.ip)
    assert listed is not None and listed.allows is not None
    assert listed.allows("ok.test") and not listed.allows("other.test")
    unknown = fw.dns_policy("10.7.0.77")  # a guest address with no VM: .vm only
    assert unknown is not None and not unknown.forward
    assert fw.dns_policy("10.7.0.1") is None  # the host itself (the gateway)
    assert fw.dns_policy("127.0.0.1") is None


def ok_runner() -> Any:
    class Runner:
        def run(self, argv: Sequence[str], **kw: Any) -> Result:
            return Result(list(argv), 0, b"", b"")
    return Runner()


# ----------------------------------------------------------------- the daemon


class Feeds:
    """Records what a runner feeds to ``nft -f -``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.scripts: list[str] = []
        self.ip_forward = Path("/nonexistent")

    def run(self, argv: Sequence[str], **kw: Any) -> Result:
        if list(argv)[:1] == ["nft"]:
            self.scripts.append((kw.get("input") or b"").decode())
        return self.inner.run(argv, **kw)  # type: ignore[no-any-return]


@pytest.fixture
def feeds(daemon: Daemon, world: FakeWorld, tmp_path: Path) -> Feeds:
    rec = Feeds(world.runner)
    # Never the host's own forwarding switch.
    rec.ip_forward = tmp_path / "ip_forward"
    rec.ip_forward.write_text("0\n")
    daemon.host = local_hostops(rec, daemon.firewall.settings, world.net, rec.ip_forward)
    daemon.firewall.host = daemon.host
    daemon.tap_pool.net = daemon.host
    return rec


def test_a_vm_is_admitted_before_its_vmm_and_forgotten_with_its_tap(
        daemon: Daemon, world: FakeWorld, feeds: Feeds) -> None:
    launched_with: list[list[str]] = []
    real_launch = world.vmm.launch

    def launch(plan: Any) -> Any:
        launched_with.append(list(daemon.firewall.admitted()))
        return real_launch(plan)

    world.vmm.launch = launch  # type: ignore[method-assign]
    vm = vmcreate.create_sync(daemon, CreateParams(name="alpha", nat=True))
    assert launched_with == [[vm["tap"]]]
    rec = daemon.db.find_vm("alpha")
    assert rec is not None and rec.spec.nat and not rec.spec.allow_private
    assert any(f'"{vm["tap"]}" . {vm["mac"]} . {vm["ip"]}' in s and
               f"add element inet {daemon.firewall.settings.table} nat_guests {{ {vm['ip']} }}"
               in s for s in feeds.scripts)
    assert feeds.ip_forward.read_text() == "1\n"
    vmpower.stop(daemon, "alpha")
    assert daemon.firewall.admitted() == {}
    # its elements go, then (the last guest) the tables
    assert f"delete element bridge {daemon.firewall.settings.table} guests" in feeds.scripts[-2]
    assert f"delete table inet {daemon.firewall.settings.table}" in feeds.scripts[-1]


def test_nat_defaults_to_the_config_and_allow_private_needs_it(
        daemon: Daemon, feeds: Feeds) -> None:
    vm = vmcreate.create_sync(daemon, CreateParams(name="plain"))
    assert vm["spec"]["nat"] is False and vm["spec"]["allow_private"] is False
    assert feeds.ip_forward.read_text() == "0\n"  # no NAT guest: left alone
    with pytest.raises(BadRequest, match="allow-private"):
        vmcreate.create_sync(daemon, CreateParams(name="odd", allow_private=True))
    vm = vmcreate.create_sync(daemon, CreateParams(name="open", nat=True,
                                                            allow_private=True))
    assert vm["spec"]["allow_private"] is True
    assert "network" in vm_detail(vm) and "private ranges included" in vm_detail(vm)


def test_a_vm_whose_admission_fails_does_not_run(daemon: Daemon, world: FakeWorld,
                                                 feeds: Feeds) -> None:
    daemon.ensure_network()  # the rules load; only the VM's own elements are refused
    world.runner.on(["nft"], ok(rc=1, err="Error: Could not process rule"))
    with pytest.raises(CommandFailed):
        vmcreate.create_sync(daemon, CreateParams(name="cut"))
    assert world.vmm.launched == []
    assert daemon.db.find_vm("cut") is None


def test_network_policy_line() -> None:
    assert network_policy({"nat": False}) == "banger DNS only (no NAT)"
    assert network_policy({"nat": True, "allow_private": False}) == \
        "NAT: the outside world except private ranges"


def test_allow_out_implies_nat_and_is_refused_with_no_nat(daemon: Daemon, feeds: Feeds) -> None:
    vm = vmcreate.create_sync(daemon, CreateParams(
        name="listed", allow_out=["OK.test", "198.51.100.7"]))
    assert vm["spec"]["nat"] is True
    assert vm["spec"]["allow_out"] == ["ok.test", "198.51.100.7/32"]
    assert "NAT: only ok.test, 198.51.100.7/32" in vm_detail(vm)
    rule = daemon.firewall.admitted()[vm["tap"]]
    assert rule.allowlist.domains == ("ok.test",)
    with pytest.raises(BadRequest, match="--no-nat"):
        vmcreate.create_sync(daemon, CreateParams(name="odd", nat=False,
                                                           allow_out=["ok.test"]))
    with pytest.raises(BadRequest, match="not an address"):
        vmcreate.create_sync(daemon, CreateParams(name="odd", allow_out=["nope"]))
    assert daemon.db.find_vm("odd") is None


def test_set_egress_changes_a_running_vms_rules_at_once(daemon: Daemon, feeds: Feeds) -> None:
    vm = vmcreate.create_sync(daemon, CreateParams(name="busy"))
    tap = vm["tap"]
    res = vmegress.set_egress(daemon, EgressParams(name="busy",
                                                            allow_out=["ok.test"]))
    assert res == {"name": "busy", "applied": True, "nat": True, "allow_private": False,
                   "allow_out": ["ok.test"]}
    assert daemon.firewall.admitted()[tap].allowlist.domains == ("ok.test",)
    assert f"allowlisted {{ {vm['ip']} }}" in feeds.scripts[-1]
    # options not given keep their value; clearing the allowlist keeps NAT
    res = vmegress.set_egress(daemon, EgressParams(name="busy", allow_out=[]))
    assert res["nat"] is True and res["allow_out"] == []
    assert not daemon.firewall.admitted()[tap].allowlist
    res = vmegress.set_egress(daemon, EgressParams(name="busy", nat=False))
    assert res["nat"] is False and not daemon.firewall.admitted()[tap].nat
    rec = daemon.db.find_vm("busy")
    assert rec is not None and not rec.spec.nat
    # a stopped VM: the store only, applied at the next start
    vmpower.stop(daemon, "busy")
    res = vmegress.set_egress(daemon, EgressParams(name="busy", nat=True,
                                                            allow_private=True))
    assert res["applied"] is False and daemon.firewall.admitted() == {}
    vmpower.start(daemon, "busy")
    rule = next(iter(daemon.firewall.admitted().values()))
    assert rule.nat and rule.allow_private


def test_set_egress_keeps_the_old_policy_when_nft_refuses(
        daemon: Daemon, world: FakeWorld, feeds: Feeds) -> None:
    vmcreate.create_sync(daemon, CreateParams(name="kept", nat=True))
    world.runner.on(["nft"], ok(rc=1, err="Error: Could not process rule"))
    with pytest.raises(CommandFailed):
        vmegress.set_egress(daemon, EgressParams(name="kept", allow_out=["ok.test"]))
    rec = daemon.db.find_vm("kept")
    assert rec is not None and rec.spec.allow_out == [] and rec.spec.nat
    assert not next(iter(daemon.firewall.admitted().values())).allowlist
