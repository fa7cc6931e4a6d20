"""``banger kernel ...``: the kernel registry (vmlinux for Firecracker, bzImage for QEMU)."""

from __future__ import annotations

from pathlib import Path

import click

from banger.cli import output
from banger.cli.app import App, follow, json_option, pass_app, wire
from banger.cli.complete import kernel_names


@click.group()
def kernel() -> None:
    """Manage guest kernels (vmlinux for Firecracker, bzImage for QEMU)."""


@kernel.command("list")
@click.option("--available", is_flag=True,
              help="List the catalog's kernels (config catalog_url) instead.")
@json_option
@pass_app
def kernel_list(app: App, available: bool) -> None:
    """List kernels (or, with --available, those `banger kernel pull NAME` can fetch)."""
    if available:
        entries = wire(app.client().kernels.available())
        app.emit(entries, output.catalog_table(entries, "kernel"))
        return
    ks = wire(app.client().kernels.list())
    app.emit(ks, output.kernel_table(ks))


@kernel.command("pull")
@click.argument("reference")
@click.option("--name", help="Kernel name (a DNS label; default: the bundle's own name).")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP to a bundle or catalog that is not on loopback.")
@json_option
@pass_app
def kernel_pull(app: App, reference: str, name: str | None, insecure: bool) -> None:
    """Pull a kernel bundle into the kernel registry.

    REFERENCE is a NAME in the catalog (config catalog_url; see `banger kernel list
    --available`), a FILE.tar.zst, or a file:// or http(s):// URL. Its files are
    checked against the manifest's sha256s (and the bundle against the catalog's),
    then validated like `banger kernel import`.
    """
    with app.daemon_reference(reference) as ref:
        res = wire(follow(app, app.client().kernels.pull, ref.reference, name=name,
                          insecure=insecure, sent_from=ref.sent_from))
    app.emit(res, f"kernel {res['name']} pulled ({res.get('version')}; "
                  f"{', '.join(res['vmms'])})")


@kernel.command("show")
@click.argument("name", shell_complete=kernel_names)
@json_option
@pass_app
def kernel_show(app: App, name: str) -> None:
    """Show one kernel."""
    k = wire(app.client().kernels.show(name))
    app.emit(k, output.kernel_detail(k))


@kernel.command("import")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Kernel name (a DNS label).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Initial ramdisk to boot with it.")
@json_option
@pass_app
def kernel_import(app: App, paths: tuple[Path, ...], name: str, initrd: Path | None) -> None:
    """Import a vmlinux and/or a bzImage (validated: ELF x86-64, or a bzImage header)."""
    files = {f"kernel{i}": path for i, path in enumerate(paths)}
    with app.daemon_paths({**files, "initrd": initrd}) as at:
        res = wire(app.client().kernels.import_files(
            name, [at[key] or "" for key in files], initrd=at["initrd"]))
    app.emit(res, f"imported kernel {name} ({', '.join(res['vmms'])})")


@kernel.command("build")
@click.option("--name", default="banger-6.1", show_default=True, help="Kernel name.")
# Not exists=True: a missing file, from the flag or the variable alike, gets the
# daemon's error and hint (naming both) instead of click's; nothing falls back.
@click.option("--base-config", type=click.Path(dir_okay=False, path_type=Path),
              envvar="BANGER_KERNEL_BASE_CONFIG", show_envvar=True,
              help="Kernel .config to start from instead of the source's own "
                   "x86_64_defconfig (banger's fragment goes on top either way).")
@click.option("--source", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel source tarball (default: Debian's linux-source-6.1).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), help="make -j (default: CPUs).")
@json_option
@pass_app
def kernel_build(app: App, name: str, base_config: Path | None, source: Path | None,
                 jobs: int | None) -> None:
    """Build a guest kernel that boots on both VMMs (vmlinux + bzImage, no modules, no
    initrd) from Debian's kernel source: its x86_64_defconfig (or --base-config) plus
    banger's fragment. Slow: tens of minutes on a small host."""
    with app.daemon_paths({"base_config": base_config, "source": source}) as at:
        res = wire(follow(app, app.client().kernels.build, name, base_config=at["base_config"],
                          source=at["source"], jobs=jobs))
    app.emit(res, f"kernel {res['name']} built ({res.get('version')}; {', '.join(res['vmms'])})")


@kernel.command("rm")
@click.argument("name", shell_complete=kernel_names)
@json_option
@pass_app
def kernel_rm(app: App, name: str) -> None:
    """Remove a kernel no image uses."""
    res = app.client().kernels.remove(name)
    app.emit(res, f"removed kernel {name}")
