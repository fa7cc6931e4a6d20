"""``banger vm ...``: create, run, inspect and reach VMs.

The lifecycle verbs (start, stop, ...) live in :mod:`banger.cli.lifecycle` and
the workspace commands in :mod:`banger.cli.workspace`; both are added to the
``vm`` group by :mod:`banger.cli`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from banger.api import OpView
from banger.api.methods import invalid_params
from banger.api.params import CreateParams
from banger.cli import exits, output
from banger.cli.app import App, follow, json_option, name_arg, pass_app, wire
from banger.cli.complete import image_names, snapshot_names, vm_names
from banger.cli.quick import run_in_guest
from banger.cli.workspace import prepare_from, prepared_text, resync_source
from banger.errors import BangerError
from banger.sdk import Client

ALLOW_OUT_HELP = (
    "Repeatable. The guest reaches only these: IPv4 addresses or networks, domains "
    "(example.com) or every name below one (*.example.com); everything else is denied. "
    "Domains resolve through banger's DNS server, which opens the addresses it answers "
    "for their TTL. Implies --nat; private addresses in answers need --allow-private.")


@click.group()
def vm() -> None:
    """Create, run and manage VMs."""


def create_options(f: Any) -> Any:
    """Add the VM creation flags (name, image, sizes, VMM, network) to command ``f``.

    Shared by ``vm create`` and ``vm run``; see :func:`_create_params`.
    """
    opts = [
        click.option("--name", callback=name_arg, help="VM name (a DNS label; generated if "
                                                        "omitted)."),
        click.option("--image", shell_complete=image_names,
                     help="Image name (default: config default_image_name)."),
        click.option("--vcpu", type=click.IntRange(1, 64), help="Virtual CPUs."),
        click.option("--memory", "memory", type=click.IntRange(128, 262144),
                     help="Memory in MiB."),
        click.option("--disk-size", help="Root disk size, e.g. 8G."),
        click.option("--work-disk-size", help="Work disk (/root) size, e.g. 4G."),
        click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]),
                     default="auto", show_default=True, help="VMM for this VM."),
        click.option("--nat/--no-nat", default=None,
                     help="Let the guest reach the outside world through NAT (default: "
                          "config nat, false unless set). Without it the guest reaches "
                          "only banger's DNS server."),
        click.option("--allow-private", is_flag=True,
                     help="With --nat, also reach private and special ranges (10/8, "
                          "172.16/12, 192.168/16, 100.64/10, 169.254/16, 127/8): the "
                          "host's LAN and cloud metadata services."),
        click.option("--allow-out", "allow_out", multiple=True, metavar="CIDR|DOMAIN",
                     help=ALLOW_OUT_HELP),
        click.option("--from-snapshot", "from_snapshot", metavar="SNAPSHOT",
                     shell_complete=snapshot_names,
                     help="Restore a clone of a snapshot (`banger vm snapshot`) instead of "
                          "booting: its image, VMM and size, with its own address, name, "
                          "host key and machine-id."),
        click.option("--cold", is_flag=True,
                     help="Boot, even where the image's boot snapshot could be restored "
                          "(config boot_snapshots), and keep no boot snapshot."),
        click.option("-p", "--publish", "forwards", multiple=True,
                     metavar="[ADDR:]HOST_PORT:GUEST_PORT",
                     help="Forward a host port to the guest while the VM runs (127.0.0.1 "
                          "unless ADDR is given; repeatable). See `vm forward`."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _create_params(kw: dict[str, Any], start: bool) -> CreateParams:
    """The create options (``create_options``) as the request's model: a flag's value
    that does not fit is refused here, naming the field."""
    try:
        return CreateParams(
            name=kw["name"], image=kw["image"], vcpu=kw["vcpu"], memory_mib=kw["memory"],
            disk_size=kw["disk_size"], work_disk_size=kw["work_disk_size"], vmm=kw["vmm"],
            start=start, nat=kw["nat"], allow_private=kw["allow_private"],
            allow_out=list(kw["allow_out"]), forwards=list(kw["forwards"]),
            from_snapshot=kw["from_snapshot"], cold=kw["cold"])
    except ValidationError as exc:
        raise invalid_params("vm.create", exc) from exc


@vm.command("create")
@create_options
@click.option("--no-start", is_flag=True, help="Create the disks but do not boot.")
@json_option
@pass_app
def vm_create(app: App, /, no_start: bool, **kw: Any) -> None:
    """Create a VM (and boot it, unless --no-start)."""
    client = app.client()
    res = wire(follow(app, client.vms.create, **_create_params(kw, not no_start).model_dump()))
    app.emit(res, f"{res['name']} {res['state']} at {res['ip']}")


@vm.command("list")
@json_option
@pass_app
def vm_list(app: App) -> None:
    """List VMs."""
    vms = wire(app.client().vms.list())
    app.emit(vms, output.vm_table(vms))


vm.add_command(vm_list, "ps")


@vm.command("show")
@click.argument("name", shell_complete=vm_names)
@json_option
@pass_app
def vm_show(app: App, name: str) -> None:
    """Show one VM: spec, state, address, process."""
    res = wire(app.client().vms.show(name))
    app.emit(res, output.vm_detail(res))


@vm.command("ports")
@click.argument("names", nargs=-1, metavar="[VM]...", shell_complete=vm_names)
@json_option
@pass_app
def vm_ports(app: App, names: tuple[str, ...]) -> None:
    """List what running VMs listen on (TCP and UDP, from `ss` in the guest).

    With no VM named, every running VM is asked. ENDPOINT is where the host reaches
    the socket (NAME.vm:PORT through banger's DNS); a socket bound to the guest's
    loopback only has none.
    """
    res = wire(app.client().vms.ports(*names))
    app.emit(res, output.ports_table(res))


@vm.command("forward")
@click.argument("args", nargs=-1, required=True,
                metavar="VM [ADDR:]HOST_PORT:GUEST_PORT | list [VM]")
@click.option("--rm", "remove", is_flag=True, help="Remove the forward instead.")
@json_option
@pass_app
def vm_forward(app: App, args: tuple[str, ...], remove: bool) -> None:
    """Forward a host TCP port to a running VM, or `vm forward list [VM]`.

    The daemon listens on ADDR:HOST_PORT (127.0.0.1 unless ADDR is given) and relays each
    connection to the guest's GUEST_PORT. A forward lasts until the VM stops (its host
    port is then free again) or `--rm`; one given at creation (`-p`) opens at every start.
    Forwards are re-opened when the daemon restarts.
    """
    if args[0] == "list" and len(args) <= 2 and not remove:
        res = wire(app.client().forwards.list(args[1] if len(args) == 2 else None))
        app.emit(res, output.forwards_table(res))
        return
    if len(args) != 2:
        raise click.UsageError("give VM and [ADDR:]HOST_PORT:GUEST_PORT, or list [VM]")
    name, spec = args
    if remove:
        res = app.client().forwards.remove(name, spec)
        app.emit(res, f"{name}: forward {res['removed']} removed")
        return
    res = wire(app.client().forwards.add(name, spec))
    app.emit(res, f"{res['host_addr']}:{res['host_port']} -> {name}:{res['guest_port']}")


@vm.command("set-egress")
@click.argument("name", shell_complete=vm_names)
@click.option("--nat/--no-nat", default=None, help="Turn NAT on or off (default: unchanged).")
@click.option("--allow-private/--no-allow-private", default=None,
              help="Open or close the private and special ranges (default: unchanged).")
@click.option("--allow-out", "allow_out", multiple=True, metavar="CIDR|DOMAIN",
              help="Replace the allowlist with these entries (repeatable; see vm create).")
@click.option("--no-allow-out", is_flag=True, help="Remove the allowlist.")
@json_option
@pass_app
def vm_set_egress(app: App, name: str, nat: bool | None, allow_private: bool | None,
                  allow_out: tuple[str, ...], no_allow_out: bool) -> None:
    """Change what a VM's guest may reach; a running VM's rules change at once.

    Connections already open stay open. Options not given keep their value.
    """
    if allow_out and no_allow_out:
        raise click.UsageError("--allow-out and --no-allow-out contradict each other")
    res = wire(app.client().vms.set_egress(
        name, nat=nat, allow_private=allow_private,
        allow_out=list(allow_out) if allow_out or no_allow_out else None))
    when = "now" if res["applied"] else "from its next start"
    app.emit(res, f"{name}: {output.network_policy(res)} ({when})")


@vm.command("logs")
@click.argument("name", shell_complete=vm_names)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@json_option
@pass_app
def vm_logs(app: App, name: str, follow: bool) -> None:
    """Print a VM's serial console log (the last 128 KiB; --json: path and content)."""
    if follow and app.json:
        raise click.UsageError("--follow and --json cannot be combined")
    res = wire(app.client().vms.logs(name))
    if app.json:
        click.echo(output.to_json(res))
        return
    sys.stdout.write(res["content"])
    sys.stdout.flush()
    if follow:
        _follow_file(Path(res["path"]))


