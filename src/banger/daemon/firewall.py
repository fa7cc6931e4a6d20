"""The guests' network policy: banger's own nftables tables, one pair per install.

A guest is hostile. From its TAP it may reach only:

- the ``.vm`` DNS server on its gateway (UDP and TCP, ``dns_port``);
- the host, in replies to connections the host opened (``ct state established,related``:
  ssh from the daemon);
- the outside world, when its VM has NAT; even then not the private and special ranges
  (:data:`CLOSED_V4`) unless the VM allows them. A VM with an egress allowlist
  (``--allow-out``, :mod:`banger.egress`) reaches only its networks and the addresses
  banger's DNS server gave it for its domains (:meth:`GuestFirewall.pin`).

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
  guest out only when its IP is in ``nat_guests``, and a guest in ``allowlisted`` only
  to ``allow_net`` (guest . network) and ``allow_dns`` (guest . address, pinned with a
  timeout as DNS answers are served); ``postrouting`` masquerades only NAT guests.

Per-VM state is set elements, added when a VM's TAP is attached (before its VMM runs)
and deleted when the TAP is released; the rules themselves never change while the
tables exist. The tables are loaded with the first admitted VM and deleted when the
last one is forgotten. The IP-keyed ``inet`` sets are safe because the ``bridge`` table
has already dropped any frame whose source IP is not its TAP's.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from banger import egress
from banger.daemon.dns import ClientPolicy
from banger.daemon.network import (
    IP_FORWARD,
    LEGACY_NFT_TABLE,
    HostChanges,
    enable_forwarding,
    gateway,
    nft_delete_tables,
)
from banger.errors import BangerError
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

    def dns_policy(self) -> ClientPolicy:
        """What banger's resolver answers this guest: ``.vm`` names only without NAT
        (so a closed guest cannot tunnel through the host's resolver), else every name
        or, with an allowlist, only its domains."""
        if not self.nat:
            return ClientPolicy(forward=False)
        if self.allowlist:
            return ClientPolicy(forward=True, allows=self.allowlist.allows_name)
        return ClientPolicy(forward=True)

    def pinnable(self, address: str) -> bool:
        """Whether a DNS answer may open ``address`` to this guest: only an allowlisted
        guest's, and a private or special address only with ``allow_private``."""
        if not self.allowlist:
            return False
        addr = ipaddress.IPv4Address(address)
        return self.allow_private or not any(addr in net for net in _CLOSED_NETS)


def guest_rule(vm: VMRecord, tap: str) -> GuestRule:
    """``vm``'s entry in the policy, on ``tap``: its address pair and its spec's egress."""
    return GuestRule(tap=tap, ip=vm.ip, mac=vm.mac, nat=vm.spec.nat,
                     allow_private=vm.spec.allow_private,
                     allowlist=egress.parse(vm.spec.allow_out))


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


class GuestFirewall:
    """Loads the ruleset with the first guest, keeps each running VM's elements in it,
    pins DNS answers for allowlisted guests, and deletes the tables with the last guest.

    ``_mu`` serialises all of it: the tables' load and removal, every element change
    (``vm start``, ``stop``, ``set-egress``, DNS worker threads pinning answers) and the
    ``ip_forward`` record (two NAT VMs starting together must not both record "banger
    found 0" over each other). It is held across nft (one short transaction each, a
    30 s budget) and the host-network record; no other lock is taken under it.
    """

    def __init__(self, runner: Runner, settings: FirewallSettings, changes_path: Path,
                 ip_forward: Path = IP_FORWARD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.settings = settings
        self.changes_path = changes_path
        self.ip_forward = ip_forward
        self._clock = clock
        self._mu = threading.Lock()
        self._loaded = False
        self._admitted: dict[str, GuestRule] = {}  # TAP name -> its elements
        self._pins: dict[str, dict[str, float]] = {}  # guest IP -> address -> expiry
        self._forwarding = False
        self._guest_net = ipaddress.IPv4Interface(settings.cidr).network
        self._gateway = gateway(settings.cidr)

    def admit(self, g: GuestRule) -> None:
        """Let ``g``'s TAP talk with its own address pair (and out, with NAT), replacing
        any earlier rule of the same TAP or IP. Loads the tables first if needed.

        Raises:
            HostError: the host-network record or ``ip_forward`` cannot be written.
            CommandFailed: nft refused the rules or the elements (the TAP stays cut off).
        """
        with self._mu:
            if not self._loaded:
                self._load()
            if g.nat:
                self._enable_forwarding()
            previous = [r for r in self._admitted.values() if g.tap == r.tap or g.ip == r.ip]
            stale = [(r, list(self._pins.get(r.ip, {}))) for r in previous]
            self._nft(admit_script(self.settings, g, stale),
                      f"admit {g.tap} to the guest network")
            for r in previous:
                self._admitted.pop(r.tap, None)
                self._pins.pop(r.ip, None)
            self._admitted[g.tap] = g

    def forget(self, tap: str) -> None:
        """Remove what :meth:`admit` and :meth:`pin` added for ``tap`` (nothing when it
        was not admitted); the tables go with the last guest.

        Raises:
            CommandFailed: nft refused; the elements stay (a later admit of the same
                TAP or address removes them first).
        """
        with self._mu:
            g = self._admitted.get(tap)
            if g is None:
                return
            pins = list(self._pins.get(g.ip, {}))
            self._nft(forget_script(self.settings, g, pins),
                      f"remove {tap} from the guest network")
            self._admitted.pop(tap, None)
            self._pins.pop(g.ip, None)
            if not self._admitted:
                self._unload()

    def unload_if_idle(self) -> None:
        """Delete this install's tables when no guest is admitted (daemon start-up: a
        daemon that died left them, and no running VM needs them)."""
        with self._mu:
            if not self._admitted:
                self._unload()

    def admitted(self) -> dict[str, GuestRule]:
        """The TAPs admitted now, with their rules."""
        with self._mu:
            return dict(self._admitted)

    def dns_policy(self, client: str) -> ClientPolicy | None:
        """What the resolver may answer ``client``: its VM's policy; a guest address
        with no running VM gets ``.vm`` names only; None for the host itself."""
        try:
            addr = ipaddress.IPv4Address(client)
        except ValueError:
            return ClientPolicy(forward=False)
        with self._mu:
            g = self._rule_of(client)
        if g is not None:
            return g.dns_policy()
        if addr in self._guest_net and str(addr) != self._gateway:
            return ClientPolicy(forward=False)
        return None

    def pin(self, client: str, answers: Sequence[tuple[str, int]]) -> list[str]:
        """Let the allowlisted guest at ``client`` reach the addresses its DNS answer
        gave it, each for its TTL (bounded: :data:`PIN_MIN_S`..:data:`PIN_MAX_S`, at
        most :data:`PINS_PER_ANSWER`). Returns the addresses pinned; none for a guest
        without an allowlist, and a private or special one only with allow_private.

        Called by the DNS server before the answer is sent, so the guest can connect
        as soon as it has the address.

        Raises:
            CommandFailed: nft refused (the answer is then not sent).
        """
        with self._mu:
            g = self._rule_of(client)
            if g is None:
                return []
            pins: dict[str, int] = {}
            for addr, ttl in answers:
                if len(pins) >= PINS_PER_ANSWER:
                    break
                if g.pinnable(addr):
                    pins[addr] = min(max(ttl, PIN_MIN_S), PIN_MAX_S)
            if not pins:
                return []
            self._nft(pin_script(self.settings, g.ip, pins), f"pin DNS answers for {g.ip}")
            now = self._clock()
            held = self._pins.setdefault(g.ip, {})
            for addr in [a for a, expiry in held.items() if expiry < now]:
                del held[addr]  # expired in the kernel too: nothing left to remove
            for addr, seconds in pins.items():
                held[addr] = now + seconds
            return list(pins)

    def pinned(self, client: str) -> dict[str, float]:
        """The addresses pinned for ``client`` and their expiry (monotonic clock)."""
        with self._mu:
            return dict(self._pins.get(client, {}))

    def _rule_of(self, ip: str) -> GuestRule | None:
        for g in self._admitted.values():
            if g.ip == ip:
                return g
        return None

    def _load(self) -> None:
        # Recorded in the host-changes file first, so a daemon stop with no VM left
        # removes the tables (banger.daemon.network.restore_host).
        changes = HostChanges.load(self.changes_path)
        # An earlier version's single `ip banger` table (NAT for every guest) goes
        # in the same transaction: its record is replaced by this one.
        legacy = changes.nft_table == LEGACY_NFT_TABLE
        changes.nft_table = self.settings.table
        changes.save()
        script = (nft_delete_tables(LEGACY_NFT_TABLE) if legacy else "") + ruleset(self.settings)
        self._nft(script, "load banger's guest network rules")
        self._loaded = True
        self._pins.clear()

    def _unload(self) -> None:
        changes = HostChanges.load(self.changes_path)
        if changes.nft_table is None:
            self._loaded = False
            return
        try:
            self._nft(nft_delete_tables(changes.nft_table), "delete banger's guest network rules")
        except BangerError as exc:
            # Harmless while no guest runs: the next admit replaces them, the daemon's
            # stop retries the removal (the record stays).
            log.warning("could not delete the guest network rules: %s", exc.message)
            return
        finally:
            self._loaded = False
        changes.nft_table = None
        changes.save()

    def _enable_forwarding(self) -> None:
        if self._forwarding:
            return
        changes = HostChanges.load(self.changes_path)
        enable_forwarding(changes, self.ip_forward)
        self._forwarding = True

    def _nft(self, script: str, desc: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script.encode(), desc=desc, timeout=30)
