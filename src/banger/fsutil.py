"""Small filesystem helpers: crash-safe writes, sparse writes and tree removal."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from banger.errors import BadRequest


def mount_field(field: str) -> str:
    """A field of ``/proc/*/mounts`` or ``mountinfo``, whose space, tab, newline and
    backslash the kernel writes as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


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


def open_beneath(root: Path, path: Path, flags: int, mode: int = 0o600) -> int:
    """Open ``path``, which must lie under ``root``, never through a symlink below ``root``.

    Each directory on the way is opened relative to the one before with
    ``O_NOFOLLOW``, so a directory swapped for a symlink while this runs cannot send
    the open elsewhere; the last component is opened with ``flags | O_NOFOLLOW``
    (``mode`` when it is created). ``root`` itself is resolved normally (an
    administrator may configure a symlinked state directory).

    Returns:
        The descriptor (close-on-exec).

    Raises:
        OSError: a component is missing, is a symlink (``ELOOP``) or not a directory;
            ``path`` is not under ``root`` or names ``..`` (``EPERM``).
    """
    rel = _relative(root, path)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(rel[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def dir_beneath(root: Path, path: Path) -> int:
    """An ``O_PATH`` descriptor of directory ``path`` under ``root``, opened like
    :func:`open_beneath` (no symlink below ``root``)."""
    return open_beneath(root, path, os.O_PATH | os.O_DIRECTORY)


def _relative(root: Path, path: Path) -> list[str]:
    if not path.is_absolute():
        raise OSError(errno.EPERM, "not an absolute path", str(path))
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise OSError(errno.EPERM, f"not under {root}", str(path)) from None
    if not parts or any(p in ("..", ".") for p in parts):
        raise OSError(errno.EPERM, "not a plain path under its root", str(path))
    return list(parts)
