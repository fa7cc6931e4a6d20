"""Finding Firecracker and the jailer, version gate, jailer mode, doctor status."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from banger.config import Config, parse_config
from banger.daemon.fcproc import (
    FirecrackerDriver,
    JailerSettings,
    check_version,
    find_binary,
    jail_owner,
    jailer_settings,
    jailer_status,
)
from banger.errors import BadRequest, HostError
from banger.runner import SubprocessRunner
from tests.fakes import FakeRunner, ok


def exe(path: Path, version: str = "Firecracker v1.7.0") -> str:
    path.write_text(f"#!{sys.executable}\nprint({version!r})\n")
    path.chmod(0o755)
    return str(path)


def config(tmp_path: Path, **over: Any) -> Config:
    return parse_config({"state_dir": str(tmp_path / "state"),
                         "jailer_chroot_base": str(tmp_path / "jails"), **over})


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
    settings = JailerSettings("/usr/bin/jailer", tmp_path, 0, 0)
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
    settings = jailer_settings(cfg, euid=euid)
    assert (settings is not None) is jailed
    status, detail = jailer_status(cfg, euid=euid)
    assert status is jailed
    if settings is not None:
        assert settings.binary == str(jailer) and settings.chroot_base == tmp_path / "jails"
        assert detail.startswith(f"jailer {jailer}: Firecracker runs jailed under ")


def test_jailer_required_but_missing_or_unprivileged(tmp_path: Path) -> None:
    cfg = config(tmp_path, jailer_enabled=True, jailer_bin=str(tmp_path / "jailer"))
    with pytest.raises(HostError, match="jailer_enabled = true but the jailer") as exc:
        jailer_settings(cfg, euid=0)
    assert "jailer_enabled = false" in exc.value.hint
    assert jailer_status(cfg, euid=0) == (
        False, f"jailer_enabled = true but the jailer ({tmp_path / 'jailer'}) is not installed"
               ": Firecracker VMs will not start")
    exe(tmp_path / "jailer")
    with pytest.raises(HostError, match="not running as root"):
        jailer_settings(cfg, euid=1000)
    # from_config surfaces the same refusal.
    fc = exe(tmp_path / "firecracker")
    cfg = config(tmp_path, firecracker_bin=fc, jailer_enabled=True,
                 jailer_bin=str(tmp_path / "missing-jailer"))
    with pytest.raises(HostError, match="is not installed"):
        FirecrackerDriver.from_config(cfg, SubprocessRunner())


def test_jailer_status_texts(tmp_path: Path) -> None:
    assert jailer_status(config(tmp_path, jailer_enabled=False)) == (
        False, "jailer disabled (jailer_enabled = false): Firecracker runs unjailed")
    missing = config(tmp_path, jailer_bin=str(tmp_path / "jailer"))
    assert jailer_status(missing, euid=0) == (
        False, f"jailer ({tmp_path / 'jailer'}) not found: Firecracker runs unjailed")
    exe(tmp_path / "jailer")
    assert jailer_status(missing, euid=1000) == (
        False, f"jailer {tmp_path / 'jailer'} found, but not running as root: "
               "Firecracker runs unjailed")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_jail_owner_is_the_state_dirs_owner(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert jail_owner(cfg) == (os.geteuid(), os.getegid())  # not created yet
    cfg.state_dir.mkdir()
    os.chown(cfg.state_dir, 4321, 8765)
    assert jail_owner(cfg) == (4321, 8765)
    (tmp_path / "jailer").write_text("")
    (tmp_path / "jailer").chmod(0o755)
    settings = jailer_settings(config(tmp_path, jailer_enabled=True,
                                      jailer_bin=str(tmp_path / "jailer")), euid=0)
    assert settings is not None and (settings.uid, settings.gid) == (4321, 8765)
