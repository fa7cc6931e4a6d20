"""The daemon and the host it shares: per-install names, undoing host network changes,
bugs reported as bugs, and the config a running daemon keeps."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger import api
from banger.api.params import CreateParams
from banger.client import Client, config_drift
from banger.config import Config, parse_config
from banger.daemon import reconcile, vmcreate, vmpower
from banger.daemon.core import Daemon, Seams
from banger.daemon.dmsnap import CopyCow
from banger.daemon.firewall import GuestFirewall
from banger.daemon.network import HostChanges, ensure_bridge, restore_host
from banger.daemon.service import Bangerd
from banger.errors import HostError, InternalError
from banger.hostops.client import HostOps
from banger.hostops.netlink import IFNAMSIZ, tap_name, tap_prefix_for
from banger.hostops.nft import FirewallSettings, GuestRule
from banger.layout import Layout, dm_prefix_for, install_tag
from tests.conftest import FakeWorld, add_fake_image
from tests.fakes import FakeNet, FakeRunner, instant_ssh, local_hostops, ok

# ----------------------------------------------------------------- naming


def test_install_tag_is_short_stable_and_per_state_dir(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert re.fullmatch(r"[0-9a-f]{6}", install_tag(a))
    assert install_tag(a) == install_tag(a)
    assert install_tag(a) != install_tag(b)
    # two spellings of one directory are one install
    a.mkdir()
    (tmp_path / "link").symlink_to(a)
    assert install_tag(tmp_path / "link") == install_tag(a)
    assert install_tag(tmp_path / "x" / ".." / "a") == install_tag(a)


def test_tap_names_fit_ifnamsiz_and_carry_the_install_prefix(tmp_path: Path) -> None:
    prefix = tap_prefix_for(install_tag(tmp_path))
    assert prefix.startswith("bgt") and len(prefix) == 9
    names = {tap_name(prefix) for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) <= IFNAMSIZ - 1 and name.startswith(prefix)
        assert re.fullmatch(r"bgt[0-9a-f]{12}", name)
    with pytest.raises(ValueError):
        tap_prefix_for("0123456789")  # would leave no room for the random part


@pytest.fixture(autouse=True)
def _reap_fake_vmms(world: FakeWorld) -> Iterator[None]:
    yield
    world.vmm.reap_all()


def _config(root: Path, **extra: Any) -> Config:
    return parse_config({
        "state_dir": str(root / "state"), "cache_dir": str(root / "cache"),
        "runtime_dir": str(root / "run"), "dns_enabled": False, "nat": False,
        "tap_pool_size": 2, "log_level": "debug",
        "vm_defaults": {"disk_size": "64M", "work_disk_size": "64M"}, **extra,
    })


def _open(root: Path, world: FakeWorld, config_file: Path | None = None,
          **extra: Any) -> Daemon:
    cfg = _config(root, **extra)
    cfg.key_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.key_path.write_text("PRIVATE")
    cfg.key_path.with_name(cfg.key_path.name + ".pub").write_text("ssh-ed25519 AAAA test\n")
    seams = Seams(runner=world.runner, net=world.net, vmm_factory=lambda name: world.vmm,
                  cow=CopyCow(), dial=world.dial, wait_for_ssh=instant_ssh)
    d = Bangerd.open(cfg, seams, log_to_stderr=True, config_file=config_file)
    add_fake_image(d)
    return d


@pytest.fixture
def two_installs(tmp_path: Path, world: FakeWorld) -> Iterator[tuple[Daemon, Path]]:
    """Install A running with a VM and a warm TAP pool; B's root, not opened yet."""
    a = _open(tmp_path / "a", world)
    vmcreate.create_sync(a, CreateParams(name="web"))
    yield a, tmp_path / "b"
    a.close()


