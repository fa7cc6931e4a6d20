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

from banger.cli import exits, output
from banger.cli.app import App, follow, json_option, name_arg, pass_app, run_ssh
from banger.errors import BangerError


@click.group()
def vm() -> None:
    """Create, run and manage VMs."""


def create_options(f: Any) -> Any:
    """Add the VM creation flags (name, image, sizes, VMM) to command ``f``.

    Shared by ``vm create`` and ``vm run``; see :func:`_create_params`.
    """
    opts = [
        click.option("--name", callback=name_arg, help="VM name (a DNS label; generated if "
                                                        "omitted)."),
        click.option("--image", help="Image name (default: config default_image_name)."),
        click.option("--vcpu", type=click.IntRange(1, 64), help="Virtual CPUs."),
        click.option("--memory", "memory", type=click.IntRange(128, 262144),
                     help="Memory in MiB."),
        click.option("--disk-size", help="Root disk size, e.g. 8G."),
        click.option("--work-disk-size", help="Work disk (/root) size, e.g. 4G."),
        click.option("--vmm", type=click.Choice(["auto", "qemu", "firecracker"]),
                     default="auto", show_default=True, help="VMM for this VM."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _create_params(kw: dict[str, Any], start: bool) -> dict[str, Any]:
    return {"name": kw["name"], "image": kw["image"], "vcpu": kw["vcpu"],
            "memory_mib": kw["memory"], "disk_size": kw["disk_size"],
            "work_disk_size": kw["work_disk_size"], "vmm": kw["vmm"], "start": start}


@vm.command("create")
@create_options
@click.option("--no-start", is_flag=True, help="Create the disks but do not boot.")
@json_option
@pass_app
def vm_create(app: App, /, no_start: bool, **kw: Any) -> None:
    """Create a VM (and boot it, unless --no-start)."""
    client = app.client()
    op = client.call("vm.create.begin", **_create_params(kw, not no_start))
    res = follow(app, client, op, "vm.create")
    app.emit(res, f"{res['name']} {res['state']} at {res['ip']}")


@vm.command("list")
@json_option
@pass_app
def vm_list(app: App) -> None:
    """List VMs."""
    vms = app.client().call("vm.list")
    app.emit(vms, output.vm_table(vms))


vm.add_command(vm_list, "ps")


@vm.command("show")
@click.argument("name")
@json_option
@pass_app
def vm_show(app: App, name: str) -> None:
    """Show one VM: spec, state, address, process."""
    res = app.client().call("vm.show", name=name)
    app.emit(res, output.vm_detail(res))


@vm.command("logs")
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@pass_app
def vm_logs(app: App, name: str, follow: bool) -> None:
    """Print a VM's serial console log."""
    res = app.client().call("vm.logs", name=name)
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
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_app
def vm_ssh(app: App, name: str, command: tuple[str, ...]) -> int:
    """Open a shell in a running VM, or run COMMAND there (after --)."""
    info = app.client().call("vm.ssh_info", name=name)
    return run_ssh(info, list(command), interactive=not command)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--auto-prepare", is_flag=True,
              help="Re-sync the workspace first if the host HEAD or work tree changed.")
@pass_app
def vm_exec(app: App, name: str, command: tuple[str, ...], auto_prepare: bool) -> int:
    """Run COMMAND in a running VM; its exit status becomes banger's.

    It runs in the VM's last prepared workspace, if it has one.
    """
    client = app.client()
    if auto_prepare:
        st = client.call("vm.workspace.status", name=name)
        if st["needs_resync"]:
            op = client.call("vm.workspace.prepare.begin", name=name, path=st["host_path"],
                             guest_path=st["guest_path"], mode=st.get("mode") or "shallow")
            follow(app, client, op, "vm.workspace.prepare")
    info = client.call("vm.ssh_info", name=name)
    return run_ssh(info, list(command), interactive=False)


@vm.command("run", context_settings={"ignore_unknown_options": True})
@create_options
@click.option("--rm", "remove", is_flag=True, help="Delete the VM when the command ends.")
@click.option("-d", "--detach", is_flag=True, help="Boot and return; print the VM name.")
@click.option("--workspace-mode", type=click.Choice(["shallow", "full_copy"]),
              default="shallow", show_default=True,
              help="History copied with a repository (full_copy: everything, submodules).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@json_option
@pass_app
def vm_run(app: App, /, remove: bool, detach: bool, workspace_mode: str,
           command: tuple[str, ...], **kw: Any) -> int:
    """Create and boot a VM, then run COMMAND in it (after --) or open a shell.

    \b
    banger vm run -- make test          in a fresh VM
    banger vm run ./repo -- make test   copy ./repo in first, run inside it
    banger vm run ./repo                a shell in the copied repository

    When the first argument is an existing directory it is the repository to
    copy in (a git work tree; see `banger vm workspace prepare`). The command's
    exit status becomes banger's own. With --rm the VM is deleted afterwards,
    whatever happened; `banger vm workspace export` gets the edits out first.
    """
    if detach and remove:
        raise click.UsageError("--rm and --detach cannot be combined")
    args = list(command)
    repo: Path | None = None
    if args and Path(args[0]).is_dir():
        repo = Path(args.pop(0)).resolve()
    client = app.client()
    op = client.call("vm.create.begin", **_create_params(kw, True))
    name = op["target"]
    try:
        res = follow(app, client, op, "vm.create")
        if repo is not None:
            prep = client.call("vm.workspace.prepare.begin", name=name, path=str(repo),
                               mode=workspace_mode)
            follow(app, client, prep, "vm.workspace.prepare")
        if detach:
            app.emit(res, res["name"])
            return 0
        info = client.call("vm.ssh_info", name=name)
        return run_ssh(info, args, interactive=not args)
    finally:
        if remove:
            try:
                client.call("vm.delete", name=name)
            except BangerError as exc:
                if exc.code != "not_found":
                    exits.print_error(exc, app.json)
