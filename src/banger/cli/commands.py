"""``banger``'s commands (click). Each command parses flags and makes one call of
the SDK (:mod:`banger.sdk`).

Errors from anywhere are printed once, as ``error: ...`` plus a ``hint:``
line, in :func:`main`, which is also the one place that turns them into exit
codes (see :mod:`banger.cli.exits`). The commands live in one module per group:
:mod:`~banger.cli.vm`, :mod:`~banger.cli.lifecycle`, :mod:`~banger.cli.workspace`,
:mod:`~banger.cli.images`, :mod:`~banger.cli.kernels`, :mod:`~banger.cli.snapshot` and
:mod:`~banger.cli.daemon_cmds`.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from banger.cli import (
    complete,
    context,
    daemon_cmds,
    exits,
    images,
    kernels,
    lifecycle,
    output,
    session,
    snapshot,
    vm,
    workspace,
)
from banger.cli.app import App, json_option, pass_app
from banger.errors import BangerError, Cancelled
from banger.protocol import __version__


class LazyGroup(click.Group):
    """A group whose commands in ``lazy`` (name -> a function that imports and returns
    the command) are imported when a command line names them (or help lists them), not
    at start.

    ``system`` is one: installing banger as a service needs the root helper's policy,
    its host operations and the unit files, whose import took about a fifth of every
    other command's start-up.
    """

    def __init__(self, *args: object, lazy: dict[str, Callable[[], click.Command]],
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, the lazy ones too (help, completion)."""
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command called ``cmd_name``, a lazy one imported now."""
        load = self.lazy.get(cmd_name)
        return super().get_command(ctx, cmd_name) if load is None else load()


def _system() -> click.Command:
    """``banger system``: imported here, when named (see :class:`LazyGroup`)."""
    from banger.cli.system import system

    return system


@click.group(cls=LazyGroup, lazy={"system": _system},
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Config file (default: $BANGER_CONFIG or ~/.config/banger/config.toml).")
@click.option("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.option("--host", metavar="ssh://[USER@]HOST[:PORT]",
              help="Talk to the bangerd on HOST over SSH (default: $BANGER_HOST, else the "
                   "current `banger context`, else this machine's).")
@click.version_option(__version__, prog_name="banger")
@click.pass_context
def cli(ctx: click.Context, config_file: Path | None, debug: bool, host: str | None) -> None:
    """One-command development sandboxes on microVMs.

    \b
    banger vm run -- uname -a          boot a VM, run a command, keep the VM
    banger vm run --rm -- make test    ... and delete the VM afterwards
    banger vm ssh NAME                 a shell in a running VM
    banger doctor                      check this host
    """
    ctx.obj = App(config_file, debug, host=host)




@cli.command()
@json_option
@pass_app
def doctor(app: App) -> int:
    """Check this host for what banger needs (no daemon required); with a remote host,
    that host's checks."""
    if app.remote is not None:
        return app.link(daemon=False).run(["doctor", *(["--json"] if app.json else [])],
                                          tty=False)
    from banger.daemon import doctor as run_doctor

    checks = [c.to_json() for c in run_doctor(app.cfg)]
    app.emit(checks, output.doctor_table(checks))
    return exits.DOCTOR_FAIL if any(c["status"] == "FAIL" for c in checks) else 0


@cli.command()
@click.argument("shell", type=click.Choice(complete.SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL: commands, options, and the names of VMs,
    images, kernels, snapshots and sessions from the running daemon (never started by a
    TAB; with none running, names complete to nothing).

    \b
    bash:  eval "$(banger completion bash)"     in ~/.bashrc
    zsh:   eval "$(banger completion zsh)"      in ~/.zshrc
    fish:  banger completion fish > ~/.config/fish/completions/banger.fish
    """
    click.echo(complete.script(cli, shell))


cli.add_command(daemon_cmds.daemon)
cli.add_command(context.context)
cli.add_command(images.image)
cli.add_command(kernels.kernel)
cli.add_command(vm.vm)
cli.add_command(snapshot.snapshot)
for _cmd in (lifecycle.start, lifecycle.stop, lifecycle.restart, lifecycle.delete, lifecycle.rm,
             lifecycle.vm_kill, lifecycle.pause, lifecycle.resume, lifecycle.suspend):
    vm.vm.add_command(_cmd)
vm.vm.add_command(workspace.vm_workspace)
vm.vm.add_command(session.session)
vm.vm.add_command(snapshot.vm_snapshot)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``banger`` console script."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    json_mode = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="banger", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(exits.INTERRUPTED)
    except KeyboardInterrupt:
        sys.exit(exits.INTERRUPTED)
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "banger"
        exits.print_usage_error(exc.format_message(), path, json_mode)
        sys.exit(exits.USAGE)
    except click.ClickException as exc:
        exits.print_error(BangerError(exc.format_message()), json_mode)
        sys.exit(exc.exit_code)
    except Cancelled as exc:
        exits.print_error(exc, json_mode)
        sys.exit(exits.INTERRUPTED)
    except BangerError as exc:
        exits.print_error(exc, json_mode)
        sys.exit(exits.code_for(exc))
    except Exception as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal error: {exc}", err=True)
        click.echo("hint: this is a bug in banger; rerun with --debug for a traceback", err=True)
        sys.exit(exits.BANGER_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)