def test_a_second_installs_sweep_leaves_the_first_ones_taps_and_dm_targets(
        two_installs: tuple[Daemon, Path], world: FakeWorld,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b_root = two_installs
    taps_a = set(world.net.taps())
    vm = a.db.find_vm("web")
    assert vm is not None and vm.runtime.teardown["tap"] in taps_a
    assert len(taps_a) == 3  # the VM's and two warm ones
    b_layout = Layout.from_config(_config(b_root))
    b_tap_prefix = tap_prefix_for(b_layout.install_tag)
    b_dm_prefix = dm_prefix_for(b_layout.install_tag)
    # Leftovers of B itself from an earlier life: B's sweep must remove exactly these.
    world.net.create_tap(b_tap_prefix + "dead00", "br-banger")
    dm_a = a.dm_prefix + vm.id
    dm_b_orphan = b_dm_prefix + "0123456789ab"
    world.runner.on(["dmsetup", "ls"], ok(f"{dm_a}\t(253:0)\n{dm_b_orphan}\t(253:1)\n"))
    monkeypatch.setattr(reconcile, "dm_snapshot_supported", lambda: True)

    b = _open(b_root, world)  # B's start-up runs its sweep
    try:
        removed = reconcile.sweep(b)  # and once more, explicitly, to see what it takes
        assert taps_a <= set(world.net.taps()), "B deleted A's TAPs"
        assert b_tap_prefix + "dead00" not in world.net.taps()
        assert dm_a not in removed["dm"]
        removed_dm = [c[-1] for c in world.runner.ran("dmsetup", "remove")]
        assert dm_a not in removed_dm and dm_b_orphan in removed_dm
        # A's VM is untouched and still has its TAP
        assert a.db.get_vm(vm.id).state.value == "running"
    finally:
        b.close()
    # B's shutdown (no VMs of its own) must not take the shared bridge A's VM uses either
    assert "br-banger" in world.net.bridges and taps_a <= set(world.net.taps())


def test_the_sweep_removes_the_network_namespaces_of_vms_gone_and_only_its_own(
        tmp_path: Path, world: FakeWorld) -> None:
    """A jailed Firecracker VM's own namespace (``jailer_netns``) outlives a crashed
    daemon; the next sweep removes it once its VM is gone, never another install's."""
    d = _open(tmp_path / "a", world)
    try:
        vmcreate.create_sync(d, CreateParams(name="web"))
        vm = d.db.find_vm("web")
        assert vm is not None
        prefix = f"banger-{d.layout.install_tag}-"
        other = "banger-ffffff-0123456789ab"  # another install's
        for name in (prefix + vm.id, prefix + "0123456789ab", other):
            world.net.create_vm_netns(name, tap_name("bgtfffff0"), "br-banger", (1, 1))
        removed = reconcile.sweep(d)
        assert removed["netns"] == ["0123456789ab"]
        assert set(world.net.namespaces) == {prefix + vm.id, other}
    finally:
        d.close()


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/loop-control").exists()
                    or shutil.which("losetup") is None,
                    reason="attaching a loop device needs root and /dev/loop-control")
def test_the_sweep_detaches_loop_devices_no_vm_names(tmp_path: Path, world: FakeWorld) -> None:
    d = _open(tmp_path / "a", world)
    try:
        leaked = d.layout.vms_dir / "0123456789ab" / "cow"
        leaked.parent.mkdir(parents=True)
        leaked.write_bytes(b"\0" * 4096)
        elsewhere = tmp_path / "not-banger.img"
        elsewhere.write_bytes(b"\0" * 4096)
        attach = ["losetup", "--find", "--show"]
        devs = [subprocess.run([*attach, str(f)], capture_output=True, text=True,
                               check=True).stdout.strip() for f in (leaked, elsewhere)]
        try:
            removed = reconcile.sweep(d)
            # The leaked VM file's loop is detached; the loop of a file outside the state
            # dir is not this install's to touch.
            assert removed["loops"] == [devs[0]]
            assert not Path(f"/sys/block/{Path(devs[0]).name}/loop").exists()
            assert Path(f"/sys/block/{Path(devs[1]).name}/loop").exists()
        finally:
            for dev in devs:
                subprocess.run(["losetup", "--detach", dev], check=False)
    finally:
        d.close()


# ----------------------------------------------------------------- host changes


def _settings(bridge: str = "br-x") -> FirewallSettings:
    return FirewallSettings(table="banger_t1", bridge=bridge, cidr="10.7.0.1/24",
                            tap_prefix="bgtt1")


def _host(runner: FakeRunner, net: FakeNet, fwd: Path, bridge: str = "br-x") -> HostOps:
    return local_hostops(runner, _settings(bridge), net, fwd)


def _firewall(host: HostOps, state: Path) -> GuestFirewall:
    return GuestFirewall(host, _settings(), state)


NAT_GUEST = GuestRule(tap="bgtt1aaaaaa", ip="10.7.0.2", mac="06:00:0a:07:00:02", nat=True)


