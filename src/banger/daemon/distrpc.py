"""The RPC handlers that move images and kernels over HTTP: ``image.pull.begin``,
``kernel.pull.begin``, ``image.export.begin``, ``catalog.list`` and
``image.cache.prune``.

They are the only users of :mod:`.imagepull`, :mod:`.bundles` and :mod:`.catalog`,
and through them of httpx and its TLS stack (about 9 MiB of a daemon's memory), so
:mod:`.rpc` loads this module on the first call of one of them: a daemon that never
pulls or exports does not carry them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from banger.api.params import (
    CachePruneParams,
    CatalogParams,
    ImageExportParams,
    ImagePullParams,
    KernelPullParams,
)
from banger.daemon import bundles, catalog, imagepull
from banger.daemon.vms import op_view

if TYPE_CHECKING:
    from banger.daemon.core import Daemon


def image_pull_begin(d: Daemon, r: ImagePullParams) -> Any:
    """``image.pull.begin``: check the request, start the pull; its operation."""
    req = imagepull.check_request(d, r.reference, name=r.name, size_bytes=r.size_bytes,
                                  kernel_name=r.kernel, insecure=r.insecure,
                                  sent_from=r.sent_from)
    return op_view(imagepull.begin_pull(d, req))


def image_export_begin(d: Daemon, r: ImageExportParams) -> Any:
    """``image.export.begin``: start writing the image's bundle; its operation."""
    owner = (r.owner_uid, r.owner_gid) if r.owner_uid is not None \
        and r.owner_gid is not None else None
    return op_view(bundles.begin_export(d, r.name, r.output, owner))


def kernel_pull_begin(d: Daemon, r: KernelPullParams) -> Any:
    """``kernel.pull.begin``: check the request, start the pull; its operation."""
    req = bundles.check_request(d, r.reference, kind="kernel", name=r.name,
                                size_bytes=None, insecure=r.insecure, sent_from=r.sent_from)
    return op_view(bundles.begin_pull(d, req))


def catalog_list(d: Daemon, r: CatalogParams) -> Any:
    """``catalog.list``: the configured catalog's entries of the asked kind."""
    return catalog.available(d.cfg.catalog_url, kind=r.kind, insecure=r.insecure)


def cache_prune(d: Daemon, r: CachePruneParams) -> Any:
    """``image.cache.prune``: drop the blob cache's unused blobs (or say which)."""
    return imagepull.prune_cache(d, dry_run=r.dry_run)
