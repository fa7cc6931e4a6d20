"""``image pull`` of an OCI image: download, flatten, finalize, publish.

The design's ``PullImage`` with its ``pullAndFlatten`` and ``finalizePulledRootfs``
steps. A pull runs as an operation in ``d.image_ops`` (stages :data:`PULL_STAGES`)
in its own staging directory; only :func:`images.publish` takes ``image_ops_mu``.
Blobs go to the daemon's digest-addressed cache (``d.blobs``), shared by every pull:
two pulls of one reference download each blob once, and a pull of the same
reference under the same name joins the one in flight.

Finalize makes the flattened tree bootable by banger without running anything from
it on the host. It checks for systemd as ``/sbin/init``, sshd and the few tools
``banger-init`` uses (:func:`rootfs.inspect`); banger adds its guest agent (the same
files ``image register`` adds), clears host keys and machine-id, and copies in the
booting kernel's modules (an OCI image has no kernel: the default image's is used
unless a registry kernel is named). A Debian or Ubuntu image that lacks those pieces
gets them from its own apt, run in a helper VM (:mod:`imagefinalize`, stage ``apt``);
any other image that lacks them is refused with the list of what is missing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.daemon import bundles, imagefinalize, images
from banger.daemon.imagemgr import ROOT_LABEL, rootfs_size
from banger.daemon.imagemgr.kernel import inspect_kernel_file
from banger.daemon.oci import fixups as oci_fixups
from banger.daemon.oci import registry, rootfs
from banger.daemon.oci.fixups import Fixups
from banger.daemon.oci.flatten import LayerSource, flatten, make_ext4
from banger.daemon.oci.reference import Reference, is_oci_reference, parse
from banger.daemon.opstate import ByteReport, Operation, mib
from banger.errors import AlreadyExists, BadRequest, InvalidState, NotFound
from banger.fsutil import remove_tree
from banger.names import MAX_LABEL, check_name

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.imagepull")

# "apt" is entered only when finalize has packages to install (imagefinalize).
PULL_STAGES = ["download", "flatten", "finalize", "rootfs", "apt", "publish"]
# The flattened tree's cap when no --size is given: stops a decompression bomb long
# before it fills the disk, and holds any development image we know of.
DEFAULT_MAX_BYTES = 16 << 30
MIN_SIZE = 64 << 20
MAX_SIZE = 1 << 40


@dataclass
class PullOperation(Operation):
    """An ``image.pull`` operation; ``reference`` lets a second identical pull join it."""

    reference: str = ""


@dataclass(frozen=True)
class PullRequest:
    """What ``image.pull.begin`` was asked for, checked."""

    ref: Reference
    name: str
    size_bytes: int | None  # the ext4's size, and the flattened tree's cap
    kernel_name: str | None
    insecure: bool


@dataclass(frozen=True)
class BootKernel:
    """The kernel a pulled image boots: a registry kernel, or files copied in."""

    kernel_name: str | None = None
    vmlinuz: Path | None = None
    initrd: Path | None = None
    modules_from: Path | None = None  # an image rootfs holding /lib/modules/<version>
    version: str | None = None


def default_name(ref: Reference) -> str:
    """An image name from a reference: the repository's last part and the tag
    (``127.0.0.1:5000/team/dev:1.2`` -> ``dev-1-2``), made a DNS label."""
    base = ref.repository.rsplit("/", 1)[-1]
    if ref.tag and ref.tag != "latest":
        base += f"-{ref.tag}"
    elif ref.digest and not ref.tag:
        base += f"-{ref.digest.split(':', 1)[1][:12]}"
    label = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:MAX_LABEL].strip("-")
    return label or "pulled"


def check_request(d: Daemon, text: str, *, name: str | None, size_bytes: int | None,
                  kernel_name: str | None, insecure: bool, sent_from: str | None = None
                  ) -> PullRequest | bundles.BundleRequest:
    """Validate a pull request before anything is downloaded.

    ``text`` is an OCI reference, or a bundle (a ``.tar.zst`` path, a URL, a catalog
    name: :func:`oci.reference.is_oci_reference`), checked by :mod:`bundles`.

    ``sent_from`` (a bundle file a remote client sent: where it read it) is recorded as
    the image's origin.

    Raises:
        BadRequest: a bad reference, name or size; ``--kernel`` with a bundle;
            ``sent_from`` with anything but a bundle file, or not printable.
        NotFound: ``kernel_name`` is not a registered kernel, or no kernel was named
            and the default image (whose kernel is used) does not exist; a catalog
            name that is not in the catalog.
    """
    if not is_oci_reference(text):
        if kernel_name is not None:
            raise BadRequest("--kernel applies to OCI images; a bundle brings its own kernel",
                             hint="pull it without --kernel, then `banger image set-kernel`")
        return bundles.check_request(d, text, kind="image", name=name,
                                     size_bytes=size_bytes, insecure=insecure,
                                     sent_from=sent_from)
    if sent_from is not None:
        raise BadRequest("sent_from names where a sent bundle file was read; "
                         f"{text!r} is an OCI image")
    ref = parse(text)
    name = check_name(name or default_name(ref), "image")
    if size_bytes is not None and not MIN_SIZE <= size_bytes <= MAX_SIZE:
        raise BadRequest(f"--size {size_bytes} bytes is out of range",
                         hint="give 64M to 1T, e.g. --size 4G")
    if kernel_name is not None:
        d.db.get_kernel(kernel_name)
    elif d.db.find_image(d.cfg.default_image_name) is None:
        raise NotFound(
            f"a pulled image boots the default image's kernel, and there is no image "
            f"{d.cfg.default_image_name!r}",
            hint="build it with `banger image build`, or pass --kernel K "
                 "(see `banger kernel list`)")
    return PullRequest(ref=ref, name=name, size_bytes=size_bytes, kernel_name=kernel_name,
                       insecure=insecure)


def begin_pull(d: Daemon, req: PullRequest | bundles.BundleRequest) -> Operation:
    """Start pulling ``req`` in the background, or join the same pull already running
    (a bundle pull: :func:`bundles.begin_pull`).

    Raises:
        AlreadyExists: the image exists, or another operation is making that name.
    """
    if isinstance(req, bundles.BundleRequest):
        return bundles.begin_pull(d, req)
    with d.image_ops_mu:
        for existing in d.image_ops.active():
            if existing.target != req.name or existing.kind == "image.export":
                continue
            if isinstance(existing, PullOperation) and existing.reference == str(req.ref):
                return existing
            raise AlreadyExists(f"image {req.name!r} is already being made by another "
                                f"{existing.kind}",
                                hint="wait for it, or pull under another --name")
        images.refuse_taken(d, req.name, "pull under another --name")
        op = PullOperation(kind="image.pull", target=req.name, stages=list(PULL_STAGES),
                           reference=str(req.ref))
        return d.image_ops.run(op, lambda o: pull(d, req, o), name=f"pull-{req.name}")


def pull(d: Daemon, req: PullRequest, op: Operation) -> dict[str, Any]:
    """download -> flatten -> finalize -> mkfs.ext4 -d -> publish (see the module doc).

    Everything is made in ``staging/pull-<name>-<op>``; on any failure or cancel it is
    removed, so nothing half-made stays (blobs already verified stay cached).
    """
    staging = d.layout.staging_dir / f"pull-{req.name}-{op.id}"
    tree = staging / "tree"
    try:
        staging.mkdir(parents=True, mode=0o700)
        tree.mkdir(mode=0o755)
        op.enter("download", str(req.ref))
        pulled = registry.pull(req.ref, d.blobs, insecure=req.insecure,
                               progress=_download_reporter(op, d.checkpoint), cancel=op.cancel)
        op.enter("flatten")
        layers = [LayerSource(la.path, la.digest, la.media_type) for la in pulled.layers]
        total = sum(la.size for la in pulled.layers)
        sizes = [la.size for la in pulled.layers]

        def flatten_progress(index: int, done: int) -> None:
            before = sum(sizes[:index])
            op.report(f"layer {index + 1}/{len(sizes)}: {mib(before + done)} of "
                      f"{mib(total)} MiB")

        # A daemon that is not root writes the tree as its own and notes the image's
        # owners, devices and privileged xattrs for the ext4 instead.
        fixups = oci_fixups.for_this_process()
        stats = flatten(layers, tree, max_bytes=req.size_bytes or DEFAULT_MAX_BYTES,
                        progress=flatten_progress, cancel=op.cancel, fixups=fixups)
        op.enter("finalize", "checking init and sshd")
        boot, added, apt = finalize(d, req, tree, staging, op, fixups=fixups)
        op.enter("rootfs", "mkfs.ext4")
        image = staging / "rootfs.ext4"
        # An upper bound of the tree's size: its data, a block per entry, what finalize
        # added, and room for the packages apt will install.
        if apt is not None:
            added += imagefinalize.APT_HEADROOM
        size = req.size_bytes or rootfs_size(stats.data_bytes + stats.entries * 4096 + added)
        size -= size % 4096
        inodes = stats.entries + 20_000
        make_ext4(d.runner, tree, image, size, label=ROOT_LABEL,
                  inodes=inodes if inodes * 16384 > size else None, fixups=fixups)
        remove_tree(tree)
        if apt is not None:
            op.enter("apt", f"installing {' '.join(apt.packages)}")
            imagefinalize.install(d, image, apt, op)
            os.chmod(image, 0o600)  # the finalize VM's QEMU had its group's access
        op.report("adding banger's guest agent")
        images.extract_workseed(d, image, staging / "workseed")
        images.inject_guest_agent(d, image, staging)
        op.enter("publish")
        return images.publish(
            d, req.name, staging, source="pulled", recipe_hash=None,
            kernel_name=boot.kernel_name,
            origin=f"{req.ref}@{pulled.manifest_digest}", blobs=tuple(sorted(pulled.blob_digests)))
    except BaseException:
        remove_tree(staging)
        raise


def finalize(d: Daemon, req: PullRequest, tree: Path, staging: Path, op: Operation, *,
             fixups: Fixups | None = None
             ) -> tuple[BootKernel, int, imagefinalize.AptJob | None]:
    """Check the tree can boot under banger and prepare it (the design's
    ``finalizePulledRootfs``); copies the boot kernel into ``staging``.

    Returns:
        The boot kernel, the bytes added to the tree (its modules), and the apt
        install still to run on the finished disk (None when nothing is missing).

    Raises:
        BadRequest: the tree lacks systemd, sshd or a tool banger-init needs, and
            has no apt that could install them.
    """
    info = rootfs.inspect(tree)
    missing = info.missing()
    apt = None
    if missing:
        apt = imagefinalize.plan(d.cfg, info, rootfs.has_apt(tree), str(req.ref))
        if apt is None:
            hint = ("build an image FROM it that installs them: "
                    f"apt-get install {' '.join(rootfs.APT_PACKAGES)}" if info.debian_like
                    else "banger boots images with systemd as init and OpenSSH's sshd; "
                         "build one FROM this image that adds them")
            raise BadRequest(f"{req.ref} cannot boot as a banger VM: it has no "
                             f"{', '.join(missing)}", hint=hint)
        if d.db.find_image(d.cfg.default_image_name) is None:
            raise NotFound(f"{req.ref} lacks {', '.join(missing)}; its apt runs in a helper "
                           f"VM of the default image, and there is no image "
                           f"{d.cfg.default_image_name!r}",
                           hint="build it with `banger image build`")
        op.report(f"no {', '.join(missing)}: the image's apt will install them")
    boot = boot_kernel(d, req.kernel_name)
    if boot.vmlinuz is not None:
        shutil.copy2(boot.vmlinuz, staging / "vmlinuz")
    if boot.initrd is not None:
        shutil.copy2(boot.initrd, staging / "initrd.img")
    modules = None
    if boot.modules_from is not None and boot.version:
        op.report(f"copying the modules of kernel {boot.version}")
        modules = _dump_modules(d, boot.modules_from, boot.version, staging / "modules")
    added = 0
    if modules is not None:
        added = sum(f.lstat().st_size + 4096 for f in modules.rglob("*"))
    rootfs.prepare(tree, modules=modules, fixups=fixups)
    if modules is not None:
        remove_tree(modules.parent)
    return boot, added, apt


def boot_kernel(d: Daemon, kernel_name: str | None) -> BootKernel:
    """The kernel a new pulled image boots: registry kernel ``kernel_name``, else the
    default image's (its registry kernel, or its own files and modules)."""
    if kernel_name is not None:
        return BootKernel(kernel_name=d.db.get_kernel(kernel_name).name)
    default = d.db.find_image(d.cfg.default_image_name)
    if default is None:
        raise NotFound(f"no image {d.cfg.default_image_name!r} to take a kernel from",
                       hint="build it with `banger image build`, or pass --kernel K")
    if default.kernel_name is not None:
        return BootKernel(kernel_name=default.kernel_name)
    kernel = Path(default.kernel)
    return BootKernel(vmlinuz=kernel, initrd=Path(default.initrd) if default.initrd else None,
                      modules_from=Path(default.rootfs),
                      version=inspect_kernel_file(kernel).version)


