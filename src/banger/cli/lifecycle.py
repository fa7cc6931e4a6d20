"""``banger vm start|stop|restart|delete|kill``: a VM's lifecycle verbs."""

from __future__ import annotations

from typing import Any

import click

from banger.cli import exits, output
from banger.cli.app import App, json_option, pass_app
from banger.errors import BangerError


def _simple(method: str, verb: str) -> Any:
    @click.argument("names", nargs=-1, required=True)
    @json_option
    @pass_app
    def command(app: App, names: tuple[str, ...]) -> int:
        client = app.client()
        results = []
        failed = 0
        for name in names:
            try:
                res = client.call(method, name=name)
            except BangerError as exc:
                if len(names) == 1:
                    raise
                failed += 1
                exits.print_error(exc, app.json)
                continue
            results.append(res)
            if not app.json:
                click.echo(f"{verb} {name}")
        if app.json:
            click.echo(output.to_json(results if len(names) > 1 else results[0]))
        return exits.BANGER_ERROR if failed else 0

    return command


start = click.command("start", help="Boot stopped VMs.")(_simple("vm.start", "started"))
stop = click.command(
    "stop", help="Stop VMs: sync, clean poweroff over SSH, kill after a bounded wait.")(
    _simple("vm.stop", "stopped"))
restart = click.command("restart", help="Stop then start VMs.")(_simple("vm.restart", "restarted"))
delete = click.command(
    "delete", help="Delete VMs: stop them and remove disks, TAP, IP and files.")(
    _simple("vm.delete", "deleted"))
rm = click.command("rm", help="Alias of delete.", hidden=True)(_simple("vm.delete", "deleted"))


@click.command("kill")
@click.argument("name")
@click.option("--signal", "-s", "sig", default="KILL", show_default=True,
              help="Signal for the VMM process (name or number).")
@json_option
@pass_app
def vm_kill(app: App, name: str, sig: str) -> None:
    """Send a signal to a VM's VMM process (default: KILL, no clean shutdown)."""
    res = app.client().call("vm.kill", name=name, signal=sig)
    app.emit(res, f"sent SIG{sig.upper().removeprefix('SIG')} to {name} ({res['state']})")
