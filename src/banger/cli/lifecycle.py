"""``banger vm start|stop|restart|delete|kill|pause|resume|suspend``: a VM's lifecycle
verbs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from banger.cli import exits, output
from banger.cli.app import App, follow, json_option, pass_app, wire
from banger.cli.complete import vm_names
from banger.errors import BangerError, Cancelled
from banger.sdk import Client
from banger.sdk.vms import VMs


def _each(verb: str, act: Callable[[App, Client, str], Any]) -> Any:
    """A command acting on each named VM in turn: ``act`` per name, then one line per VM
    (or one JSON value, a list for several names). With several names a failure is
    reported and the next VM still gets its turn; the exit status says one failed."""
    @click.argument("names", nargs=-1, required=True, shell_complete=vm_names)
    @json_option
    @pass_app
    def command(app: App, names: tuple[str, ...]) -> int:
        client = app.client()
        results = []
        failed = 0
        for name in names:
            try:
                res = act(app, client, name)
            except Cancelled:
                raise  # Ctrl-C cancels the whole command, not one VM of it
            except BangerError as exc:
                if len(names) == 1:
                    raise
                failed += 1
                exits.print_error(exc, app.json)
                continue
            results.append(wire(res))
            if not app.json:
                click.echo(f"{verb} {name}")
        if app.json:
            click.echo(output.to_json(results if len(names) > 1 else results[0]))
        return exits.BANGER_ERROR if failed else 0

    return command


def _simple(verb: str, method: Callable[[VMs, str], Any]) -> Any:
    """``method`` of ``client.vms`` per VM, no progress (fast verbs)."""
    return _each(verb, lambda _app, client, name: method(client.vms, name))


def _followed(verb: str, method: Callable[..., Any]) -> Any:
    """``method`` of ``client.vms`` per VM, an operation whose stages show on stderr as it
    runs (like ``vm create``)."""
    def act(app: App, client: Client, name: str) -> Any:
        return follow(app, method, client.vms, name)

    return _each(verb, act)


start = click.command(
    "start", help="Boot stopped VMs (resume suspended ones where they were), one after the "
                  "other, showing each boot's stages.")(
    _followed("started", VMs.start))
stop = click.command(
    "stop", help="Stop VMs: sync, clean poweroff over SSH, kill after a bounded wait "
                 "(stages shown; once under way a stop is not cancelled).")(
    _followed("stopped", VMs.stop))
restart = click.command(
    "restart", help="Stop then start VMs, showing the stages of both.")(
    _followed("restarted", VMs.restart))
delete = click.command(
    "delete", help="Delete VMs: stop them and remove disks, TAP, IP and files.")(
    _simple("deleted", VMs.delete))
rm = click.command("rm", help="Alias of delete.", hidden=True)(_simple("deleted", VMs.delete))
pause = click.command(
    "pause", help="Stop running VMs' vCPUs where they are (memory stays in RAM); "
                  "`vm resume` runs them again.")(
    _simple("paused", VMs.pause))
resume = click.command(
    "resume", help="Run paused VMs' vCPUs again (a suspended VM resumes with `vm start`).")(
    _simple("resumed", VMs.resume))
suspend = click.command(
    "suspend", help="Save running or paused VMs' memory and device state to disk and end "
                    "their VMMs, freeing their memory; `vm start` resumes each where it "
                    "was, processes and all.")(
    _followed("suspended", VMs.suspend))


@click.command("kill")
@click.argument("name", shell_complete=vm_names)
@click.option("--signal", "-s", "sig", default="KILL", show_default=True,
              help="Signal for the VMM process (name or number).")
@json_option
@pass_app
def vm_kill(app: App, name: str, sig: str) -> None:
    """Send a signal to a VM's VMM process (default: KILL, no clean shutdown)."""
    res = wire(app.client().vms.kill(name, sig))
    app.emit(res, f"sent SIG{sig.upper().removeprefix('SIG')} to {name} ({res['state']})")
