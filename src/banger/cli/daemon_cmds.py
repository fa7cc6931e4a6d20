"""``banger daemon ...``: inspect or control bangerd."""

from __future__ import annotations

import os
import pwd
from typing import Any

import click

from banger.cli import output
from banger.cli.app import App, json_option, pass_app
from banger.client import start_daemon
from banger.errors import DaemonUnavailable
from banger.layout import Layout
from banger.protocol import PROTOCOL_VERSION, __version__


@click.group()
def daemon() -> None:
    """Inspect or control bangerd (the CLI starts it on demand)."""


@daemon.command("status")
@json_option
@pass_app
def daemon_status(app: App) -> int:
    """Show pid, socket, log path, version and config of the running daemon.

    `--json` includes the config file's path and the effective values the daemon
    started with (it keeps them until `banger daemon restart`).
    """
    client = app.client(autostart=False)
    try:
        st = client.daemon.status()
    except DaemonUnavailable:
        if app.remote is not None:
            app.emit({"running": False, "host": str(app.remote)},
                     f"bangerd is not running on {app.remote}")
            return 3
        lay = Layout.from_config(app.cfg)
        app.emit({"running": False, "socket": str(lay.socket), "log": str(lay.daemon_log)},
                 f"bangerd is not running (socket {lay.socket}, log {lay.daemon_log})")
        return 3
    app.emit({"running": True, **st}, output.daemon_status(st))
    return 0


@daemon.command("where")
@click.option("--no-start", is_flag=True, help="Do not start it when it is not running.")
@json_option
@pass_app
def daemon_where(app: App, no_start: bool) -> None:
    """Where this machine's daemon listens, its version and user (starting it if needed).

    What a `banger --host ssh://...` on another machine asks first, over SSH.
    """
    app.on_this_machine("`banger daemon where`")
    client = app.client(autostart=not no_start)
    socket = str(Layout.from_config(app.cfg).socket)
    daemon_uid: int | None = None
    try:
        st = client.daemon.status()
        version, running, daemon_uid = st["version"], True, st.get("uid")
    except DaemonUnavailable:
        if not no_start:
            raise
        version, running = __version__, False  # the CLI's: the daemon it would start
    # Who runs the daemon and who asks: a repository sent over SSH is unpacked as the
    # latter, and a daemon that is not root copies only its own user's repositories.
    info = {"version": version, "protocol": PROTOCOL_VERSION, "socket": socket,
            "running": running, "daemon_uid": daemon_uid,
            "daemon_user": _user_name(daemon_uid), "login_uid": os.getuid()}
    app.emit(info, f"bangerd {version} at {socket}" + ("" if running else " (not running)"))


def _user_name(uid: int | None) -> str | None:
    """The account name of ``uid`` (None when it has none, or for None)."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@daemon.command("start")
@pass_app
def daemon_start(app: App) -> None:
    """Start bangerd in the background if it is not running."""
    app.on_this_machine("`banger daemon start`")
    client = app.client(autostart=False)
    if client.daemon.alive():
        click.echo("bangerd is already running")
        return
    pid = start_daemon(app.cfg)
    click.echo(f"bangerd started (pid {pid})")


@daemon.command("stop")
@pass_app
def daemon_stop(app: App) -> None:
    """Stop bangerd; running VMs keep running and are re-adopted at its next start.

    With no VM running (every VM stopped, none being created, started or copied to),
    the daemon also puts the host network back as it found it: the bridge and the
    nftables table `banger` it made and the TAP pool are removed and
    net.ipv4.ip_forward gets its earlier value again.
    """
    status = app.client(autostart=False).daemon.stop()
    if status is None:
        click.echo("bangerd is not running")
    else:
        click.echo(_stopped_line(status))


@daemon.command("restart")
@pass_app
def daemon_restart(app: App) -> None:
    """Stop bangerd and start it again, so that it reads the config file anew.

    Running VMs keep running and are re-adopted by the new daemon.
    """
    app.on_this_machine("`banger daemon restart`")
    status = app.client(autostart=False).daemon.stop()
    if status is not None:
        click.echo(_stopped_line(status))
    pid = start_daemon(app.cfg)
    click.echo(f"bangerd started (pid {pid})")


def _stopped_line(status: dict[str, Any]) -> str:
    """What ``daemon stop`` did, from the daemon's status just before it stopped."""
    if status.get("idle", True):
        return "bangerd stopped"
    running = status.get("vms_running", 0)
    return (f"bangerd stopped; {running} running VM(s) keep running with the bridge and NAT "
            "(re-adopted at the next start)")
