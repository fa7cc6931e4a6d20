"""The guests' network policy: banger's own nftables tables, one pair per install.

A guest is hostile. From its TAP it may reach only:

- the ``.vm`` DNS server on its gateway (UDP and TCP, ``dns_port``);
- the host, in replies to connections the host opened (``ct state established,related``:
  ssh from the daemon);
- the outside world, when its VM has NAT; even then not the private and special ranges
  (:data:`CLOSED_V4`) unless the VM allows them.

Everything else is dropped: any other port on any host address (the gateway included),
other guests (unless ``vm_to_vm``), IPv6 and every other non-IPv4 protocol (banger gives
guests IPv4 only, so IPv6 to the host's link-local addresses stays closed), and frames
whose source MAC or IPv4 address is not the pair banger gave that TAP.

Two tables carry it, both named ``banger_<install tag>`` so two installs on one host
never touch each other's rules, and nothing else on the host is touched:

- ``bridge``: frames entering the bridge from this install's TAPs (``iifname
  "<tap prefix>*"``). Anti-spoofing is a set of ``tap . mac . ip`` (and the same for
  ARP's sender fields): a TAP with no element (a pool TAP, a VM whose admission failed)
  has its every frame dropped. Frames between two TAPs are bridged, not routed, so the
  ``inet`` forward hook never sees them (without ``br_netfilter``): guest-to-guest
  isolation is the bridge table's ``forward`` chain.
- ``inet``: what reaches the IP stack from the guests (the bridge, a guest address:
  the bridge table has already dropped everything else from a TAP, IPv6 included, and
  whatever else a user's own bridge carries is left alone). ``input`` (the host
  itself, every address) allows DNS on the gateway and replies; ``forward`` allows a
  guest out only when its IP is in ``nat_guests``; ``postrouting`` masquerades only
  those.

Per-VM state is set elements, added when a VM's TAP is attached (before its VMM runs)
and deleted when the TAP is released; the rules themselves never change while the
daemon runs. The IP-keyed ``inet`` sets are safe because the ``bridge`` table has
already dropped any frame whose source IP is not its TAP's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from banger.daemon.network import (
    IP_FORWARD,
    LEGACY_NFT_TABLE,
    HostChanges,
    enable_forwarding,
    gateway,
    nft_delete_tables,
)
from banger.runner import Runner

if TYPE_CHECKING:
    from banger.daemon.store import VMRecord

log = logging.getLogger("banger.firewall")

TABLE_PREFIX = "banger_"
# Private and special IPv4 ranges a NAT guest still cannot reach without --allow-private:
# RFC 1918, CGNAT (RFC 6598), link-local (cloud metadata at 169.254.169.254), loopback,
# "this network", and multicast + reserved + limited broadcast (224/4, 240/4).
CLOSED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
             "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3")
_TABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def table_name(install_tag: str) -> str:
    """The name of this install's two nftables tables (``inet`` and ``bridge``)."""
    name = TABLE_PREFIX + install_tag
    if not _TABLE_RE.fullmatch(name):
        raise ValueError(f"install tag {install_tag!r} does not make an nftables name")
    return name


@dataclass(frozen=True)
class FirewallSettings:
    """What the rules depend on; fixed for a daemon's lifetime (config is read once)."""

    table: str  # table_name(install tag)
    bridge: str
    cidr: str  # the bridge's gateway address and prefix, e.g. 172.29.0.1/24
    tap_prefix: str  # network.tap_prefix_for(install tag)
    dns_port: int = 53
    vm_to_vm: bool = False

    def __post_init__(self) -> None:
        # Everything here is pasted into nft's input: refuse anything that could
        # change the ruleset's meaning instead of quoting it.
        if not _TABLE_RE.fullmatch(self.table):
            raise ValueError(f"bad nftables table name {self.table!r}")
        for name in (self.bridge, self.tap_prefix):
            if not _IFNAME_RE.fullmatch(name):
                raise ValueError(f"bad interface name {name!r}")
        ipaddress.IPv4Interface(self.cidr)
        if not 1 <= self.dns_port <= 65535:
            raise ValueError(f"bad DNS port {self.dns_port}")


