"""The host's links over rtnetlink (pyroute2), and IPv4 forwarding.

What the executor (:mod:`banger.hostops.executor`) runs for the network requests:
the bridge, TAPs, deleting a link, listing links, ``net.ipv4.ip_forward``. Unit
tests replace :class:`NetlinkNetwork` with a dict (``tests.fakes.FakeNet``) and the
forwarding file with one of their own.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path
from typing import Any, Protocol

from banger.errors import HostError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")  # per network namespace
TAP_PREFIX = "bgt"  # every TAP banger creates starts with this, then the install tag
IFNAMSIZ = 16  # linux/if.h, including the NUL: a link name has at most 15 characters
TAP_RANDOM_HEX = 6  # random hex digits after the install's prefix


def tap_prefix_for(install_tag: str) -> str:
    """The prefix of every TAP one install creates: ``bgt`` + its install tag.

    Sweeps delete only links with their own install's prefix, so two installs (two
    state dirs) on one host never delete each other's TAPs.
    """
    prefix = TAP_PREFIX + install_tag
    if len(prefix) + TAP_RANDOM_HEX > IFNAMSIZ - 1:
        raise ValueError(f"install tag {install_tag!r} leaves no room in a TAP name")
    return prefix


def tap_name(prefix: str) -> str:
    """A fresh TAP name: ``prefix`` (see :func:`tap_prefix_for`) + 6 random hex digits.

    ``bgt`` + a 6-digit tag + 6 digits is 15 characters, IFNAMSIZ's limit. TAPs are
    pooled before a VM claims one, so the name cannot carry the 12-digit VM id; 6
    random digits make a clash within one install (at most a few hundred TAPs, one
    per guest address) unlikely, and a clash is refused by ``create_tap``, not merged.
    """
    return prefix + secrets.token_hex(TAP_RANDOM_HEX // 2)


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
                if ipr.link_lookup(ifname=name):
                    # Someone else's link (or a VM's TAP): never adopt it, and never
                    # delete it in the clean-up below.
                    raise HostError(f"cannot create tap {name}: a link of that name exists")
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


def ip_forward(value: str | None, path: Path = IP_FORWARD) -> str:
    """Read IPv4 forwarding (this network namespace only) and, with ``value``, set it.

    Returns:
        The value before (``"0"`` or ``"1"``).

    Raises:
        HostError: the setting cannot be read or written.
    """
    try:
        before = path.read_text().strip()
    except OSError as exc:
        raise HostError(f"cannot read IPv4 forwarding ({path}): {exc.strerror}",
                        hint="run bangerd as root, or create the VM without --nat") from exc
    if value is not None and value != before:
        try:
            path.write_text(value + "\n")
        except OSError as exc:
            raise HostError(f"cannot set IPv4 forwarding to {value}: {exc.strerror}",
                            hint="run bangerd as root, or create the VM without --nat") from exc
    return before


DNS_TCP_BACKLOG = 64


def bind_dns(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """The ``.vm`` DNS server's UDP and TCP sockets, bound to ``address``:``port`` (the
    TCP one listening). Port 53 needs CAP_NET_BIND_SERVICE: the helper binds them for a
    daemon that has none and hands them over.

    Raises:
        OSError: either cannot be bound (both are closed then).
    """
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind((address, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((address, port))
        tcp.listen(DNS_TCP_BACKLOG)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp
