"""The ``.vm`` DNS server: ``<name>.vm`` answers with the VM's guest address.

Listens on UDP and TCP at the bridge gateway: guests use it as their resolver (the
host reaches VMs by name through the ssh config include instead). Names outside
``.vm`` are forwarded to the upstream resolver, as the asking guest's policy allows
(:class:`ClientPolicy`, from :mod:`banger.daemon.firewall`): a guest without NAT gets
``.vm`` names only, so it cannot tunnel data out through the host's resolver; an
allowlisted guest gets only its domains, and the addresses in their answers are
pinned into its firewall set before the answer is sent.

Guests are hostile, so the server is bounded everywhere: a fixed pool of worker
threads and a bounded backlog for UDP (a datagram past it is dropped: the client
retries), at most :data:`TCP_MAX_CONNECTIONS` TCP connections, each with an idle
timeout and a message cap, and every packet parsed by dnslib inside ``try`` (one
that does not parse is dropped). Upstream answers are checked against the question
before they are passed on. The record table has its own leaf lock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from banger.hostops.netlink import bind_dns

log = logging.getLogger("banger.dns")

ZONE = "vm"
TTL = 5  # seconds: a VM's address is stable, but a deleted name must vanish quickly
UPSTREAM_TIMEOUT_S = 3.0
UDP_MAX = 4096  # bytes read per datagram (EDNS's usual buffer); longer ones are cut and dropped
UDP_WORKERS = 8
UDP_BACKLOG = 64  # datagrams queued for the workers; more are dropped
TCP_MAX_CONNECTIONS = 16
TCP_IDLE_S = 10.0
TCP_MAX_MESSAGES = 100  # per connection


@dataclass(frozen=True)
class ClientPolicy:
    """What the resolver may do for one client.

    Attributes:
        forward: names outside ``.vm`` may go to the upstream resolver.
        allows: when set, only names it accepts are forwarded (an egress
            allowlist), and their answers are pinned.
    """

    forward: bool
    allows: Callable[[str], bool] | None = None


class EgressPolicy(Protocol):
    """The firewall's side of the resolver (:class:`banger.daemon.firewall.GuestFirewall`)."""

    def dns_policy(self, client: str) -> ClientPolicy | None:
        """The policy for ``client``; None: not a guest (the host), everything allowed."""
        ...

    def pin(self, client: str, answers: Sequence[tuple[str, int]]) -> list[str]:
        """Open the (address, TTL) answers to an allowlisted ``client``."""
        ...


def upstream_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> tuple[str, int] | None:
    """The first non-loopback nameserver of the host, if any."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
                return parts[1], 53
    except OSError:
        pass
    return None


class VMResolver:
    """Turns one query (bytes, from a client address) into its reply (bytes or None)."""

    def __init__(self, upstream: tuple[str, int] | None,
                 policy: EgressPolicy | None = None) -> None:
        self.upstream = upstream
        self.policy = policy
        # Guards _records; lookups copy the answer out before replying.
        self._mu = threading.Lock()
        self._records: dict[str, str] = {}

    def set(self, name: str, ip: str) -> None:
        """Answer ``<name>.vm`` with ``ip`` (names are case-insensitive)."""
        with self._mu:
            self._records[name.lower()] = ip

    def remove(self, name: str) -> None:
        """Stop answering for ``name``; unknown names are ignored."""
        with self._mu:
            self._records.pop(name.lower(), None)

    def lookup(self, name: str) -> str | None:
        """The address recorded for ``name``, or None."""
        with self._mu:
            return self._records.get(name.lower())

    def handle(self, data: bytes, client: str, tcp: bool) -> bytes | None:
        """The reply to the query ``data`` from ``client``; None to send nothing (a
        packet that is not a query)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types on malformed input
            return None
        if request.header.qr or len(request.questions) != 1:
            return None
        try:
            return self._answer(request, data, client, tcp)
        except Exception as exc:
            log.warning("dns: answering %s failed: %s", client, exc)
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())

    def _answer(self, request: DNSRecord, data: bytes, client: str, tcp: bool) -> bytes:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        labels = qname.split(".")
        if labels[-1] == ZONE:
            ip = self.lookup(labels[0]) if len(labels) == 2 else None
            if ip is None:
                reply.header.rcode = RCODE.NXDOMAIN
            elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=TTL))
            # other types for an existing name: NOERROR with no answer (NODATA)
            return bytes(reply.pack())
        policy = self.policy.dns_policy(client) if self.policy is not None else None
        refused = self.upstream is None or (policy is not None and (
            not policy.forward or (policy.allows is not None and not policy.allows(qname))))
        if refused:
            reply.header.rcode = RCODE.REFUSED
            return bytes(reply.pack())
        assert self.upstream is not None
        raw = forward(data, self.upstream, tcp)
        answer = DNSRecord.parse(raw)
        if (answer.header.id != request.header.id or not answer.header.qr
                or len(answer.questions) != 1
                or str(answer.q.qname).lower() != str(request.q.qname).lower()):
            raise ValueError("the upstream answer does not match the question")
        if policy is not None and policy.allows is not None and self.policy is not None:
            a_records = [(str(rr.rdata), rr.ttl) for rr in answer.rr if rr.rtype == QTYPE.A]
            self.policy.pin(client, a_records)
        return raw