def test_firewall_records_before_changing_and_restore_undoes(tmp_path: Path) -> None:
    runner, net = FakeRunner(), FakeNet()
    fwd = tmp_path / "ip_forward"
    fwd.write_text("0\n")
    host = _host(runner, net, fwd)
    state = tmp_path / "host-network.json"
    changes = HostChanges.load(state)
    assert changes.empty
    ensure_bridge(host, "br-x", "10.7.0.1/24", changes)
    fw = _firewall(host, state)
    # Forwarding waits for the first guest with NAT; one without leaves it alone.
    fw.admit(GuestRule(tap="bgtt1bbbbbb", ip="10.7.0.3", mac="06:00:0a:07:00:03"))
    assert fwd.read_text() == "0\n"
    fw.admit(NAT_GUEST)
    assert fwd.read_text() == "1\n"
    assert json.loads(state.read_text()) == {"ip_forward_before": "0", "bridge": "br-x",
                                             "nft_table": "banger_t1"}
    # A second daemon (a restart) sees forwarding on but keeps the value banger found.
    again = HostChanges.load(state)
    ensure_bridge(host, "br-x", "10.7.0.1/24", again)
    fw2 = _firewall(host, state)
    fw2.admit(NAT_GUEST)  # loads the tables afresh
    again = HostChanges.load(state)
    assert again.ip_forward_before == "0" and again.bridge == "br-x"

    script = network_script(runner, lambda: restore_host(
        host, HostChanges.load(state)) == [] or pytest.fail("problems"))
    assert "delete table inet banger_t1" in script and "delete table bridge banger_t1" in script
    assert fwd.read_text() == "0\n"
    assert "br-x" not in net.links()
    assert not state.exists()


def test_restore_deletes_both_tables_and_a_legacy_record_still_works(tmp_path: Path) -> None:
    runner, net = FakeRunner(), FakeNet()
    host = _host(runner, net, tmp_path / "fwd")
    state = tmp_path / "host-network.json"
    # What banger wrote before per-install tables: one `ip banger` table, as a bool.
    state.write_text(json.dumps({"ip_forward_before": None, "bridge": None,
                                 "nft_table": True}))
    assert HostChanges.load(state).nft_table == "banger"
    assert network_script(runner, lambda: restore_host(
        host, HostChanges.load(state))) == "table ip banger\ndelete table ip banger\n"
    assert not state.exists()
    # A daemon of this version that finds the legacy record replaces the old table.
    state.write_text(json.dumps({"ip_forward_before": None, "bridge": None,
                                 "nft_table": True}))
    fw = _firewall(host, state)
    script = network_script(runner, lambda: fw.admit(
        GuestRule(tap="bgtt1bbbbbb", ip="10.7.0.3", mac="06:00:0a:07:00:03")))
    assert script.startswith("table ip banger\ndelete table ip banger\n")
    assert HostChanges.load(state).nft_table == "banger_t1"
    assert network_script(runner, lambda: restore_host(host, HostChanges.load(state))) == (
        "table bridge banger_t1\ndelete table bridge banger_t1\n"
        "table inet banger_t1\ndelete table inet banger_t1\n")


def network_script(runner: FakeRunner, act: Any) -> str:
    """What ``act`` fed to ``nft -f -`` (the FakeRunner keeps argv only)."""
    fed: list[bytes] = []
    real = runner.run

    def spy(argv: Any, **kw: Any) -> Any:
        if list(argv)[:1] == ["nft"]:
            fed.append(kw.get("input") or b"")
        return real(argv, **kw)

    runner.run = spy  # type: ignore[method-assign]
    try:
        act()
    finally:
        runner.run = real  # type: ignore[method-assign]
    return b"".join(fed).decode()


def test_restore_leaves_what_banger_found(tmp_path: Path) -> None:
    runner, net = FakeRunner(), FakeNet()
    net.ensure_bridge("br-mine", "10.8.0.1/24")  # the user's own bridge
    fwd = tmp_path / "ip_forward"
    fwd.write_text("1\n")  # forwarding was already on
    host = _host(runner, net, fwd, bridge="br-mine")
    state = tmp_path / "host-network.json"
    changes = HostChanges.load(state)
    ensure_bridge(host, "br-mine", "10.7.0.1/24", changes)
    fw = _firewall(host, state)
    fw.admit(NAT_GUEST)
    changes = HostChanges.load(state)
    assert changes.bridge is None and changes.ip_forward_before is None
    assert restore_host(host, HostChanges.load(state)) == []
    assert "br-mine" in net.links() and fwd.read_text() == "1\n"
    assert not state.exists()


