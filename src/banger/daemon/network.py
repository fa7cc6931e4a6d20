"""Host networking: the bridge, per-VM TAPs (with a small warm pool), guest IPs.

Every VM gets a TAP enslaved to ``bridge_name`` and a static address from
``bridge_cidr``; the bridge holds the gateway address. Netlink work goes
through :class:`HostNetwork` (pyroute2 for real, a dict for unit tests).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from banger.errors import HostError
from banger.runner import Runner

log = logging.getLogger("banger.network")

TAP_PREFIX = "bgt"  # every TAP banger creates starts with this; sweeps rely on it


def tap_name() -> str:
    """A fresh random TAP name, ``bgt`` + 8 hex digits."""
    # IFNAMSIZ is 16 with the NUL; "bgt" + 8 hex = 11 leaves room and avoids collisions.
    return TAP_PREFIX + secrets.token_hex(4)


class HostNetwork(Protocol):
    def ensure_bridge(self, name: str, cidr: str) -> None:
        """Create bridge ``name`` if missing, give it ``cidr``'s address, bring it up."""
        ...

    def create_tap(self, name: str, bridge: str) -> None:
        """Create TAP ``name``, enslave it to ``bridge`` and bring it up."""
        ...

    def delete_link(self, name: str) -> None:
        """Delete link ``name``; a missing link is not an error."""
        ...

    def links(self) -> list[str]:
        """The names of every network link on the host."""
        ...


class NetlinkNetwork:
    """The real implementation, over rtnetlink via pyroute2."""

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def ensure_bridge(self, name: str, cidr: str) -> None:
        """Create bridge ``name`` if missing, add ``cidr``'s address if absent, set it up.

        Raises:
            HostError: any netlink failure (usually missing CAP_NET_ADMIN).
        """
        iface = ipaddress.ip_interface(cidr)
        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    ipr.link("add", ifname=name, kind="bridge")
                    found = ipr.link_lookup(ifname=name)
                idx = found[0]
                have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                        for a in ipr.get_addr(index=idx, family=2)}
                if (str(iface.ip), iface.network.prefixlen) not in have:
                    ipr.addr("add", index=idx, address=str(iface.ip),
                             prefixlen=iface.network.prefixlen)
                ipr.link("set", index=idx, state="up")
        except Exception as exc:
            raise HostError(f"cannot set up bridge {name} ({cidr}): {exc}",
                            hint="banger needs root (CAP_NET_ADMIN); see `banger doctor`") from exc

    def create_tap(self, name: str, bridge: str) -> None:
        """Create TAP ``name`` enslaved to ``bridge`` and up.

        Raises:
            HostError: the bridge is missing, or netlink failed (the half-made TAP
                is deleted first).
        """
        try:
            with self._ipr() as ipr:
                bidx = ipr.link_lookup(ifname=bridge)
                if not bidx:
                    raise HostError(f"bridge {bridge} is missing")
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
                tidx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=tidx, master=bidx[0], state="up")
        except HostError:
            raise
        except Exception as exc:
            self.delete_link(name)
            raise HostError(f"cannot create tap {name}: {exc}",
                            hint="check /dev/net/tun with `banger doctor`") from exc

    def delete_link(self, name: str) -> None:
        """Delete link ``name`` if it exists.

        Raises:
            HostError: netlink refused the deletion.
        """
        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=name)
                if found:
                    ipr.link("del", index=found[0])
        except Exception as exc:
            raise HostError(f"cannot delete link {name}: {exc}") from exc

    def links(self) -> list[str]:
        """The names of every network link on the host."""
        with self._ipr() as ipr:
            return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


class TapPool:
    """A few pre-created TAPs so a VM start does not wait for netlink round trips.

    ``_mu`` guards ``_ready`` only (a leaf lock); netlink calls happen outside it.
    """

    def __init__(self, net: HostNetwork, bridge: str, size: int) -> None:
        self.net = net
        self.bridge = bridge
        self.size = size
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
        name = tap_name()
        self.net.create_tap(name, self.bridge)
        return name

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
                name = tap_name()
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


NFT_TABLE = "banger"


def nat_ruleset(bridge: str, cidr: str) -> str:
    """nftables rules giving guests outbound access: masquerade + forwarding for the bridge.

    Loaded in one transaction; creating then deleting the table first makes it
    idempotent (a re-load replaces the rules instead of duplicating them). Another
    table's drop policy on the forward hook (e.g. Docker's) still wins: nftables
    drops a packet any base chain drops.
    """
    net = ipaddress.ip_interface(cidr).network
    return f"""table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} oifname != "{bridge}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{bridge}" accept
    oifname "{bridge}" ct state established,related accept
  }}
}}
"""


def enable_nat(runner: Runner, bridge: str, cidr: str,
               ip_forward: Path = Path("/proc/sys/net/ipv4/ip_forward")) -> None:
    """Turn on IPv4 forwarding (this network namespace only) and load :func:`nat_ruleset`."""
    try:
        ip_forward.write_text("1\n")
    except OSError as exc:
        raise HostError(f"cannot enable IPv4 forwarding: {exc.strerror}",
                        hint="run bangerd as root, or set nat = false") from exc
    runner.run(["nft", "-f", "-"], input=nat_ruleset(bridge, cidr).encode(),
               desc="load banger's NAT rules", timeout=30)
