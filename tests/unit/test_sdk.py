"""``from banger import Client`` against the daemon's real RPC server and dispatch table
(fake host seams: no VMM; session and ``ss`` scripts run by the host's sh), and
against a scripted socket for what the fake host cannot do (kernel builds, a workspace
export, replies of another shape). The guest half (exec, workspace prepare and
export) is the end-to-end test ``tests/e2e/test_sdk.py``.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import banger
from banger.api import (
    BundleView,
    CachePruneView,
    CatalogEntry,
    ForwardView,
    ImageView,
    KernelView,
    OpView,
    PortsView,
    SessionView,
    SnapshotView,
    VMView,
)
from banger.cli import app as app_module
from banger.cli.app import App, follow
from banger.daemon import images
from banger.daemon.core import Daemon
from banger.daemon.opstate import Operation
from banger.daemon.server import RPCServer
from banger.daemon.session import scripts
from banger.daemon.store import ImageRecord, now
from banger.errors import BadRequest, BadVersion, Cancelled, NotFound
from banger.sdk import Client, Patch
from banger.sdk.client import Cancel
from tests.bundlefiles import build_bundle
from tests.conftest import FakeWorld
from tests.fakes import RPCSocket, ssh_until_cancelled
from tests.unit.test_api_methods import ListeningGuest
from tests.unit.test_bundles import (
    add_image,
    entry,
    make_ext4,
    set_catalog,
    write_catalog,
)
from tests.unit.test_registry import bzimage


@pytest.fixture
def sdk(daemon: Daemon, tmp_path: Path) -> Iterator[Client]:
    """A Client on a real socket the test's daemon serves."""
    path = tmp_path / "bangerd.sock"
    server = RPCServer(daemon, path)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_until, args=(stop,), daemon=True)
    thread.start()
    try:
        yield Client(socket=path)
    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_the_package_exports_the_sdk_client() -> None:
    assert banger.Client is Client
    with pytest.raises(AttributeError):
        banger.NoSuchThing  # noqa: B018


def test_a_vms_life_through_typed_methods(sdk: Client) -> None:
    seen: list[OpView] = []
    vm = sdk.vms.create("alpha", vcpu=1, on_progress=seen.append)
    assert isinstance(vm, VMView) and vm.name == "alpha" and vm.state == "running"
    assert seen and seen[-1].done and seen[-1].kind == "vm.create"
    assert [v.name for v in sdk.vms.list()] == ["alpha"]
    assert sdk.vms.show("alpha").spec.vcpu == 1
    assert sdk.vms.stop("alpha").state == "stopped"
    assert sdk.vms.start("alpha").state == "running"
    assert sdk.vms.ssh_info("alpha").ip == vm.ip
    assert [i.name for i in sdk.images.list()] == [sdk.images.list()[0].name]
    assert sdk.vms.delete("alpha") == {"deleted": "alpha", "id": vm.id}
    assert sdk.vms.list() == []


def test_the_lifecycle_verbs_are_operations_with_progress(sdk: Client) -> None:
    vm = sdk.vms.create("beta")
    kinds: list[str] = []

    def seen(view: OpView) -> None:
        kinds.append(view.kind)

    assert sdk.vms.stop("beta", on_progress=seen).state == "stopped"
    assert sdk.vms.start("beta", on_progress=seen).state == "running"
    assert sdk.vms.restart("beta", on_progress=seen).state == "running"
    assert sdk.vms.pause("beta").state == "paused"
    assert sdk.vms.resume("beta").state == "running"
    suspended = sdk.vms.suspend("beta", on_progress=seen)
    assert suspended.state == "suspended" and suspended.suspended is not None
    assert sdk.vms.start("beta").state == "running"
    assert sorted(set(kinds)) == ["vm.restart", "vm.start", "vm.stop", "vm.suspend"]
    assert sdk.vms.kill("beta", "KILL").state == "stopped"
    assert sdk.vms.show("beta").id == vm.id


