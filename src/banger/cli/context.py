"""``banger context ...``: named remote hosts, and which one commands talk to."""

from __future__ import annotations

from collections.abc import Callable

import click

from banger.cli.app import App, json_option, pass_app
from banger.contexts import LOCAL, Contexts, chosen_host


@click.group()
def context() -> None:
    """Remote hosts by name: `context use NAME` makes every command talk to its daemon.

    \b
    banger context add box ssh://dev@box.example.com   store a host
    banger context use box                              talk to it from now on
    banger context use local                            back to this machine
    """


def _change(apply: Callable[[Contexts], object], said: Callable[[Contexts], str]) -> None:
    """Load the contexts, ``apply`` a change, save them, print what ``said`` says."""
    ctx = Contexts.load()
    apply(ctx)
    ctx.save()
    click.echo(said(ctx))


@context.command("add")
@click.argument("name")
@click.argument("url", metavar="ssh://[USER@]HOST[:PORT]")
def context_add(name: str, url: str) -> None:
    """Store NAME for the bangerd reached at URL (the system ssh, your keys and config)."""
    _change(lambda ctx: ctx.add(name, url),
            lambda ctx: f"context {name}: {ctx.hosts[name]} "
                        f"(`banger context use {name}` to talk to it)")


@context.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context (`local`: this machine's daemon)."""
    _change(lambda ctx: ctx.use(name), lambda _ctx: f"now using {name}")


@context.command("rm")
@click.argument("name")
def context_rm(name: str) -> None:
    """Forget context NAME (when it was current, `local` is)."""
    _change(lambda ctx: ctx.remove(name), lambda _ctx: f"removed context {name}")


@context.command("ls")
@json_option
@pass_app
def context_ls(app: App) -> None:
    """The contexts; `*` marks the one commands talk to (after --host and $BANGER_HOST)."""
    ctx = Contexts.load()
    chosen = app.remote
    rows = [{"name": LOCAL, "host": "", "current": chosen is None}]
    rows += [{"name": n, "host": h, "current": chosen is not None and str(chosen) == h
              and (ctx.current == n or app.host is not None)}
             for n, h in sorted(ctx.hosts.items())]
    lines = [f"{'*' if r['current'] else ' '} {r['name']:<20} {r['host'] or 'this machine'}"
             for r in rows]
    if chosen is not None and not any(r["current"] for r in rows):
        lines.append(f"* (--host or $BANGER_HOST) {chosen}")
    app.emit(rows, "\n".join(lines))


__all__ = ["chosen_host", "context"]
