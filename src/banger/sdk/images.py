"""``client.images``: the image registry (build, pull, export, promote, register)."""

from __future__ import annotations

import builtins
import os
import threading
from pathlib import Path
from typing import Any

from banger.api import BundleView, CachePruneView, CatalogEntry, ImageView
from banger.sdk.base import DaemonPath, Namespace, Progress, absolute, view, views


def bundle_ref(reference: str) -> str:
    """``reference`` with a local bundle path made absolute (the daemon's cwd is not ours;
    a :class:`~banger.sdk.base.DaemonPath` is already the daemon's)."""
    if isinstance(reference, DaemonPath):
        return str(reference)
    if is_bundle_path(reference):
        return str(Path(reference).expanduser().resolve())
    return reference


def is_bundle_path(reference: str) -> bool:
    """Whether a pull's ``reference`` names a bundle file (not a name, a URL or an OCI
    reference)."""
    return "://" not in reference and (reference.endswith(".tar.zst")
                                       or reference.startswith(("/", "./", "../", "~")))


class Images(Namespace):
    """``client.images``."""

    def list(self) -> builtins.list[ImageView]:
        """Every registered image."""
        return views(ImageView, self._c.call("image.list"), "image.list")

    def show(self, name: str) -> ImageView:
        """One image."""
        return view(ImageView, self._c.call("image.show", name=name), "image.show")

    def build(self, name: str | None = None, *, on_progress: Progress | None = None,
              cancel: threading.Event | None = None) -> ImageView:
        """Build a built-in image (None: config ``default_image_name``) with debootstrap."""
        op = self._c.call("image.build.begin", name=name)
        return self._wait("image.build", op, ImageView, on_progress, cancel)

    def pull(self, reference: str, *, name: str | None = None, size_bytes: int | None = None,
             kernel: str | None = None, insecure: bool = False,
             sent_from: str | None = None, on_progress: Progress | None = None,
             cancel: threading.Event | None = None) -> ImageView:
        """``image pull``: an OCI image or a bundle (a file, URL or catalog name), made
        bootable and registered. ``sent_from``: a bundle file sent to the daemon's
        host, where it was read (the image's origin)."""
        op = self._c.call("image.pull.begin", reference=bundle_ref(reference), name=name,
                          size_bytes=size_bytes, kernel=kernel, insecure=insecure,
                          sent_from=sent_from)
        return self._wait("image.pull", op, ImageView, on_progress, cancel)

    def export(self, name: str, output: str | Path, *, on_progress: Progress | None = None,
               cancel: threading.Event | None = None) -> BundleView:
        """Write image ``name`` as a bundle file at ``output``, owned by this process's
        user (replaced if it exists; a failed or cancelled export leaves none)."""
        op = self._c.call("image.export.begin", name=name, output=absolute(output),
                          owner_uid=os.geteuid(), owner_gid=os.getegid())
        return self._wait("image.export", op, BundleView, on_progress, cancel)

    def promote(self, vm: str, name: str) -> ImageView:
        """Make stopped VM ``vm``'s disks and kernel the new image ``name``."""
        return view(ImageView, self._c.call("image.promote", vm=vm, name=name),
                    "image.promote")

    def register(self, name: str, rootfs: str | Path, *, kernel: str | Path | None = None,
                 initrd: str | Path | None = None, kernel_name: str | None = None
                 ) -> ImageView:
        """Register a root file system with its kernel (files, or registry kernel
        ``kernel_name``) as image ``name``; the files are copied."""
        res = self._c.call("image.register", name=name, rootfs=absolute(rootfs),
                           kernel=absolute(kernel) if kernel else None,
                           initrd=absolute(initrd) if initrd else None, kernel_name=kernel_name)
        return view(ImageView, res, "image.register")

    def set_kernel(self, name: str, kernel: str | None = None) -> ImageView:
        """Make image ``name`` boot registry kernel ``kernel`` (None: its bundled one)."""
        res = self._c.call("image.set_kernel", name=name, kernel=kernel)
        return view(ImageView, res, "image.set_kernel")

    def delete(self, name: str) -> dict[str, Any]:
        """Delete an image no VM uses (``{"deleted": NAME}``)."""
        result: dict[str, Any] = self._c.call("image.delete", name=name)
        return result

    def available(self, *, insecure: bool = False) -> builtins.list[CatalogEntry]:
        """The images the catalog (config ``catalog_url``) lists, for :meth:`pull`."""
        res = self._c.call("catalog.list", kind="image", insecure=insecure)
        return views(CatalogEntry, res, "catalog.list")

    def prune_cache(self, *, dry_run: bool = False) -> CachePruneView:
        """Remove cached registry blobs no image was pulled from (``dry_run``: only say)."""
        res = self._c.call("image.cache.prune", dry_run=dry_run)
        return view(CachePruneView, res, "image.cache.prune")