def test_errors_are_the_cli_s_exception_tree_with_codes(sdk: Client) -> None:
    with pytest.raises(NotFound) as missing:
        sdk.vms.show("nope")
    assert missing.value.code == "not_found"
    with pytest.raises(BadRequest, match="vcpu"):
        sdk.vms.create("bad", vcpu=0)  # refused before anything is sent
    assert sdk.vms.list() == []
    sdk.vms.create("plain", start=False)
    with pytest.raises(NotFound, match="no workspace"):
        sdk.workspace.status("plain")
    with pytest.raises(NotFound):
        sdk.kernels.show("nope")


def test_setting_cancel_cancels_the_operation_and_raises_cancelled(
        sdk: Client, daemon: Daemon) -> None:
    in_ssh = threading.Event()
    daemon.seams.wait_for_ssh = ssh_until_cancelled(in_ssh)
    cancel = threading.Event()

    def progress(view: OpView) -> None:
        if in_ssh.is_set():
            cancel.set()

    with pytest.raises(Cancelled):
        sdk.vms.create("slow", on_progress=progress, cancel=cancel)
    assert cancel.is_set()
    assert daemon.db.find_vm("slow") is None  # the cancelled create rolled itself back


def test_a_cancelled_start_leaves_the_vm_stopped(sdk: Client, daemon: Daemon) -> None:
    sdk.vms.create("gamma", start=False)
    in_ssh = threading.Event()
    daemon.seams.wait_for_ssh = ssh_until_cancelled(in_ssh)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        sdk.vms.start("gamma", on_progress=lambda _v: in_ssh.is_set() and cancel.set(),
                      cancel=cancel)
    assert sdk.vms.show("gamma").state == "stopped"


