"""An image's root file system at a VM's disk size, grown once per size.

A VM's root disk is a copy (a reflink where the file system has them) of its image's
``rootfs.ext4``, at the VM's ``disk_size``. Growing an ext4 image takes an ``e2fsck``
(which ``resize2fs`` demands after the image's last write) and a ``resize2fs``: about half
a second of every create when each VM grew its own copy. So the first create of an
image at a size makes ``<image dir>/grown/rootfs-<bytes>.ext4`` once (built beside it and
renamed into place, under a lock file, so a crash or a concurrent create never sees half
of one), and every VM of that image and size copies it as it is. The grown files go
with the image's directory when the image is deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from banger.daemon.dmsnap import clone_or_copy
from banger.errors import BadRequest, HostError
from banger.fsutil import fsync_path, remove_tree

if TYPE_CHECKING:
    from banger.daemon.core import Daemon
    from banger.daemon.store import ImageRecord

log = logging.getLogger(__name__)

GROWN_DIR = "grown"
FSCK_TIMEOUT_S = 300


def rootfs_at(d: Daemon, img: ImageRecord, size: int) -> Path:
    """Image ``img``'s root file system grown to ``size`` bytes: the image's own file when
    that is its size, else the grown copy (made now if this is the first create of that
    size).

    Raises:
        BadRequest: ``size`` is smaller than the image.
        HostError: the copy or the file system tools failed.
    """
    source = Path(img.rootfs)
    current = source.stat().st_size
    if size < current:
        raise BadRequest(
            f"disk size {size >> 20}M is smaller than the image ({current >> 20}M)",
            hint=f"use --disk-size {(current + (1 << 30) - 1) >> 30}G or more",
        )
    if size == current:
        return source
    grown_dir = source.parent / GROWN_DIR
    target = grown_dir / f"rootfs-{size}.ext4"
    if target.exists():
        return target
    grown_dir.mkdir(mode=0o700, exist_ok=True)
    with (grown_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another create of this image and size waits
        if target.exists():
            return target
        partial = grown_dir / f".rootfs-{size}.partial"
        remove_tree(partial)  # a crash's leftover
        try:
            clone_or_copy(source, partial)
            grow_ext4(d, partial, size)
            fsync_path(partial)  # whole on disk before it has its name
            os.rename(partial, target)
            fsync_path(grown_dir)
        except OSError as exc:
            remove_tree(partial)
            raise HostError(f"cannot grow image {img.name!r} to {size >> 20}M: "
                            f"{exc.strerror}") from exc
        except BaseException:
            remove_tree(partial)
            raise
    log.info("image %s: root file system grown to %d MiB for its VMs", img.name, size >> 20)
    return target


def grow_ext4(d: Daemon, image: Path, size: int) -> None:
    """Grow the unmounted ext4 image file ``image`` to ``size`` bytes."""
    with image.open("r+b") as fh:
        fh.truncate(size)
    # e2fsck -p (preen) is required by resize2fs after the image's last write.
    d.runner.run(["e2fsck", "-p", "-f", str(image)], desc="check the root disk",
                 timeout=FSCK_TIMEOUT_S, check=False)
    d.runner.run(["resize2fs", str(image)], desc="grow the root disk", timeout=FSCK_TIMEOUT_S)
