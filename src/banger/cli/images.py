"""``banger image ...``: the image registry (root file system + kernel)."""

from __future__ import annotations

from pathlib import Path

import click

from banger.cli import bundleout, output
from banger.cli.app import App, follow, json_option, pass_app, wire
from banger.cli.complete import image_names, kernel_names, vm_names
from banger.config import parse_size


@click.group()
def image() -> None:
    """Manage images (root file system + kernel)."""


@image.command("build")
@click.argument("name", required=False)
@json_option
@pass_app
def image_build(app: App, name: str | None) -> None:
    """Build a built-in image (default: debian-bookworm) with debootstrap."""
    result = wire(follow(app, app.client().images.build, name))
    app.emit(result, f"image {result['name']} built ({result['size_bytes'] >> 20} MiB)")


@image.command("pull")
@click.argument("reference")
@click.option("--name", help="Image name (a DNS label; default: from the reference, "
                             "e.g. 127.0.0.1:5000/team/dev:1.2 -> dev-1-2; a bundle's "
                             "own name).")
@click.option("--size", help="Root file system size, e.g. 4G; also caps the unpacked "
                             "image (default: fitted to it, at most 16G unpacked; a "
                             "bundle's rootfs at most 64G).")
@click.option("--kernel", "kernel_name", shell_complete=kernel_names,
              help="Boot this registry kernel (see `banger kernel list`; default: the "
                   "default image's kernel). OCI images only: a bundle brings its own.")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP to a registry, bundle or catalog that is not on "
                   "loopback.")
@json_option
@pass_app
def image_pull(app: App, reference: str, name: str | None, size: str | None,
               kernel_name: str | None, insecure: bool) -> None:
    """Pull an OCI image from a registry, or an image bundle, and make it a bootable image.

    REFERENCE is either an OCI image, [HOST[:PORT]/]REPO[:TAG][@sha256:DIGEST] (Docker
    Hub when no host is given): layers are verified against their digests and cached
    under the cache dir (see `banger image cache prune`); the image must have systemd
    as init and OpenSSH's sshd; banger adds its guest agent and the kernel's modules.

    Or a bundle made by `banger image export`: a FILE.tar.zst, a file:// or
    http(s):// URL, or a NAME in the catalog (config catalog_url; see `banger image
    list --available`). Every file in it is checked against its manifest's sha256
    (and the bundle against the catalog's); banger adds its guest agent.
    """
    with app.daemon_reference(reference) as ref:
        result = wire(follow(app, app.client().images.pull, ref.reference, name=name,
                             size_bytes=parse_size(size) if size else None,
                             kernel=kernel_name, insecure=insecure,
                             sent_from=ref.sent_from))
    app.emit(result, f"image {result['name']} pulled ({result['size_bytes'] >> 20} MiB) "
                     f"from {result.get('origin')}")


@image.command("export")
@click.argument("name", shell_complete=image_names)
@click.option("-o", "--output", "out_name", required=True,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="The bundle file to write, e.g. NAME.tar.zst (replaced if it exists); "
                   "- for standard output.")
@json_option
@pass_app
def image_export(app: App, name: str, out_name: str) -> None:
    """Write image NAME as a bundle: a zstd tar of its root file system, work seed and
    kernel, with a manifest of their sizes and sha256s.

    Pull it elsewhere with `banger image pull FILE.tar.zst` (or a URL, or list it in a
    catalog with the size and sha256 printed here). The file belongs to you, as if
    written by this command; a failed or cancelled export leaves none. With a remote
    host the bundle comes back over the SSH connection. With `-o -` it goes to standard
    output and the summary to standard error.
    """
    out_file = Path(out_name)  # "./-" is a file named -, "-" standard output
    if out_name == "-":
        res = bundleout.to_stdout(app, name)
    elif app.remote is not None:
        res = bundleout.from_remote(app, name, out_file)
    else:
        res = wire(follow(app, app.client().images.export, name, out_file))
    where = "standard output" if res["path"] == "-" else res["path"]
    text = (f"image {name} exported to {where} ({res['size_bytes'] >> 20} MiB, "
            f"sha256 {res['sha256']})")
    if res["path"] == "-":  # standard output is the bundle's
        click.echo(output.to_json(res) if app.json else text, err=True)
        return
    app.emit(res, text)


