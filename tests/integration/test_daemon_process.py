"""A real bangerd process over its real socket: CLI auto-start, RPC errors, hostile clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger import api

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bangerd needs root")

BANGER = [sys.executable, "-m", "banger"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    cfg = tmp_path / "config.toml"
    # A short runtime dir: socket paths must fit in 108 bytes.
    run = Path(f"/run/banger-it-{os.getpid()}-{tmp_path.name[-8:]}")
    cfg.write_text(f'state_dir = "{tmp_path}/state"\ncache_dir = "{tmp_path}/cache"\n'
                   f'runtime_dir = "{run}"\nlog_level = "debug"\n')
    e = {**os.environ, "BANGER_CONFIG": str(cfg)}
    yield e
    subprocess.run([*BANGER, "daemon", "stop"], env=e, capture_output=True, timeout=30)
    subprocess.run(["rm", "-rf", str(run)], check=False)


def banger(env: dict[str, str], *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BANGER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def sock_path(env: dict[str, str]) -> str:
    st = json.loads(banger(env, "daemon", "status", "--json").stdout)
    return str(st["socket"])


def raw_call(path: str, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        line = s.makefile("rb").readline()
    return json.loads(line)  # type: ignore[no-any-return]


def req(method: str, params: object = None, version: int = api.PROTOCOL_VERSION) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params or {},
                       "protocol": version}).encode() + b"\n"


def test_autostart_status_and_stop(env: dict[str, str]) -> None:
    st = banger(env, "daemon", "status")
    assert st.returncode == 3 and "not running" in st.stdout
    listed = banger(env, "vm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    st = json.loads(banger(env, "daemon", "status", "--json").stdout)
    assert st["running"] and st["pid"] > 0 and st["socket"].endswith("bangerd.sock")
    assert oct(os.stat(st["socket"]).st_mode & 0o777) == "0o600"
    assert banger(env, "daemon", "stop").returncode == 0
    for _ in range(100):
        if not Path(f"/proc/{st['pid']}").exists():
            break
        time.sleep(0.05)
    assert not Path(f"/proc/{st['pid']}").exists()


def test_cli_errors_are_one_line_with_hint(env: dict[str, str]) -> None:
    res = banger(env, "vm", "show", "nope")
    assert res.returncode == 125
    assert res.stderr.splitlines()[0] == "error: no VM named 'nope'"
    assert res.stderr.splitlines()[1].startswith("hint:")
    assert "Traceback" not in res.stderr
    js = banger(env, "vm", "show", "nope", "--json")
    assert json.loads(js.stdout)["error"]["code"] == "not_found"
    bad = banger(env, "vm", "create", "--name", "Bad_Name")
    assert bad.returncode == 2 and "invalid VM name" in bad.stderr
    img = banger(env, "vm", "create", "--name", "ok", "--image", "missing-image")
    assert img.returncode == 125 and "no image named 'missing-image'" in img.stderr
    assert json.loads(banger(env, "vm", "list", "--json").stdout) == []


def test_rpc_error_codes(env: dict[str, str]) -> None:
    banger(env, "vm", "list")
    path = sock_path(env)
    r = raw_call(path, req("no.such.method"))
    assert r["error"]["data"]["code"] == "unknown_method"  # type: ignore[index]
    assert r["error"]["code"] == api.METHOD_NOT_FOUND  # type: ignore[index]
    r = raw_call(path, b"{not json\n")
    assert r["error"]["data"]["code"] == "bad_request" and r["error"]["code"] == api.PARSE_ERROR  # type: ignore[index]
    r = raw_call(path, req("vm.list", version=99))
    assert r["error"]["data"]["code"] == "bad_version"  # type: ignore[index]
    r = raw_call(path, req("vm.show", {"name": 5}))
    assert r["error"]["data"]["code"] == "bad_request"  # type: ignore[index]
    r = raw_call(path, req("vm.show", {"name": "x", "extra": 1}))
    assert "unknown parameter" in r["error"]["message"]  # type: ignore[index]
    r = raw_call(path, req("vm.show", {"name": "ghost"}))
    assert r["error"]["data"]["code"] == "not_found"  # type: ignore[index]
    r = raw_call(path, b"x" * (api.MAX_FRAME + 10) + b"\n")
    assert "frame exceeds" in r["error"]["message"]  # type: ignore[index]
    assert raw_call(path, req("daemon.ping"))["result"]["pong"] is True  # type: ignore[index]


def test_slow_and_half_closed_clients_do_not_block_others(env: dict[str, str]) -> None:
    banger(env, "vm", "list")
    path = sock_path(env)
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
    for s in silent:
        s.connect(path)
        s.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')  # a partial frame, then nothing
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(path)
    half.shutdown(socket.SHUT_WR)
    t0 = time.monotonic()
    assert raw_call(path, req("daemon.ping"))["result"]["pong"] is True  # type: ignore[index]
    assert time.monotonic() - t0 < 5
    for s in [*silent, half]:
        s.close()


def test_foreign_uid_is_dropped(env: dict[str, str]) -> None:
    banger(env, "vm", "list")
    path = sock_path(env)
    # Defeat the first line of defence (0700 dir, 0600 socket) to test the second: SO_PEERCRED.
    os.chmod(Path(path).parent, 0o711)
    os.chmod(path, 0o666)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        f"s.connect({path!r})\n"
        "s.settimeout(10)\n"
        "try:\n"
        "    s.sendall(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"vm.list\",'\n"
        "              b'\"protocol\":1}\\n')\n"
        "    print('dropped' if s.recv(100) == b'' else 'answered')\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    print('dropped')  # closed before or while we wrote\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "dropped", out.stderr  # closed without a reply
    assert raw_call(path, req("daemon.ping"))["result"]["pong"] is True  # type: ignore[index]


def test_doctor_runs_without_daemon(env: dict[str, str]) -> None:
    res = banger(env, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)}
    assert {"qemu", "kvm", "tun", "network", "tools", "disk"} <= set(checks)
    assert all(c["status"] in ("OK", "WARN", "FAIL") for c in checks.values())
    kvm_pvm_only = Path("/sys/module/kvm_pvm").exists() and not any(
        Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    if kvm_pvm_only:
        assert "PVM" in checks["kvm"]["detail"] and checks["kvm"]["status"] == "WARN"
    assert banger(env, "daemon", "status").returncode == 3  # doctor did not start it


def test_a_second_daemon_refuses_before_touching_anything(env: dict[str, str]) -> None:
    banger(env, "vm", "list")
    st = json.loads(banger(env, "daemon", "status", "--json").stdout)
    second = subprocess.run([sys.executable, "-m", "banger.cli.bangerd", "--log-stderr"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another bangerd (pid {st['pid']}) is already using" in second.stderr
    # the first one still serves and still owns its pid file
    after = json.loads(banger(env, "daemon", "status", "--json").stdout)
    assert after["pid"] == st["pid"]
    assert Path(st["socket"]).parent.joinpath("bangerd.pid").read_text().strip() == str(st["pid"])


def test_hostile_frames_are_answered_and_the_connection_lives_on(env: dict[str, str]) -> None:
    """Every decode failure is an error reply on the same connection, which then still
    serves requests (a ValueError from a 4,301-digit integer used to kill its thread)."""
    banger(env, "vm", "list")
    path = sock_path(env)
    hostile = [
        b'{"jsonrpc":"2.0","id":' + b"9" * 4301 + b',"method":"vm.list","protocol":1}',
        b'{"jsonrpc":"2.0","id":1,"method":"vm.show","params":{"name":-' + b"1" * 50_000
        + b'},"protocol":1}',
        b"[" * 200_000,  # nesting past the recursion limit
        b'{"jsonrpc":"2.0","id":1,"method":"vm.\xff\xfe","protocol":1}',  # invalid UTF-8
        b'{"jsonrpc":"2.0","id":1,"method":"vm.show","params":{"name":"\\ud800"},'
        b'"protocol":1}',  # a lone surrogate
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        reader = s.makefile("rb")
        for frame in hostile:
            s.sendall(frame + b"\n")
            line = reader.readline()
            assert line, f"connection closed after {frame[:60]!r}"
            reply = json.loads(line)
            assert reply["error"]["data"]["code"] == "bad_request", reply
            assert reply["error"]["code"] == api.PARSE_ERROR
        s.sendall(req("daemon.ping"))
        assert json.loads(reader.readline())["result"]["pong"] is True


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (the old daemon was the child of a CLI
    that exited; where PID 1 reaps slowly its entry lingers in /proc as a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_config_drift_warning_and_restart(env: dict[str, str]) -> None:
    """A running daemon keeps its config; the CLI says which keys differ, once, and
    `daemon restart` applies them."""
    assert banger(env, "vm", "list").returncode == 0
    before = json.loads(banger(env, "daemon", "status", "--json").stdout)
    assert before["config"]["path"] == env["BANGER_CONFIG"]
    assert before["config"]["values"]["tap_pool_size"] == 2
    cfg = Path(env["BANGER_CONFIG"])
    cfg.write_text(cfg.read_text() + "tap_pool_size = 3\n[vm_defaults]\nvcpu = 3\n")
    listed = banger(env, "vm", "list")
    assert listed.returncode == 0
    warnings = [ln for ln in listed.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, listed.stderr
    assert "tap_pool_size, vm_defaults.vcpu" in warnings[0]
    assert "banger daemon restart" in warnings[0]
    restarted = banger(env, "daemon", "restart")
    assert restarted.returncode == 0, restarted.stderr
    after = json.loads(banger(env, "daemon", "status", "--json").stdout)
    assert after["pid"] != before["pid"] and not _running(before["pid"])
    assert after["config"]["values"]["tap_pool_size"] == 3
    again = banger(env, "vm", "list")
    assert again.returncode == 0 and "warning" not in again.stderr
