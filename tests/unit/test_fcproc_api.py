"""Firecracker API client: request bodies, error mapping, instance states.

Answers come from ``httpx.MockTransport`` (httpx's own fake transport) or
from real Unix sockets; the bodies themselves are checked against the
published spec in tests/contract.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from banger.daemon.fcproc.api import FirecrackerAPI, InstanceInfo, InstanceState, SnapshotType
from banger.errors import InvalidState, VMMError


class Recorder:
    """A MockTransport handler: records requests, answers with ``reply``."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.reply = reply or (lambda req: httpx.Response(204))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        return self.reply(request)


def api_with(rec: Recorder) -> FirecrackerAPI:
    return FirecrackerAPI(Path("/nonexistent/fc.sock"), transport=httpx.MockTransport(rec))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bfa-", dir="/tmp"))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def test_fault_message_becomes_vmm_error_naming_the_request() -> None:
    fault = "Invalid block device path: No such file or directory (os error 2)"
    rec = Recorder(lambda req: httpx.Response(400, json={"fault_message": fault}))
    with api_with(rec) as api, pytest.raises(VMMError) as exc:
        api.put_drive("rootfs", "/missing", is_root_device=True)
    err = exc.value
    assert err.message == f"Firecracker refused PUT /drives/rootfs (HTTP 400): {fault}"
    assert err.details == {"method": "PUT", "path": "/drives/rootfs", "status": 400,
                           "fault_message": fault}
    assert err.code == "vmm_failed"


def test_error_without_fault_message_keeps_the_raw_body() -> None:
    rec = Recorder(lambda req: httpx.Response(500, text="internal panic"))
    with api_with(rec) as api, pytest.raises(VMMError) as exc:
        api.instance_start()
    assert exc.value.details["fault_message"] == "internal panic"
    assert "PUT /actions (HTTP 500): internal panic" in exc.value.message


def test_overlong_fault_is_truncated() -> None:
    rec = Recorder(lambda req: httpx.Response(400, json={"fault_message": "x" * 5000}))
    with api_with(rec) as api, pytest.raises(VMMError) as exc:
        api.pause()
    assert len(exc.value.details["fault_message"]) == 500


def test_non_json_success_body_is_an_error() -> None:
    rec = Recorder(lambda req: httpx.Response(200, text="<html>"))
    with api_with(rec) as api, pytest.raises(VMMError, match="non-JSON"):
        api.instance_info()


def test_instance_info_is_parsed_and_checked() -> None:
    good = {"app_name": "Firecracker", "id": "banger-1", "state": "Paused",
            "vmm_version": "1.7.0"}
    rec = Recorder(lambda req: httpx.Response(200, json=good))
    with api_with(rec) as api:
        info = api.instance_info()
    assert info == InstanceInfo("Firecracker", "banger-1", InstanceState.PAUSED, "1.7.0")
    with pytest.raises(VMMError, match="unexpected body"):
        InstanceInfo.from_json({**good, "state": "Booting"})
    with pytest.raises(VMMError, match="unexpected body"):
        InstanceInfo.from_json(["not", "an", "object"])


