"""Finding Firecracker and the jailer, version gate, jailer mode, doctor status."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from banger import vmmuser
from banger.config import Config, parse_config
from banger.daemon.fcproc import (
    JailerStatus,
    check_version,
    jailer_binary,
    jailer_status,
)
from banger.daemon.fcproc import driver as fcdriver
from banger.daemon.fcproc import host as fchost
from banger.daemon.fcproc.driver import FirecrackerDriver
from banger.errors import BadRequest, HostError
from banger.hostops.client import HostOps
from banger.hostops.jail import find_binary
from banger.layout import install_tag
from banger.runner import Result, SubprocessRunner
from banger.vmmuser import VMMUser
from tests.fakes import FakeRunner, ok

USER = VMMUser("banger-vmm", 990, 985)
class Helper:
    """The root helper as far as the driver asks it: the binaries it found."""

    @staticmethod
    def fc_status() -> tuple[str, str]:
        return "/usr/bin/firecracker", "/usr/sbin/jailer"


HELPER = cast(HostOps, Helper())  # stands for the host operations


def exe(path: Path, version: str = "Firecracker v1.7.0") -> str:
    path.write_text(f"#!{sys.executable}\nprint({version!r})\n")
    path.chmod(0o755)
    return str(path)


def config(tmp_path: Path, **over: Any) -> Config:
    return parse_config({"state_dir": str(tmp_path / "state"),
                         "jailer_chroot_base": str(tmp_path / "jails"), **over})


@pytest.fixture(autouse=True)
def vmm_user(monkeypatch: pytest.MonkeyPatch) -> dict[str, VMMUser]:
    """The host's accounts, as far as these tests see them: banger-vmm is USER."""
    accounts = {"banger-vmm": USER}
    for module in (vmmuser, fchost, fcdriver):
        monkeypatch.setattr(module, "lookup_user", accounts.get)
    return accounts


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> None:
    """bangerd runs as root, as far as the driver and the jailer choice can tell."""
    for module in (fchost.os, fcdriver.os):
        monkeypatch.setattr(module, "geteuid", lambda: 0)


def v1_mounts(tmp_path: Path) -> Path:
    """A mount table with cgroup v1 memory, pids and cpu (this host's shape)."""
    lines = [f"cgroup {tmp_path / c} cgroup rw,relatime,{c} 0 0" for c in ("memory", "pids", "cpu")]
    mounts = tmp_path / "mounts"
    mounts.write_text("\n".join(lines) + "\n")
    return mounts


def test_find_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fc = exe(tmp_path / "firecracker")
    assert find_binary(fc) == fc
    monkeypatch.chdir(tmp_path)
    assert find_binary("./firecracker") == fc  # made absolute: the jailer needs that
    assert find_binary(str(tmp_path / "nope")) is None
    (tmp_path / "noexec").write_text("")
    assert find_binary(str(tmp_path / "noexec")) is None
    (tmp_path / "adir").mkdir()
    assert find_binary(str(tmp_path / "adir")) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_binary("firecracker") == fc
    assert find_binary("jailer") is None


def test_from_config_needs_the_binary(tmp_path: Path) -> None:
    cfg = config(tmp_path, firecracker_bin=str(tmp_path / "firecracker"))
    with pytest.raises(HostError) as exc:
        FirecrackerDriver.from_config(cfg, FakeRunner(), HELPER)
    assert exc.value.message == f"Firecracker ({tmp_path / 'firecracker'}) is not installed"
    assert "firecracker_bin" in exc.value.hint and "vmm = qemu" in exc.value.hint


def test_from_config_refuses_an_old_release(tmp_path: Path) -> None:
    cfg = config(tmp_path, firecracker_bin=exe(tmp_path / "firecracker", "Firecracker v1.3.2"))
    with pytest.raises(HostError, match=r"unsupported Firecracker: .*v1\.3\.2 \(minimum 1\.4\.0\)"):
        FirecrackerDriver.from_config(cfg, SubprocessRunner(), HELPER)


def test_from_config_builds_an_unjailed_driver(tmp_path: Path) -> None:
    fc = exe(tmp_path / "firecracker")
    drv = FirecrackerDriver.from_config(config(tmp_path, firecracker_bin=fc,
                                               jailer_enabled=False), SubprocessRunner(), HELPER)
    assert (drv.name, drv.binary, drv.jail) == ("firecracker", fc, None)


def test_jailed_driver_refuses_a_binary_the_jailer_will_not_exec() -> None:
    with pytest.raises(BadRequest, match="contains 'firecracker'"):
        FirecrackerDriver(FakeRunner(), "/opt/fc/fc-1.7", jail=HELPER)
    FirecrackerDriver(FakeRunner(), "/opt/fc/fc-1.7")  # unjailed, any name will do


