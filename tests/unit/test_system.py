"""`banger system ...`: the units (checked by systemd-analyze verify), what install and
uninstall write and refuse, and a CLI that finds the system config and never starts a
daemon of its own for it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger import systemunits as su
from banger.cli import quick
from banger.cli.app import App
from banger.cli.system import install_system, system_status, uninstall_system
from banger.client import connect, start_daemon
from banger.config import config_path, parse_config
from banger.errors import BadRequest, DaemonUnavailable
from banger.runner import Result
from tests.fakes import FakeRunner

VENV_BIN = Path(sys.executable).parent  # where bangerd and banger-helper are installed


def _install(bin_dir: Path = VENV_BIN, owner: str = "nobody") -> su.Install:
    return su.Install(owner=owner, group=owner, config=Path("/etc/banger/config.toml"),
                      bin_dir=bin_dir)


def test_units_are_hardened_and_hold_only_what_each_needs() -> None:
    daemon, helper = su.daemon_unit(_install()), su.helper_unit(_install())
    for unit in (daemon, helper):
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "SystemCallFilter=@system-service", "KillMode=process"):
            assert line in unit.splitlines(), (line, unit)
    assert "User=nobody" in daemon.splitlines() and "User=" not in helper
    assert "ProtectHome=read-only" in daemon and "ProtectHome=yes" in helper
    assert "CapabilityBoundingSet=" in daemon.splitlines()  # none at all
    assert "AmbientCapabilities" not in daemon
    caps = next(line for line in helper.splitlines() if line.startswith("CapabilityBounding"))
    assert set(caps.split("=", 1)[1].split()) == set(su.HELPER_CAPABILITIES)
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in daemon  # no netlink
    assert "AF_NETLINK" in helper  # links and nftables
    assert "ReadWritePaths=/var/lib/banger /var/cache/banger /run/banger" in daemon
    assert f"ExecStart={VENV_BIN}/banger-helper --config /etc/banger/config.toml " \
           "--owner nobody" in helper
    assert "Requires=banger-helper.service" in daemon


def test_a_helper_that_runs_the_jailer_gets_its_jail_base_and_no_more() -> None:
    plain = su.helper_unit(_install())
    jail = su.helper_unit(dataclasses.replace(_install(), jail_base=Path("/srv/jailer")))
    caps = next(line for line in jail.splitlines() if line.startswith("CapabilityBounding"))
    assert set(caps.split("=", 1)[1].split()) == {*su.HELPER_CAPABILITIES,
                                                  *su.JAILER_CAPABILITIES}
    assert "SystemCallFilter=@mount" in jail.splitlines()
    assert "SystemCallFilter=@mount" not in plain and "CAP_MKNOD" not in plain
    rw = next(line for line in jail.splitlines() if line.startswith("ReadWritePaths="))
    assert rw.endswith(" /srv/jailer /run/netns") and "/srv/jailer" not in plain
    # jailer_netns's namespaces are named in /run/netns, made before the sandbox is set up
    assert "ExecStartPre=+/bin/mkdir -p /run/netns" in jail.splitlines()
    assert "/run/netns" not in plain


@pytest.mark.skipif(shutil.which("systemd-analyze") is None
                    or not (VENV_BIN / "bangerd").exists(),
                    reason="needs systemd-analyze (package systemd) and bangerd beside python")
@pytest.mark.parametrize("jail_base", [None, Path("/srv/jailer")])
def test_systemd_analyze_verifies_both_units(tmp_path: Path, jail_base: Path | None) -> None:
    # (systemd warns about the shared "nobody" account: a real owner is a user of its own)
    alice = dataclasses.replace(_install(owner="alice"), jail_base=jail_base)
    for name, text in ((su.DAEMON_UNIT, su.daemon_unit(alice)),
                       (su.HELPER_UNIT, su.helper_unit(alice))):
        (tmp_path / name).write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / su.DAEMON_UNIT),
                          str(tmp_path / su.HELPER_UNIT)], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr  # not even a warning


@pytest.fixture
def runnable() -> Iterator[Path]:
    """A directory nobody can reach with stand-ins for banger's programs."""
    d = Path(tempfile.mkdtemp(prefix="banger-system-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    for name in ("bangerd", "banger-helper", "python3"):
        (d / name).write_text("#!/bin/sh\n")
        os.chmod(d / name, 0o755)
    yield d
    shutil.rmtree(d)


def _programs(d: Path) -> list[Path]:
    return [d / "bangerd", d / "banger-helper", d / "python3"]


def test_a_staged_install_writes_the_config_and_units(tmp_path: Path, runnable: Path) -> None:
    runner = FakeRunner()
    out = install_system("nobody", root=tmp_path, runner=runner, start=True,
                         bin_dir=runnable, python=runnable / "python3",
                         programs=_programs(runnable))
    config = tmp_path / "etc/banger/config.toml"
    cfg = parse_config(__import__("tomllib").loads(config.read_text()))
    assert cfg.helper_socket == su.HELPER_SOCKET and cfg.state_dir == su.SYSTEM_STATE
    assert (tmp_path / "etc/systemd/system/bangerd.service").read_text() == su.daemon_unit(
        su.Install(owner="nobody", group="nogroup", config=Path("/etc/banger/config.toml"),
                   bin_dir=runnable))
    assert (tmp_path / "etc/systemd/system/banger-helper.service").exists()
    assert runner.calls == []  # staged: no useradd, no systemctl
    assert any("wrote" in line for line in out)
    # a second install keeps the config it finds
    out = install_system("nobody", root=tmp_path, runner=runner, start=True,
                         bin_dir=runnable, python=runnable / "python3",
                         programs=_programs(runnable))
    assert f"kept {config}" in out


def test_install_refuses_root_an_unknown_owner_and_a_config_without_a_helper(
        tmp_path: Path, runnable: Path) -> None:
    kw = {"root": tmp_path, "runner": FakeRunner(), "start": False, "bin_dir": runnable,
          "python": runnable / "python3", "programs": _programs(runnable)}
    with pytest.raises(BadRequest, match="must not be root"):
        install_system("root", **kw)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="no user"):
        install_system("no-such-user-here", **kw)  # type: ignore[arg-type]
    config = tmp_path / "etc/banger/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('state_dir = "/srv/banger"\n')
    with pytest.raises(BadRequest, match="helper_socket") as exc:
        install_system("nobody", **kw)  # type: ignore[arg-type]
    assert "add that line" in exc.value.hint


def test_install_refuses_an_owner_who_cannot_run_banger(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    prog = hidden / "bangerd"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    with pytest.raises(BadRequest, match="nobody cannot run") as exc:
        install_system("nobody", root=tmp_path / "root", runner=FakeRunner(), start=False,
                       bin_dir=hidden, python=prog, programs=[prog])
    assert "venv under /opt" in exc.value.hint
    assert su.runnable_by(prog, os.getuid(), {os.getgid()}) is None
    not_exec = tmp_path / "plain"
    not_exec.write_text("")
    not_exec.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert su.runnable_by(not_exec, 65534, {65534}) is not None


def test_uninstall_moves_the_config_aside_and_purge_keeps_vms(tmp_path: Path,
                                                              runnable: Path) -> None:
    install_system("nobody", root=tmp_path, runner=FakeRunner(), start=False,
                   bin_dir=runnable, python=runnable / "python3", programs=_programs(runnable))
    out = uninstall_system(purge=False, root=tmp_path, runner=FakeRunner())
    assert not (tmp_path / "etc/systemd/system/bangerd.service").exists()
    assert (tmp_path / "etc/banger/config.toml.uninstalled").exists()
    assert any("moved" in line for line in out)
    # --purge refuses while VMs have disks
    state = tmp_path / "state"
    (state / "vms" / "0123456789ab").mkdir(parents=True)
    config = tmp_path / "etc/banger/config.toml"
    config.write_text(su.system_config(state_dir=state, cache_dir=tmp_path / "cache"))
    with pytest.raises(BadRequest, match="VMs still exist"):
        uninstall_system(purge=True, root=tmp_path, runner=FakeRunner())
    assert config.exists()
    shutil.rmtree(state / "vms")
    uninstall_system(purge=True, root=tmp_path, runner=FakeRunner())
    assert not config.exists()


def test_the_cli_finds_the_system_config_and_never_starts_its_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    system = tmp_path / "etc-banger.toml"
    run = tmp_path / "r"
    system.write_text(f'runtime_dir = "{run}"\nstate_dir = "{tmp_path / "s"}"\n'
                      f'helper_socket = "{su.HELPER_SOCKET}"\n')
    env = {"HOME": str(home)}
    assert config_path(env, system=system) == system
    own = home / ".config/banger/config.toml"
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert config_path(env, system=system) == own  # the user's own file wins
    assert config_path({**env, "BANGER_CONFIG": "/x.toml"}, system=system) == Path("/x.toml")
    own.unlink()
    # vm exec's fast path reads the same file
    monkeypatch.setattr(quick, "SYSTEM_CONFIG", str(system))
    found = quick.config_of(env)
    assert found is not None and found[0] == str(run)

    cfg = parse_config({"runtime_dir": str(run), "state_dir": str(tmp_path / "s"),
                        "helper_socket": str(su.HELPER_SOCKET)})
    with pytest.raises(DaemonUnavailable) as exc:
        connect(cfg)
    assert "banger system status" in exc.value.hint
    with pytest.raises(DaemonUnavailable, match="system service"):
        start_daemon(cfg)
    assert not (tmp_path / "s").exists()  # nothing was started or made


def test_status_reports_units_and_a_silent_daemon(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'runtime_dir = "{tmp_path / "r"}"\nstate_dir = "{tmp_path / "s"}"\n'
                      f'helper_socket = "{su.HELPER_SOCKET}"\n')
    runner = FakeRunner()
    runner.on(["systemctl", "is-enabled"], lambda argv: Result(argv, 0, b"enabled\n", b""))
    runner.on(["systemctl", "is-active"], lambda argv: Result(argv, 3, b"failed\n", b""))
    st = system_status(runner, App(config, debug=False))
    assert st["units"] == {u: {"enabled": "enabled", "active": "failed"}
                           for u in (su.HELPER_UNIT, su.DAEMON_UNIT)}
    assert st["daemon"] is None
