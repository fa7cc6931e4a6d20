"""``banger vm session ...``: long-running guest commands that outlive the client.

A session is named ``VM/NAME`` on the command line. Each command is one call of
``client.sessions`` (:mod:`banger.sdk.sessions`), except ``logs -f`` and ``attach``,
which poll (:mod:`banger.cli.attach`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from banger.cli import attach as attach_mod
from banger.cli import output
from banger.cli.app import App, json_option, pass_app, wire
from banger.cli.complete import session_refs, vm_names

REF = "VM/NAME"


def split_ref(ref: str) -> tuple[str, str]:
    """``VM/NAME`` -> (VM, NAME) (usage error otherwise)."""
    vm, sep, name = ref.partition("/")
    if not sep or not vm or not name or "/" in name:
        raise click.UsageError(f"{ref!r}: name a session as VM/NAME (e.g. web/server)")
    return vm, name


@click.group("session")
def session() -> None:
    """Long-running commands in a VM that outlive the client (and bangerd).

    A session's output goes to log files in the guest and its input is kept open, so
    you can start it, go away, and later read its logs, send it input, attach to it
    or stop it. Sessions of a stopped VM show as ended; a deleted VM takes its
    sessions along.
    """


@session.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("vm", shell_complete=vm_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--name", help="Session name (a DNS label; default: from the command).")
@click.option("--cwd", help="Guest working directory (default: the VM's workspace, else "
                            "/root).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment (repeatable).")
@click.option("--tty", is_flag=True, help="Run on a pseudo-terminal (REPLs, editors, agents "
                                          "that want a terminal); attach passes keys through.")
@json_option
@pass_app
def start(app: App, vm: str, command: tuple[str, ...], name: str | None, cwd: str | None,
          env: tuple[str, ...], tty: bool) -> None:
    """Start COMMAND detached in VM; returns once the guest runs it.

    \b
    banger vm session start web --name server -- python3 -m http.server 8000
    banger vm session start web --tty -- python3
    """
    pairs: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--env {item!r}: use NAME=VALUE")
        pairs[key] = value
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        raise click.UsageError("give the command after --")
    size = os.get_terminal_size(sys.stdout.fileno()) if tty and sys.stdout.isatty() else None
    res = wire(app.client().sessions.start(vm, argv, name=name, cwd=cwd, env=pairs, tty=tty,
                                           rows=size.lines if size else 24,
                                           cols=size.columns if size else 80))
    app.emit(res, _started(res))


def _started(res: dict[str, Any]) -> str:
    if res["state"] == "ended":
        return (f"{res['ref']}: {output.session_status(res)} at once "
                f"(see `banger vm session logs {res['ref']}`)")
    return f"{res['ref']}: running (pid {res['pid']})"


@session.command("list")
@click.argument("vm", required=False, shell_complete=vm_names)
@json_option
@pass_app
def list_(app: App, vm: str | None) -> None:
    """List sessions (of one VM, or of all)."""
    res = wire(app.client().sessions.list(vm))
    app.emit(res, output.sessions_table(res))


@session.command("show")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@json_option
@pass_app
def show(app: App, ref: str) -> None:
    """Show one session: command, state, exit status, attachments."""
    vm, name = split_ref(ref)
    res = wire(app.client().sessions.show(vm, name))
    app.emit(res, output.session_detail(res))


@session.command("logs")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the session ends.")
@click.option("--since", default="0:0", show_default=True, metavar="POSITION",
              help="Start after this position (the `next` value of an earlier "
                   "`logs --json`): print only what is new since then.")
@json_option
@pass_app
def logs(app: App, ref: str, follow: bool, since: str) -> None:
    """Print a session's output (stdout here, stderr on stderr).

    With --json: {"stdout", "stderr", "next", "ended", "exit_code", ...}; pass `next`
    to --since to read only what came after.
    """
    vm, name = split_ref(ref)
    if follow and app.json:
        raise click.UsageError("--follow prints raw output; with --json, poll with --since")
    client = app.client()
    if follow:
        attach_mod.follow_logs(client, vm, name, since)
        return
    out, err, reply = bytearray(), bytearray(), None
    cursor = since
    while reply is None or reply.more:
        reply = client.sessions.logs(vm, name, cursor)
        out += reply.stdout
        err += reply.stderr
        cursor = reply.next
    if app.json:
        app.emit({**wire(reply), "stdout": out.decode(errors="replace"),
                  "stderr": err.decode(errors="replace")}, "")
        return
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(err)


@session.command("attach")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@click.option("--read-only", is_flag=True, help="Only watch; another client may hold the "
                                                "input.")
@pass_app
def attach(app: App, ref: str, read_only: bool) -> None:
    """Follow a session's output live and type into it.

    Several clients may watch; one at a time holds the input (a second gets an error:
    use --read-only). On a terminal, a --tty session gets your keys raw; Ctrl-P Ctrl-Q
    detaches (Ctrl-C otherwise). Exits with the session's status if it ends.
    """
    vm, name = split_ref(ref)
    app.client()  # starts bangerd if needed, warns about config drift once
    sys.exit(attach_mod.attach(lambda: app.client(autostart=False), vm, name,
                               read_only=read_only))


@session.command("send")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@click.argument("text")
@click.option("--no-newline", is_flag=True, help="Do not add a newline.")
@json_option
@pass_app
def send(app: App, ref: str, text: str, no_newline: bool) -> None:
    """Write TEXT and a newline to a session's input."""
    vm, name = split_ref(ref)
    res = app.client().sessions.send(vm, name, text, newline=not no_newline)
    app.emit(res, f"{vm}/{name}: sent {res['sent']} bytes")


@session.command("stop")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, 300), default=10.0,
              show_default=True, help="Seconds between SIGTERM and SIGKILL.")
@json_option
@pass_app
def stop(app: App, ref: str, timeout_s: float) -> None:
    """Stop a session: SIGTERM to its processes, SIGKILL if they outlast --timeout."""
    vm, name = split_ref(ref)
    res = wire(app.client().sessions.stop(vm, name, timeout_s))
    app.emit(res, f"{res['ref']}: {output.session_status(res)}")


@session.command("kill")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True,
              help="Signal name (TERM, INT, HUP, KILL, ...).")
@json_option
@pass_app
def kill(app: App, ref: str, sig: str) -> None:
    """Send a signal to a session's processes."""
    vm, name = split_ref(ref)
    res = wire(app.client().sessions.kill(vm, name, sig))
    app.emit(res, f"{res['ref']}: {output.session_status(res)}")


@session.command("rm")
@click.argument("ref", metavar=REF, shell_complete=session_refs)
@json_option
@pass_app
def rm(app: App, ref: str) -> None:
    """Forget an ended session and delete its logs."""
    vm, name = split_ref(ref)
    res = app.client().sessions.remove(vm, name)
    app.emit(res, f"{vm}/{res['removed']} removed")