def _follow_file(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            while True:
                chunk = fh.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
    except KeyboardInterrupt:
        return


@vm.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name", shell_complete=vm_names)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_app
def vm_ssh(app: App, name: str, command: tuple[str, ...]) -> int:
    """Open a shell in a running VM, or run COMMAND there (after --), like OpenSSH.

    \b
    banger vm ssh web                      interactive login shell
    banger vm ssh web -- 'cd /tmp; ls *'   the words are joined with spaces and
                                           run by the guest's shell, as `ssh` does

    Use `banger vm exec` to pass argv unchanged (no shell). The exit status is
    the command's; a command killed by signal N gives 128+N.
    """
    return in_guest(app, app.client(), name, list(command), shell_string=True)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name", shell_complete=vm_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--auto-prepare", is_flag=True,
              help="Re-sync the workspace first if the host HEAD or work tree changed "
                   "(guest edits are saved and re-applied; see `vm workspace prepare`). "
                   "With a remote host: the repository on this machine it was sent from.")
@click.option("--discard-guest-changes", is_flag=True,
              help="With --auto-prepare: do not re-apply the guest's edits (they are still "
                   "saved as a patch under the VM's directory).")
@pass_app
def vm_exec(app: App, name: str, command: tuple[str, ...], auto_prepare: bool,
            discard_guest_changes: bool) -> int:
    """Run COMMAND in a running VM with argv semantics; its exit status becomes banger's.

    \b
    banger vm exec web -- ls -l 'a file'   each word arrives as one argument
                                           (no shell: use `vm ssh` for 'a; b')

    It runs in the VM's last prepared workspace, if it has one. A command killed by
    signal N gives 128+N.
    """
    if discard_guest_changes and not auto_prepare:
        raise click.UsageError("--discard-guest-changes only applies with --auto-prepare")
    client = app.client()
    if auto_prepare:
        st = client.workspace.status(name)
        repo = resync_source(app, st)
        if repo is not None:
            prepared = prepare_from(app, client, name, repo, guest_path=st["guest_path"],
                                    mode=st.get("mode") or "shallow",
                                    discard_guest_changes=discard_guest_changes)
            click.echo(prepared_text(prepared), err=True)  # stdout is the command's
    return in_guest(app, client, name, list(command))


