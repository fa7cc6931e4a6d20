"""The ``.vm`` DNS server with real packets on loopback: UDP and TCP, the per-client
policy (``.vm`` only, everything, an allowlist with its answers pinned first), a real
upstream resolver (dnslib's server on another loopback port), and hostile input."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from banger import egress
from banger.daemon import dns
from banger.daemon.dns import VMDNS, ClientPolicy

UPSTREAM_ZONE = {"ok.test": ["198.18.0.2", "198.18.0.3"], "other.test": ["198.18.0.9"],
                 "big.test": [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(300)]}


class Zone(BaseResolver):  # type: ignore[misc]
    """A real upstream: answers names of ``UPSTREAM_ZONE`` (TTL 42), NXDOMAIN else."""

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if name not in UPSTREAM_ZONE:
            reply.header.rcode = RCODE.NXDOMAIN
        for ip in UPSTREAM_ZONE.get(name, []):
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=42))
        return reply


class Policy:
    """Per-client policies and a record of what was pinned, in order."""

    def __init__(self) -> None:
        self.policies: dict[str, ClientPolicy | None] = {}
        self.pinned: list[tuple[str, list[tuple[str, int]]]] = []

    def dns_policy(self, client: str) -> ClientPolicy | None:
        return self.policies.get(client)

    def pin(self, client: str, answers: Sequence[tuple[str, int]]) -> list[str]:
        self.pinned.append((client, list(answers)))
        return [a for a, _ in answers]


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    quiet = DNSLogger(log="-request,-reply,-truncated,-data,-error", prefix=False)
    servers = [DNSServer(Zone(), address="127.0.0.1", port=0, logger=quiet)]
    port = servers[0].server.server_address[1]
    servers.append(DNSServer(Zone(), address="127.0.0.1", port=port, tcp=True, logger=quiet))
    for s in servers:
        s.start_thread()
    yield port
    for s in servers:
        s.stop()
        s.server.server_close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(upstream: int) -> Iterator[tuple[VMDNS, Policy, int]]:
    policy = Policy()
    srv = VMDNS(("127.0.0.1", upstream), policy=policy)
    for attempt in range(5):  # a port free for UDP may be taken for TCP by a parallel test
        port = free_port()
        try:
            srv.listen("127.0.0.1", port)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 4:
                raise
    srv.register("web", "172.29.0.5")
    yield srv, policy, port
    srv.close()


def ask(port: int, name: str, tcp: bool = False, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    return DNSRecord.parse(q.send("127.0.0.1", port, tcp=tcp, timeout=5))


@pytest.mark.parametrize("tcp", [False, True])
def test_vm_names_answer_over_udp_and_tcp(server: tuple[VMDNS, Policy, int], tcp: bool) -> None:
    _, policy, port = server
    policy.policies["127.0.0.1"] = ClientPolicy(forward=False)  # even a closed guest
    reply = ask(port, "web.vm", tcp)
    assert [str(rr.rdata) for rr in reply.rr] == ["172.29.0.5"]
    assert reply.header.rcode == RCODE.NOERROR
    assert ask(port, "gone.vm", tcp).header.rcode == RCODE.NXDOMAIN
    assert ask(port, "web.vm", tcp, "AAAA").rr == []  # NODATA


def test_a_guest_without_nat_gets_vm_names_only(server: tuple[VMDNS, Policy, int]) -> None:
    _, policy, port = server
    policy.policies["127.0.0.1"] = ClientPolicy(forward=False)
    for tcp in (False, True):
        assert ask(port, "ok.test", tcp).header.rcode == RCODE.REFUSED
    assert policy.pinned == []


@pytest.mark.parametrize("tcp", [False, True])
def test_the_host_and_nat_guests_get_every_name_forwarded(
        server: tuple[VMDNS, Policy, int], tcp: bool) -> None:
    _, policy, port = server
    for who in (None, ClientPolicy(forward=True)):
        policy.policies["127.0.0.1"] = who
        reply = ask(port, "other.test", tcp)
        assert [str(rr.rdata) for rr in reply.rr] == ["198.18.0.9"]
        assert ask(port, "missing.test", tcp).header.rcode == RCODE.NXDOMAIN
    assert policy.pinned == []  # no allowlist: nothing to pin


def test_an_allowlisted_guest_gets_its_domains_pinned_before_the_answer(
        server: tuple[VMDNS, Policy, int]) -> None:
    _, policy, port = server
    allow = egress.parse(["ok.test"])
    policy.policies["127.0.0.1"] = ClientPolicy(forward=True, allows=allow.allows_name)
    reply = ask(port, "ok.test")
    assert sorted(str(rr.rdata) for rr in reply.rr) == ["198.18.0.2", "198.18.0.3"]
    assert policy.pinned == [("127.0.0.1", [("198.18.0.2", 42), ("198.18.0.3", 42)])]
    assert ask(port, "other.test").header.rcode == RCODE.REFUSED
    assert len(policy.pinned) == 1


def test_a_failed_pin_sends_servfail_not_the_address(server: tuple[VMDNS, Policy, int]) -> None:
    _srv, policy, port = server
    policy.policies["127.0.0.1"] = ClientPolicy(forward=True, allows=lambda n: True)

    def refuse(client: str, answers: Sequence[tuple[str, int]]) -> list[str]:
        raise RuntimeError("nft said no")

    policy.pin = refuse  # type: ignore[method-assign]
    reply = ask(port, "ok.test")
    assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []


def test_a_long_answer_comes_whole_over_tcp(server: tuple[VMDNS, Policy, int]) -> None:
    _, policy, port = server
    policy.policies["127.0.0.1"] = ClientPolicy(forward=True)
    assert len(ask(port, "big.test", tcp=True).rr) == 300


def test_no_upstream_refuses_outside_names(upstream: int) -> None:
    srv = VMDNS(None)
    port = free_port()
    srv.listen("127.0.0.1", port)
    try:
        assert ask(port, "ok.test").header.rcode == RCODE.REFUSED
    finally:
        srv.close()


def test_hostile_input_leaves_the_server_answering(server: tuple[VMDNS, Policy, int]) -> None:
    _, _policy, port = server
    junk = [b"", b"\x00", b"\xff" * 600, DNSRecord.question("web.vm").pack()[:7],
            bytes(DNSRecord.question("web.vm").reply().pack())]  # a reply, not a query
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        for packet in junk:
            s.sendto(packet, ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            s.recv(512)  # none of it gets an answer
    # TCP: a length with nothing behind it, garbage, then more connections than allowed
    conns = []
    for _ in range(dns.TCP_MAX_CONNECTIONS + 4):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        conns.append(c)
    conns[0].sendall(struct.pack("!H", 500) + b"abc")
    conns[1].sendall(struct.pack("!H", 3) + b"abc")
    assert conns[1].recv(10) == b""  # garbage: connection closed
    for c in conns:
        c.close()
    deadline = time.monotonic() + 10
    while True:  # the slots come back as the handlers see their peers go
        try:
            assert str(ask(port, "web.vm", tcp=True).rr[0].rdata) == "172.29.0.5"
            break
        except (OSError, struct.error):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert str(ask(port, "web.vm").rr[0].rdata) == "172.29.0.5"


def test_udp_floods_are_bounded(server: tuple[VMDNS, Policy, int]) -> None:
    _, policy, port = server
    policy.policies["127.0.0.1"] = ClientPolicy(forward=True)

    def dns_threads() -> int:  # the server's own: other tests' threads come and go
        return sum(1 for t in threading.enumerate() if t.name.startswith("dns-udp"))

    started = dns_threads()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        query = DNSRecord.question("other.test").pack()
        for _ in range(500):
            s.sendto(query, ("127.0.0.1", port))
        # a bounded pool, not a thread per datagram
        assert dns_threads() - started <= dns.UDP_WORKERS
    # Past the backlog datagrams are dropped; a client retrying (as resolvers do) is
    # answered once the backlog drains.
    deadline = time.monotonic() + 20
    while True:
        try:
            assert str(ask(port, "web.vm").rr[0].rdata) == "172.29.0.5"
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the server never answered again"


def test_an_upstream_answer_to_another_question_is_not_passed_on(upstream: int) -> None:
    liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    liar.bind(("127.0.0.1", 0))

    def answer_wrong() -> None:
        data, addr = liar.recvfrom(4096)
        q = DNSRecord.parse(data)
        bad = DNSRecord.question("evil.test").reply()
        bad.header.id = q.header.id
        bad.add_answer(RR("evil.test", QTYPE.A, rdata=A("6.6.6.6"), ttl=60))
        liar.sendto(bad.pack(), addr)

    t = threading.Thread(target=answer_wrong, daemon=True)
    t.start()
    srv = VMDNS(liar.getsockname())
    port = free_port()
    srv.listen("127.0.0.1", port)
    try:
        reply = ask(port, "ok.test")
        assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []
    finally:
        srv.close()
        liar.close()
