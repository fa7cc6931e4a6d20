"""The host's links (iproute2's ``ip``), IPv4 forwarding and the DNS sockets.

What the executor (:mod:`banger.hostops.executor`) runs for the network requests:
the bridge, TAPs, deleting a link, listing links, ``net.ipv4.ip_forward``. Unit
tests replace :class:`IPNetwork` with a dict (``tests.fakes.FakeNet``) and the
forwarding file with one of their own; ``tests/integration`` runs it in a network
namespace of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Protocol

from banger.errors import HostError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")  # per network namespace
IPV6 = Path("/proc/sys/net/ipv6")  # absent on a kernel booted with ipv6.disable=1
TAP_PREFIX = "bgt"  # every TAP banger creates starts with this, then the install tag
IP_TIMEOUT_S = 30  # one `ip` command: milliseconds, unless the host is in trouble
IFNAMSIZ = 16  # linux/if.h, including the NUL: a link name has at most 15 characters
TAP_RANDOM_HEX = 6  # random hex digits after the install's prefix
NETNS_DIR = Path("/run/netns")  # where `ip netns` names a namespace (a bind mount)
NETNS_PREFIX = "banger-"  # a VM's own namespace: this, the install tag, "-", the VM id
# Inside a VM's own namespace: the TAP its VMM opens by name, the bridge it hangs from,
# and that bridge's uplink (a veth whose other end is the VM's port on banger's bridge).
VM_NETNS_TAP = "tap0"
VM_NETNS_BRIDGE = "br0"
VM_NETNS_UPLINK = "uplink0"


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


def vm_netns_prefix(install_tag: str) -> str:
    """The prefix of the network namespaces one install makes for VMs (a VM id follows)."""
    return f"{NETNS_PREFIX}{install_tag}-"


class Links(Protocol):
    """The bridge and its TAPs: what the daemon asks of the host's links (through
    :class:`~banger.hostops.client.HostOps`)."""

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


class HostNetwork(Links, Protocol):
    """:class:`Links`, and VMs' own network namespaces (the root helper's alone)."""

    def create_vm_netns(self, netns: str, port: str, bridge: str,
                        tap_owner: tuple[int, int]) -> None:
        """Make network namespace ``netns`` for one VM (see :meth:`IPNetwork.create_vm_netns`)."""
        ...

    def delete_netns(self, netns: str) -> None:
        """Delete network namespace ``netns`` and what it holds; a missing one is not an error."""
        ...

    def unname_netns(self, netns: str) -> None:
        """Remove the name ``netns`` only (the namespace lives while a process is in it)."""
        ...

    def netns_names(self) -> list[str]:
        """The names of the host's named network namespaces."""
        ...