@image.command("promote")
@click.argument("vm", shell_complete=vm_names)
@click.argument("name")
@json_option
@pass_app
def image_promote(app: App, vm: str, name: str) -> None:
    """Make stopped VM's disks and kernel the new image NAME.

    The root disk is cloned (a reflink where the state dir allows it, else a copy);
    the work disk's files (/root) become the image's work-seed. The VM's SSH host key
    and machine-id are left out; the VM itself is not changed.
    """
    res = wire(app.client().images.promote(vm, name))
    app.emit(res, f"image {name} promoted from VM {vm} ({res['size_bytes'] >> 20} MiB)")


@image.group("cache")
def image_cache() -> None:
    """The cache of downloaded registry blobs."""


@image_cache.command("prune")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@json_option
@pass_app
def image_cache_prune(app: App, dry_run: bool) -> None:
    """Remove cached blobs that no image was pulled from."""
    res = wire(app.client().images.prune_cache(dry_run=dry_run))
    verb = "would free" if dry_run else "freed"
    app.emit(res, f"{len(res['removed'])} blob(s), {verb} {res['freed_bytes'] >> 20} MiB "
                  f"({res['kept']} kept for images)")


@image.command("list")
@click.option("--available", is_flag=True,
              help="List the catalog's images (config catalog_url) instead.")
@json_option
@pass_app
def image_list(app: App, available: bool) -> None:
    """List images (or, with --available, those `banger image pull NAME` can fetch)."""
    if available:
        entries = wire(app.client().images.available())
        app.emit(entries, output.catalog_table(entries, "image"))
        return
    imgs = wire(app.client().images.list())
    app.emit(imgs, output.image_table(imgs))


@image.command("show")
@click.argument("name", shell_complete=image_names)
@json_option
@pass_app
def image_show(app: App, name: str) -> None:
    """Show one image."""
    img = wire(app.client().images.show(name))
    app.emit(img, output.image_detail(img))


@image.command("delete")
@click.argument("name", shell_complete=image_names)
@json_option
@pass_app
def image_delete(app: App, name: str) -> None:
    """Delete an image no VM uses."""
    res = app.client().images.delete(name)
    app.emit(res, f"deleted image {name}")


@image.command("register")
@click.option("--name", required=True, help="Image name (a DNS label).")
@click.option("--rootfs", required=True, type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="ext4 root file system image.")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Kernel to bundle (bzImage for QEMU, vmlinux for Firecracker).")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Initial ramdisk, if the kernel needs one.")
@click.option("--kernel-name", help="Boot this registry kernel (see `banger kernel`) instead.")
@json_option
@pass_app
def image_register(app: App, name: str, rootfs: Path, kernel: Path | None,
                   initrd: Path | None, kernel_name: str | None) -> None:
    """Register your own root file system and kernel as an image (files are copied).

    banger adds its small guest agent (network, host name, SSH host key, work disk)
    to the copy with debugfs; the original file is not changed.
    """
    with app.daemon_paths({"rootfs": rootfs, "kernel": kernel, "initrd": initrd}) as at:
        res = wire(app.client().images.register(name, at["rootfs"] or "", kernel=at["kernel"],
                                                initrd=at["initrd"], kernel_name=kernel_name))
    app.emit(res, f"registered image {name}")


@image.command("set-kernel")
@click.argument("name", shell_complete=image_names)
@click.argument("kernel", required=False, shell_complete=kernel_names)
@json_option
@pass_app
def image_set_kernel(app: App, name: str, kernel: str | None) -> None:
    """Make image NAME boot registry KERNEL (omit KERNEL: its bundled kernel again)."""
    res = wire(app.client().images.set_kernel(name, kernel))
    app.emit(res, f"image {name} boots {kernel or 'its bundled kernel'}")
