"""The spec validator itself: it accepts what Firecracker accepts and provably rejects the rest.

Without these, a validator that returned no errors for anything would make
every contract test pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.fcspec import FirecrackerSpec

GOOD_DRIVE = {"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": True,
              "is_read_only": False, "cache_type": "Unsafe"}


def test_valid_bodies_pass(spec: FirecrackerSpec) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
        ("PUT", "/drives/rootfs", GOOD_DRIVE),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_backend": {
            "backend_type": "File", "backend_path": "/m"}}),
        ("GET", "/", None),
    ]
    for method, path, body in cases:
        route, errors = spec.validate_request(method, path, body, "application/json")
        assert route is not None and errors == [], (method, path, errors)


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    # out of range (vcpu_count minimum 1)
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 256}, "less than the minimum"),
    # misspelt key: Firecracker denies unknown fields
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256, "vcpus": 1},
     "Additional properties are not allowed ('vcpus'"),
    # missing required field
    ("PUT", "/boot-source", {"boot_args": "console=ttyS0"}, "'kernel_image_path' is a required"),
    # wrong type
    ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "is_root_device": "yes"}, "is not of type 'boolean'"),
    # enum
    ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "cache_type": "WriteThrough"}, "is not one of"),
    # nested $ref (RateLimiter -> TokenBucket) is resolved and enforced
    ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "rate_limiter": {"bandwidth": {"size": 1}}},
     "'refill_time' is a required property"),
    # the path id and the body id disagree
    ("PUT", "/drives/rootfs", {**GOOD_DRIVE, "drive_id": "work"}, "differs from the path"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v.sock"}, "less than the minimum of 3"),
    ("PATCH", "/vm", {"state": "Running"}, "is not one of ['Paused', 'Resumed']"),
    # both memory sources
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                               "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
     "exactly one of mem_file_path and mem_backend"),
    # no body where one is required
    ("PUT", "/actions", None, "a JSON body is required"),
    # a body where none is taken
    ("GET", "/", {"x": 1}, "takes no body"),
    # not an operation at all
    ("PUT", "/instance-start", {}, "no such operation"),
    ("DELETE", "/drives/rootfs", None, "no such operation"),
])
def test_invalid_requests_are_flagged(spec: FirecrackerSpec, method: str, path: str,
                                      body: Any, expected: str) -> None:
    _, errors = spec.validate_request(method, path, body, "application/json")
    assert any(expected in e for e in errors), errors


def test_wrong_content_type_is_flagged(spec: FirecrackerSpec) -> None:
    _, errors = spec.validate_request("PATCH", "/vm", {"state": "Paused"}, "text/plain")
    assert errors == ["PATCH /vm: Content-Type is 'text/plain', not application/json"]


def test_responses_are_checked(spec: FirecrackerSpec) -> None:
    route = spec.route("GET", "/")
    assert route is not None
    good = {"app_name": "Firecracker", "id": "x", "state": "Running", "vmm_version": "1.7.0"}
    assert spec.validate_response(route, 200, good) == []
    assert any("'Booting' is not one of" in e
               for e in spec.validate_response(route, 200, {**good, "state": "Booting"}))
    put = spec.route("PUT", "/actions")
    assert put is not None
    assert spec.validate_response(put, 204, None) == []
    assert spec.validate_response(put, 400, {"fault_message": "no"}) == []
    assert spec.validate_response(put, 204, {"x": 1}) != []