def forward(data: bytes, upstream: tuple[str, int], tcp: bool) -> bytes:
    """Send the query ``data`` to ``upstream`` and return its raw answer (over TCP when
    the client asked over TCP, so a long answer is not truncated again).

    Raises:
        OSError: no answer within :data:`UPSTREAM_TIMEOUT_S`.
    """
    host, port = upstream
    if tcp:
        with socket.create_connection((host, port), timeout=UPSTREAM_TIMEOUT_S) as sock:
            sock.sendall(struct.pack("!H", len(data)) + data)
            (length,) = struct.unpack("!H", _recv_exact(sock, 2))
            return _recv_exact(sock, length)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UPSTREAM_TIMEOUT_S)
        sock.connect((host, port))
        sock.send(data)
        return sock.recv(65535)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


class _Listener:
    """One address's UDP and TCP sockets and their threads."""

    def __init__(self, resolver: VMResolver, udp: socket.socket, tcp: socket.socket) -> None:
        self.resolver = resolver
        self.closing = threading.Event()
        self.udp = udp
        self.tcp = tcp
        self.workers = ThreadPoolExecutor(UDP_WORKERS, thread_name_prefix="dns-udp")
        self.backlog = threading.BoundedSemaphore(UDP_BACKLOG)
        self.connections = threading.BoundedSemaphore(TCP_MAX_CONNECTIONS)
        self.threads = [threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True),
                        threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True)]
        for t in self.threads:
            t.start()

    def _serve_udp(self) -> None:
        while not self.closing.is_set():
            try:
                data, addr = self.udp.recvfrom(UDP_MAX)
            except OSError:
                return  # closed
            if not self.backlog.acquire(blocking=False):
                continue  # overloaded: drop it, the client retries
            try:
                self.workers.submit(self._answer_udp, data, addr)
            except RuntimeError:
                return  # shutting down

    def _answer_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.resolver.handle(data, addr[0], tcp=False)
            if reply is not None:
                if len(reply) > 512 and not _has_edns(data):
                    reply = _truncated(data)
                self.udp.sendto(reply, addr)
        except OSError:
            pass
        finally:
            self.backlog.release()

    def _serve_tcp(self) -> None:
        while not self.closing.is_set():
            try:
                conn, addr = self.tcp.accept()
            except OSError:
                return  # closed
            if not self.connections.acquire(blocking=False):
                conn.close()  # too many at once
                continue
            threading.Thread(target=self._answer_tcp, args=(conn, addr[0]),
                             name="dns-tcp-conn", daemon=True).start()

    def _answer_tcp(self, conn: socket.socket, client: str) -> None:
        try:
            conn.settimeout(TCP_IDLE_S)
            for _ in range(TCP_MAX_MESSAGES):
                head = conn.recv(2, socket.MSG_WAITALL)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                data = _recv_exact(conn, length)
                reply = self.resolver.handle(data, client, tcp=True)
                if reply is None:
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()
            self.connections.release()

    def close(self) -> None:
        self.closing.set()
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        for t in self.threads:
            t.join(timeout=2)


def _has_edns(data: bytes) -> bool:
    try:
        return any(rr.rtype == QTYPE.OPT for rr in DNSRecord.parse(data).ar)
    except Exception:
        return False


def _truncated(data: bytes) -> bytes:
    reply = DNSRecord.parse(data).reply()
    reply.header.tc = 1
    return bytes(reply.pack())


class VMDNS:
    """The running listener(s) and the record table they share."""

    def __init__(self, upstream: tuple[str, int] | None,
                 policy: EgressPolicy | None = None) -> None:
        self.resolver = VMResolver(upstream, policy)
        self._listeners: list[_Listener] = []

    def listen(self, address: str, port: int) -> None:
        """Serve UDP and TCP on ``address``:``port``, sharing the record table.

        Raises:
            OSError: either socket cannot be bound.
        """
        self.serve(*bind_dns(address, port))

    def serve(self, udp: socket.socket, tcp: socket.socket) -> None:
        """Serve on sockets bound elsewhere (the host operations bind port 53)."""
        self._listeners.append(_Listener(self.resolver, udp, tcp))
        host, port = udp.getsockname()
        log.info("dns: serving .%s on %s:%d (udp, tcp)", ZONE, host, port)

    def register(self, name: str, ip: str) -> None:
        """Make ``<name>.vm`` resolve to ``ip`` on every listening server."""
        self.resolver.set(name, ip)

    def unregister(self, name: str) -> None:
        """Make ``<name>.vm`` answer NXDOMAIN again."""
        self.resolver.remove(name)

    def close(self) -> None:
        """Stop every listener and close its sockets."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
