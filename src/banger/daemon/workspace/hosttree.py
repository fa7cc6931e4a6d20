"""Reading a host work tree without ever following a symlink.

Every lookup walks from the work tree's root one component at a time with
``openat(O_NOFOLLOW | O_DIRECTORY)``, so a symlink anywhere in a path (even one
swapped in while banger is reading; bangerd may run as root) is never followed:
a path whose parent is a symlink is reported missing, exactly as git treats it
(deleted, with the symlink itself an untracked entry).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from types import TracebackType

from banger.errors import BadRequest, HostError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under a tracked name must not hang the copy.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class HostTree:
    """Symlink-safe ``lstat``/``open``/``readlink`` below one root directory.

    Keeps open only the chain of directories leading to the last path used
    (bounded by the tree's depth), which suits paths visited in sorted order.
    """

    def __init__(self, root: str) -> None:
        try:
            self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(f"cannot open {root}: {exc.strerror}") from exc
        self.root = root
        self._chain: list[tuple[str, int]] = []  # (component, fd) below the root

    def close(self) -> None:
        """Close every descriptor; the tree is unusable afterwards."""
        self._trim(0)
        with contextlib.suppress(OSError):
            os.close(self._root)

    def __enter__(self) -> HostTree:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _trim(self, keep: int) -> None:
        while len(self._chain) > keep:
            _, fd = self._chain.pop()
            with contextlib.suppress(OSError):
                os.close(fd)

    def _parent(self, path: str) -> tuple[int, str] | None:
        """(fd of the parent directory, last component), or None if a parent is not
        a real directory (missing, a file, or a symlink)."""
        *dirs, name = path.split("/")
        common = 0
        while (common < len(dirs) and common < len(self._chain)
               and self._chain[common][0] == dirs[common]):
            common += 1
        self._trim(common)
        for comp in dirs[common:]:
            parent = self._chain[-1][1] if self._chain else self._root
            try:
                fd = os.open(comp, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _GONE:
                    return None
                raise _read_error(path, exc) from exc
            self._chain.append((comp, fd))
        return (self._chain[-1][1] if self._chain else self._root), name

    def lstat(self, path: str) -> os.stat_result | None:
        """``lstat`` of ``path``, or None when it (or a real-directory parent) is missing."""
        parent = self._parent(path)
        if parent is None:
            return None
        fd, name = parent
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _GONE:
                return None
            raise _read_error(path, exc) from exc

    def open_file(self, path: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading; returns (fd, fstat). The caller closes fd.

        Raises:
            BadRequest: ``path`` vanished or stopped being a regular file since it was planned.
        """
        parent = self._parent(path)
        if parent is None:
            raise _changed(path)
        dfd, name = parent
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in _GONE:
                raise _changed(path) from exc
            raise _read_error(path, exc) from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _changed(path)
        os.set_blocking(fd, True)
        return fd, st

    def readlink(self, path: str) -> str:
        """A symlink's target, verbatim (never resolved)."""
        parent = self._parent(path)
        if parent is None:
            raise _changed(path)
        fd, name = parent
        try:
            return os.readlink(name, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (*_GONE, errno.EINVAL):
                raise _changed(path) from exc
            raise _read_error(path, exc) from exc


def _changed(path: str) -> BadRequest:
    return BadRequest(f"{path!r} changed while the workspace was being copied",
                      hint="retry once writes to the repository have settled", path=path)


def _read_error(path: str, exc: OSError) -> HostError:
    return HostError(f"cannot read {path!r} in the host repository: {exc.strerror}",
                     hint="check the file's permissions", path=path)


def read_owned(path: str, owner: int, limit: int = 1 << 20) -> bytes | None:
    """Read a small metadata file of the repository (``.git/shallow``, an exclude file).

    bangerd may be root, and these paths come from a repository its owner controls:
    the final component is never followed, the file must be a regular file owned by
    ``owner`` (the work tree's owner) and at most ``limit`` bytes. Anything else reads
    as None, so a symlink or hard link to someone else's file leaks nothing.
    """
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size > limit:
            return None
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)[:limit]
    except OSError:
        return None
    finally:
        os.close(fd)