class IPNetwork:
    """The real implementation: iproute2's ``ip`` (rtnetlink; its JSON read back).

    A program per change, not a netlink library in the daemon: these run when a TAP is
    made for the pool (ahead of any VM that takes one) or the bridge on first need, a
    few milliseconds each, and a library (pyroute2) held 10 MiB of the daemon's memory
    for them. Whether a link exists is asked of the kernel directly
    (``if_nameindex``, in this process's network namespace).
    """

    def __init__(self, ip_bin: str | None = None) -> None:
        # Found once, in the sbin directories too: a root helper's PATH may lack them.
        self.ip_bin = ip_bin or shutil.which(
            "ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin:/usr/bin:/bin") or "ip"

    def _ip(self, *args: str, stdin: str | None = None) -> str:
        """``ip ARGS``'s standard output (``stdin``: what it reads, for ``-batch -``).

        Raises:
            HostError: ``ip`` failed (its message) or is missing.
        """
        try:
            res = subprocess.run([self.ip_bin, *args], input=stdin, capture_output=True,
                                 text=True, timeout=IP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostError(f"cannot run {self.ip_bin}: {exc}",
                            hint="install iproute2; see `banger doctor`") from exc
        if res.returncode != 0:
            raise HostError(res.stderr.strip()[-500:] or f"ip {' '.join(args)} failed")
        return res.stdout

    def ensure_bridge(self, name: str, cidr: str) -> None:
        """Create bridge ``name`` if missing, add ``cidr``'s address if absent, set it up,
        and keep its MAC fixed.

        A Linux bridge whose MAC was never set takes its lowest port's, so it changes as
        TAPs come and go (a VM deleted, the TAP pool drained at daemon stop). Guests
        would then send to the gateway's old MAC until their ARP entry fails, seconds
        without any traffic leaving the guest network. A new bridge gets
        :func:`bridge_mac`; an existing one keeps the MAC it has now (setting it to
        itself pins it), so running guests see no change.

        Raises:
            HostError: any failure (usually missing CAP_NET_ADMIN).
        """
        iface = ipaddress.ip_interface(cidr)
        try:
            if not link_exists(name):  # made with its MAC set: pinned already
                self._ip("link", "add", "name", name, "address", bridge_mac(name),
                         "type", "bridge")
            else:
                mac = json.loads(self._ip("-j", "link", "show", "dev", name))[0]["address"]
                self._ip("link", "set", "dev", name, "address", str(mac))
            shown = json.loads(self._ip("-j", "-4", "addr", "show", "dev", name) or "[]")
            have = {(a.get("local"), a.get("prefixlen")) for link in shown
                    for a in link.get("addr_info", [])}
            if (str(iface.ip), iface.network.prefixlen) not in have:
                self._ip("addr", "add", str(iface.with_prefixlen), "dev", name)
            self._ip("link", "set", "dev", name, "up")
        except (HostError, ValueError, AttributeError, TypeError, LookupError) as exc:
            message = exc.message if isinstance(exc, HostError) else f"unexpected ip output: {exc}"
            raise HostError(f"cannot set up bridge {name} ({cidr}): {message}",
                            hint="banger needs root (CAP_NET_ADMIN); see `banger doctor`") from exc

    def create_tap(self, name: str, bridge: str) -> None:
        """Create TAP ``name`` enslaved to ``bridge`` and up.

        Raises:
            HostError: the bridge is missing, a link named ``name`` exists, or ``ip``
                failed (the half-made TAP is deleted first).
        """
        if not link_exists(bridge):
            raise HostError(f"bridge {bridge} is missing")
        if link_exists(name):
            # Someone else's link (or a VM's TAP): never adopt it, and never delete it
            # in the clean-up below.
            raise HostError(f"cannot create tap {name}: a link of that name exists")
        try:
            self._ip("tuntap", "add", "dev", name, "mode", "tap")
            self._ip("link", "set", "dev", name, "master", bridge, "up")
        except HostError as exc:
            with contextlib.suppress(HostError):
                self.delete_link(name)
            raise HostError(f"cannot create tap {name}: {exc.message}",
                            hint="check /dev/net/tun with `banger doctor`") from exc

    def delete_link(self, name: str) -> None:
        """Delete link ``name`` if it exists.

        Raises:
            HostError: the deletion was refused.
        """
        if not link_exists(name):
            return
        try:
            self._ip("link", "del", "dev", name)
        except HostError as exc:
            if link_exists(name):  # not gone meanwhile by another hand
                raise HostError(f"cannot delete link {name}: {exc.message}") from exc

    def links(self) -> list[str]:
        """The names of every network link on the host.

        Raises:
            HostError: ``ip`` failed or said something unexpected.
        """
        try:
            return [str(link["ifname"]) for link in json.loads(self._ip("-j", "link", "show"))]
        except (ValueError, KeyError, TypeError) as exc:
            raise HostError(f"cannot list links: unexpected ip output: {exc}") from exc


    def create_vm_netns(self, netns: str, port: str, bridge: str,
                        tap_owner: tuple[int, int]) -> None:
        """Make network namespace ``netns`` holding one VM's TAP, joined to ``bridge``.

        Inside the namespace: TAP :data:`VM_NETNS_TAP` (owned by ``tap_owner``'s uid
        and gid, so a VMM running as that user may open it by name and no other user
        may), enslaved with :data:`VM_NETNS_UPLINK` to bridge :data:`VM_NETNS_BRIDGE`.
        The uplink is a veth whose other end is ``port`` on ``bridge`` here: the
        guest's frames reach banger's bridge through ``port``, which carries a TAP's
        name so the guest network's rules apply to it as to any TAP. No link in the
        namespace has an address (IPv6 address generation off): the namespace only
        carries the guest's frames.

        Raises:
            HostError: the bridge is missing, ``port`` or the namespace exists, or
                ``ip`` failed (what was made is removed first).
        """
        if not link_exists(bridge):
            raise HostError(f"bridge {bridge} is missing")
        if link_exists(port):
            raise HostError(f"cannot create port {port}: a link of that name exists")
        if (NETNS_DIR / netns).exists():
            raise HostError(f"network namespace {netns} exists")
        uid, gid = tap_owner
        # No IPv6 address generation: a kernel booted without IPv6 has no such setting.
        quiet = " addrgenmode none" if IPV6.exists() else ""
        inside = "\n".join([
            f"link add name {VM_NETNS_BRIDGE} type bridge",
            f"link set dev {VM_NETNS_BRIDGE}{quiet} up",
            f"link set dev {VM_NETNS_UPLINK}{quiet} master {VM_NETNS_BRIDGE} up",
            f"tuntap add dev {VM_NETNS_TAP} mode tap user {uid} group {gid}",
            f"link set dev {VM_NETNS_TAP}{quiet} master {VM_NETNS_BRIDGE} up",
        ]) + "\n"
        try:
            self._ip("netns", "add", netns)
            self._ip("link", "add", "name", port, "type", "veth",
                     "peer", "name", VM_NETNS_UPLINK, "netns", netns)
            self._ip("link", "set", "dev", port, "master", bridge, "up")
            self._ip("-n", netns, "-batch", "-", stdin=inside)
        except HostError as exc:
            # The uplink's deletion takes the port, if this call made it (and only then:
            # a port of that name made meanwhile by another hand is left alone).
            with contextlib.suppress(HostError):
                self.delete_netns(netns)
            raise HostError(f"cannot make network namespace {netns}: {exc.message}",
                            hint="check network namespaces with `banger doctor`; a system "
                                 "service installed before jailer_netns needs `banger "
                                 "system install` again") from exc

    def delete_netns(self, netns: str) -> None:
        """Delete network namespace ``netns``, its links, and the VM's port they fed.

        Raises:
            HostError: the deletion was refused.
        """
        if not (NETNS_DIR / netns).exists():
            return
        # The uplink first: deleting a veth takes its peer (the VM's port) at once, where
        # a namespace's links go only when the kernel gets round to freeing it.
        with contextlib.suppress(HostError):
            self._ip("-n", netns, "link", "del", "dev", VM_NETNS_UPLINK)
        self.unname_netns(netns)

    def unname_netns(self, netns: str) -> None:
        """Remove the name ``netns`` only: the namespace lives on while a process is in
        it (a VMM that joined it), and goes, with its links, when the last one leaves.

        Raises:
            HostError: the name could not be removed.
        """
        if not (NETNS_DIR / netns).exists():
            return
        try:
            self._ip("netns", "del", netns)
        except HostError as exc:
            if (NETNS_DIR / netns).exists():
                raise HostError(f"cannot remove the name of network namespace {netns}: "
                                f"{exc.message}") from exc

    def netns_names(self) -> list[str]:
        """The host's named network namespaces (``ip netns``' names in :data:`NETNS_DIR`).

        Raises:
            HostError: the directory cannot be read.
        """
        try:
            return sorted(p.name for p in NETNS_DIR.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise HostError(f"cannot list {NETNS_DIR}: {exc.strerror or exc}") from exc


def bridge_mac(name: str) -> str:
    """The MAC banger gives a bridge it creates: locally administered, unicast, and the
    same for the same name, so a bridge made again (deleted with the last VM) still
    has the gateway MAC that suspended guests and snapshots remember."""
    digest = hashlib.sha256(f"banger-bridge\0{name}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


def link_exists(name: str) -> bool:
    """Whether this network namespace has a link named ``name`` (asked of the kernel,
    in this process's namespace).

    Raises:
        HostError: the kernel could not be asked.
    """
    try:
        # Not if_nametoindex: its "no such name" and its failures are one error.
        return any(link == name for _, link in socket.if_nameindex())
    except OSError as exc:
        raise HostError(f"cannot list the network links: {exc.strerror or exc}") from exc


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
