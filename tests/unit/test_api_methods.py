"""banger.api.methods against the daemon's real dispatch table and the real client.

The table names every method once, with the params model the daemon parses and the
result type the client checks: the daemon serves exactly its methods, parses each with
its model, and its answers (from a daemon with fake host seams) have the shapes the
table gives them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from banger.api.methods import METHODS, check_params, check_result
from banger.client import Client
from banger.daemon import rpc
from banger.daemon.core import Daemon
from banger.daemon.session import scripts
from banger.errors import BadRequest, BadVersion, DaemonUnavailable
from banger.protocol import MAX_FRAME
from tests.conftest import FakeWorld
from tests.unit.test_bundles import entry, set_catalog, write_catalog
from tests.unit.test_registry import bzimage
from tests.unit.test_sessions import HostShellGuest


def test_the_daemon_serves_exactly_the_methods_of_the_table(daemon: Daemon) -> None:
    assert set(daemon.methods) == set(METHODS)


def test_a_handler_missing_from_the_table_stops_the_daemon_starting(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    shorter = dict(METHODS)
    del shorter["vm.show"]
    monkeypatch.setattr(rpc, "METHODS", shorter)
    with pytest.raises(RuntimeError, match=r"vm\.show"):
        rpc.register(daemon)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_parses_its_params_with_the_tables_model(daemon: Daemon,
                                                              method: str) -> None:
    """An unknown field is refused by the daemon and by the client's check alike."""
    with pytest.raises(BadRequest, match=r"^invalid params: ") as served:
        daemon.methods[method]({"no_such_field": 1})
    with pytest.raises(BadRequest, match=rf"^invalid params for {method}: ") as checked:
        check_params(method, {"no_such_field": 1})
    assert served.value.message.split(": ", 1)[1] == checked.value.message.split(": ", 1)[1]


