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

from banger.cli.output import network_policy, vm_detail
from banger.daemon import vmcreate, vmpower
from banger.daemon.core import Daemon
from banger.daemon.firewall import (
    CLOSED_V4,
    FirewallSettings,
    GuestFirewall,
    GuestRule,
    admit_script,
    forget_script,
    ruleset,
    table_name,
)
from banger.errors import BadRequest, CommandFailed
from banger.runner import Result
from tests.conftest import FakeWorld
from tests.fakes import ok

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
    # a stale NAT element for this address is removed, none is added back
    assert plain.strip().endswith("delete element inet banger_t1 private_guests { 10.7.0.2 }")
    assert admit_script(SETTINGS, NAT_GUEST).strip().endswith(
        "add element inet banger_t1 nat_guests { 10.7.0.3 }")
    assert admit_script(SETTINGS, OPEN_GUEST).strip().endswith(
        "add element inet banger_t1 private_guests { 10.7.0.4 }")
    gone = forget_script(SETTINGS, NAT_GUEST)
    assert gone.count("delete element") == 4 and gone.count("add element") == 4


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
    fw = GuestFirewall(netns, SETTINGS, tmp_path / "host-network.json",  # type: ignore[arg-type]
                       ip_forward=fwd)
    for _ in range(2):  # a daemon restart loads over its own tables
        fw.load()
    for _ in range(2):
        fw.admit(NAT_GUEST)
        fw.admit(GUEST)
    guests = netns.nft("list", "set", "bridge", "banger_t1", "guests")
    assert '"bgtt1aaaaaa" . 06:00:0a:07:00:02 . 10.7.0.2' in guests
    assert '"bgtt1bbbbbb" . 06:00:0a:07:00:03 . 10.7.0.3' in guests
    nat = netns.nft("list", "set", "inet", "banger_t1", "nat_guests")
    assert "10.7.0.3" in nat and "10.7.0.2" not in nat
    # The same address admitted again without NAT (a new VM on a freed IP) loses it.
    fw.admit(GuestRule(tap="bgtt1dddddd", ip="10.7.0.3", mac="06:00:0a:07:00:03"))
    assert "10.7.0.3" not in netns.nft("list", "set", "inet", "banger_t1", "nat_guests")
    fw.forget("bgtt1aaaaaa")
    fw.forget("bgtt1aaaaaa")  # not admitted any more: nothing to do
    assert "bgtt1aaaaaa" not in netns.nft("list", "set", "bridge", "banger_t1", "guests")
    assert set(fw.admitted()) == {"bgtt1bbbbbb", "bgtt1dddddd"}
    # forget's own transaction is idempotent too (a retried teardown)
    netns.run(["nft", "-f", "-"], input=forget_script(SETTINGS, GUEST).encode(), desc="again")
    # restore_host's deletion removes both tables and nothing else
    from banger.daemon.network import HostChanges, restore_host
    from tests.fakes import FakeNet

    assert restore_host(FakeNet(), netns,  # type: ignore[arg-type]
                        HostChanges.load(tmp_path / "host-network.json"), ip_forward=fwd) == []
    assert netns.nft("list", "tables").strip() == ""


# ----------------------------------------------------------------- the daemon


class Feeds:
    """Records what a runner feeds to ``nft -f -``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.scripts: list[str] = []

    def run(self, argv: Sequence[str], **kw: Any) -> Result:
        if list(argv)[:1] == ["nft"]:
            self.scripts.append((kw.get("input") or b"").decode())
        return self.inner.run(argv, **kw)  # type: ignore[no-any-return]


@pytest.fixture
def feeds(daemon: Daemon, world: FakeWorld, tmp_path: Path) -> Feeds:
    rec = Feeds(world.runner)
    daemon.firewall.runner = rec  # type: ignore[assignment]
    # Never the host's own forwarding switch.
    daemon.firewall.ip_forward = tmp_path / "ip_forward"
    daemon.firewall.ip_forward.write_text("0\n")
    return rec


def test_a_vm_is_admitted_before_its_vmm_and_forgotten_with_its_tap(
        daemon: Daemon, world: FakeWorld, feeds: Feeds) -> None:
    launched_with: list[list[str]] = []
    real_launch = world.vmm.launch

    def launch(plan: Any) -> Any:
        launched_with.append(list(daemon.firewall.admitted()))
        return real_launch(plan)

    world.vmm.launch = launch  # type: ignore[method-assign]
    vm = vmcreate.create_sync(daemon, vmcreate.CreateParams(name="alpha", nat=True))
    assert launched_with == [[vm["tap"]]]
    rec = daemon.db.find_vm("alpha")
    assert rec is not None and rec.spec.nat and not rec.spec.allow_private
    assert any(f'"{vm["tap"]}" . {vm["mac"]} . {vm["ip"]}' in s and
               f"add element inet {daemon.firewall.settings.table} nat_guests {{ {vm['ip']} }}"
               in s for s in feeds.scripts)
    assert daemon.firewall.ip_forward.read_text() == "1\n"
    vmpower.stop(daemon, "alpha")
    assert daemon.firewall.admitted() == {}
    assert f"delete element bridge {daemon.firewall.settings.table} guests" in feeds.scripts[-1]


def test_nat_defaults_to_the_config_and_allow_private_needs_it(
        daemon: Daemon, feeds: Feeds) -> None:
    vm = vmcreate.create_sync(daemon, vmcreate.CreateParams(name="plain"))
    assert vm["spec"]["nat"] is False and vm["spec"]["allow_private"] is False
    assert daemon.firewall.ip_forward.read_text() == "0\n"  # no NAT guest: left alone
    with pytest.raises(BadRequest, match="allow-private"):
        vmcreate.create_sync(daemon, vmcreate.CreateParams(name="odd", allow_private=True))
    vm = vmcreate.create_sync(daemon, vmcreate.CreateParams(name="open", nat=True,
                                                            allow_private=True))
    assert vm["spec"]["allow_private"] is True
    assert "network" in vm_detail(vm) and "private ranges included" in vm_detail(vm)


def test_a_vm_whose_admission_fails_does_not_run(daemon: Daemon, world: FakeWorld,
                                                 feeds: Feeds) -> None:
    daemon.ensure_network()  # the rules load; only the VM's own elements are refused
    world.runner.on(["nft"], ok(rc=1, err="Error: Could not process rule"))
    with pytest.raises(CommandFailed):
        vmcreate.create_sync(daemon, vmcreate.CreateParams(name="cut"))
    assert world.vmm.launched == []
    assert daemon.db.find_vm("cut") is None


def test_network_policy_line() -> None:
    assert network_policy({"nat": False}) == "banger DNS only (no NAT)"
    assert network_policy({"nat": True, "allow_private": False}) == \
        "NAT: the outside world except private ranges"
