"""``banger daemon ...``: inspect or control bangerd."""

from __future__ import annotations

import time
from pathlib import Path

import click

from banger.cli import output
from banger.cli.app import App, json_option, pass_app
from banger.client import start_daemon
from banger.errors import DaemonUnavailable
from banger.layout import Layout


@click.group()
def daemon() -> None:
    """Inspect or control bangerd (the CLI starts it on demand)."""


@daemon.command("status")
@json_option
@pass_app
def daemon_status(app: App) -> int:
    """Show pid, socket, log path and version of the running daemon."""
    client = app.client(autostart=False)
    try:
        st = client.call("daemon.status")
    except DaemonUnavailable:
        lay = Layout.from_config(app.cfg)
        app.emit({"running": False, "socket": str(lay.socket), "log": str(lay.daemon_log)},
                 f"bangerd is not running (socket {lay.socket}, log {lay.daemon_log})")
        return 3
    app.emit({"running": True, **st}, output.daemon_status(st))
    return 0


@daemon.command("start")
@pass_app
def daemon_start(app: App) -> None:
    """Start bangerd in the background if it is not running."""
    client = app.client(autostart=False)
    if client.alive():
        click.echo("bangerd is already running")
        return
    pid = start_daemon(app.cfg)
    click.echo(f"bangerd started (pid {pid})")


@daemon.command("stop")
@pass_app
def daemon_stop(app: App) -> None:
    """Stop bangerd. Running VMs keep running and are re-adopted on its next start."""
    client = app.client(autostart=False)
    try:
        st = client.call("daemon.status")
        client.call("daemon.stop")
    except DaemonUnavailable:
        click.echo("bangerd is not running")
        return
    deadline = time.monotonic() + 15  # it finishes the request in flight, then exits
    while time.monotonic() < deadline and Path(f"/proc/{st['pid']}").exists():
        time.sleep(0.05)
    click.echo("bangerd stopped")
