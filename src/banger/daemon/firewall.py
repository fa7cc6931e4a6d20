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
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from banger import egress
from banger.daemon.dns import ClientPolicy
from banger.daemon.network import HostChanges, enable_forwarding, gateway
from banger.errors import BangerError
from banger.hostops.client import HostOps
from banger.hostops.nft import (
    LEGACY_NFT_TABLE,
    PIN_MAX_S,
    PIN_MIN_S,
    PINS_PER_ANSWER,
    FirewallSettings,
    GuestRule,
)

if TYPE_CHECKING:
    from banger.daemon.store import VMRecord

log = logging.getLogger("banger.firewall")

def guest_rule(vm: VMRecord, tap: str) -> GuestRule:
    """``vm``'s entry in the policy, on ``tap``: its address pair and its spec's egress."""
    return GuestRule(tap=tap, ip=vm.ip, mac=vm.mac, nat=vm.spec.nat,
                     allow_private=vm.spec.allow_private,
                     allowlist=egress.parse(vm.spec.allow_out))


def guest_dns_policy(g: GuestRule) -> ClientPolicy:
    """What banger's resolver answers ``g``'s guest: ``.vm`` names only without NAT (so a
    closed guest cannot tunnel through the host's resolver), else every name or, with an
    allowlist, only its domains."""
    if not g.nat:
        return ClientPolicy(forward=False)
    if g.allowlist:
        return ClientPolicy(forward=True, allows=g.allowlist.allows_name)
    return ClientPolicy(forward=True)


class GuestFirewall:
    """Loads the ruleset with the first guest, keeps each running VM's elements in it,
    pins DNS answers for allowlisted guests, and deletes the tables with the last guest.

    ``_mu`` serialises all of it: the tables' load and removal, every element change
    (``vm start``, ``stop``, ``set-egress``, DNS worker threads pinning answers) and the
    ``ip_forward`` record (two NAT VMs starting together must not both record "banger
    found 0" over each other). It is held across nft (one short transaction each, a
    30 s budget) and the host-network record; no other lock is taken under it.
    """

    def __init__(self, host: HostOps, settings: FirewallSettings, changes_path: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.settings = settings
        self.changes_path = changes_path
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
            self.host.nft_admit(g, stale)
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
            self.host.nft_forget(g, pins)
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
            return guest_dns_policy(g)
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
            self.host.nft_pin(g.ip, pins)
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
        self.host.nft_load(drop_legacy=legacy)
        self._loaded = True
        self._pins.clear()

    def _unload(self) -> None:
        changes = HostChanges.load(self.changes_path)
        if changes.nft_table is None:
            self._loaded = False
            return
        try:
            self.host.nft_delete(changes.nft_table)
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
        enable_forwarding(self.host, changes)
        self._forwarding = True
