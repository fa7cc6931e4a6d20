"""Finding Firecracker and the jailer, version gate, jailer mode, doctor status."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from banger import vmmuser
from banger.config import Config, parse_config
from banger.daemon.fcproc import (
    FirecrackerDriver,
    JailerSettings,
    JailerStatus,
    check_version,
    find_binary,
    jailer_settings,
    jailer_status,
)
from banger.daemon.fcproc import host as fchost
from banger.errors import BadRequest, HostError
from banger.hostops.cgroups import CgroupHost, CgroupVersion
from banger.layout import install_tag
from banger.runner import Result, SubprocessRunner
from banger.vmmuser import VMMUser
from tests.fakes import FakeRunner, ok

USER = VMMUser("banger-vmm", 990, 985)
V2 = CgroupHost(CgroupVersion.V2, {c: Path("/sys/fs/cgroup") for c in ("memory", "pids", "cpu")})


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
    for module in (vmmuser, fchost):
        monkeypatch.setattr(module, "lookup_user", accounts.get)
    return accounts


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
        FirecrackerDriver.from_config(cfg, FakeRunner())
    assert exc.value.message == f"Firecracker ({tmp_path / 'firecracker'}) is not installed"
    assert "firecracker_bin" in exc.value.hint and "vmm = qemu" in exc.value.hint


def test_from_config_refuses_an_old_release(tmp_path: Path) -> None:
    cfg = config(tmp_path, firecracker_bin=exe(tmp_path / "firecracker", "Firecracker v1.3.2"))
    with pytest.raises(HostError, match=r"unsupported Firecracker: .*v1\.3\.2 \(minimum 1\.4\.0\)"):
        FirecrackerDriver.from_config(cfg, SubprocessRunner())


def test_from_config_builds_an_unjailed_driver(tmp_path: Path) -> None:
    fc = exe(tmp_path / "firecracker")
    drv = FirecrackerDriver.from_config(config(tmp_path, firecracker_bin=fc,
                                               jailer_enabled=False), SubprocessRunner())
    assert (drv.name, drv.binary, drv.jailer) == ("firecracker", fc, None)
    assert drv.chroot_base == tmp_path / "jails"  # stale jails are still found


def test_jailed_driver_refuses_a_binary_the_jailer_will_not_exec(tmp_path: Path) -> None:
    settings = JailerSettings("/usr/bin/jailer", tmp_path, USER, V2, "banger-abc123")
    with pytest.raises(BadRequest, match="contains 'firecracker'"):
        FirecrackerDriver(FakeRunner(), "/opt/fc/fc-1.7", jailer=settings)
    FirecrackerDriver(FakeRunner(), "/opt/fc/fc-1.7")  # unjailed, any name will do


def test_check_version_reads_the_release() -> None:
    runner = FakeRunner()
    runner.on(["/fc", "--version"], ok("Firecracker v1.10.1\n\nSupported snapshot versions"))
    assert check_version(runner, "/fc") == (True, "/fc: v1.10.1 (minimum 1.4.0)")
    runner = FakeRunner()
    runner.on(["/fc", "--version"], ok("garbage"))
    assert check_version(runner, "/fc") == (False, "/fc: cannot read a version from 'garbage'")


@pytest.mark.parametrize(("enabled", "found", "euid", "jailed"), [
    (None, True, 0, True),      # auto: jailer present and root
    (None, False, 0, False),    # auto: no jailer
    (None, True, 1000, False),  # auto: not root
    (False, True, 0, False),    # off
    (True, True, 0, True),      # on
])
def test_jailer_modes(tmp_path: Path, enabled: bool | None, found: bool, euid: int,
                      jailed: bool) -> None:
    jailer = tmp_path / "jailer"
    if found:
        exe(jailer)
    cfg = config(tmp_path, jailer_enabled=enabled, jailer_bin=str(jailer))
    settings = jailer_settings(cfg, FakeRunner(), euid=euid, cgroups=V2)
    assert (settings is not None) is jailed
    st = jailer_status(cfg, euid=euid, mounts=v1_mounts(tmp_path))
    assert (st.jailed, st.blocks_vms) == (jailed, False)
    if settings is not None:
        assert settings.binary == str(jailer) and settings.chroot_base == tmp_path / "jails"
        assert st.detail.startswith(f"jailer {jailer}: Firecracker runs jailed under ")


def test_jailed_firecracker_runs_as_the_vmm_user_in_this_installs_cgroup(
        tmp_path: Path) -> None:
    exe(tmp_path / "jailer")
    cfg = config(tmp_path, jailer_enabled=True, jailer_bin=str(tmp_path / "jailer"))
    (tmp_path / "state").mkdir()  # its owner (root here) no longer matters
    runner = FakeRunner()
    settings = jailer_settings(cfg, runner, euid=0, cgroups=V2)
    assert settings is not None
    assert (settings.user, settings.uid, settings.gid) == (USER, 990, 985)
    assert settings.cgroups is V2
    assert settings.parent_cgroup == f"banger-{install_tag(tmp_path / 'state')}"
    assert runner.calls == []  # the user exists: nothing to create


def test_jailer_settings_create_a_missing_vmm_user(tmp_path: Path,
                                                   vmm_user: dict[str, VMMUser]) -> None:
    exe(tmp_path / "jailer")
    cfg = config(tmp_path, jailer_enabled=True, jailer_bin=str(tmp_path / "jailer"),
                 vmm_user="fc-vms")
    runner = FakeRunner()

    def useradd(argv: list[str]) -> Result:
        vmm_user[argv[-1]] = VMMUser(argv[-1], 991, 986)
        return Result(argv, 0, b"", b"")

    runner.on(["useradd"], useradd)
    # doctor only reads the host: it says the user will be made, and makes nothing
    st = jailer_status(cfg, euid=0, mounts=v1_mounts(tmp_path))
    assert st.jailed and "as fc-vms (not created yet" in st.detail
    assert runner.calls == []
    settings = jailer_settings(cfg, runner, euid=0, cgroups=V2)
    assert settings is not None and (settings.uid, settings.gid) == (991, 986)
    assert runner.ran("useradd")[0][-2:] == ["--user-group", "fc-vms"]


@pytest.mark.parametrize(("uid", "gid"), [(0, 0), (0, 100), (1000, 0)])
def test_a_root_vmm_user_is_refused_never_used(tmp_path: Path, vmm_user: dict[str, VMMUser],
                                               uid: int, gid: int) -> None:
    vmm_user["banger-vmm"] = VMMUser("banger-vmm", uid, gid)
    exe(tmp_path / "jailer")
    for enabled in (None, True):  # auto mode does not fall back to running unjailed
        cfg = config(tmp_path, jailer_enabled=enabled, jailer_bin=str(tmp_path / "jailer"))
        with pytest.raises(BadRequest, match=rf"is root \(uid {uid}, gid {gid}\)") as exc:
            jailer_settings(cfg, FakeRunner(), euid=0, cgroups=V2)
        assert "unprivileged account" in exc.value.hint
        st = jailer_status(cfg, euid=0, mounts=v1_mounts(tmp_path))
        assert st == JailerStatus(
            False, f"vmm_user 'banger-vmm' is root (uid {uid}, gid {gid}): Firecracker VMs "
                   "will not start", blocks_vms=True, hint=exc.value.hint)


@pytest.mark.skipif(os.geteuid() != 0, reason="the jailer is used only when banger runs as root")
def test_from_config_refuses_a_root_vmm_user(tmp_path: Path,
                                             vmm_user: dict[str, VMMUser]) -> None:
    vmm_user["banger-vmm"] = VMMUser("banger-vmm", 0, 0)
    exe(tmp_path / "jailer")
    fc = exe(tmp_path / "firecracker")
    with pytest.raises(BadRequest, match="is root"):
        FirecrackerDriver.from_config(config(tmp_path, firecracker_bin=fc,
                                             jailer_bin=str(tmp_path / "jailer")),
                                      SubprocessRunner(), cgroups=V2)


def test_no_cgroup_hierarchy_blocks_jailed_vms(tmp_path: Path) -> None:
    exe(tmp_path / "jailer")
    cfg = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup {tmp_path} cgroup rw,memory 0 0\n")
    st = jailer_status(cfg, euid=0, mounts=mounts)
    assert not st.jailed and st.blocks_vms
    assert st.detail.startswith("no cgroup hierarchy offers memory, pids, cpu")
    assert st.detail.endswith(": Firecracker VMs will not start") and st.hint


def test_jailer_required_but_missing_or_unprivileged(tmp_path: Path) -> None:
    cfg = config(tmp_path, jailer_enabled=True, jailer_bin=str(tmp_path / "jailer"))
    with pytest.raises(HostError, match="jailer_enabled = true but the jailer") as exc:
        jailer_settings(cfg, FakeRunner(), euid=0, cgroups=V2)
    assert "jailer_enabled = false" in exc.value.hint
    assert jailer_status(cfg, euid=0) == JailerStatus(
        False, f"jailer_enabled = true but the jailer ({tmp_path / 'jailer'}) is not installed"
               ": Firecracker VMs will not start", blocks_vms=True, hint=exc.value.hint)
    exe(tmp_path / "jailer")
    with pytest.raises(HostError, match="not running as root"):
        jailer_settings(cfg, FakeRunner(), euid=1000, cgroups=V2)
    # from_config surfaces the same refusal.
    fc = exe(tmp_path / "firecracker")
    cfg = config(tmp_path, firecracker_bin=fc, jailer_enabled=True,
                 jailer_bin=str(tmp_path / "missing-jailer"))
    with pytest.raises(HostError, match="is not installed"):
        FirecrackerDriver.from_config(cfg, SubprocessRunner())


def test_jailer_status_texts(tmp_path: Path) -> None:
    assert jailer_status(config(tmp_path, jailer_enabled=False)) == JailerStatus(
        False, "jailer disabled (jailer_enabled = false): Firecracker runs unjailed")
    missing = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    assert jailer_status(missing, euid=0) == JailerStatus(
        False, f"jailer ({tmp_path / 'jailer'}) not found: Firecracker runs unjailed")
    exe(tmp_path / "jailer")
    assert jailer_status(missing, euid=1000) == JailerStatus(
        False, f"jailer {tmp_path / 'jailer'} found, but not running as root: "
               "Firecracker runs unjailed")
    # jailed: the jailer, the user's name and uid:gid, the cgroup version and parent
    tag = install_tag(tmp_path / "state")
    assert jailer_status(missing, euid=0, mounts=v1_mounts(tmp_path)) == JailerStatus(
        True, f"jailer {tmp_path / 'jailer'}: Firecracker runs jailed under "
              f"{tmp_path / 'jails'} as banger-vmm (990:985), in a cgroup v1 under "
              f"banger-{tag} (memory, pids and cpu limits)")


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


def test_jailer_netns_is_refused_until_supported() -> None:
    assert parse_config({}).jailer_netns == ""
    with pytest.raises(BadRequest, match=r"jailer_netns: .*not supported yet") as exc:
        parse_config({"jailer_netns": "/var/run/netns/fc"})
    assert "TAP" in exc.value.message
