"""Names, sizes, config, the error tree and the RPC frame decoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from banger import api
from banger.config import format_size, load_config, parse_config, parse_size
from banger.errors import AlreadyExists, BadName, BadRequest, BadVersion, NotRunning, from_code
from banger.layout import Layout, check_socket_path
from banger.names import check_name, generate_name, is_dns_label


@pytest.mark.parametrize("name", ["a", "web-1", "x" * 63, "0abc", "a-b-c"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "a.b", "x" * 64, "é", "a b",
                                  "a\nb"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(BadName) as exc:
        check_name(name)
    assert exc.value.hint  # every refusal says what a valid name looks like


def test_generated_names_are_labels_and_unused() -> None:
    taken = {generate_name(set()) for _ in range(50)}
    fresh = generate_name(taken)
    assert is_dns_label(fresh) and fresh not in taken


@pytest.mark.parametrize(("text", "n"), [("4G", 4 << 30), ("512M", 512 << 20), ("2GiB", 2 << 30),
                                         ("1024", 1024), ("8k", 8192), (" 3 g ", 3 << 30)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "G", "-1G", "4X", "1.5G", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_size(text)


def test_format_size_roundtrip() -> None:
    for text in ("4G", "1536M", "7K", "1T"):
        assert format_size(parse_size(text)) == text


def test_config_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the default path: absent here, so defaults
    monkeypatch.delenv("BANGER_CONFIG", raising=False)
    assert load_config().bridge_name == "br-banger"
    f = tmp_path / "c.toml"
    f.write_text('vmm = "qemu"\nbridge_cidr = "10.9.0.1/24"\n[vm_defaults]\nvcpu = 4\n')
    cfg = load_config(f)
    assert cfg.vmm.value == "qemu" and cfg.vm_defaults.vcpu == 4
    assert cfg.vm_defaults.memory_mib == 1024


@pytest.mark.parametrize(("data", "where"), [
    ({"nope": 1}, "nope: unknown key"),
    ({"bridge_cidr": "10.0.0.0/24"}, "bridge_cidr"),
    ({"bridge_name": "this-name-is-too-long"}, "bridge_name"),
    ({"vm_defaults": {"vcpu": 0}}, "vm_defaults.vcpu"),
    ({"vm_defaults": {"disk_size": "lots"}}, "vm_defaults.disk_size"),
    ({"vmm": "xen"}, "vmm"),
])
def test_config_errors_name_the_key(data: dict[str, object], where: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_config(data)
    assert where in exc.value.message


def test_config_toml_syntax_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("vmm = \n")
    with pytest.raises(BadRequest) as exc:
        load_config(f)
    assert str(f) in exc.value.message


def test_socket_path_limit(tmp_path: Path) -> None:
    assert check_socket_path(tmp_path / "s.sock")
    with pytest.raises(BadRequest) as exc:
        check_socket_path(Path("/" + "d" * 120) / "x.sock")
    assert "runtime_dir" in exc.value.hint


def test_layout_vm_paths(tmp_path: Path) -> None:
    cfg = parse_config({"state_dir": str(tmp_path / "s"), "runtime_dir": str(tmp_path / "r")})
    lay = Layout.from_config(cfg)
    p = lay.vm("0123456789ab")
    assert p.rootfs.parent == lay.vms_dir / "0123456789ab"
    assert p.qmp_socket.parent == lay.vms_run_dir / "0123456789ab"
    assert lay.public_key.name == "id_ed25519.pub"


def test_error_codes_roundtrip() -> None:
    err = from_code("not_running", "VM x is not running", "start it")
    assert isinstance(err, NotRunning) and err.hint == "start it"
    assert isinstance(from_code("already_exists", "m"), AlreadyExists)
    unknown = from_code("future_code", "m")
    assert unknown.code == "future_code"


def frame(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_decode_request_ok() -> None:
    req = api.decode_request(frame({"jsonrpc": "2.0", "id": 1, "method": "vm.list",
                                    "params": {}, "protocol": api.PROTOCOL_VERSION}))
    assert req.method == "vm.list"


@pytest.mark.parametrize("raw", [b"{", b"[1,2]", b"\xff\xfe", b'"str"',
                                 frame({"jsonrpc": "2.0", "id": 1, "protocol": 1}),
                                 frame({"jsonrpc": "1.0", "id": 1, "method": "x", "protocol": 1}),
                                 frame({"jsonrpc": "2.0", "id": [1], "method": "x",
                                        "protocol": 1}),
                                 frame({"jsonrpc": "2.0", "id": 1, "method": "x",
                                        "params": [1], "protocol": 1})])
def test_decode_request_rejects(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        api.decode_request(raw)


def test_decode_request_wrong_version() -> None:
    with pytest.raises(BadVersion):
        api.decode_request(frame({"jsonrpc": "2.0", "id": 1, "method": "x", "protocol": 99}))


def test_encode_refuses_oversized() -> None:
    with pytest.raises(BadRequest):
        api.encode({"x": "y" * api.MAX_FRAME})


def test_state_transitions() -> None:
    st = api.VMState
    assert st.STOPPED.can_become(st.STARTING)
    assert not st.STOPPED.can_become(st.RUNNING)
    assert not st.DELETING.can_become(st.RUNNING)
    # delete claims a settled (or booting) VM; never one already stopping or deleting
    assert {s for s in st if s.can_become(st.DELETING)} == {
        st.CREATING, st.STOPPED, st.STARTING, st.RUNNING, st.ERROR, st.PAUSED, st.SUSPENDED,
        st.POOLED}
    # a pool's clone is taken by a create (or removed), and made by one
    assert {s for s in st if st.POOLED.can_become(s)} == {st.CREATING, st.DELETING}
    assert {s for s in st if s.can_become(st.POOLED)} == {st.CREATING}
    # a suspended guest is resumed by a start; a stop would discard its processes
    assert st.SUSPENDED.can_become(st.STARTING) and not st.SUSPENDED.can_become(st.STOPPING)
    assert st.SUSPENDING.busy and not st.PAUSED.busy
    assert not st.DELETING.can_become(st.DELETING)


def test_create_params_are_bounded_at_the_rpc_boundary() -> None:
    from banger.daemon import vmcreate
    from banger.daemon.rpc import parse

    for bad in ({"vcpu": 0}, {"memory_mib": 64}, {"vcpu": "many"}, {"nope": 1}):
        with pytest.raises(BadRequest):
            parse(vmcreate.CreateParams, bad)
    assert parse(vmcreate.CreateParams, {"vcpu": 2}).vcpu == 2


def test_an_explicit_config_path_that_does_not_exist_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BANGER_CONFIG", raising=False)
    with pytest.raises(BadRequest, match="does not exist") as exc:
        load_config(tmp_path / "typo.toml")
    assert "BANGER_CONFIG" in exc.value.hint
    monkeypatch.setenv("BANGER_CONFIG", str(tmp_path / "typo.toml"))
    with pytest.raises(BadRequest, match="does not exist"):
        load_config()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_refuses_a_missing_explicit_config(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nope.toml"
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("BANGER_CONFIG", None)
    args = [sys.executable, "-m", "banger", "vm", "list"]
    if how == "flag":
        args[3:3] = ["--config", str(missing)]
    else:
        env["BANGER_CONFIG"] = str(missing)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 125, proc.stderr
    assert f"error: config file {missing} does not exist" in proc.stderr
    assert "hint:" in proc.stderr
    assert not (tmp_path / "state").exists()


def test_pool_size_names_images() -> None:
    from banger.config import parse_config

    cfg = parse_config({"pool_size": {"debian-bookworm": 2}, "pool_memory_mib": 2048})
    assert cfg.pool_size == {"debian-bookworm": 2} and cfg.pool_memory_mib == 2048
    for bad in ({"Not_A_Label": 1}, {"debian-bookworm": -1}, {"debian-bookworm": 99}):
        with pytest.raises(BadRequest):
            parse_config({"pool_size": bad})


def test_rename_script_names_only_dns_labels() -> None:
    from banger.daemon.identity import rename_script

    script = rename_script("web-1", 1700000000.25)
    assert "h=web-1 " in script and "date -u -s @1700000000.250 " in script
    with pytest.raises(BadRequest):
        rename_script("x; reboot", 0.0)
