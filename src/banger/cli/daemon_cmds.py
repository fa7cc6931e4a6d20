"""``banger daemon ...``: inspect or control bangerd."""

from __future__ import annotations

from typing import Any

import click

from banger.cli import output
from banger.cli.app import App, json_option, pass_app
from banger.client import start_daemon
from banger.errors import DaemonUnavailable
from banger.layout import Layout
from banger.protocol import PROTOCOL_VERSION


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
        lay = Layout.from_config(app.cfg)
        app.emit({"running": False, "socket": str(lay.socket), "log": str(lay.daemon_log)},
                 f"bangerd is not running (socket {lay.socket}, log {lay.daemon_log})")
        return 3
    app.emit({"running": True, **st}, output.daemon_status(st))
    return 0


@daemon.command("where")
@json_option
@pass_app
def daemon_where(app: App) -> None:
    """Where this machine's daemon listens, and its version (starting it if needed).

    What a `banger --host ssh://...` on another machine asks first, over SSH.
    """
    client = app.client()
    st = client.daemon.status()
    info = {"version": st["version"], "protocol": PROTOCOL_VERSION,
            "socket": str(Layout.from_config(app.cfg).socket)}
    app.emit(info, f"bangerd {info['version']} at {info['socket']}")


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