@dataclass(frozen=True)
class GuestRule:
    """One VM's entry in the policy: its TAP, the address pair banger gave it, its egress."""

    tap: str
    ip: str
    mac: str
    nat: bool = False
    allow_private: bool = False

    def __post_init__(self) -> None:
        if not _IFNAME_RE.fullmatch(self.tap):
            raise ValueError(f"bad TAP name {self.tap!r}")
        ipaddress.IPv4Address(self.ip)
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", self.mac):
            raise ValueError(f"bad MAC {self.mac!r}")


def guest_rule(vm: VMRecord, tap: str) -> GuestRule:
    """``vm``'s entry in the policy, on ``tap``: its address pair and its spec's egress."""
    return GuestRule(tap=tap, ip=vm.ip, mac=vm.mac, nat=vm.spec.nat,
                     allow_private=vm.spec.allow_private)


def ruleset(s: FirewallSettings) -> str:
    """Both tables, replacing any earlier version of them in one nft transaction.

    ``table X`` + ``delete table X`` first makes the load idempotent (nft's "delete if
    it exists"); the new tables start with empty per-VM sets, refilled by admitting
    the running VMs again (reconcile does, when the daemon starts).
    """
    t, br, p = s.table, s.bridge, s.tap_prefix
    gw, net = gateway(s.cidr), ipaddress.IPv4Interface(s.cidr).network
    between_guests = "accept" if s.vm_to_vm else "drop"
    closed = ", ".join(CLOSED_V4)
    return f"""table bridge {t}
delete table bridge {t}
table inet {t}
delete table inet {t}
table bridge {t} {{
  set guests {{
    type ifname . ether_addr . ipv4_addr
  }}
  set guests_arp {{
    type ifname . ether_addr . ether_addr . ipv4_addr
  }}
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname "{p}*" jump from_guest
  }}
  chain from_guest {{
    ether type ip iifname . ether saddr . ip saddr @guests return
    ether type arp iifname . ether saddr . arp saddr ether . arp saddr ip @guests_arp return
    drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{p}*" oifname "{p}*" {between_guests}
  }}
}}
table inet {t} {{
  set nat_guests {{
    type ipv4_addr
  }}
  set private_guests {{
    type ipv4_addr
  }}
  set closed {{
    type ipv4_addr
    flags interval
    elements = {{ {closed} }}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{br}" ip saddr {net} jump from_guest
  }}
  chain from_guest {{
    ct state established,related accept
    ip daddr {gw} udp dport {s.dns_port} accept
    ip daddr {gw} tcp dport {s.dns_port} accept
    drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{br}" ip saddr {net} jump out_of_guest
  }}
  chain out_of_guest {{
    oifname "{br}" {between_guests}
    ct state established,related accept
    ip saddr != @nat_guests drop
    ip saddr @private_guests accept
    ip daddr @closed drop
    accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname != "{br}" ip saddr @nat_guests masquerade
  }}
}}
"""


def _ensure_absent(family: str, table: str, set_name: str, element: str) -> list[str]:
    # nft has no "delete if present" for an element: adding it first makes the delete
    # succeed either way, in the same (atomic) transaction.
    return [f"add element {family} {table} {set_name} {{ {element} }}",
            f"delete element {family} {table} {set_name} {{ {element} }}"]


def admit_script(s: FirewallSettings, g: GuestRule) -> str:
    """The nft transaction giving ``g``'s TAP its address pair and egress; idempotent.

    The IP is first taken out of the egress sets, so a stale element (a VM that had
    this address before, a failed removal) never grants this VM more than its own spec.
    """
    t = s.table
    lines = [
        f'add element bridge {t} guests {{ "{g.tap}" . {g.mac} . {g.ip} }}',
        f'add element bridge {t} guests_arp {{ "{g.tap}" . {g.mac} . {g.mac} . {g.ip} }}',
        *_ensure_absent("inet", t, "nat_guests", g.ip),
        *_ensure_absent("inet", t, "private_guests", g.ip),
    ]
    if g.nat:
        lines.append(f"add element inet {t} nat_guests {{ {g.ip} }}")
    if g.allow_private:
        lines.append(f"add element inet {t} private_guests {{ {g.ip} }}")
    return "\n".join(lines) + "\n"


