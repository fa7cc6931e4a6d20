"""``client.kernels``: the guest kernel registry."""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from banger.api import CatalogEntry, KernelView
from banger.sdk.base import Namespace, Progress, absolute, view, views
from banger.sdk.images import bundle_ref


class Kernels(Namespace):
    """``client.kernels``."""

    def list(self) -> builtins.list[KernelView]:
        """Every registered kernel, by name."""
        return views(KernelView, self._c.call("kernel.list"), "kernel.list")

    def show(self, name: str) -> KernelView:
        """One kernel."""
        return view(KernelView, self._c.call("kernel.show", name=name), "kernel.show")

    def import_files(self, name: str, paths: Sequence[str | Path], *,
                     initrd: str | Path | None = None) -> KernelView:
        """Register a vmlinux and/or a bzImage (and an initrd) as kernel ``name``."""
        res = self._c.call("kernel.import", name=name, paths=[absolute(p) for p in paths],
                           initrd=absolute(initrd) if initrd else None)
        return view(KernelView, res, "kernel.import")

    def pull(self, reference: str, *, name: str | None = None, insecure: bool = False,
             sent_from: str | None = None, on_progress: Progress | None = None,
             cancel: threading.Event | None = None) -> KernelView:
        """Pull a kernel bundle (a catalog name, a file or a URL) into the registry.
        ``sent_from``: a bundle file sent to the daemon's host, where it was read (the
        kernel's origin)."""
        op = self._c.call("kernel.pull.begin", reference=bundle_ref(reference), name=name,
                          insecure=insecure, sent_from=sent_from)
        return self._wait("kernel.pull", op, KernelView, on_progress, cancel)

    def build(self, name: str = "banger-6.1", *, base_config: str | Path | None = None,
              source: str | Path | None = None, jobs: int | None = None,
              on_progress: Progress | None = None,
              cancel: threading.Event | None = None) -> KernelView:
        """Build a guest kernel for both VMMs from Debian's source (or ``source``) with
        banger's config fragment on ``base_config`` (default: x86_64_defconfig)."""
        op = self._c.call("kernel.build.begin", name=name,
                          base_config=absolute(base_config) if base_config else None,
                          source=absolute(source) if source else None, jobs=jobs)
        return self._wait("kernel.build", op, KernelView, on_progress, cancel)

    def remove(self, name: str) -> dict[str, Any]:
        """Remove a kernel no image uses (``{"deleted": NAME}``)."""
        result: dict[str, Any] = self._c.call("kernel.rm", name=name)
        return result

    def available(self, *, insecure: bool = False) -> builtins.list[CatalogEntry]:
        """The kernels the catalog (config ``catalog_url``) lists, for :meth:`pull`."""
        res = self._c.call("catalog.list", kind="kernel", insecure=insecure)
        return views(CatalogEntry, res, "catalog.list")
