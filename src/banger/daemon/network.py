"""Host networking: the bridge, per-VM TAPs (with a small warm pool), guest IPs.

Every VM gets a TAP enslaved to ``bridge_name`` and a static address from
``bridge_cidr``; the bridge holds the gateway address. Link work goes through
:class:`~banger.hostops.client.HostOps` (root's, in process or in the helper; a
dict in unit tests). TAP names carry the install's tag
(:func:`banger.hostops.netlink.tap_prefix_for`). What banger changes
on the host (bridge, nftables tables, ``ip_forward``) is recorded in a
:class:`HostChanges` file first and undone by :func:`restore_host`. The guests'
nftables policy itself is :mod:`banger.daemon.firewall`'s.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BangerError, HostError
from banger.fsutil import atomic_write
from banger.hostops.client import HostOps
from banger.hostops.netlink import Links, tap_name
from banger.hostops.nft import LEGACY_NFT_TABLE

log = logging.getLogger("banger.network")

NFT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a table name banger may record


class TapPool:
    """A few pre-created TAPs so a VM start does not wait for netlink round trips.

    ``_mu`` guards ``_ready`` only (a leaf lock); netlink calls happen outside it.
    """

    def __init__(self, net: Links, bridge: str, size: int, prefix: str) -> None:
        self.net = net
        self.bridge = bridge
        self.size = size
        self.prefix = prefix  # tap_prefix_for(install tag): names this install's TAPs
        self._mu = threading.Lock()
        self._ready: list[str] = []
        self._filling = False

    def acquire(self) -> str:
        """A TAP on the bridge: a warm one if any (then refill in the background)."""
        with self._mu:
            name = self._ready.pop() if self._ready else None
        if name is not None:
            threading.Thread(target=self.fill, name="tap-pool-fill", daemon=True).start()
            return name
        name = tap_name(self.prefix)
        self.net.create_tap(name, self.bridge)
        return name

    def port_name(self) -> str:
        """A fresh name for a port a VMM makes itself (``VMMDriver.own_port``), with this
        install's TAP prefix: the guest network's rules and the sweep take it for a TAP."""
        return tap_name(self.prefix)

    def release(self, name: str) -> None:
        """Delete a TAP a VM no longer needs (a used TAP is never recycled)."""
        self.net.delete_link(name)

    def owned(self) -> set[str]:
        """The warm TAPs still in the pool (a sweep must not delete them)."""
        with self._mu:
            return set(self._ready)

    def fill(self) -> None:
        """Top the pool up to ``size``; errors are logged, the pool is an optimisation."""
        with self._mu:
            if self._filling:
                return  # another thread is already filling
            self._filling = True
        try:
            while True:
                with self._mu:
                    if len(self._ready) >= self.size:
                        return
                name = tap_name(self.prefix)
                try:
                    self.net.create_tap(name, self.bridge)
                except HostError as exc:
                    log.warning("tap pool: %s", exc)
                    return
                with self._mu:
                    self._ready.append(name)
        finally:
            with self._mu:
                self._filling = False

    def drain(self) -> None:
        """Delete the warm TAPs (daemon shutdown); a fill racing with this stops."""
        with self._mu:
            self.size = 0
            names, self._ready = self._ready, []
        for name in names:
            try:
                self.net.delete_link(name)
            except HostError as exc:
                log.warning("tap pool drain: %s", exc)


def gateway(cidr: str) -> str:
    """The bridge's own address in ``cidr`` (the guests' gateway and DNS server)."""
    return str(ipaddress.ip_interface(cidr).ip)


def prefixlen(cidr: str) -> int:
    """The network prefix length of ``cidr`` (24 for ``172.29.0.1/24``)."""
    return ipaddress.ip_interface(cidr).network.prefixlen


def allocate_ip(cidr: str, used: Iterable[str]) -> str:
    """The lowest free host address in ``cidr`` that is not the gateway."""
    iface = ipaddress.ip_interface(cidr)
    taken = set(used) | {str(iface.ip)}
    for host in iface.network.hosts():
        if str(host) not in taken:
            return str(host)
    raise HostError(
        f"no free guest address left in {iface.network}",
        hint="delete unused VMs or set a wider bridge_cidr",
    )


def mac_for_ip(ip: str) -> str:
    """A stable, locally administered unicast MAC derived from the guest IP."""
    b = ipaddress.IPv4Address(ip).packed
    return "06:00:" + ":".join(f"{x:02x}" for x in b)


@dataclass
class HostChanges:
    """What banger changed in its network namespace, so it can be undone later.

    Kept in ``<state_dir>/host-network.json`` and saved (temp + fsync + rename)
    *before* each change, so a daemon killed at any instant leaves a record of at
    least everything it did. Facts are only added until :func:`restore_host` undoes
    them: the ``ip_forward`` recorded is the value banger first saw, across any
    number of daemon restarts.
    """

    path: Path
    ip_forward_before: str | None = None  # "0"/"1", only when banger changed it
    bridge: str | None = None  # only when banger created the bridge
    # The name of the nftables tables banger loaded (``inet`` and ``bridge``), or
    # LEGACY_NFT_TABLE for the single ``ip`` table of earlier versions.
    nft_table: str | None = None

    @classmethod
    def load(cls, path: Path) -> HostChanges:
        """The record at ``path`` (empty when there is none).

        Raises:
            HostError: the file is unreadable or not a record banger wrote.
        """
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
            before = data.get("ip_forward_before")
            bridge = data.get("bridge")
            nft = data.get("nft_table")
            # Earlier versions recorded a bool for their one `ip banger` table.
            if isinstance(nft, bool):
                nft = LEGACY_NFT_TABLE if nft else None
            nft_ok = nft is None or (isinstance(nft, str) and NFT_NAME.fullmatch(nft))
            if before not in (None, "0", "1") or not isinstance(bridge, str | None) \
                    or not nft_ok:
                raise ValueError("unexpected values")
        except (ValueError, AttributeError) as exc:
            raise HostError(
                f"{path} is not a record banger wrote: {exc}",
                hint="check the bridge, the nftables tables named `banger*` and "
                     "net.ipv4.ip_forward by hand, then delete the file") from exc
        return cls(path, before, bridge, nft)

    @property
    def empty(self) -> bool:
        """Nothing is left to undo."""
        return self.ip_forward_before is None and self.bridge is None and self.nft_table is None

    def save(self) -> None:
        """Write the record (crash-safe); an empty record removes the file."""
        if self.empty:
            self.path.unlink(missing_ok=True)
            return
        data = {"ip_forward_before": self.ip_forward_before, "bridge": self.bridge,
                "nft_table": self.nft_table}
        atomic_write(self.path, json.dumps(data, indent=1).encode() + b"\n", 0o600)


def ensure_bridge(net: Links, name: str, cidr: str, changes: HostChanges) -> None:
    """Create (or reuse) the bridge, recording first when banger is the one creating it.

    A bridge that existed before banger is left in place by :func:`restore_host`.
    """
    if changes.bridge != name and name not in net.links():
        changes.bridge = name
        changes.save()
    net.ensure_bridge(name, cidr)


def enable_forwarding(host: HostOps, changes: HostChanges) -> None:
    """Turn on IPv4 forwarding (this network namespace only), for guests with NAT.

    ``changes`` records the value banger found, before it is changed, so
    :func:`restore_host` can put it back.

    Raises:
        HostError: forwarding cannot be read or set.
    """
    before = host.ip_forward()
    if before == "1":
        return
    if changes.ip_forward_before is None:
        changes.ip_forward_before = before
        changes.save()
    host.ip_forward("1")


def restore_host(host: HostOps, changes: HostChanges) -> list[str]:
    """Undo what ``changes`` records: the nftables tables, the bridge, ``ip_forward``.

    Each step runs even when an earlier one failed; what could not be undone stays in
    the record for the next daemon stop to retry. The caller has already released
    every TAP on the bridge (the pool is drained; no VM holds one).

    Returns:
        One line per step that failed (empty: the host is as banger found it).
    """
    problems: list[str] = []
    if changes.nft_table is not None:
        try:
            host.nft_delete(changes.nft_table)
            changes.nft_table = None
        except BangerError as exc:
            problems.append(f"nft delete table {changes.nft_table}: {exc.message}")
    if changes.bridge is not None:
        try:
            host.delete_link(changes.bridge)
            changes.bridge = None
        except BangerError as exc:
            problems.append(exc.message)
    if changes.ip_forward_before is not None:
        try:
            host.ip_forward(changes.ip_forward_before)
            changes.ip_forward_before = None
        except BangerError as exc:
            problems.append(f"cannot restore ip_forward: {exc.message}")
    changes.save()
    return problems
