"""``banger system ...``: banger as a system service (bangerd as its owner, a root helper).

``install`` writes ``/etc/banger/config.toml`` (unless there is one), makes the VMM
user and banger's directories (the owner's), writes ``bangerd.service`` and
``banger-helper.service`` (:mod:`banger.systemunits`) and enables and starts them.
After that every ``banger`` command finds the system config and talks to that
daemon; none starts a daemon of its own. ``status``, ``restart`` and ``uninstall``
(``--purge`` for banger's data too) manage it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

import banger
from banger import systemunits as su
from banger.cli.app import App, json_option, pass_app
from banger.client import Client
from banger.config import SYSTEM_CONFIG, load_config
from banger.errors import BadRequest, DaemonUnavailable
from banger.hostops import userns
from banger.hostops.policy import Policy
from banger.layout import Layout
from banger.runner import Runner, SubprocessRunner
from banger.vmmuser import ensure_user

START_WAIT_S = 30.0
UNITS = (su.HELPER_UNIT, su.DAEMON_UNIT)  # start order


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BadRequest(f"`banger system {what}` must run as root",
                         hint=f"sudo banger system {what} ...")


def _systemctl(runner: Runner, *args: str, check: bool = True) -> str:
    return runner.run(["systemctl", *args], desc=f"systemctl {' '.join(args)}",
                      timeout=120, check=check).out


@click.group()
@pass_app
def system(app: App) -> None:
    """Run banger as a system service: the daemon as its owner, a root helper."""
    app.on_this_machine("`banger system`")


@system.command("install")
@click.option("--owner", required=True,
              help="The user bangerd runs as (its files, VMs and SSH key are theirs).")
@click.option("--root", "root", type=click.Path(path_type=Path), default=Path("/"),
              show_default=True,
              help="Write the units and config below this directory instead (packaging); "
                   "nothing is started.")
@click.option("--no-start", is_flag=True, help="Enable the units but do not start them.")
def install(owner: str, root: Path, no_start: bool) -> None:
    """Install bangerd.service (as OWNER) and banger-helper.service (root), and start them."""
    staged = root != Path("/")
    if not staged:
        _require_root("install")
    lines = install_system(owner, root=root, runner=SubprocessRunner(),
                           start=not (staged or no_start), bin_dir=Path(sys.executable).parent,
                           python=Path(sys.executable))
    for line in lines:
        click.echo(line)


def install_system(owner: str, *, root: Path, runner: Runner, start: bool, bin_dir: Path,
                   python: Path, programs: list[Path] | None = None) -> list[str]:
    """Everything ``system install`` does; returns the lines it prints.

    With ``root`` other than ``/`` only files are written (no user, no chown, no
    systemctl): a package build or a test. ``programs`` are what the owner must be able
    to run (default: the two programs in ``bin_dir``, ``python`` and banger's package).

    Raises:
        BadRequest: the owner is root or unknown, cannot run banger from where it is
            installed, or the existing system config has no helper socket.
    """
    try:
        pw = pwd.getpwnam(owner)
    except KeyError as exc:
        raise BadRequest(f"no user {owner!r}", hint="create it, or name another") from exc
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise BadRequest("the owner must not be root: the point is a daemon without root",
                         hint="name the user who will use banger")
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if owner in g.gr_mem)}
    if programs is None:
        programs = [bin_dir / "bangerd", bin_dir / "banger-helper", python,
                    Path(banger.__file__).parent]
    su.check_runnable(programs, owner, pw.pw_uid, gids)
    staged = root != Path("/")
    config = root / SYSTEM_CONFIG.relative_to("/")
    out = []
    if config.exists():
        cfg = load_config(config)
        if cfg.helper_socket != su.HELPER_SOCKET:
            raise BadRequest(f"{config} exists without helper_socket = \"{su.HELPER_SOCKET}\"",
                             hint="add that line (the daemon then asks the helper for what "
                                  "needs root), or move the file away")
        out.append(f"kept {config}")
    else:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(su.system_config())
        config.chmod(0o644)
        cfg = load_config(config)
        out.append(f"wrote {config}")
    if cfg.runtime_dir.parent != Path("/run"):
        raise BadRequest(f"runtime_dir {cfg.runtime_dir} is not directly under /run",
                         hint="a system install keeps sockets in /run/<name>")
    jailed = Policy.from_config(cfg).runs_firecracker  # what the helper will find
    i = su.Install(owner=owner, group=grp.getgrgid(pw.pw_gid).gr_name, config=SYSTEM_CONFIG,
                   bin_dir=bin_dir, state_dir=cfg.state_dir, cache_dir=cfg.cache_dir,
                   runtime_dir=cfg.runtime_dir,
                   jail_base=cfg.jailer_chroot_base if jailed else None)
    units = root / su.UNIT_DIR
    units.mkdir(parents=True, exist_ok=True)
    for name, text in ((su.DAEMON_UNIT, su.daemon_unit(i)), (su.HELPER_UNIT, su.helper_unit(i))):
        (units / name).write_text(text)
        out.append(f"wrote {units / name}")
    if staged:
        return out
    _refuse_a_running_daemon(cfg.runtime_dir)
    vmm = ensure_user(runner, cfg.vmm_user)
    out.append(f"VMM user: {vmm.describe()}")
    if i.jail_base is not None:  # the helper's unit may write only there: it must exist
        i.jail_base.mkdir(parents=True, exist_ok=True)
        out.append(f"Firecracker's jails: {i.jail_base}")
    uids, gids_range = userns.reserve(owner, pw.pw_uid)
    out.append(f"{owner}'s image builds use subordinate uids {uids.start}+{uids.count} and "
               f"gids {gids_range.start}+{gids_range.count} ({userns.SUBUID}, "
               f"{userns.SUBGID})")
    for d in (cfg.state_dir, cfg.cache_dir, cfg.runtime_dir):
        d.mkdir(parents=True, exist_ok=True)
        _chown_tree(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o700)
    out.append(f"{cfg.state_dir}, {cfg.cache_dir} and {cfg.runtime_dir} belong to {owner}")
    _systemctl(runner, "daemon-reload")
    _systemctl(runner, "enable", *UNITS)
    if start:
        _systemctl(runner, "restart", *UNITS)
        _wait_answering(Layout.from_config(cfg).socket)
        out.append(f"started {' and '.join(UNITS)}; `banger system status` shows them")
    else:
        out.append(f"enabled {' and '.join(UNITS)} (not started)")
    return out


def _refuse_a_running_daemon(runtime_dir: Path) -> None:
    sock = runtime_dir / "bangerd.sock"
    if sock.exists() and Client(sock).alive():
        raise BadRequest("a bangerd is running on this config's socket",
                         hint="stop it first (`banger daemon stop`; VMs keep running and "
                              "the system daemon re-adopts them)")


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """Hand ``top`` and everything in it to the owner (a root daemon made them before),
    keeping each file's group when it is not root's (the VMM user's on VM disks)."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            os.chown(p, uid, gid if st.st_gid == 0 else -1, follow_symlinks=False)


def _wait_answering(socket: Path) -> None:
    deadline = time.monotonic() + START_WAIT_S
    client = Client(socket)
    while not client.alive():
        if time.monotonic() > deadline:
            raise DaemonUnavailable(f"bangerd.service did not answer on {socket} within "
                                    f"{START_WAIT_S:.0f}s",
                                    hint="journalctl -u bangerd.service -u banger-helper.service")
        time.sleep(0.2)


@system.command("status")
@json_option
@pass_app
def status(app: App) -> int:
    """Show whether the units are enabled and running, and the daemon's own status."""
    st = system_status(SubprocessRunner(), app)
    lines = [f"{u}: {st['units'][u]['enabled']}, {st['units'][u]['active']}" for u in UNITS]
    daemon = st["daemon"]
    lines.append(f"bangerd: pid {daemon['pid']}, version {daemon['version']}" if daemon
                 else "bangerd: not answering")
    app.emit(st, "\n".join(lines))
    return 0 if daemon and all(st["units"][u]["active"] == "active" for u in UNITS) else 3


def system_status(runner: Runner, app: App) -> dict[str, Any]:
    """The units' state (``systemctl is-enabled/is-active``) and ``daemon.status``."""
    units = {u: {"enabled": _systemctl(runner, "is-enabled", u, check=False).strip()
                 or "unknown",
                 "active": _systemctl(runner, "is-active", u, check=False).strip()
                 or "unknown"} for u in UNITS}
    try:
        daemon: dict[str, Any] | None = app.client(autostart=False).daemon.status()
    except DaemonUnavailable:
        daemon = None
    return {"units": units, "daemon": daemon}


@system.command("restart")
def restart() -> None:
    """Restart the helper and the daemon (running VMs keep running)."""
    _require_root("restart")
    _systemctl(SubprocessRunner(), "restart", *UNITS)
    click.echo(f"restarted {' and '.join(UNITS)}")


@system.command("uninstall")
@click.option("--purge", is_flag=True,
              help="Also delete banger's state (images, VMs' disks), cache and config.")
@click.option("--root", "root", type=click.Path(path_type=Path), default=Path("/"),
              show_default=True, help="Remove the files below this directory instead.")
def uninstall(purge: bool, root: Path) -> None:
    """Stop and remove the units; the config is moved aside unless --purge deletes it."""
    if root == Path("/"):
        _require_root("uninstall")
    for line in uninstall_system(purge=purge, root=root, runner=SubprocessRunner()):
        click.echo(line)


def uninstall_system(*, purge: bool, root: Path, runner: Runner) -> list[str]:
    """Everything ``system uninstall`` does; returns the lines it prints.

    Raises:
        BadRequest: ``--purge`` while VMs exist (their disks would go with it).
    """
    config = root / SYSTEM_CONFIG.relative_to("/")
    cfg = load_config(config) if config.exists() else None
    out = []
    if purge and cfg is not None:
        vms = Layout.from_config(cfg).vms_dir
        if vms.is_dir() and any(vms.iterdir()):
            raise BadRequest(f"VMs still exist in {vms}: --purge would delete their disks",
                             hint="delete them first (`banger vm delete NAME`), or "
                                  "uninstall without --purge")
    if root == Path("/"):
        _systemctl(runner, "disable", "--now", *reversed(UNITS), check=False)
    for name in UNITS:
        unit = root / su.UNIT_DIR / name
        if unit.exists():
            unit.unlink()
            out.append(f"removed {unit}")
    if root == Path("/"):
        _systemctl(runner, "daemon-reload", check=False)
    if cfg is None:
        return out
    if purge:
        for d in (cfg.state_dir, cfg.cache_dir):
            if root == Path("/"):
                shutil.rmtree(d, ignore_errors=True)
                out.append(f"deleted {d}")
        config.unlink()
        out.append(f"deleted {config}")
    else:
        aside = config.with_name(config.name + ".uninstalled")
        config.rename(aside)
        out.append(f"moved {config} to {aside} (the CLI no longer finds it); "
                   f"{cfg.state_dir} is kept")
    return out

