"""The ``.vm`` DNS server: ``<name>.vm`` answers with the VM's guest address.

Listens on UDP at the bridge gateway (guests use it as their resolver; the host
reaches VMs by name through the ssh config include instead). Names outside ``.vm``
are forwarded to the host's
upstream resolver when one is configured, else refused. Packets are parsed
and built with dnslib; the record table has its own leaf lock.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

log = logging.getLogger("banger.dns")

ZONE = "vm"
TTL = 5  # seconds: a VM's address is stable, but a deleted name must vanish quickly
UPSTREAM_TIMEOUT_S = 3.0


def upstream_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> str | None:
    """The first non-loopback nameserver of the host, if any."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and not parts[1].startswith("127."):
                return parts[1]
    except OSError:
        pass
    return None


class VMResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, upstream: str | None) -> None:
        self.upstream = upstream
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

    def resolve(self, request: Any, handler: Any) -> Any:
        """dnslib's hook: answer ``<name>.vm`` locally, forward anything else.

        Unknown ``.vm`` names get NXDOMAIN and non-A queries for known ones an empty
        NOERROR. Other names go to the upstream resolver (SERVFAIL when it fails), or
        are REFUSED when there is none.
        """
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
            return reply
        if self.upstream is None:
            reply.header.rcode = RCODE.REFUSED
            return reply
        try:
            raw = request.send(self.upstream, 53, timeout=UPSTREAM_TIMEOUT_S)
            return DNSRecord.parse(raw)
        except Exception:
            reply.header.rcode = RCODE.SERVFAIL
            return reply


class _QuietLogger(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-data", prefix=False)

    def log_error(self, handler: Any, e: Any) -> None:
        log.debug("dns error: %s", e)


class VMDNS:
    """The running server(s) and the record table they share."""

    def __init__(self, upstream: str | None) -> None:
        self.resolver = VMResolver(upstream)
        self._servers: list[DNSServer] = []

    def listen(self, address: str, port: int) -> None:
        """Start a UDP server thread on ``address``:``port`` sharing the record table."""
        server = DNSServer(self.resolver, address=address, port=port, logger=_QuietLogger())
        server.start_thread()
        self._servers.append(server)
        log.info("dns: serving .%s on %s:%d", ZONE, address, port)

    def register(self, name: str, ip: str) -> None:
        """Make ``<name>.vm`` resolve to ``ip`` on every listening server."""
        self.resolver.set(name, ip)

    def unregister(self, name: str) -> None:
        """Make ``<name>.vm`` answer NXDOMAIN again."""
        self.resolver.remove(name)

    def close(self) -> None:
        """Stop every server thread and close its socket."""
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers.clear()
