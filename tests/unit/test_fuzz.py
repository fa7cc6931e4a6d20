"""Property-based tests of everything that parses untrusted input."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from banger import api
from banger.config import parse_size
from banger.daemon.imagemgr import safe_join
from banger.daemon.server import RPCServer
from banger.errors import BadName, BadRequest, BangerError
from banger.names import MAX_LABEL, check_name, is_dns_label

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def server_with(methods: dict[str, Any]) -> RPCServer:
    srv = RPCServer.__new__(RPCServer)  # no socket: only the frame handler is under test
    srv.d = SimpleNamespace(methods=methods)  # type: ignore[assignment]
    return srv


def echo(params: dict[str, Any]) -> Any:
    if params.get("boom"):
        raise RuntimeError("handler bug")
    return params


@settings(max_examples=400)
@given(st.binary(max_size=512))
def test_handle_frame_never_raises_on_bytes(raw: bytes) -> None:
    resp = server_with({"echo": echo}).handle_frame(raw)
    assert resp["jsonrpc"] == "2.0"
    assert ("result" in resp) != ("error" in resp)
    if "error" in resp:
        assert isinstance(resp["error"]["data"]["code"], str)
        json.dumps(resp)  # always encodable


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "protocol", "x"]),
                       json_values, max_size=6))
def test_handle_frame_on_json_objects(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    resp = server_with({"echo": echo}).handle_frame(raw)
    valid = (obj.get("jsonrpc") == "2.0" and isinstance(obj.get("id"), int | str)
             and not isinstance(obj.get("id"), bool)
             and obj.get("method") == "echo" and obj.get("protocol") == api.PROTOCOL_VERSION
             and isinstance(obj.get("params", {}), dict))
    if valid and not obj.get("params", {}).get("boom"):
        assert resp.get("result") == obj.get("params", {})
    else:
        assert "error" in resp


def test_handler_crash_is_internal_error_not_a_dead_daemon() -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"boom": True},
                      "protocol": api.PROTOCOL_VERSION}).encode()
    resp = server_with({"echo": echo}).handle_frame(raw)
    assert resp["error"]["data"]["code"] == "internal"


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_check_name_accepts_exactly_dns_labels(name: str) -> None:
    ok = (0 < len(name) <= MAX_LABEL and all(c in string.ascii_lowercase + string.digits + "-"
                                             for c in name)
          and not name.startswith("-") and not name.endswith("-"))
    assert is_dns_label(name) == ok
    if ok:
        assert check_name(name) == name
    else:
        try:
            check_name(name)
        except BadName as exc:
            assert exc.hint
        else:
            raise AssertionError(f"accepted {name!r}")


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "c\0", "dir"]), max_size=6))
def test_safe_join_never_leaves_root(parts: list[str]) -> None:
    rel = "/".join(parts)
    root = Path("/srv/root")
    try:
        joined = safe_join(root, rel)
    except BadRequest:
        return
    assert joined == root or root in joined.parents
    assert ".." not in joined.parts


@given(st.text(max_size=12))
def test_parse_size_only_raises_banger_errors(text: str) -> None:
    with contextlib.suppress(BangerError):
        assert parse_size(text) > 0


def test_foreign_errors_become_host_errors_with_hints() -> None:
    import errno
    import sqlite3

    from banger.errors import HostError, InternalError, from_foreign

    full = from_foreign(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x"), "vm.create")
    assert isinstance(full, HostError) and "free some disk space" in full.hint
    assert "/var/lib/x" in full.message
    db = from_foreign(sqlite3.OperationalError("database or disk is full"), "vm.list")
    assert isinstance(db, HostError) and "state_dir" in db.hint
    assert isinstance(from_foreign(KeyError("x"), "vm.show"), InternalError)


def test_oversized_reply_becomes_an_error_reply() -> None:
    from banger.daemon.server import _encode_reply

    raw = _encode_reply({"jsonrpc": "2.0", "id": 3, "result": "x" * (api.MAX_FRAME + 1)})
    reply = json.loads(raw)
    assert reply["id"] == 3 and "too large" in reply["error"]["message"]
    assert len(raw) < api.MAX_FRAME


def test_handler_oserror_is_a_host_error() -> None:
    def disk_full(params: dict[str, Any]) -> Any:
        raise OSError(28, "No space left on device")

    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {},
                      "protocol": api.PROTOCOL_VERSION}).encode()
    resp = server_with({"x": disk_full}).handle_frame(raw)
    assert resp["error"]["data"]["code"] == "host_error"