def test_a_failed_restore_step_stays_recorded(tmp_path: Path) -> None:
    runner, net = FakeRunner(), FakeNet()
    fwd = tmp_path / "ip_forward"
    fwd.write_text("0\n")
    host = _host(runner, net, fwd)
    state = tmp_path / "host-network.json"
    changes = HostChanges.load(state)
    ensure_bridge(host, "br-x", "10.7.0.1/24", changes)
    fw = _firewall(host, state)
    fw.admit(NAT_GUEST)
    runner.on(["nft"], ok(rc=1, err="Error: Operation not permitted"))
    problems = restore_host(host, HostChanges.load(state))
    assert len(problems) == 1 and "not permitted" in problems[0]
    # the other steps still ran; only the tables are left for the next stop to retry
    assert fwd.read_text() == "0\n" and "br-x" not in net.links()
    assert json.loads(state.read_text())["nft_table"] == "banger_t1"
    state.write_text("{not json")
    with pytest.raises(HostError, match="not a record banger wrote"):
        HostChanges.load(state)


def test_stop_with_no_vm_left_removes_bridge_and_taps(tmp_path: Path, world: FakeWorld) -> None:
    d = _open(tmp_path, world)
    vmcreate.create_sync(d, CreateParams(name="gone"))
    assert "br-banger" in world.net.links() and world.net.taps()
    from banger.daemon import vmdelete

    vmdelete.delete(d, "gone")
    vmcreate.create_sync(d, CreateParams(name="kept", start=False))  # stopped VMs
    world.net.create_tap(d.tap_pool.prefix + "1eaced", "br-banger")  # a release that failed
    other = tap_prefix_for("0f0f0f") + "abcdef"  # another install's, on a bridge of its own
    world.net.ensure_bridge("br-other", "10.9.0.1/24")
    world.net.create_tap(other, "br-other")
    assert d.status()["idle"] is True
    d.close()
    assert sorted(world.net.links()) == sorted(["br-other", other])
    assert not d.layout.host_network_state.exists()


def test_stop_with_a_running_vm_keeps_the_network(tmp_path: Path, world: FakeWorld) -> None:
    d = _open(tmp_path, world)
    vmcreate.create_sync(d, CreateParams(name="up"))
    vm = d.db.find_vm("up")
    assert vm is not None and d.status()["idle"] is False
    d.close()
    assert "br-banger" in world.net.links()
    assert vm.runtime.teardown["tap"] in world.net.taps()
    assert d.layout.host_network_state.exists()  # undone by a later stop


# ----------------------------------------------------------------- bugs vs host failures


def test_a_bug_in_vm_start_is_internal_and_names_the_log(
        tmp_path: Path, world: FakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _open(tmp_path, world)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("banger").addHandler(keep)
    try:
        vmcreate.create_sync(d, CreateParams(name="s", start=False))

        def buggy(plan: Any) -> Any:
            raise KeyError("a bug")

        monkeypatch.setattr(world.vmm, "launch", buggy)
        with pytest.raises(InternalError) as exc:
            vmpower.start(d, "s")
        assert "KeyError" in exc.value.message
        assert d.log_location in exc.value.message and "doctor" not in exc.value.hint
        assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in seen)
        # a real host failure is still a host error with the doctor hint
        err = d.error_of(OSError(5, "Input/output error"), "vm.start")
        assert isinstance(err, HostError) and "doctor" in err.hint
    finally:
        logging.getLogger("banger").removeHandler(keep)
        d.close()


def test_an_unopened_daemon_names_its_log_file(tmp_path: Path) -> None:
    d = Daemon(_config(tmp_path))
    err = d.error_of(AttributeError("no such thing"), "vm.show")
    assert isinstance(err, InternalError)
    assert str(tmp_path / "state" / "bangerd.log") in err.message


# ----------------------------------------------------------------- config drift


