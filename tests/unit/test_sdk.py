"""``from banger import Client`` against the daemon's real RPC server and dispatch table
(fake host seams: no VMM, no guest). The guest half (exec, workspace export) is the
end-to-end test ``tests/e2e/test_sdk.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import banger
from banger.api import OpView, VMView
from banger.daemon.core import Daemon
from banger.daemon.server import RPCServer
from banger.errors import BadRequest, Cancelled, NotFound
from banger.sdk import Client
from tests.fakes import ssh_until_cancelled


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
    sdk.vms.delete("alpha")
    assert sdk.vms.list() == []


def test_errors_are_the_cli_s_exception_tree_with_codes(sdk: Client) -> None:
    with pytest.raises(NotFound) as missing:
        sdk.vms.show("nope")
    assert missing.value.code == "not_found"
    with pytest.raises(BadRequest, match="vcpu"):
        sdk.vms.create("bad", vcpu=0)  # refused before anything is sent
    assert sdk.vms.list() == []


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


def test_typed_views_dump_to_what_the_daemon_sent(sdk: Client) -> None:
    """The CLI prints the SDK's typed views (model_dump): the same JSON the daemon sent,
    so `--json` output did not change shape when the CLI moved onto the SDK."""
    sdk.vms.create(name="seen", start=False)
    assert [v.model_dump(mode="json") for v in sdk.vms.list()] == sdk.call("vm.list")
    assert sdk.vms.show("seen").model_dump(mode="json") == sdk.call("vm.show", name="seen")
    assert [i.model_dump(mode="json") for i in sdk.images.list()] == sdk.call("image.list")
    name = sdk.call("image.list")[0]["name"]
    assert sdk.images.show(name).model_dump(mode="json") == sdk.call("image.show", name=name)
    assert [s.model_dump(mode="json") for s in sdk.snapshots.list()] == \
        sdk.call("snapshot.list")


def test_the_cli_follows_operations_through_the_sdk(
        daemon: Daemon, sdk: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.cli.app import App, follow

    seen: list[str] = []
    real = Client.operation

    def spy(self: Client, kind: str, op: dict[str, object], **kw: object) -> object:
        seen.append(kind)
        return real(self, kind, op, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Client, "operation", spy)
    op = sdk.call("vm.create.begin", name="followed", start=False)
    res = follow(App(None, debug=False, json=True), sdk, op, "vm.create")
    assert seen == ["vm.create"] and res["name"] == "followed"