def test_check_version_reads_the_release() -> None:
    runner = FakeRunner()
    runner.on(["/fc", "--version"], ok("Firecracker v1.10.1\n\nSupported snapshot versions"))
    assert check_version(runner, "/fc") == (True, "/fc: v1.10.1 (minimum 1.4.0)")
    runner = FakeRunner()
    runner.on(["/fc", "--version"], ok("garbage"))
    assert check_version(runner, "/fc") == (False, "/fc: cannot read a version from 'garbage'")


@pytest.mark.parametrize(("enabled", "found", "euid", "jailed"), [
    (None, True, 0, True),      # auto: jailer present
    (None, False, 0, False),    # auto: no jailer, root: unjailed
    (None, True, 1000, True),   # auto, not root: the root helper jails it
    (False, True, 0, False),    # off
    (True, True, 0, True),      # on
])
def test_jailer_modes(tmp_path: Path, enabled: bool | None, found: bool, euid: int,
                      jailed: bool) -> None:
    jailer = tmp_path / "jailer"
    if found:
        exe(jailer)
    cfg = config(tmp_path, jailer_enabled=enabled, jailer_bin=str(jailer))
    binary = jailer_binary(cfg, euid=euid)
    assert (binary is not None) is jailed
    st = jailer_status(cfg, euid=euid, mounts=v1_mounts(tmp_path))
    assert (st.jailed, st.blocks_vms) == (jailed, False)
    if binary is not None:
        assert binary == str(jailer)
        assert st.detail.startswith(f"jailer {jailer}: Firecracker runs jailed under ")


def test_a_root_daemon_creates_a_missing_vmm_user(tmp_path: Path, root: None,
                                                  vmm_user: dict[str, VMMUser]) -> None:
    exe(tmp_path / "jailer")
    fc = exe(tmp_path / "firecracker")
    cfg = config(tmp_path, firecracker_bin=fc, jailer_enabled=True,
                 jailer_bin=str(tmp_path / "jailer"), vmm_user="fc-vms")
    runner = FakeRunner()
    runner.on([fc, "--version"], ok("Firecracker v1.7.0\n"))

    def useradd(argv: list[str]) -> Result:
        vmm_user[argv[-1]] = VMMUser(argv[-1], 991, 986)
        return Result(argv, 0, b"", b"")

    runner.on(["useradd"], useradd)
    # doctor only reads the host: it says the user will be made, and makes nothing
    st = jailer_status(cfg, euid=0, mounts=v1_mounts(tmp_path))
    assert st.jailed and "as fc-vms (not created yet" in st.detail
    assert runner.ran("useradd") == []
    drv = FirecrackerDriver.from_config(cfg, runner, HELPER)
    assert drv.jail is HELPER
    assert runner.ran("useradd")[0][-2:] == ["--user-group", "fc-vms"]
    assert vmm_user["fc-vms"] == VMMUser("fc-vms", 991, 986)


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), (0, 100), (1000, 0)])
def test_a_root_vmm_user_is_refused_never_used(tmp_path: Path, vmm_user: dict[str, VMMUser],
                                               uid: int, gid: int) -> None:
    vmm_user["banger-vmm"] = VMMUser("banger-vmm", uid, gid)
    exe(tmp_path / "jailer")
    fc = exe(tmp_path / "firecracker")
    for enabled in (None, True):  # auto mode does not fall back to running unjailed
        cfg = config(tmp_path, jailer_enabled=enabled, jailer_bin=str(tmp_path / "jailer"),
                     firecracker_bin=fc)
        with pytest.raises(BadRequest, match=rf"is root \(uid {uid}, gid {gid}\)") as exc:
            FirecrackerDriver.from_config(cfg, SubprocessRunner(), HELPER)
        assert "unprivileged account" in exc.value.hint
        st = jailer_status(cfg, euid=0, mounts=v1_mounts(tmp_path))
        assert st == JailerStatus(
            False, f"vmm_user 'banger-vmm' is root (uid {uid}, gid {gid}): Firecracker VMs "
                   "will not start", blocks_vms=True, hint=exc.value.hint)


@pytest.mark.parametrize("euid", [0, 1000])
def test_from_config_refuses_a_root_vmm_user(tmp_path: Path, euid: int,
                                             monkeypatch: pytest.MonkeyPatch,
                                             vmm_user: dict[str, VMMUser]) -> None:
    for module in (fchost.os, fcdriver.os):
        monkeypatch.setattr(module, "geteuid", lambda: euid)
    vmm_user["banger-vmm"] = VMMUser("banger-vmm", 0, 0)
    exe(tmp_path / "jailer")
    fc = exe(tmp_path / "firecracker")
    with pytest.raises(BadRequest, match="is root"):
        FirecrackerDriver.from_config(config(tmp_path, firecracker_bin=fc,
                                             jailer_bin=str(tmp_path / "jailer")),
                                      SubprocessRunner(), HELPER)


