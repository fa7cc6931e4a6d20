"""What the root helper will do for this install, and nothing else.

The daemon is trusted less than the helper: it parses guest output, git data and
image layers. A request that parsed (:mod:`banger.hostops.ops`) is still refused
unless every value in it is this install's own: its bridge and address, a TAP name
with its prefix, its nftables table, a guest address inside its network with a MAC
and an egress list that mean what they say. Values are compared, never quoted: a
name that is not exactly this install's is an error, so nothing a request carries can
change the meaning of an nft script or reach another interface.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from banger import egress
from banger.config import Config
from banger.errors import BangerError, Refused
from banger.hostops import ops
from banger.hostops.netlink import tap_prefix_for
from banger.hostops.nft import (
    LEGACY_NFT_TABLE,
    PIN_MAX_S,
    PIN_MIN_S,
    FirewallSettings,
    GuestRule,
    table_name,
)
from banger.layout import install_tag

TAP_SUFFIX = re.compile(r"[0-9a-f]{6}")  # network.tap_name: the prefix, 6 hex digits
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class Policy:
    """This install's names, fixed when the helper starts (its config is read once)."""

    firewall: FirewallSettings

    @classmethod
    def from_config(cls, cfg: Config) -> Policy:
        """The policy of the install ``cfg`` describes."""
        tag = install_tag(cfg.state_dir)
        return cls(FirewallSettings(
            table=table_name(tag), bridge=cfg.bridge_name, cidr=cfg.bridge_cidr,
            tap_prefix=tap_prefix_for(tag), dns_port=cfg.dns_port, vm_to_vm=cfg.vm_to_vm))

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The guests' network (the bridge's)."""
        return ipaddress.IPv4Interface(self.firewall.cidr).network

    def check(self, req: ops.Request) -> None:
        """Refuse ``req`` unless every value in it is this install's.

        Raises:
            Refused: naming the request and the value out of policy.
        """
        s = self.firewall
        match req:
            case ops.EnsureBridge(name=name, cidr=cidr):
                self._bridge(name)
                if cidr != s.cidr:
                    raise Refused(f"bridge.ensure: address {cidr!r} is not {s.cidr}")
            case ops.CreateTap(name=name, bridge=bridge):
                self._tap(req.op, name)
                self._bridge(bridge)
            case ops.DeleteLink(name=name):
                if name != s.bridge:
                    self._tap(req.op, name)
            case ops.ListLinks() | ops.NftLoad() | ops.IPForward():
                pass
            case ops.NftAdmit(rule=rule, previous=previous):
                self.rule(req.op, rule)
                for stale in previous:
                    self.rule(req.op, stale.rule)
                    self._addresses(req.op, stale.pins)
            case ops.NftForget(rule=rule, pins=pins):
                self.rule(req.op, rule)
                self._addresses(req.op, pins)
            case ops.NftPin(guest_ip=guest_ip, pins=pins):
                self._guest_ip(req.op, guest_ip)
                self._addresses(req.op, list(pins))
                for addr, seconds in pins.items():
                    if not PIN_MIN_S <= seconds <= PIN_MAX_S:
                        raise Refused(f"nft.pin: {seconds} s for {addr} is outside "
                                      f"{PIN_MIN_S}..{PIN_MAX_S}")
            case ops.NftDelete(table=table):
                if table not in (s.table, LEGACY_NFT_TABLE):
                    raise Refused(f"nft.delete: table {table!r} is not banger's ({s.table})")

    def rule(self, op: str, rule: ops.Rule) -> GuestRule:
        """``rule`` as the nft module's ``GuestRule``, once every value is in policy.

        Raises:
            Refused: a foreign TAP, an address outside the guests' network, a bad MAC
                or egress entry.
        """
        self._tap(op, rule.tap)
        self._guest_ip(op, rule.ip)
        if not MAC.fullmatch(rule.mac):
            raise Refused(f"{op}: {rule.mac!r} is not a MAC address")
        try:
            allowlist = egress.parse(rule.allow_out)
        except BangerError as exc:
            raise Refused(f"{op}: egress entry refused: {exc.message}") from exc
        return GuestRule(tap=rule.tap, ip=rule.ip, mac=rule.mac, nat=rule.nat,
                         allow_private=rule.allow_private, allowlist=allowlist)

    def _bridge(self, name: str) -> None:
        if name != self.firewall.bridge:
            raise Refused(f"bridge {name!r} is not this install's ({self.firewall.bridge})")

    def _tap(self, op: str, name: str) -> None:
        prefix = self.firewall.tap_prefix
        if not (name.startswith(prefix) and TAP_SUFFIX.fullmatch(name[len(prefix):])):
            raise Refused(f"{op}: {name!r} is not one of this install's TAPs "
                          f"({prefix} and 6 hex digits)")

    def _guest_ip(self, op: str, ip: str) -> None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise Refused(f"{op}: {ip!r} is not an IPv4 address") from exc
        net = self.network
        gw = ipaddress.IPv4Interface(self.firewall.cidr).ip
        if addr not in net or addr in (net.network_address, net.broadcast_address, gw):
            raise Refused(f"{op}: {ip} is not a guest address in {net}")

    @staticmethod
    def _addresses(op: str, addresses: list[str]) -> None:
        for a in addresses:
            try:
                ipaddress.IPv4Address(a)
            except ValueError as exc:
                raise Refused(f"{op}: {a!r} is not an IPv4 address") from exc