def in_guest(app: App, client: Client, name: str, command: list[str], *,
             shell_string: bool = False) -> int:
    """Run ``command`` in VM ``name`` (a login shell when empty); its exit status.

    Here, through the guest's agent or the system ssh with the install's key
    (:func:`run_in_guest`); with a remote daemon, that host's banger runs ``vm
    ssh``/``vm exec`` over the command's SSH connection, so the guest's key and
    known_hosts never leave it.
    """
    if app.remote is not None:
        sub = ["vm", "ssh" if shell_string or not command else "exec", name]
        tty = not command or (sys.stdin.isatty() and sys.stdout.isatty())
        return app.link().run([*sub, "--", *command] if command else sub, tty=tty)
    info = wire(client.vms.ssh_info(name))
    return run_in_guest(info, command, shell_string=shell_string, debug=app.debug)


class _RunCommand(click.Command):
    """``vm run``'s command: remembers which words came after ``--``.

    Only a word before ``--`` can name the repository; everything after it is the
    guest command, whatever it looks like.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Record the words after ``--`` in ``ctx.meta``, then parse as usual."""
        ctx.meta["after_dashdash"] = args[args.index("--") + 1:] if "--" in args else None
        return super().parse_args(ctx, args)


def _looks_like_path(word: str) -> bool:
    return word.startswith((".", "/", "~")) or "/" in word


def split_run_args(words: list[str], after_dashdash: list[str] | None
                   ) -> tuple[Path | None, list[str]]:
    """``vm run``'s positional words as (repository, guest command).

    Raises:
        click.UsageError: a repository word that is not an existing directory (a
            typo must not boot a VM and run the typo as a command), or more than
            one word before ``--``.
    """
    if after_dashdash is not None:
        before = words[:len(words) - len(after_dashdash)]
        if len(before) > 1:
            raise click.UsageError(
                f"only the repository goes before --, got {' '.join(before)!r}")
        repo = _repo_dir(before[0], hint_dashdash=False) if before else None
        return repo, list(after_dashdash)
    if words and (_looks_like_path(words[0]) or Path(words[0]).is_dir()):
        path = Path(words[0]).expanduser()
        if path.is_dir():
            return _repo_dir(words[0], hint_dashdash=False), words[1:]
        if not path.exists():
            return _repo_dir(words[0], hint_dashdash=True), words[1:]
    return None, words


def _repo_dir(word: str, *, hint_dashdash: bool) -> Path:
    path = Path(word).expanduser()
    if path.is_dir():
        return path.resolve()
    what = "does not exist" if not path.exists() else "is not a directory"
    msg = f"repository {word!r} {what}"
    if hint_dashdash:
        msg += f"; to run a guest program by that path, put it after --: " \
               f"banger vm run -- {word}"
    raise click.UsageError(msg)


