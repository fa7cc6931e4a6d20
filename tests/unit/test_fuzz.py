"""Property-based tests of everything that parses untrusted input."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banger import api
from banger.config import parse_config, parse_size
from banger.daemon.core import Daemon
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
    # A daemon that was never opened (no directories, store or host changes): only
    # its dispatch table and error translation are used.
    d = Daemon(parse_config({"state_dir": "/var/empty/banger-fuzz/state"}))
    d.methods = methods
    srv = RPCServer.__new__(RPCServer)  # no socket: only the frame handler is under test
    srv.d = d
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
    # a bug names the log holding its traceback, and sends no one to `banger doctor`
    assert "/var/empty/banger-fuzz/state/bangerd.log" in resp["error"]["message"]
    assert "doctor" not in resp["error"]["data"]["hint"]


# ------------------------------------------------------------ hostile frames
# Each must be answered with a bad_request error reply by handle_frame (which the
# connection thread relies on never raising); tests/integration/test_daemon_process.py
# sends the same frames to a real daemon on one connection.

def _request(params: Any, *, rid: Any = 1, protocol: Any = api.PROTOCOL_VERSION) -> str:
    return f'{{"jsonrpc":"2.0","id":{rid},"method":"echo","params":{params},"protocol":{protocol}}}'


def assert_bad_request(resp: dict[str, Any]) -> None:
    assert resp["jsonrpc"] == "2.0" and "result" not in resp
    assert resp["error"]["data"]["code"] == "bad_request", resp
    assert resp["error"]["code"] == api.PARSE_ERROR, resp
    assert len(api.encode(resp)) < 2048  # the reply does not echo the hostile input


huge_digits = st.integers(min_value=4301, max_value=60_000).map(lambda n: "7" * n)


@settings(max_examples=40)
@given(huge_digits, st.sampled_from(["id", "param", "protocol", "bare", "negative", "nested"]))
def test_huge_integers_are_a_bad_request(digits: str, where: str) -> None:
    frame = {
        "id": _request("{}", rid=digits),
        "param": _request('{"n":' + digits + "}"),
        "protocol": _request("{}", protocol=digits),
        "bare": digits,
        "negative": _request('{"n":-' + digits + "}"),
        "nested": _request('{"a":[1,{"b":[' + digits + "]}]}"),
    }[where]
    resp = server_with({"echo": echo}).handle_frame(frame.encode())
    assert_bad_request(resp)
    assert "digits" in resp["error"]["message"]


@settings(max_examples=40)
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", '{"a":']),
       st.booleans())
def test_nesting_is_answered_at_any_depth(depth: int, opener: str, closed: bool) -> None:
    closer = "]" if opener == "[" else "}"
    value = opener * depth + ("1" + closer * depth if closed else "")
    resp = server_with({"echo": echo}).handle_frame(_request('{"v":' + value + "}").encode())
    if "result" in resp:  # shallow enough for the parser: echoed back, and encodable
        assert closed
        api.encode(resp)
    else:
        assert_bad_request(resp)


invalid_utf8 = st.sampled_from([
    b"\xff", b"\xfe", b"\x80", b"\xc0\x80",  # never valid; an overlong NUL
    b"\xe2\x82", b"\xf0\x9f\x98",  # truncated multi-byte sequences
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
])


@settings(max_examples=200)
@given(st.text(max_size=20), invalid_utf8, st.text(max_size=20),
       st.sampled_from(["method", "param", "key"]))
def test_invalid_utf8_is_a_bad_request(before: str, bad: bytes, after: str, where: str) -> None:
    text = json.dumps(before)[1:-1].encode() + bad + json.dumps(after)[1:-1].encode()
    frame = {
        "method": b'{"jsonrpc":"2.0","id":1,"method":"' + text + b'","protocol":1}',
        "param": _request('{"s":"@"}').encode().replace(b"@", text),
        "key": _request('{"@":1}').encode().replace(b"@", text),
    }[where]
    resp = server_with({"echo": echo}).handle_frame(frame)
    assert_bad_request(resp)
    assert "UTF-8" in resp["error"]["message"]


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "x\\ud83d", "\\udc00\\ud800"])
def test_lone_surrogate_escapes_are_a_bad_request(escape: str) -> None:
    resp = server_with({"echo": echo}).handle_frame(_request('{"s":"' + escape + '"}').encode())
    assert_bad_request(resp)
    # a correctly paired surrogate escape is just a character
    ok = server_with({"echo": echo}).handle_frame(_request('{"s":"\\ud83d\\ude00"}').encode())
    assert ok["result"] == {"s": "\U0001F600"}


def test_a_failing_handle_frame_costs_one_reply_not_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv = server_with({"echo": echo})

    def broken(frame: bytes) -> dict[str, Any]:
        raise RuntimeError("bug in the frame handler")

    monkeypatch.setattr(srv, "handle_frame", broken)
    resp = srv._answer(b"{}")
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
    import subprocess

    from banger.errors import CommandFailed, CommandTimeout, HostError, InternalError, from_foreign

    full = from_foreign(OSError(errno.ENOSPC, "No space left on device", "/var/lib/x"), "vm.create")
    assert isinstance(full, HostError) and "free some disk space" in full.hint
    assert "/var/lib/x" in full.message
    db = from_foreign(sqlite3.OperationalError("database or disk is full"), "vm.list")
    assert isinstance(db, HostError) and "state_dir" in db.hint
    ran = from_foreign(subprocess.CalledProcessError(3, ["mkfs.ext4", "-q"]), "vm.create")
    assert isinstance(ran, CommandFailed) and "mkfs.ext4 exited with status 3" in ran.message
    slow = from_foreign(subprocess.TimeoutExpired(["qemu-img"], 30), "vm.create")
    assert isinstance(slow, CommandTimeout) and "30s" in slow.message
    bug = from_foreign(KeyError("x"), "vm.show", "/state/bangerd.log")
    assert isinstance(bug, InternalError) and not isinstance(bug, HostError)
    assert "KeyError" in bug.message and "/state/bangerd.log" in bug.message
    assert "doctor" not in bug.hint
    huge = from_foreign(ValueError("v" * 10_000), "vm.show", "/l")
    assert len(huge.message) < 500


def test_oversized_reply_becomes_an_error_reply() -> None:
    from banger.daemon.server import _encode_reply

    raw = _encode_reply({"jsonrpc": "2.0", "id": 3, "result": "x" * (api.MAX_FRAME + 1)}, "/l")
    reply = json.loads(raw)
    assert reply["id"] == 3 and "too large" in reply["error"]["message"]
    assert len(raw) < api.MAX_FRAME
    # a reply JSON cannot encode at all is a bug in its handler, not a dead connection
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    raw = _encode_reply({"jsonrpc": "2.0", "id": 4, "result": deep}, "/state/bangerd.log")
    reply = json.loads(raw)
    assert reply["error"]["data"]["code"] == "internal"
    assert "/state/bangerd.log" in reply["error"]["message"]


def test_handler_oserror_is_a_host_error() -> None:
    def disk_full(params: dict[str, Any]) -> Any:
        raise OSError(28, "No space left on device")

    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": {},
                      "protocol": api.PROTOCOL_VERSION}).encode()
    resp = server_with({"x": disk_full}).handle_frame(raw)
    assert resp["error"]["data"]["code"] == "host_error"
