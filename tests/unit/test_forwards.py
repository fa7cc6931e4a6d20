"""Port forwards: the relay on real loopback sockets, and the VM rules with the fake world.

The real thing (a guest HTTP server through a forward, a daemon kill -9, vm stop) is
tests/e2e/test_forwards.py.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from banger.api.params import CreateParams
from banger.daemon import forwards, reconcile, vmcreate, vmpower, vms
from banger.daemon.core import Daemon
from banger.daemon.forwarder import Forward, ForwardSpec, ForwardTable, check, parse
from banger.errors import AlreadyExists, BadRequest, NotFound, NotRunning
from banger.proc import matches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo() -> Iterator[int]:
    """A loopback TCP server that answers each line upper-cased (the "guest")."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    srv.close()


def test_parse() -> None:
    assert parse("8080:80") == ForwardSpec("127.0.0.1", 8080, 80)
    assert parse("0.0.0.0:8080:80") == ForwardSpec("0.0.0.0", 8080, 80)
    assert str(parse("8080:80")) == "127.0.0.1:8080:80"
    assert ForwardSpec.from_json(parse("1:2").to_json()) == parse("1:2")
    for bad, says in (("80", "HOST_PORT:GUEST_PORT"), ("a:b:c:d", "HOST_PORT:GUEST_PORT"),
                      ("0:80", "out of range"), ("8080:65536", "out of range"),
                      ("x:80", "not a port"), ("::1:80:80", "HOST_PORT:GUEST_PORT"),
                      ("host:80:80", "not an IP address")):
        with pytest.raises(BadRequest) as exc:
            parse(bad)
        assert says in exc.value.message, bad
    with pytest.raises(BadRequest, match="IPv4"):
        check("::1", 80, 80)


def test_a_forward_relays_and_close_frees_the_port(echo: int) -> None:
    spec = check("127.0.0.1", free_port(), echo)
    fwd = Forward(spec, "127.0.0.1", "box")
    with socket.create_connection(("127.0.0.1", spec.host_port), timeout=5) as c:
        c.sendall(b"hello\n")
        assert c.recv(100) == b"HELLO\n"
        with pytest.raises(AlreadyExists, match="already in use"):
            Forward(spec, "127.0.0.1", "other")
        fwd.close()
        c.settimeout(5)
        assert c.recv(100) == b""  # the open connection was cut
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", spec.host_port))  # free again


def test_a_guest_that_refuses_closes_the_client() -> None:
    spec = check("127.0.0.1", free_port(), free_port())  # nothing listens there
    fwd = Forward(spec, "127.0.0.1", "box")
    try:
        with socket.create_connection(("127.0.0.1", spec.host_port), timeout=5) as c:
            c.settimeout(10)
            assert c.recv(10) == b""
    finally:
        fwd.close()


def test_table_refuses_a_port_another_vm_forwards() -> None:
    table = ForwardTable()
    port = free_port()
    table.open("vm1", check("127.0.0.1", port, 80), "127.0.0.1", "one")
    table.open("vm1", check("127.0.0.1", port, 80), "127.0.0.1", "one")  # again: a no-op
    with pytest.raises(AlreadyExists, match="already forwarded"):
        table.open("vm2", check("0.0.0.0", port, 22), "127.0.0.1", "two")
    assert table.opened("vm1") == [check("127.0.0.1", port, 80)]
    table.close_all()
    assert table.opened("vm1") == []


def test_forward_rules(daemon: Daemon) -> None:
    port, created = free_port(), free_port()
    vmcreate.create_sync(daemon, CreateParams(name="web",
                                                       forwards=[f"{created}:8081"]))
    assert [str(s) for s in daemon.forwards.opened(
        vms.resolve(daemon, "web").id)] == [f"127.0.0.1:{created}:8081"]
    added = forwards.add(daemon, "web", f"{port}:8080")
    assert added["open"] and not added["from_create"]
    listed = forwards.list_forwards(daemon, "web")
    assert sorted(f["host_port"] for f in listed) == sorted([port, created])
    with pytest.raises(NotFound, match="no forward"):
        forwards.remove(daemon, "web", "1:2")
    forwards.remove(daemon, "web", f"{port}:8080")
    forwards.add(daemon, "web", f"{port}:8080")

    vmpower.stop(daemon, "web")
    vm = vms.resolve(daemon, "web")
    assert daemon.forwards.opened(vm.id) == [] and vm.runtime.forwards is None
    with pytest.raises(NotRunning) as exc:
        forwards.add(daemon, "web", f"{port}:8080")
    assert "banger vm start web" in (exc.value.hint or "")
    vmpower.start(daemon, "web")
    assert [s.host_port for s in daemon.forwards.opened(vm.id)] == [created]  # -p only
    with pytest.raises(BadRequest):
        vmcreate.create_sync(daemon, CreateParams(name="bad", forwards=["99999:1"]))


def test_a_vm_found_dead_at_start_up_loses_its_run_time_forwards(daemon: Daemon) -> None:
    """The VMM died while no daemon ran: reconcile marks the VM stopped, and the forwards
    added while it ran end with it, as at a stop (its -p ones stay in the spec)."""
    created = free_port()
    vmcreate.create_sync(daemon, CreateParams(name="gone",
                                                       forwards=[f"{created}:80"]))
    forwards.add(daemon, "gone", f"{free_port()}:8080")
    vm = vms.resolve(daemon, "gone")
    h = daemon.handles.get(vm.id)
    assert h is not None and h.process is not None and vm.runtime.forwards
    daemon.forwards.close_all()  # the daemon went away
    os.kill(h.process.pid, signal.SIGKILL)
    for _ in range(100):
        if not matches(h.process):
            break
        time.sleep(0.02)
    reconcile.reconcile_vm(daemon, vm)
    after = vms.resolve(daemon, "gone")
    assert after.state.value == "stopped" and after.runtime.forwards is None
    assert [f["host_port"] for f in forwards.list_forwards(daemon, "gone")] == [created]
