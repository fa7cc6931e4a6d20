"""``banger vm snapshot`` and ``banger snapshot list|rm``: guests kept to clone from.

Clones are made with ``banger vm create|run --from-snapshot NAME`` (:mod:`banger.cli.vm`).
"""

from __future__ import annotations

import click

from banger.cli import output
from banger.cli.app import App, follow, json_option, name_arg, pass_app, wire
from banger.cli.complete import snapshot_names, vm_names


@click.command("snapshot")
@click.argument("vm_name", metavar="VM", shell_complete=vm_names)
@click.argument("name", callback=name_arg)
@json_option
@pass_app
def vm_snapshot(app: App, vm_name: str, name: str) -> None:
    """Snapshot a running (or paused) VM as NAME: its memory, devices and disks.

    The guest stops for the copy (a second or two, plus the memory's size at disk
    speed) and then runs on as before. `banger vm create --from-snapshot NAME` and
    `banger vm run --from-snapshot NAME` restore clones of it in a fraction of a boot,
    each with its own address, MAC, host name, machine-id, SSH host key and random
    state. QEMU VMs, and Firecracker VMs run under the jailer.
    """
    res = wire(follow(app, app.client().snapshots.take, vm_name, name))
    app.emit(res, f"snapshot {res['name']} of {res['source_vm']} "
                  f"({res['size_bytes'] / (1 << 20):.0f} MiB)")


@click.group("snapshot")
def snapshot() -> None:
    """List and remove snapshots (take one with `banger vm snapshot VM NAME`)."""


@snapshot.command("list")
@json_option
@pass_app
def snapshot_list(app: App) -> None:
    """List snapshots: name, kind (user: `vm snapshot`; boot: an image's first boot, kept
    by banger), source VM, image, size of the saved machine, bytes on disk."""
    snaps = wire(app.client().snapshots.list())
    app.emit(snaps, output.snapshot_table(snaps))


snapshot.add_command(snapshot_list, "ls")


@snapshot.command("rm")
@click.argument("names", nargs=-1, required=True, shell_complete=snapshot_names)
@json_option
@pass_app
def snapshot_rm(app: App, names: tuple[str, ...]) -> None:
    """Remove snapshots (clones made from them keep running)."""
    client = app.client()
    removed = [wire(client.snapshots.remove(n)) for n in names]
    app.emit(removed if len(names) > 1 else removed[0],
             "\n".join(f"removed {r['name']}" for r in removed))
