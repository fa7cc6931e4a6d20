"""Which work-tree files the guest checks out of the history pack instead of receiving.

The history pack already carries every blob the host index names. A file whose
bytes on disk are exactly its index blob (same object id, same executable bit) would
cross the link twice if the tar carried it too, so prepare leaves it out of the tar
and the guest writes it from the pack (``git checkout-index`` with content
conversion off, see :mod:`.scripts`). Every other entry (a modified or untracked
file, a symlink, a conflicted path, a file git converts on check-in) travels as
bytes in the tar, as before.

The comparison hashes the raw bytes, read through :class:`.hosttree.HostTree` (never
following a symlink), as git would hash them with ``--no-filters``. A file that
changes while it is hashed is at worst judged by one of its versions: either way the
guest gets one consistent version of it (the index blob, or the bytes the tar reads
and checks).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from banger.errors import BangerError

from .hosttree import HostTree
from .model import CopyPlan, EntryKind
from .repo import parse_index

CHUNK = 1 << 20

_FILE_MODES = {False: "100644", True: "100755"}


def blob_id(fd: int, size: int, object_format: str) -> str | None:
    """The git blob id of ``size`` bytes read from ``fd``; None if the file is not
    that size any more."""
    # git's object ids; a collision could only make the guest get the index blob,
    # the user's own staged content, instead of the file's bytes.
    h = (hashlib.sha256() if object_format == "sha256"
         else hashlib.sha1(usedforsecurity=False))
    h.update(b"blob %d\0" % size)
    left = size
    while left > 0:
        data = os.read(fd, min(CHUNK, left))
        if not data:
            return None
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def checkout_paths(plan: CopyPlan, object_format: str) -> tuple[str, ...]:
    """The regular files of ``plan`` (one repository, paths relative to its root) whose
    bytes equal their stage-0 index blob, which the history pack holds."""
    wanted: dict[str, tuple[str, str]] = {}
    conflicted: set[str] = set()
    for e in parse_index(plan.index):
        if e.stage:
            conflicted.add(e.path)
        else:
            wanted[e.path] = (e.mode, e.oid)
    in_pack = set(plan.index_blobs)
    out = []
    with HostTree(plan.root) as tree:
        for entry in plan.entries:
            if entry.kind is not EntryKind.FILE or entry.path in conflicted:
                continue
            mode, oid = wanted.get(entry.path, ("", ""))
            if mode != _FILE_MODES[entry.executable] or oid not in in_pack:
                continue
            if _same_blob(tree, entry.path, oid, object_format):
                out.append(entry.path)
    return tuple(out)


def _same_blob(tree: HostTree, path: str, oid: str, object_format: str) -> bool:
    try:
        fd, st = tree.open_file(path)
    except BangerError:  # gone, changed type or unreadable: the tar's own read reports it
        return False
    try:
        return blob_id(fd, st.st_size, object_format) == oid
    except OSError:
        return False
    finally:
        os.close(fd)


def listing(paths: Iterable[str]) -> bytes:
    """``paths`` NUL-terminated, as ``git checkout-index -z --stdin`` reads them."""
    return b"".join(p.encode() + b"\0" for p in paths)