@vm.command("run", cls=_RunCommand, context_settings={"ignore_unknown_options": True})
@create_options
@click.option("--rm", "remove", is_flag=True, help="Delete the VM when the command ends.")
@click.option("-d", "--detach", is_flag=True, help="Boot and return; print the VM name.")
@click.option("--workspace-mode", type=click.Choice(["shallow", "full_copy"]),
              default="shallow", show_default=True,
              help="History copied with a repository (full_copy: everything, submodules).")
@click.option("--export", "export_to", metavar="FILE",
              help="Write the guest's edits to the repository as a patch to FILE ('-': "
                   "stdout) when the command ends, before --rm deletes the VM.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_app
def vm_run(app: App, /, remove: bool, detach: bool, workspace_mode: str,
           export_to: str | None, command: tuple[str, ...], **kw: Any) -> int:
    """Create and boot a VM, then run COMMAND in it (after --) or open a shell.

    \b
    banger vm run -- make test                 in a fresh VM
    banger vm run ./repo -- make test          copy ./repo in first, run inside it
    banger vm run ./repo                       a shell in the copied repository
    banger vm run --rm --export e.patch ./repo -- make fmt
                                               keep the guest's edits, drop the VM

    A word before -- that looks like a path (., /, ~ or a /) must be an existing
    directory: the repository to copy in (a git work tree; see `banger vm
    workspace prepare`). The command runs with argv semantics, like `vm exec`;
    its exit status becomes banger's own (killed by signal N: 128+N). With --rm
    the VM is deleted afterwards, whatever happened; when the guest changed the
    repository and --export was not given, a line on stderr says so.
    """
    if detach and remove:
        raise click.UsageError("--rm and --detach cannot be combined")
    repo, args = split_run_args(list(command), click.get_current_context().meta.get(
        "after_dashdash"))
    if export_to is not None and repo is None:
        raise click.UsageError("--export needs a repository to copy in (vm run ./repo ...)")
    if export_to is not None and detach:
        raise click.UsageError("--export and --detach cannot be combined; use "
                               "`banger vm workspace export` later")
    client = app.client()
    params = _create_params(kw, True)
    made: list[str] = []  # the VM's name, once the daemon took the create on

    def accepted(view: OpView) -> None:
        if not made:
            made.append(view.target)

    keep = not remove  # set when deleting would lose edits banger could not save
    try:
        res = follow(app, client.vms.create, watch=accepted, **params.model_dump())
        name = res.name
        if repo is not None:
            prepare_from(app, client, name, repo, mode=workspace_mode)
        if detach:
            app.emit(wire(res), res.name)
            return 0
        status = in_guest(app, client, name, args)
        if repo is not None and (export_to is not None or remove):
            keep = not _save_edits(app, client, name, export_to, remove)
        return status
    except BangerError as exc:
        if not remove and made:
            exc.hint = _kept_hint(client, made[0], exc.hint)
        raise
    finally:
        if not keep and made:
            try:
                client.vms.delete(made[0])
            except BangerError as exc:
                if exc.code != "not_found":
                    exits.print_error(exc, app.json)


def _save_edits(app: App, client: Client, name: str, export_to: str | None,
                removing: bool) -> bool:
    """Write the guest's patch to ``export_to``, or say on stderr that edits go unexported.

    Returns False when the edits could not be read and the VM must be kept.
    """
    try:
        patch = app.export_patch(client, name)
    except BangerError as exc:
        exc.hint = f"the VM {name} was kept so its edits are not lost; " \
                   f"`banger vm workspace export {name}` retries"
        exits.print_error(exc, app.json)
        return False
    changed = len(patch.changes)
    if export_to == "-":
        sys.stdout.buffer.write(patch.data)
        sys.stdout.flush()
    elif export_to is not None:
        try:
            Path(export_to).write_bytes(patch.data)
        except OSError as exc:
            click.echo(f"error: cannot write the patch to {export_to}: {exc.strerror}", err=True)
            click.echo(f"hint: the VM {name} was kept; `banger vm workspace export {name} "
                       f"-o FILE` retries", err=True)
            return False
        click.echo(f"banger: {changed} changed file(s) exported to {export_to}", err=True)
    elif removing and changed:
        click.echo(f"banger: {changed} file(s) changed in the guest were not exported "
                   f"(use --export FILE to keep them)", err=True)
    return True


def _kept_hint(client: Client, name: str, hint: str) -> str:
    """``hint`` plus how to remove VM ``name``, when the failure left it behind."""
    try:
        client.vms.show(name)
    except BangerError:
        return hint
    extra = f"the VM {name} was kept: `banger vm delete {name}` removes it"
    return f"{hint}; {extra}" if hint else extra