def test_config_values_hash_and_changed_keys(tmp_path: Path) -> None:
    base = _config(tmp_path)
    values = api.config_values(base)
    assert values["bridge_name"] == "br-banger" and values["vm_defaults.vcpu"] == 2
    assert values["state_dir"] == str(tmp_path / "state")
    same = api.config_values(_config(tmp_path))
    assert api.config_hash(values) == api.config_hash(same)
    # the values survive the trip over RPC unchanged
    assert api.config_hash(json.loads(json.dumps(values))) == api.config_hash(values)
    other = api.config_values(_config(tmp_path, bridge_cidr="10.9.0.1/24",
                                      vm_defaults={"vcpu": 4, "disk_size": "64M",
                                                   "work_disk_size": "64M"}))
    assert api.config_hash(other) != api.config_hash(values)
    assert api.changed_keys(values, other) == ["bridge_cidr", "vm_defaults.vcpu"]
    assert api.changed_keys(values, {**values, "new_key": 1}) == ["new_key"]


def test_config_drift_warning_names_keys_and_restart(tmp_path: Path, world: FakeWorld) -> None:
    d = _open(tmp_path, world, config_file=tmp_path / "config.toml")
    try:
        status = json.loads(json.dumps(d.status()))  # as the CLI receives it
    finally:
        d.close()
    assert status["config"]["path"] == str(tmp_path / "config.toml")
    assert config_drift(_config(tmp_path), status) is None
    warning = config_drift(_config(tmp_path, tap_pool_size=5, log_level="info"), status)
    assert warning is not None
    assert "log_level, tap_pool_size" in warning and "`banger daemon restart`" in warning
    assert str(tmp_path / "config.toml") in warning
    assert config_drift(_config(tmp_path), {"pid": 1}) is None  # an older daemon
    client = Client(tmp_path / "nowhere.sock")
    assert client.config_drift(_config(tmp_path)) is None  # no ping yet: nothing to compare


def test_background_work_that_fails_as_the_daemon_closes_is_no_thread_error(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    """Re-adoption work runs on threads the close does not wait for: what they hit once
    the daemon closes (the store gone) is noted, not an unhandled thread exception;
    before that, a failure is logged as one."""
    import threading

    caplog.set_level(logging.DEBUG, logger="banger.daemon")
    go, done = threading.Event(), threading.Event()

    def reads_the_store() -> None:
        try:
            go.wait(10)
            daemon.db.list_vms()
        finally:
            done.set()

    daemon.in_background("late-reader", reads_the_store)
    daemon.close()
    go.set()
    assert done.wait(10)
    for _ in range(100):  # the note is logged just after `done`
        if any("late-reader: stopped by the daemon's shutdown" in r.message
               for r in caplog.records):
            break
        threading.Event().wait(0.05)
    else:
        raise AssertionError("the late reader's failure was not noted")


def test_background_work_that_fails_while_serving_is_logged(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    done = threading.Event()

    def fails() -> None:
        done.set()
        raise RuntimeError("boom")

    daemon.in_background("doomed", fails)
    assert done.wait(10)
    for _ in range(100):
        if any(r.message == "doomed failed" and r.levelno == logging.ERROR
               for r in caplog.records):
            break
        threading.Event().wait(0.05)
    else:
        raise AssertionError("the failure was not logged")


def test_a_vmm_that_makes_its_own_port_gets_a_name_not_a_pooled_tap(
        tmp_path: Path, world: FakeWorld) -> None:
    """A jailed Firecracker with jailer_netns makes the VM's port itself (``own_port``):
    the daemon names it with the install's TAP prefix, leaves the TAP pool alone, admits
    the guest on that name, and deletes it at teardown like any TAP."""
    world.vmm.own_port = True  # type: ignore[misc]
    d = _open(tmp_path / "a", world)
    try:
        vmcreate.create_sync(d, CreateParams(name="web"))
        vm = d.db.find_vm("web")
        assert vm is not None
        port = vm.runtime.teardown["tap"]
        d.tap_pool.fill()
        pooled = d.tap_pool.owned()
        assert port.startswith(d.tap_pool.prefix) and port not in pooled
        assert len(pooled) == 2  # the pool's size: none of it went to the VM
        assert set(world.net.taps()) == pooled  # and the daemon made no TAP for the VM
        assert port in {g.tap for g in d.firewall._admitted.values()}
        world.net.create_tap(port, "br-banger")  # as the VMM's launch would
        vmpower.stop(d, "web")
        assert port not in world.net.links()  # released like any TAP
    finally:
        d.close()