def test_every_typed_answer_has_its_shape(daemon: Daemon, world: FakeWorld, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method whose result the table types is called once (a VM's life, its
    forwards, ports, egress, logs and sessions, a suspend, a snapshot, images registered,
    promoted and re-kernelled, kernels, the catalog) and its answer validated as the
    client validates it; a typed method this test does not reach fails it."""
    called: set[str] = set()

    def call(method: str, **params: Any) -> Any:
        called.add(method)
        return check_result(method, daemon.methods[method](params))

    def finish(kind: str, op: dict[str, Any]) -> dict[str, Any]:
        called.add(f"{kind}.begin")
        while not op["done"]:
            op = call(f"{kind}.status", id=op["id"], wait_s=10)
        return op

    vm = call("vm.create", name="alpha")
    assert vm["state"] == "running"
    daemon.layout.vm(vm["id"]).work_disk.write_bytes(b"work")  # the fake runner makes none
    assert call("vm.show", name="alpha")["name"] == "alpha"
    assert [v["name"] for v in call("vm.list")] == ["alpha"]
    assert call("vm.ssh_info", name="alpha")["ip"] == vm["ip"]
    with socket.socket() as probe:  # a free loopback port for the forward
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fwd = call("vm.forward.add", name="alpha", forward=f"127.0.0.1:{port}:8080")
    assert fwd["guest_port"] == 8080
    assert [f["guest_port"] for f in call("vm.forward.list", name="alpha")] == [8080]
    assert call("vm.set_egress", name="alpha", nat=False)["nat"] is False
    assert call("vm.logs", name="alpha")["name"] == "alpha"
    guest_side(call, world, vm["ip"], tmp_path, monkeypatch)
    assert call("vm.pause", name="alpha")["state"] == "paused"
    assert call("vm.resume", name="alpha")["state"] == "running"
    snap = call("vm.snapshot", vm="alpha", name="s1")
    assert [s["name"] for s in call("snapshot.list")] == ["s1"]
    assert call("snapshot.rm", name="s1")["id"] == snap["id"]
    cancelled = call("vm.snapshot.begin", vm="alpha", name="s2")
    call("vm.snapshot.cancel", id=cancelled["id"])
    finish("vm.snapshot", cancelled)
    assert call("vm.suspend", name="alpha")["state"] == "suspended"
    assert call("vm.start", name="alpha")["state"] == "running"
    assert call("vm.stop", name="alpha")["state"] == "stopped"
    assert finish("vm.start", call("vm.start.begin", name="alpha"))["error"] is None
    assert call("vm.restart", name="alpha")["state"] == "running"
    assert call("vm.kill", name="alpha")["state"] == "stopped"
    promoted = call("image.promote", vm="alpha", name="gold")
    assert promoted["source"] == "promoted"
    images = call("image.list")
    assert call("image.show", name="gold") == next(i for i in images if i["name"] == "gold")
    kernel = bzimage(tmp_path / "bz")
    rootfs = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(rootfs), "8M"], check=True)
    registered = call("image.register", name="mine", rootfs=str(rootfs), kernel=str(kernel))
    assert registered["name"] == "mine"
    assert call("kernel.import", name="k1", paths=[str(kernel)])["vmms"] == ["qemu"]
    assert [k["name"] for k in call("kernel.list")] == ["k1"]
    assert call("kernel.show", name="k1")["bzimage"]
    assert call("image.set_kernel", name="mine", kernel="k1")["kernel_name"] == "k1"
    assert call("image.cache.prune", dry_run=True)["removed"] == []
    bundle = tmp_path / "dev.tar.zst"
    bundle.write_bytes(b"bundle")
    set_catalog(daemon, write_catalog(tmp_path / "catalog.json", [entry("dev", bundle)]))
    assert [e["name"] for e in call("catalog.list", kind="image")] == ["dev"]
    assert call("daemon.operations.list")
    typed = {m for m, spec in METHODS.items() if spec.result is not Any}
    # Every operation's begin, status and cancel share OpView: one kind stands for all.
    ops = {m for m in typed if m.rsplit(".", 1)[-1] in ("begin", "status", "cancel")}
    assert typed - ops <= called, sorted(typed - ops - called)
    assert {"vm.snapshot.begin", "vm.snapshot.status", "vm.snapshot.cancel"} <= called


class ListeningGuest(HostShellGuest):
    """Session scripts run by the host's sh; ``ss`` says sshd listens on port 22."""

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        if script.startswith("exec ss "):
            return subprocess.Popen(["echo", SSHD_LISTENS], **kwargs)
        return super().popen(script, **kwargs)


SSHD_LISTENS = 'tcp LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=312,fd=3))'


def guest_side(call: Callable[..., Any], world: FakeWorld, ip: str, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> None:
    """The typed answers read from VM alpha's guest: its ports, and ``vm.session.*``
    from session scripts run by the host's sh (tests/unit/test_sessions.py)."""
    monkeypatch.setattr(scripts, "ROOT", str(tmp_path / "guest-sessions"))
    world.guests[ip] = ListeningGuest(ip, on_poweroff=world.vmm.poweroff)
    [ports] = call("vm.ports", names=["alpha"])
    assert [(x["port"], x["endpoint"]) for x in ports["listeners"]] == [(22, "alpha.vm:22")]
    started = call("vm.session.start", vm="alpha", argv=["sh", "-c", "echo hi; sleep 300"],
                   name="s1")
    assert started["state"] == "running"
    assert [x["ref"] for x in call("vm.session.list", vm="alpha")] == ["alpha/s1"]
    assert call("vm.session.show", vm="alpha", name="s1")["argv"][0] == "sh"
    assert call("vm.session.logs", vm="alpha", name="s1", wait_s=5)["next"] != "0:0"
    assert call("vm.session.attach", vm="alpha", name="s1", write=False)["writer"] is False
    assert call("vm.session.kill", vm="alpha", name="s1", signal="TERM")["signal"] == 15
    call("vm.session.start", vm="alpha", argv=["sleep", "300"], name="s2")
    assert call("vm.session.stop", vm="alpha", name="s2", timeout_s=5)["state"] == "ended"


def test_a_reply_of_another_shape_is_a_version_mismatch() -> None:
    with pytest.raises(BadVersion, match=r"vm\.show") as exc:
        check_result("vm.show", {"name": "alpha"})
    assert "daemon restart" in (exc.value.hint or "")
    with pytest.raises(BadVersion):
        check_result("vm.list", [{"name": "alpha"}])
    assert check_result("daemon.status", {"anything": 1}) == {"anything": 1}  # untyped
    assert check_result("some.future.method", [1]) == [1]


class OneReply:
    """A Unix socket server that answers one request with ``reply`` (raw bytes)."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.received: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self.thread.start()

    def _serve(self, reply: bytes) -> None:
        conn, _ = self.sock.accept()
        with conn:
            self.received.append(json.loads(conn.makefile("rb").readline()))
            conn.sendall(reply)

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


def test_the_client_reads_no_more_than_a_frame_and_checks_what_it_reads(
        tmp_path: Path) -> None:
    path = tmp_path / "sock"
    too_long = b'{"jsonrpc":"2.0","id":1,"result":"' + b"x" * MAX_FRAME + b'"}\n'
    server = OneReply(path, too_long)
    with pytest.raises(DaemonUnavailable, match="longer than the"):
        Client(path).call("daemon.status", timeout=10)
    server.close()
    path.unlink()
    server = OneReply(path, b'{"jsonrpc":"2.0","id":1,"result":{"name":"x"}}\n')
    with pytest.raises(BadVersion):
        Client(path).call("vm.show", timeout=10, name="x")
    server.close()
    assert server.received[0]["params"] == {"name": "x"}
    path.unlink()
    server = OneReply(path, b'{"jsonrpc":"2.0","id":1,"result":{"na')
    with pytest.raises(DaemonUnavailable, match="in the middle of its reply"):
        Client(path).call("daemon.status", timeout=10)
    server.close()


def test_the_client_refuses_bad_params_before_sending(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"vm\.create: vcpu"):
        Client(tmp_path / "no-daemon-here").call("vm.create", vcpu=0)
    with pytest.raises(BadRequest, match="unknown parameter"):
        Client(tmp_path / "no-daemon-here").call("vm.show", name="x", nmae="typo")


def test_the_cli_builds_a_create_from_its_flags_through_the_model() -> None:
    """`vm create`/`vm run` flags become the request's model: renamed flags (--memory)
    land in their fields, and a value the model refuses is a clear error, not a
    traceback."""
    from banger.cli.vm import _create_params

    flags: dict[str, Any] = {
        "name": "a", "image": None, "vcpu": 2, "memory": 512, "disk_size": None,
        "work_disk_size": None, "vmm": "auto", "nat": None, "allow_private": False,
        "allow_out": ("example.com",), "forwards": (), "from_snapshot": None, "cold": True}
    made = _create_params(flags, start=False)
    assert (made.memory_mib, made.start, made.allow_out, made.cold) == (
        512, False, ["example.com"], True)
    check_params("vm.create.begin", made.model_dump(mode="json"))
    with pytest.raises(BadRequest, match=r"^invalid params for vm\.create: vcpu: "):
        _create_params({**flags, "vcpu": 0}, start=True)