def test_egress_logs_ports_and_forwards(sdk: Client, world: FakeWorld, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    vm = sdk.vms.create("web")
    egress = sdk.vms.set_egress("web", nat=False, allow_private=False)
    assert (egress.name, egress.nat, egress.applied) == ("web", False, True)
    logs = sdk.vms.logs("web")
    assert logs.name == "web" and logs.path.endswith(".log")
    world.guests[vm.ip] = ListeningGuest(vm.ip, on_poweroff=world.vmm.poweroff)
    [ports] = sdk.vms.ports()
    assert isinstance(ports, PortsView) and ports.error is None
    assert [(x.port, x.process, x.endpoint) for x in ports.listeners] == [
        (22, "sshd", "web.vm:22")]
    with socket.socket() as probe:  # a free loopback port for the forward
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fwd = sdk.forwards.add("web", f"{port}:8080")
    assert isinstance(fwd, ForwardView) and (fwd.host_port, fwd.guest_port) == (port, 8080)
    assert sdk.forwards.list("web") == [fwd] and sdk.forwards.list() == [fwd]
    assert sdk.forwards.remove("web", f"{port}:8080")["name"] == "web"
    assert sdk.forwards.list() == []


def test_snapshots_take_list_remove(sdk: Client, daemon: Daemon) -> None:
    vm = sdk.vms.create("src")
    daemon.layout.vm(vm.id).work_disk.write_bytes(b"work")  # the fake runner makes none
    stages: list[str] = []
    snap = sdk.snapshots.take("src", "s1", on_progress=lambda v: stages.append(v.kind))
    assert isinstance(snap, SnapshotView) and (snap.name, snap.source_vm) == ("s1", "src")
    assert set(stages) == {"vm.snapshot"}
    assert [s.name for s in sdk.snapshots.list()] == ["s1"]
    clone = sdk.vms.create("clone", from_snapshot="s1")
    assert clone.from_snapshot == "s1"
    assert sdk.snapshots.remove("s1") == snap
    assert sdk.snapshots.list() == []


def fake_build(d: Daemon, recipe: Any, op: Operation) -> dict[str, Any]:
    """The image build seam: an image of the recipe's name, at once."""
    op.enter("debootstrap", "pretending")
    img_dir = d.layout.image_dir(op.target)
    img_dir.mkdir(parents=True, exist_ok=True)
    rootfs = img_dir / "rootfs.ext4"
    rootfs.write_bytes(b"root")
    (img_dir / "vmlinuz").write_bytes(b"k")
    d.db.add_image(ImageRecord(op.target, "built", str(rootfs), str(img_dir / "vmlinuz"),
                               None, None, 4, "h", now()))
    return images.view(d.db.get_image(op.target))


def test_images_build_export_pull_register_promote(sdk: Client, daemon: Daemon,
                                                   tmp_path: Path) -> None:
    assert sdk.images.delete("debian-bookworm") == {"deleted": "debian-bookworm"}
    daemon.seams.image_build = fake_build
    built_stages: list[str] = []
    built = sdk.images.build(on_progress=lambda v: built_stages.append(v.stage))
    assert built.name == "debian-bookworm" and "debootstrap" in built_stages

    add_image(daemon, tmp_path, "src")
    out = tmp_path / "out" / "src.tar.zst"
    out.parent.mkdir()
    bundle = sdk.images.export("src", out)
    assert isinstance(bundle, BundleView) and bundle.path == str(out)
    assert bundle.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert out.stat().st_uid == os.geteuid()
    pulled = sdk.images.pull(str(out), name="back")
    assert isinstance(pulled, ImageView) and (pulled.name, pulled.source) == ("back", "bundle")

    kernel = bzimage(tmp_path / "bz")
    registered = sdk.images.register("mine", make_ext4(tmp_path, "mine.ext4"),
                                     kernel=kernel)
    assert registered.name == "mine" and registered.source == "registered"
    k1 = sdk.kernels.import_files("k1", [kernel])
    assert sdk.images.set_kernel("mine", k1.name).kernel_name == "k1"
    assert sdk.images.set_kernel("mine").kernel_name is None

    vm = sdk.vms.create("donor", start=False)
    daemon.layout.vm(vm.id).work_disk.write_bytes(b"work")  # the fake runner makes none
    promoted = sdk.images.promote("donor", "gold")
    assert promoted.name == "gold" and promoted.source == "promoted"
    assert {"back", "mine", "gold", "src"} <= {i.name for i in sdk.images.list()}

    pruned = sdk.images.prune_cache(dry_run=True)
    assert isinstance(pruned, CachePruneView) and pruned.dry_run and pruned.removed == []


def test_kernels_and_the_catalog(sdk: Client, daemon: Daemon, tmp_path: Path) -> None:
    k1 = sdk.kernels.import_files("k1", [bzimage(tmp_path / "bz", "6.1.7-test")])
    assert isinstance(k1, KernelView) and (k1.vmms, k1.version) == (["qemu"], "6.1.7-test")
    assert sdk.kernels.list() == [k1] and sdk.kernels.show("k1") == k1
    data = bzimage(tmp_path / "bz2", "6.1.8-cat").read_bytes()
    kbundle = build_bundle(tmp_path / "k.tar.zst", {"bzImage": data}, kind="kernel",
                           manifest={"name": "cat-kernel"})
    stages: list[str] = []
    pulled = sdk.kernels.pull(str(kbundle), on_progress=lambda v: stages.append(v.kind))
    assert (pulled.name, pulled.version, set(stages)) == ("cat-kernel", "6.1.8-cat",
                                                         {"kernel.pull"})
    assert pulled.origin is not None and pulled.origin.startswith(f"{kbundle}#sha256:")
    assert sdk.kernels.remove("cat-kernel") == {"deleted": "cat-kernel"}
    sent = sdk.kernels.pull(str(kbundle), sent_from="laptop:/k.tar.zst")
    assert sent.origin is not None and sent.origin.startswith("laptop:/k.tar.zst#sha256:")
    assert sdk.kernels.remove("cat-kernel") == {"deleted": "cat-kernel"}
    assert [k.name for k in sdk.kernels.list()] == ["k1"]

    ibundle = tmp_path / "dev.tar.zst"
    ibundle.write_bytes(b"an image bundle")
    set_catalog(daemon, write_catalog(tmp_path / "catalog.json", [
        entry("dev", ibundle), entry("kk", kbundle, kind="kernel")]))
    [dev] = sdk.images.available()
    assert isinstance(dev, CatalogEntry) and (dev.name, dev.kind) == ("dev", "image")
    assert dev.size_bytes == ibundle.stat().st_size
    assert [e.name for e in sdk.kernels.available()] == ["kk"]


def test_sessions_through_the_sdk(sdk: Client, world: FakeWorld, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts, "ROOT", str(tmp_path / "guest-sessions"))
    vm = sdk.vms.create("box")
    world.guests[vm.ip] = ListeningGuest(vm.ip, on_poweroff=world.vmm.poweroff)
    try:
        talk = sdk.sessions.start("box", ["sh", "-c", "echo hi; cat"], name="talk",
                                  env={"GREETING": "x"})
        assert isinstance(talk, SessionView) and (talk.ref, talk.state) == ("box/talk",
                                                                            "running")
        assert talk.env_keys == ["GREETING"] and talk.pid
        assert [s.ref for s in sdk.sessions.list("box")] == ["box/talk"]
        assert sdk.sessions.show("box", "talk").argv == ["sh", "-c", "echo hi; cat"]
        att = sdk.sessions.attach("box", "talk")
        assert att.writer and not att.tty
        assert sdk.sessions.write(att.attachment, b"typed\n") == {"written": 6}
        assert "resized" in sdk.sessions.resize(att.attachment, 30, 100)
        out, cursor = read_until(sdk, b"typed\n", attachment=att.attachment)
        assert out == b"hi\ntyped\n"
        assert sdk.sessions.detach(att.attachment) == {"detached": True}
        assert sdk.sessions.send("box", "talk", "sent")["sent"] == 5
        out, _ = read_until(sdk, b"sent\n", cursor=cursor)
        assert out == b"sent\n"
        stopped = sdk.sessions.stop("box", "talk", timeout_s=5)
        assert stopped.state == "ended" and stopped.signal == 15
        assert sdk.sessions.remove("box", "talk")["removed"] == "talk"
        sdk.sessions.start("box", ["sleep", "300"], name="nap")
        assert sdk.sessions.kill("box", "nap", "HUP").signal == 1
    finally:
        for pid_file in (tmp_path / "guest-sessions").glob("*/pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), 9)


def read_until(sdk: Client, wanted: bytes, *, cursor: str = "0:0",
               attachment: str | None = None) -> tuple[bytes, str]:
    """Session box/talk's output from ``cursor`` until it ends with ``wanted``."""
    out = b""
    for _ in range(40):
        chunk = sdk.sessions.logs("box", "talk", cursor, 0.5, attachment=attachment)
        out += chunk.stdout
        cursor = chunk.next
        if out.endswith(wanted):
            return out, cursor
    raise AssertionError(out)


def test_the_daemon_namespace(sdk: Client) -> None:
    assert sdk.daemon.alive()
    status = sdk.daemon.status()
    assert status["pid"] == os.getpid() and "vm_pool" in status
    sdk.vms.create("seen", start=False)
    ops = sdk.daemon.operations()
    assert [(o.kind, o.target) for o in ops] == [("vm.create", "seen")]


def test_typed_views_dump_to_what_the_daemon_sent(sdk: Client, daemon: Daemon,
                                                  world: FakeWorld, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints the SDK's typed views (``banger.cli.app.wire``: the fields that
    were sent, dumped as JSON): the same JSON the daemon sent, so `--json` output did
    not change when the CLI moved onto the SDK."""
    def wire(x: Any) -> Any:
        return x.model_dump(mode="json", exclude_unset=True)

    vm = sdk.vms.create(name="seen")
    daemon.layout.vm(vm.id).work_disk.write_bytes(b"work")  # for the snapshot
    assert [wire(v) for v in sdk.vms.list()] == sdk.call("vm.list")
    assert wire(sdk.vms.show("seen")) == sdk.call("vm.show", name="seen")
    assert [wire(i) for i in sdk.images.list()] == sdk.call("image.list")
    name = sdk.call("image.list")[0]["name"]
    assert wire(sdk.images.show(name)) == sdk.call("image.show", name=name)
    sdk.kernels.import_files("k1", [bzimage(tmp_path / "bz")])
    assert [wire(k) for k in sdk.kernels.list()] == sdk.call("kernel.list")
    assert wire(sdk.snapshots.take("seen", "s1")) == sdk.call("snapshot.list")[0]
    monkeypatch.setattr(scripts, "ROOT", str(tmp_path / "guest-sessions"))
    world.guests[vm.ip] = ListeningGuest(vm.ip, on_poweroff=world.vmm.poweroff)
    assert [wire(p) for p in sdk.vms.ports("seen")] == sdk.call("vm.ports", names=["seen"])
    sdk.sessions.start("seen", ["sh", "-c", "echo hi; sleep 300"], name="s")
    try:
        listed = sdk.call("vm.session.list")
        assert "stdout_bytes" in listed[0] and "stale" in listed[0]
        assert [wire(s) for s in sdk.sessions.list()] == listed
        shown = sdk.call("vm.session.show", vm="seen", name="s")
        assert "stale" not in shown and wire(sdk.sessions.show("seen", "s")) == shown
        assert wire(sdk.sessions.logs("seen", "s", "0:0")) == \
            sdk.call("vm.session.logs", vm="seen", name="s", cursor="0:0")
    finally:
        sdk.sessions.kill("seen", "s")


def test_the_cli_follows_operations_through_the_sdk(
        daemon: Daemon, sdk: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = Client.operation

    def spy(self: Client, kind: str, op: dict[str, object], **kw: object) -> object:
        seen.append(kind)
        return real(self, kind, op, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Client, "operation", spy)
    views: list[str] = []
    res = follow(App(None, debug=False, json=True), sdk.vms.create, "followed", start=False,
                 watch=lambda v: views.append(v.target))
    assert seen == ["vm.create"] and res.name == "followed" and set(views) == {"followed"}


def test_ctrl_c_while_following_cancels_the_operation(daemon: Daemon, sdk: Client) -> None:
    """The first Ctrl-C (here: KeyboardInterrupt in the main thread, as SIGINT raises it)
    sets the SDK call's cancel; the operation is cancelled and the call's Cancelled is
    what the command sees."""
    in_ssh = threading.Event()
    daemon.seams.wait_for_ssh = ssh_until_cancelled(in_ssh)
    interrupted: list[str] = []

    def ctrl_c(view: OpView) -> None:
        if in_ssh.is_set() and not interrupted:
            interrupted.append(view.stage)
            _thread.interrupt_main()

    with pytest.raises(Cancelled):
        follow(App(None, debug=False, json=True), sdk.vms.create, "slow", watch=ctrl_c)
    assert interrupted
    assert daemon.db.find_vm("slow") is None


def test_a_second_ctrl_c_stops_waiting_only_once_the_cancel_was_asked(
        daemon: Daemon, sdk: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Ctrl-Cs in a row: the command stops waiting (or sees the cancel land), and
    either way the daemon had been asked to cancel before it returned: a CLI that exits
    then leaves no operation running unasked."""
    in_ssh = threading.Event()
    daemon.seams.wait_for_ssh = ssh_until_cancelled(in_ssh)
    made: list[Cancel] = []

    class Recorded(Cancel):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(app_module, "Cancel", Recorded)
    interrupted: list[str] = []

    def twice() -> None:
        _thread.interrupt_main()
        time.sleep(0.02)
        _thread.interrupt_main()

    def ctrl_c(view: OpView) -> None:
        if in_ssh.is_set() and not interrupted:
            interrupted.append(view.stage)
            threading.Thread(target=twice).start()

    with pytest.raises((KeyboardInterrupt, Cancelled)):
        follow(App(None, debug=False, json=True), sdk.vms.create, "twice", watch=ctrl_c)
    assert interrupted and made[0].asked.is_set()
    deadline = time.monotonic() + 30
    while daemon.db.find_vm("twice") is not None:  # cancelled: the half-made VM goes
        assert time.monotonic() < deadline, "the operation was left running"
        time.sleep(0.05)


# ------------------------------------------------------------ against a scripted socket

NOW = datetime.now(UTC).isoformat()
WRONG = {"unexpected": 1}  # no view has this shape
RECEIPT = {"ok": 1}


def finished_op(kind: str, result: Any) -> dict[str, Any]:
    """An operation's view, done, with ``result``."""
    return {"id": "op-1", "kind": kind, "target": "t", "stage": "done", "stages": ["done"],
            "progress": "", "done": True, "error": None, "result": result,
            "started_at": NOW, "updated_at": NOW}


ELSEWHERE = "/nonexistent-banger-sdk-test"
UID, GID = os.geteuid(), os.getegid()

# (what the SDK is asked, the RPC method and params it must send, whether the answer is
# a view: a reply of another shape must then raise BadVersion). For an operation the
# method is its begin; the scripted daemon answers it with the operation already done.
Case = tuple[Callable[[Client], Any], str, dict[str, Any], bool]
CASES: dict[str, Case] = {
    "vms.create": (lambda c: c.vms.create("a"), "vm.create.begin",
                   {"name": "a", "vmm": "auto", "start": True, "allow_private": False,
                    "allow_out": [], "forwards": [], "cold": False}, True),
    "vms.list": (lambda c: c.vms.list(), "vm.list", {}, True),
    "vms.show": (lambda c: c.vms.show("a"), "vm.show", {"name": "a"}, True),
    "vms.start": (lambda c: c.vms.start("a"), "vm.start.begin", {"name": "a"}, True),
    "vms.stop": (lambda c: c.vms.stop("a"), "vm.stop.begin", {"name": "a"}, True),
    "vms.restart": (lambda c: c.vms.restart("a"), "vm.restart.begin", {"name": "a"}, True),
    "vms.suspend": (lambda c: c.vms.suspend("a"), "vm.suspend.begin", {"name": "a"}, True),
    "vms.pause": (lambda c: c.vms.pause("a"), "vm.pause", {"name": "a"}, True),
    "vms.resume": (lambda c: c.vms.resume("a"), "vm.resume", {"name": "a"}, True),
    "vms.kill": (lambda c: c.vms.kill("a", "TERM"), "vm.kill",
                 {"name": "a", "signal": "TERM"}, True),
    "vms.delete": (lambda c: c.vms.delete("a"), "vm.delete", {"name": "a"}, False),
    "vms.set_egress": (lambda c: c.vms.set_egress("a", nat=True, allow_out=[]),
                       "vm.set_egress", {"name": "a", "nat": True, "allow_out": []}, True),
    "vms.logs": (lambda c: c.vms.logs("a"), "vm.logs", {"name": "a"}, True),
    "vms.ssh_info": (lambda c: c.vms.ssh_info("a"), "vm.ssh_info", {"name": "a"}, True),
    "vms.ports": (lambda c: c.vms.ports("a", "b"), "vm.ports", {"names": ["a", "b"]}, True),
    "forwards.list": (lambda c: c.forwards.list(), "vm.forward.list", {}, True),
    "forwards.add": (lambda c: c.forwards.add("a", "8080:80"), "vm.forward.add",
                     {"name": "a", "forward": "8080:80"}, True),
    "forwards.remove": (lambda c: c.forwards.remove("a", "8080:80"), "vm.forward.remove",
                        {"name": "a", "forward": "8080:80"}, False),
    "workspace.prepare": (lambda c: c.workspace.prepare("a", f"{ELSEWHERE}/repo",
                                                        branch="b"),
                          "vm.workspace.prepare.begin",
                          {"name": "a", "path": f"{ELSEWHERE}/repo", "branch": "b",
                           "mode": "shallow", "discard_guest_changes": False}, False),
    "workspace.status": (lambda c: c.workspace.status("a"), "vm.workspace.status",
                         {"name": "a"}, False),
    "images.list": (lambda c: c.images.list(), "image.list", {}, True),
    "images.show": (lambda c: c.images.show("dev"), "image.show", {"name": "dev"}, True),
    "images.build": (lambda c: c.images.build(), "image.build.begin", {}, True),
    "images.pull": (lambda c: c.images.pull("debian:12", size_bytes=1 << 30),
                    "image.pull.begin", {"reference": "debian:12", "size_bytes": 1 << 30,
                                         "insecure": False}, True),
    "images.export": (lambda c: c.images.export("dev", f"{ELSEWHERE}/dev.tar.zst"),
                      "image.export.begin", {"name": "dev", "output": f"{ELSEWHERE}/dev.tar.zst",
                                             "owner_uid": UID, "owner_gid": GID}, True),
    "images.promote": (lambda c: c.images.promote("a", "gold"), "image.promote",
                       {"vm": "a", "name": "gold"}, True),
    "images.register": (lambda c: c.images.register("dev", f"{ELSEWHERE}/r.ext4",
                                                    kernel_name="k1"),
                        "image.register", {"name": "dev", "rootfs": f"{ELSEWHERE}/r.ext4",
                                           "kernel_name": "k1"}, True),
    "images.set_kernel": (lambda c: c.images.set_kernel("dev", "k1"), "image.set_kernel",
                          {"name": "dev", "kernel": "k1"}, True),
    "images.delete": (lambda c: c.images.delete("dev"), "image.delete", {"name": "dev"},
                      False),
    "images.available": (lambda c: c.images.available(), "catalog.list",
                         {"kind": "image", "insecure": False}, True),
    "images.prune_cache": (lambda c: c.images.prune_cache(dry_run=True), "image.cache.prune",
                           {"dry_run": True}, True),
    "kernels.list": (lambda c: c.kernels.list(), "kernel.list", {}, True),
    "kernels.show": (lambda c: c.kernels.show("k1"), "kernel.show", {"name": "k1"}, True),
    "kernels.import_files": (lambda c: c.kernels.import_files("k1", [f"{ELSEWHERE}/bz"],
                                                              initrd=f"{ELSEWHERE}/rd"),
                             "kernel.import", {"name": "k1", "paths": [f"{ELSEWHERE}/bz"],
                                               "initrd": f"{ELSEWHERE}/rd"}, True),
    "kernels.pull": (lambda c: c.kernels.pull("cat-kernel", insecure=True),
                     "kernel.pull.begin", {"reference": "cat-kernel", "insecure": True}, True),
    "kernels.build": (lambda c: c.kernels.build(source=f"{ELSEWHERE}/src.tar.xz", jobs=4),
                      "kernel.build.begin", {"name": "banger-6.1",
                                             "source": f"{ELSEWHERE}/src.tar.xz", "jobs": 4},
                      True),
    "kernels.remove": (lambda c: c.kernels.remove("k1"), "kernel.rm", {"name": "k1"}, False),
    "kernels.available": (lambda c: c.kernels.available(), "catalog.list",
                          {"kind": "kernel", "insecure": False}, True),
    "snapshots.take": (lambda c: c.snapshots.take("a", "s1"), "vm.snapshot.begin",
                       {"vm": "a", "name": "s1"}, True),
    "snapshots.list": (lambda c: c.snapshots.list(), "snapshot.list", {}, True),
    "snapshots.remove": (lambda c: c.snapshots.remove("s1"), "snapshot.rm", {"name": "s1"},
                         True),
    "sessions.start": (lambda c: c.sessions.start("a", ["top"], cwd="/tmp", tty=True),
                       "vm.session.start", {"vm": "a", "argv": ["top"], "cwd": "/tmp",
                                            "env": {}, "tty": True, "rows": 24, "cols": 80},
                       True),
    "sessions.list": (lambda c: c.sessions.list(fresh=False), "vm.session.list",
                      {"fresh": False}, True),
    "sessions.show": (lambda c: c.sessions.show("a", "s"), "vm.session.show",
                      {"vm": "a", "name": "s"}, True),
    "sessions.logs": (lambda c: c.sessions.logs("a", "s", "3:4", attachment="att"),
                      "vm.session.logs", {"vm": "a", "name": "s", "cursor": "3:4",
                                          "wait_s": 0.0, "attachment": "att"}, True),
    "sessions.send": (lambda c: c.sessions.send("a", "s", "hi", newline=False),
                      "vm.session.send", {"vm": "a", "name": "s", "text": "hi",
                                          "newline": False}, False),
    "sessions.stop": (lambda c: c.sessions.stop("a", "s", 2.5), "vm.session.stop",
                      {"vm": "a", "name": "s", "timeout_s": 2.5}, True),
    "sessions.kill": (lambda c: c.sessions.kill("a", "s", "INT"), "vm.session.kill",
                      {"vm": "a", "name": "s", "signal": "INT"}, True),
    "sessions.remove": (lambda c: c.sessions.remove("a", "s"), "vm.session.rm",
                        {"vm": "a", "name": "s"}, False),
    "sessions.attach": (lambda c: c.sessions.attach("a", "s", write=False),
                        "vm.session.attach", {"vm": "a", "name": "s", "write": False}, True),
    "sessions.write": (lambda c: c.sessions.write("att", b"\x00hi"), "vm.session.write",
                       {"attachment": "att", "data": "AGhp"}, False),
    "sessions.resize": (lambda c: c.sessions.resize("att", 30, 100), "vm.session.resize",
                        {"attachment": "att", "rows": 30, "cols": 100}, False),
    "sessions.detach": (lambda c: c.sessions.detach("att"), "vm.session.detach",
                        {"attachment": "att"}, False),
    "daemon.status": (lambda c: c.daemon.status(), "daemon.status", {}, False),
    "daemon.operations": (lambda c: c.daemon.operations(), "daemon.operations.list", {},
                          True),
}


def scripted(tmp_path: Path, answer: Callable[[str, dict[str, Any]], Any]
             ) -> tuple[Client, RPCSocket]:
    path = tmp_path / "scripted.sock"
    return Client(socket=path), RPCSocket(path, answer)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_method_sends_its_rpc_and_checks_the_answer(tmp_path: Path, case: str) -> None:
    ask, method, params, typed = CASES[case]

    def answer(m: str, _params: dict[str, Any]) -> Any:
        if m.endswith(".begin"):
            return finished_op(m.removesuffix(".begin"), WRONG if typed else RECEIPT)
        return WRONG if typed else RECEIPT

    client, server = scripted(tmp_path, answer)
    if typed:
        with pytest.raises(BadVersion, match=method.removesuffix(".begin")) as exc:
            ask(client)
        assert "daemon restart" in (exc.value.hint or "")
    else:
        assert ask(client) == RECEIPT
    assert server.asked == [(method, params)]


def test_every_sdk_method_has_a_case() -> None:
    """The table above covers each public SDK method (a new one needs its row)."""
    client = Client(socket="/nonexistent")
    spaces = ("vms", "forwards", "workspace", "images", "kernels", "snapshots", "sessions",
              "daemon")
    public = {f"{space}.{name}" for space in spaces for name in dir(getattr(client, space))
              if not name.startswith("_")}
    # Not one RPC each: exec and run drive ssh, export reads the patch file, alive pings,
    # stop waits for the process (tested below and in tests/e2e/test_sdk.py).
    elsewhere = {"vms.exec", "vms.run", "workspace.export", "daemon.alive", "daemon.stop"}
    assert public - elsewhere == set(CASES)


def test_a_workspace_export_reads_and_removes_the_patch_file(tmp_path: Path) -> None:
    patch_file = tmp_path / "web.patch"
    patch_file.write_bytes(b"diff --git a/x b/x\n")
    changes = [{"status": "M", "path": "x", "old_path": None}]
    client, server = scripted(tmp_path, lambda _m, _p: {
        "vm": "web", "patch_path": str(patch_file), "bytes": 19, "base": "c0ffee",
        "changes": changes})
    assert client.workspace.export("web", base_commit="abc") == Patch(
        changes=changes, data=b"diff --git a/x b/x\n", vm="web", base="c0ffee")
    assert server.asked == [("vm.workspace.export", {"name": "web", "base_commit": "abc"})]
    assert not patch_file.exists()


def test_stopping_the_daemon_asks_its_status_then_stops_it(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now: nothing to wait for
    status = {"pid": gone.pid, "idle": True}
    client, server = scripted(tmp_path, lambda m, _p: status if m == "daemon.status"
                              else {"stopping": True})
    assert client.daemon.stop() == status
    assert [m for m, _ in server.asked] == ["daemon.status", "daemon.stop"]
    assert client.daemon.alive()  # the scripted socket answers the ping too


def test_session_calls_carry_their_time_budgets(tmp_path: Path) -> None:
    """A stop waits its TERM-to-KILL time plus the daemon's guest steps; the attachment
    calls take the caller's bound."""
    budgets: list[tuple[str, float | None]] = []

    class Recording:
        def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
            budgets.append((method, timeout))
            return {"written": 1}

    client = Client(connection=Recording())  # type: ignore[arg-type]
    client.sessions.write("att", b"x", timeout=30)
    client.sessions.detach("att")
    with pytest.raises(BadVersion):
        client.sessions.stop("vm", "s", timeout_s=5)
    assert budgets == [("vm.session.write", 30), ("vm.session.detach", None),
                       ("vm.session.stop", 125.0)]