def test_no_cgroup_hierarchy_blocks_jailed_vms(tmp_path: Path) -> None:
    exe(tmp_path / "jailer")
    cfg = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {tmp_path} cgroup rw,memory 0 0\n")
    st = jailer_status(cfg, euid=0, mounts=mounts)
    assert not st.jailed and st.blocks_vms
    assert st.detail.startswith("no cgroup hierarchy offers memory, pids, cpu")
    assert st.detail.endswith(": Firecracker VMs will not start") and st.hint


def test_jailer_required_but_missing(tmp_path: Path) -> None:
    cfg = config(tmp_path, jailer_enabled=True, jailer_bin=str(tmp_path / "jailer"))
    with pytest.raises(HostError, match="jailer_enabled = true, so Firecracker runs under "
                                        "its jailer") as exc:
        jailer_binary(cfg, euid=0)
    assert "vmm = qemu" in exc.value.hint
    assert jailer_status(cfg, euid=0) == JailerStatus(
        False, f"{exc.value.message}: Firecracker VMs will not start", blocks_vms=True,
        hint=exc.value.hint)
    # A daemon that is not root needs it even in auto mode, and cannot switch it off.
    auto = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    with pytest.raises(HostError, match="bangerd is not root, so Firecracker runs under"):
        jailer_binary(auto, euid=1000)
    with pytest.raises(HostError, match="needs a daemon running as root"):
        jailer_binary(config(tmp_path, jailer_enabled=False), euid=1000)
    exe(tmp_path / "jailer")
    assert jailer_binary(cfg, euid=1000) == str(tmp_path / "jailer")
    # from_config surfaces the same refusal.
    fc = exe(tmp_path / "firecracker")
    cfg = config(tmp_path, firecracker_bin=fc, jailer_enabled=True,
                 jailer_bin=str(tmp_path / "missing-jailer"))
    with pytest.raises(HostError, match="is not installed"):
        FirecrackerDriver.from_config(cfg, SubprocessRunner(), HELPER)


def test_jailer_status_texts(tmp_path: Path) -> None:
    assert jailer_status(config(tmp_path, jailer_enabled=False), euid=0) == JailerStatus(
        False, "jailer disabled (jailer_enabled = false): Firecracker runs unjailed")
    missing = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    assert jailer_status(missing, euid=0) == JailerStatus(
        False, f"jailer ({tmp_path / 'jailer'}) not found: Firecracker runs unjailed")
    exe(tmp_path / "jailer")
    # jailed: the jailer, the user's name and uid:gid, the cgroup version and parent
    tag = install_tag(tmp_path / "state")
    for euid in (0, 1000):
        assert jailer_status(missing, euid=euid, mounts=v1_mounts(tmp_path)) == JailerStatus(
            True, f"jailer {tmp_path / 'jailer'}: Firecracker runs jailed under "
                  f"{tmp_path / 'jails'} as banger-vmm (990:985), in a cgroup v1 under "
                  f"banger-{tag} (memory, pids and cpu limits)")
    netns = config(tmp_path, jailer_bin=str(tmp_path / "jailer"), jailer_netns=True)
    assert jailer_status(netns, euid=0, mounts=v1_mounts(tmp_path)).detail.endswith(
        "limits); each VM in a network namespace of its own (jailer_netns)")


def test_jailer_netns_without_a_jailer_blocks_firecracker(tmp_path: Path) -> None:
    for cfg in (config(tmp_path, jailer_enabled=False, jailer_netns=True),
                config(tmp_path, jailer_bin=str(tmp_path / "nope"), jailer_netns=True)):
        st = jailer_status(cfg, euid=0)
        assert (st.jailed, st.blocks_vms) == (False, True)
        assert st.detail.endswith("and jailer_netns needs it: Firecracker VMs will not start")
        assert "turn jailer_netns off" in st.hint


def test_doctor_fails_when_the_jailer_blocks_firecracker(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    doctor = importlib.import_module("banger.daemon.doctor")
    cfg = config(tmp_path, firecracker_bin=exe(tmp_path / "firecracker"))
    for status, want in ((JailerStatus(True, "jailed"), doctor.Status.OK),
                         (JailerStatus(False, "unjailed"), doctor.Status.WARN),
                         (JailerStatus(False, "root", blocks_vms=True, hint="fix"),
                          doctor.Status.FAIL)):
        monkeypatch.setattr(doctor, "jailer_status", lambda cfg, s=status: s)
        check = doctor._jailer(cfg)
        assert (check.status, check.detail) == (want, status.detail)
        if status.blocks_vms:
            assert check.hint == "fix"


def test_jailer_netns_is_a_switch_and_an_old_path_is_refused_with_why() -> None:
    assert parse_config({}).jailer_netns is False
    assert parse_config({"jailer_netns": ""}).jailer_netns is False  # the old default
    assert parse_config({"jailer_netns": True}).jailer_netns is True
    with pytest.raises(BadRequest, match=r"jailer_netns: .*true or false") as exc:
        parse_config({"jailer_netns": "/var/run/netns/fc"})
    assert "no path to give" in exc.value.message