def forget_script(s: FirewallSettings, g: GuestRule) -> str:
    """The nft transaction removing every element of ``g``; idempotent."""
    t = s.table
    lines = [
        *_ensure_absent("bridge", t, "guests", f'"{g.tap}" . {g.mac} . {g.ip}'),
        *_ensure_absent("bridge", t, "guests_arp", f'"{g.tap}" . {g.mac} . {g.mac} . {g.ip}'),
        *_ensure_absent("inet", t, "nat_guests", g.ip),
        *_ensure_absent("inet", t, "private_guests", g.ip),
    ]
    return "\n".join(lines) + "\n"


class GuestFirewall:
    """Loads the ruleset and keeps each running VM's elements in it.

    ``_mu`` is a leaf lock. It guards ``_admitted`` and serialises the ``ip_forward``
    record (two NAT VMs starting together must not both record "banger found 0" over
    each other); nft runs outside it, each call one atomic transaction.
    """

    def __init__(self, runner: Runner, settings: FirewallSettings, changes_path: Path,
                 ip_forward: Path = IP_FORWARD) -> None:
        self.runner = runner
        self.settings = settings
        self.changes_path = changes_path
        self.ip_forward = ip_forward
        self._mu = threading.Lock()
        self._admitted: dict[str, GuestRule] = {}  # TAP name -> its elements
        self._forwarding = False

    def load(self) -> None:
        """Replace this install's tables with fresh ones (no guest admitted yet).

        Recorded in the host-changes file first, so a daemon stop with no VM left
        removes them (:func:`banger.daemon.network.restore_host`).

        Raises:
            HostError: the record cannot be written.
            CommandFailed: nft refused the rules (missing nftables or CAP_NET_ADMIN).
        """
        with self._mu:
            changes = HostChanges.load(self.changes_path)
            # An earlier version's single `ip banger` table (NAT for every guest) goes
            # in the same transaction: its record is replaced by this one.
            legacy = changes.nft_table == LEGACY_NFT_TABLE
            changes.nft_table = self.settings.table
            changes.save()
            self._admitted.clear()
        script = (nft_delete_tables(LEGACY_NFT_TABLE) if legacy else "") + ruleset(self.settings)
        self._nft(script, "load banger's guest network rules")

    def admit(self, g: GuestRule) -> None:
        """Let ``g``'s TAP talk with its own address pair (and out, with NAT).

        Raises:
            HostError: IPv4 forwarding cannot be turned on for a NAT guest.
            CommandFailed: nft refused the elements (the TAP stays cut off).
        """
        if g.nat:
            self._enable_forwarding()
        self._nft(admit_script(self.settings, g), f"admit {g.tap} to the guest network")
        with self._mu:
            self._admitted[g.tap] = g

    def forget(self, tap: str) -> None:
        """Remove what :meth:`admit` added for ``tap`` (nothing when it was not admitted).

        Raises:
            CommandFailed: nft refused; the elements stay (a later admit of the same
                address resets its egress first).
        """
        with self._mu:
            g = self._admitted.get(tap)
        if g is None:
            return
        self._nft(forget_script(self.settings, g), f"remove {tap} from the guest network")
        with self._mu:
            self._admitted.pop(tap, None)

    def admitted(self) -> dict[str, GuestRule]:
        """The TAPs admitted since the last :meth:`load`, with their rules."""
        with self._mu:
            return dict(self._admitted)

    def _enable_forwarding(self) -> None:
        with self._mu:
            if self._forwarding:
                return
            changes = HostChanges.load(self.changes_path)
            enable_forwarding(changes, self.ip_forward)
            self._forwarding = True

    def _nft(self, script: str, desc: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script.encode(), desc=desc, timeout=30)