def _dump_modules(d: Daemon, image: Path, version: str, dest: Path) -> Path | None:
    """``/lib/modules/<version>`` of ext4 ``image`` copied out to ``dest/<version>``
    (debugfs: no mount); None when the image has none (a kernel with no modules)."""
    dest.mkdir(mode=0o700)
    for where in (f"/usr/lib/modules/{version}", f"/lib/modules/{version}"):
        d.runner.run(["debugfs", "-R", f"rdump {where} {dest}", str(image)],
                     desc=f"copy the modules of kernel {version}", timeout=300, check=False)
        if (dest / version).is_dir():
            return dest / version
    log.info("%s has no modules for kernel %s", image, version)
    return None


def _download_reporter(op: Operation, checkpoint: Callable[[str], None]) -> registry.Progress:
    """A download progress callback (throttled by :class:`opstate.ByteReport`).

    ``checkpoint("pull-mid-blob")`` (the fault tests' hook) runs once, inside the
    first blob seen half-downloaded.
    """
    report = ByteReport(op)
    seen: dict[str, int] = {}
    mid: list[str] = []

    def progress(digest: str, done: int, total: int) -> None:
        seen.setdefault(digest, len(seen) + 1)
        if 0 < done < total and not mid:
            mid.append(digest)
            checkpoint("pull-mid-blob")
        report(done, f"blob {seen[digest]} {digest[7:19]}", total)

    return progress


# ------------------------------------------------------------------------ cache


def prune_cache(d: Daemon, *, dry_run: bool) -> dict[str, Any]:
    """Remove cached blobs no image was made from (``image cache prune``).

    Refused while a pull runs: its blobs are cached before any image names them.
    """
    with d.image_ops_mu:
        if any(op.kind == "image.pull" for op in d.image_ops.active()):
            raise InvalidState("an image pull is running; its blobs are not yet an image's",
                               hint="prune when it has finished")
        keep = {b for img in d.db.list_images() for b in img.blobs}
        gone = d.blobs.prune(keep, dry_run=dry_run)
    return {"removed": [{"digest": dg, "size_bytes": size} for dg, size in gone],
            "freed_bytes": sum(size for _, size in gone), "dry_run": dry_run,
            "kept": len(keep)}

