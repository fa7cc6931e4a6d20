"""banger's nftables rules as text: the guests' policy tables and the transactions that
change their per-VM elements.

Pure functions of typed inputs, shared by the host-operations executor (which runs
them through ``nft``) and ``doctor`` (which checks them). Every value pasted into a
script is validated first (a table, interface, address or MAC that could change a
script's meaning is refused, never quoted), because the inputs arrive from the daemon
over the root helper's socket. The policy itself is described in
:mod:`banger.daemon.firewall`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from banger import egress

LEGACY_NFT_TABLE = "banger"  # the one `ip` table banger loaded before per-install tables
TABLE_PREFIX = "banger_"
# Private and special IPv4 ranges a NAT guest still cannot reach without --allow-private:
# RFC 1918, CGNAT (RFC 6598), link-local (cloud metadata at 169.254.169.254), loopback,
# "this network", and multicast + reserved + limited broadcast (224/4, 240/4).
CLOSED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
             "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3")
_CLOSED_NETS = tuple(ipaddress.IPv4Network(n) for n in CLOSED_V4)
# A pinned DNS answer lives for its TTL, but never less than PIN_MIN_S (a TTL of 0 must
# still let the guest connect) nor more than PIN_MAX_S; PINS_PER_ANSWER bounds what
# one answer can add, ALLOW_DNS_SIZE the whole set.
PIN_MIN_S = 30
PIN_MAX_S = 86400
PINS_PER_ANSWER = 32
ALLOW_DNS_SIZE = 65536
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
    allowlist: egress.Allowlist = field(default_factory=egress.Allowlist)

    def __post_init__(self) -> None:
        if not _IFNAME_RE.fullmatch(self.tap):
            raise ValueError(f"bad TAP name {self.tap!r}")
        ipaddress.IPv4Address(self.ip)
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", self.mac):
            raise ValueError(f"bad MAC {self.mac!r}")

    def pinnable(self, address: str) -> bool:
        """Whether a DNS answer may open ``address`` to this guest: only an allowlisted
        guest's, and a private or special address only with ``allow_private``."""
        if not self.allowlist:
            return False
        addr = ipaddress.IPv4Address(address)
        return self.allow_private or not any(addr in net for net in _CLOSED_NETS)


def ruleset(s: FirewallSettings) -> str:
    """Both tables, replacing any earlier version of them in one nft transaction.

    ``table X`` + ``delete table X`` first makes the load idempotent (nft's "delete if
    it exists"); the new tables start with empty per-VM sets, refilled by admitting
    the running VMs again (reconcile does, when the daemon starts).
    """
    t, br, p = s.table, s.bridge, s.tap_prefix
    iface = ipaddress.IPv4Interface(s.cidr)
    gw, net = str(iface.ip), iface.network
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
  set allowlisted {{
    type ipv4_addr
  }}
  set allow_net {{
    type ipv4_addr . ipv4_addr
    flags interval
  }}
  set allow_dns {{
    type ipv4_addr . ipv4_addr
    flags timeout
    size {ALLOW_DNS_SIZE}
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
    ip saddr @allowlisted jump allowlist
    ip saddr @private_guests accept
    ip daddr @closed drop
    accept
  }}
  chain allowlist {{
    ip saddr . ip daddr @allow_net accept
    ip saddr . ip daddr @allow_dns accept
    drop
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


def _remove_lines(s: FirewallSettings, g: GuestRule, pins: Iterable[str]) -> list[str]:
    """Lines removing every element ``g`` (and its pinned addresses) may have added."""
    t = s.table
    lines = [
        *_ensure_absent("bridge", t, "guests", f'"{g.tap}" . {g.mac} . {g.ip}'),
        *_ensure_absent("bridge", t, "guests_arp", f'"{g.tap}" . {g.mac} . {g.mac} . {g.ip}'),
    ]
    for set_name in ("nat_guests", "private_guests", "allowlisted"):
        lines += _ensure_absent("inet", t, set_name, g.ip)
    for net in g.allowlist.networks:
        lines += _ensure_absent("inet", t, "allow_net", f"{g.ip} . {net}")
    for addr in pins:
        lines += _ensure_absent("inet", t, "allow_dns", f"{g.ip} . {addr}")
    return lines


def admit_script(s: FirewallSettings, g: GuestRule,
                 previous: Sequence[tuple[GuestRule, Iterable[str]]] = ()) -> str:
    """The nft transaction giving ``g``'s TAP its address pair and egress; idempotent.

    ``previous`` are the rules (with their pinned addresses) this one replaces: the
    same TAP or the same IP admitted earlier (``vm set-egress``, a failed removal).
    Their elements go first, and the IP is taken out of the egress sets, so a stale
    element never grants this VM more than its own spec.
    """
    t = s.table
    lines: list[str] = []
    for old, pins in previous:
        lines += _remove_lines(s, old, pins)
    lines += [
        f'add element bridge {t} guests {{ "{g.tap}" . {g.mac} . {g.ip} }}',
        f'add element bridge {t} guests_arp {{ "{g.tap}" . {g.mac} . {g.mac} . {g.ip} }}',
    ]
    for set_name in ("nat_guests", "private_guests", "allowlisted"):
        lines += _ensure_absent("inet", t, set_name, g.ip)
    if g.nat:
        lines.append(f"add element inet {t} nat_guests {{ {g.ip} }}")
    if g.allow_private:
        lines.append(f"add element inet {t} private_guests {{ {g.ip} }}")
    if g.allowlist:
        lines.append(f"add element inet {t} allowlisted {{ {g.ip} }}")
    if g.allowlist.networks:
        nets = ", ".join(f"{g.ip} . {net}" for net in g.allowlist.networks)
        lines.append(f"add element inet {t} allow_net {{ {nets} }}")
    return "\n".join(lines) + "\n"


def forget_script(s: FirewallSettings, g: GuestRule, pins: Iterable[str] = ()) -> str:
    """The nft transaction removing every element of ``g``; idempotent."""
    return "\n".join(_remove_lines(s, g, pins)) + "\n"


def pin_script(s: FirewallSettings, guest_ip: str, pins: dict[str, int]) -> str:
    """The nft transaction letting ``guest_ip`` reach each address for its seconds.

    An element already there keeps its old timeout on a plain ``add``; adding it with
    any timeout and deleting it first makes the new timeout the one that counts.
    """
    t = s.table
    lines: list[str] = []
    for addr, seconds in pins.items():
        element = f"{guest_ip} . {addr}"
        lines += [f"add element inet {t} allow_dns {{ {element} timeout 1s }}",
                  f"delete element inet {t} allow_dns {{ {element} }}",
                  f"add element inet {t} allow_dns {{ {element} timeout {seconds}s }}"]
    return "\n".join(lines) + "\n"


def nft_delete_tables(name: str) -> str:
    """The nft transaction deleting the tables ``changes.nft_table`` names (if present)."""
    families = ["ip"] if name == LEGACY_NFT_TABLE else ["bridge", "inet"]
    # `table X` + `delete table X`: nft's "delete if it exists", in one transaction.
    return "".join(f"table {f} {name}\ndelete table {f} {name}\n" for f in families)