def test_request_bodies() -> None:
    rec = Recorder()
    with api_with(rec) as api:
        api.put_machine_config(4, 2048, track_dirty_pages=True)
        api.put_boot_source("/k", "console=ttyS0")
        api.put_boot_source("/k", "quiet", initrd_path="/i")
        api.put_drive("work", "/w", is_root_device=False, cache_type="Writeback")
        api.put_network_interface("eth0", "tap0", "06:00:00:00:00:01")
        api.put_network_interface("eth1", "tap1")
        api.put_vsock(3, "/v.sock")
        api.put_logger("/log", level="Debug")
        api.put_metrics("/m")
        api.send_ctrl_alt_del()
        api.flush_metrics()
        api.resume()
        api.create_snapshot("/s", "/m", snapshot_type=SnapshotType.DIFF)
        api.load_snapshot("/s", "/m", resume_vm=True, network_overrides={"eth0": "tap9"})
        api.load_snapshot("/s", "/m")
    assert rec.requests == [
        ("PUT", "/machine-config", {"vcpu_count": 4, "mem_size_mib": 2048, "smt": False,
                                    "track_dirty_pages": True}),
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "console=ttyS0"}),
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "quiet",
                                 "initrd_path": "/i"}),
        ("PUT", "/drives/work", {"drive_id": "work", "path_on_host": "/w",
                                 "is_root_device": False, "is_read_only": False,
                                 "cache_type": "Writeback"}),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                             "guest_mac": "06:00:00:00:00:01"}),
        ("PUT", "/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "tap1"}),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v.sock"}),
        ("PUT", "/logger", {"log_path": "/log", "level": "Debug", "show_level": True,
                            "show_log_origin": False}),
        ("PUT", "/metrics", {"metrics_path": "/m"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PUT", "/actions", {"action_type": "FlushMetrics"}),
        ("PATCH", "/vm", {"state": "Resumed"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": "/s",
                                     "mem_file_path": "/m"}),
        ("PUT", "/snapshot/load", {
            "snapshot_path": "/s",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            "track_dirty_pages": False, "resume_vm": True,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}),
        ("PUT", "/snapshot/load", {
            "snapshot_path": "/s",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"},
            "track_dirty_pages": False, "resume_vm": False}),
    ]


def test_missing_socket_is_a_vmm_error(sock_dir: Path) -> None:
    path = sock_dir / "fc.sock"
    with FirecrackerAPI(path) as api, pytest.raises(VMMError) as exc:
        api.put_metrics("/m")
    assert f"PUT /metrics: cannot reach {path}" in exc.value.message
    assert exc.value.details == {"method": "PUT", "path": "/metrics"}


def test_stale_socket_of_an_exited_vmm_is_a_vmm_error(sock_dir: Path) -> None:
    path = sock_dir / "fc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))  # bound, then closed without listening: connect is refused
    with FirecrackerAPI(path) as api, pytest.raises(VMMError, match="Connection refused"):
        api.instance_info()


def test_silent_vmm_times_out_within_the_budget(sock_dir: Path) -> None:
    path = sock_dir / "fc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)  # connections queue in the backlog; nobody ever answers
        with FirecrackerAPI(path, timeout=0.3) as api, pytest.raises(VMMError) as exc:
            api.send_ctrl_alt_del()
    assert exc.value.message == f"Firecracker API PUT /actions timed out after 0.3s on {path}"


def test_a_full_listen_backlog_is_waited_out_not_an_error(sock_dir: Path) -> None:
    """A Unix connect() with a timeout fails with EAGAIN while the backlog is full."""
    path = sock_dir / "fc.sock"
    fillers: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(0)
        while True:  # fill the backlog until the kernel refuses with EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            fillers.append(c)
        assert fillers

        def serve() -> None:
            time.sleep(0.3)
            srv.listen(8)  # room again, as a VMM that caught up would have
            for _ in fillers:
                srv.accept()[0].close()
            while True:  # the pre-flight probe, then the real request
                conn, _ = srv.accept()
                with conn:
                    data = conn.recv(65536)
                    if data:
                        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                        return

        srv.settimeout(10)  # a failing client must not leave this thread blocked forever
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with FirecrackerAPI(path, timeout=5) as api:
                api.send_ctrl_alt_del()
        finally:
            server.join(timeout=5)
            for c in fillers:
                c.close()


@pytest.mark.parametrize(("state", "target", "ok"), [
    (InstanceState.NOT_STARTED, InstanceState.RUNNING, True),
    (InstanceState.NOT_STARTED, InstanceState.PAUSED, True),
    (InstanceState.RUNNING, InstanceState.PAUSED, True),
    (InstanceState.PAUSED, InstanceState.RUNNING, True),
    (InstanceState.RUNNING, InstanceState.RUNNING, False),
    (InstanceState.PAUSED, InstanceState.PAUSED, False),
    (InstanceState.RUNNING, InstanceState.NOT_STARTED, False),
    (InstanceState.PAUSED, InstanceState.NOT_STARTED, False),
])
def test_instance_state_transitions(state: InstanceState, target: InstanceState,
                                    ok: bool) -> None:
    assert state.can_become(target) is ok


def test_illegal_transition_has_its_own_message() -> None:
    with pytest.raises(InvalidState) as exc:
        InstanceState.PAUSED.check_can_become(InstanceState.PAUSED, "pause")
    assert exc.value.message == "cannot pause a Firecracker instance that is 'Paused'"
    assert exc.value.hint == "the VM is already paused; resume it first"
    InstanceState.RUNNING.check_can_become(InstanceState.PAUSED, "pause")  # no error
