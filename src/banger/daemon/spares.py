"""Spare root disks: copies of an image's root file system made before the creates
that take them, where root disks are plain copies (``cow_strategy = "copy"``).

On a file system without reflinks every create copies the image's root (about half a
gigabyte of data for the built-in image): 0.2 s from the page cache, up to a second
from disk, all of it between ``vm run`` and the VMM's start. A spare moves that copy
off the create's path: the create renames a ready copy into the VM's directory (the
same file system) and a background thread makes the next one.

A spare belongs to one source file: its name starts with a digest of the source's
path, inode, size and modification time, so a rebuilt or re-grown image's spares are
never taken, and are removed by the next refill. A copy is made under a temporary
name and renamed when whole, so a daemon killed mid-copy leaves only a temporary file,
which :meth:`Spares.sweep` removes at start. ``spare_root_disks`` (default 1) is how
many are kept, of the source the last create used; 0 turns them off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from banger.fsutil import fsync_path

log = logging.getLogger("banger.spares")

TEMP_PREFIX = ".making-"
SUFFIX = ".ext4"
# What a spare must leave free on its file system: the VMs' own disks grow into it.
FREE_MARGIN = 2 << 30


def source_key(source: Path) -> str:
    """The digest naming ``source``'s spares: changes when the file is replaced or
    written (path, inode, size, modification time).

    Raises:
        OSError: ``source`` cannot be read.
    """
    st = os.stat(source)
    ident = f"{source.resolve()}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class Spares:
    """Ready copies of one source at a time, below ``root`` (on the VMs' file system).

    ``copy(source, target)`` makes one, on disk before it returns
    (:func:`banger.daemon.dmsnap.sparse_copy`, durable). ``take`` and the
    refill's own renames are under ``_mu``; the copying itself is not, and one
    refill runs at a time.
    """

    def __init__(self, root: Path, keep: int, copy: Callable[[Path, Path], None]) -> None:
        self.root = root
        self.keep = keep
        self._copy = copy
        self._mu = threading.Lock()
        self._filling = threading.Lock()

    def _ready(self, key: str) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir()
                          if p.name.startswith(key + "-") and p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def take(self, source: Path, target: Path) -> bool:
        """Move a ready copy of ``source`` to ``target``; False when there is none (or
        spares are off), and the caller copies as before."""
        if self.keep == 0:
            return False
        try:
            key = source_key(source)
        except OSError:
            return False
        with self._mu:
            for spare in self._ready(key):
                try:
                    os.rename(spare, target)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # another file system (EXDEV): copy as before
                    log.warning("cannot move spare %s to %s: %s; no more spares made",
                                spare, target, exc.strerror)
                    self.keep = 0
                    return False
                log.debug("root disk %s: a spare copy of %s", target, source)
                return True
        return False

    def refill(self, source: Path) -> None:
        """Make copies of ``source`` until :attr:`keep` are ready, and remove every
        spare of another source (or of an older version of this one). Returns at once
        when another refill is running: it makes the same copies. A copy that fails,
        or that would leave less than :data:`FREE_MARGIN` of the file system free, is
        not made (a warning says why): the creates copy as before."""
        if self.keep == 0 or not self._filling.acquire(blocking=False):
            return
        try:
            # The least CPU there is (Linux nice is per thread): the copy must not slow
            # the boot of the VM whose create asked for it.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            key = source_key(source)
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._drop_all_but(key)
            while len(self._ready(key)) < self.keep:
                needed = os.stat(source).st_blocks * 512 + FREE_MARGIN
                if shutil.disk_usage(self.root).free < needed:
                    log.warning("no spare root disk made: less than %d MiB free in %s",
                                needed >> 20, self.root)
                    return
                self._make_one(source, key)
        except OSError as exc:
            log.warning("no spare root disk made of %s: %s", source, exc.strerror or exc)
        finally:
            self._filling.release()

    def _make_one(self, source: Path, key: str) -> None:
        """One spare: copied under a temporary name, on disk (a spare that a host crash
        left half written must never pass for a whole one), then renamed."""
        temp = self.root / f"{TEMP_PREFIX}{key}-{secrets.token_hex(4)}{SUFFIX}"
        try:
            self._copy(source, temp)
            with self._mu:
                temp.rename(self.root / temp.name.removeprefix(TEMP_PREFIX))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_path(self.root)  # the rename itself

    def sweep(self) -> None:
        """At start: remove copies a killed daemon left half made."""
        try:
            for p in self.root.iterdir():
                if p.name.startswith(TEMP_PREFIX):
                    p.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def drop(self) -> None:
        """Remove every spare (``spare_root_disks = 0``, or the strategy is not copy)."""
        self._drop_all_but(None)

    def _drop_all_but(self, key: str | None) -> None:
        try:
            names = list(self.root.iterdir())
        except FileNotFoundError:
            return
        with self._mu:
            for p in names:
                if p.name.endswith(SUFFIX) and not p.name.startswith(TEMP_PREFIX) \
                        and (key is None or not p.name.startswith(key + "-")):
                    p.unlink(missing_ok=True)
