"""Small filesystem helpers: crash-safe writes, sparse writes and tree removal."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from banger.errors import BadRequest


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename over, then fsync the directory
    so the rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path (a directory: the entries made or renamed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPARSE_BLOCK = 64 << 10  # all-zero blocks of this size become holes
_ZERO = bytes(SPARSE_BLOCK)


def write_sparse(out: BinaryIO, data: bytes | memoryview) -> None:
    """Write ``data`` at ``out``'s position, seeking over all-zero :data:`SPARSE_BLOCK`
    blocks so they stay holes. The caller truncates ``out`` to its full size at the end
    (a file that ends in a hole is otherwise short)."""
    view = memoryview(data)
    for start in range(0, len(view), SPARSE_BLOCK):
        block = view[start:start + SPARSE_BLOCK]
        if block == _ZERO[:len(block)]:
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)


def existing_file(path: str, what: str) -> Path:
    """``path`` (from a request) as a Path, refused unless absolute and a regular file.

    Raises:
        BadRequest: relative, missing, or not a regular file; ``what`` names it.
    """
    p = Path(path)
    if not p.is_absolute():
        raise BadRequest(f"{what} {path!r} must be an absolute path")
    if not p.is_file():
        raise BadRequest(f"{what} {path} does not exist or is not a regular file")
    return p


def remove_tree(path: Path) -> None:
    """Remove a file, symlink, other node or directory tree if it exists (no symlink following)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


TRASH_PREFIX = ".trash-"


def move_aside(path: Path) -> Path | None:
    """Rename ``path`` to a hidden sibling (same file system: instant) and return it.

    Lets a caller take a directory out of a registry under a lock and do the slow
    recursive delete after releasing it. None when ``path`` does not exist.
    """
    if not path.exists() and not path.is_symlink():
        return None
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    return trash


def remove_trash(directory: Path) -> None:
    """Finish deletes a crash interrupted (hidden ``.trash-*`` entries in ``directory``)."""
    if directory.is_dir():
        for entry in directory.glob(f"{TRASH_PREFIX}*"):
            remove_tree(entry)


def tail(path: Path, max_bytes: int = 4096) -> str:
    """The last ``max_bytes`` of a text file, or "" if unreadable."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
