"""Opening a VM's files for its VMM: the root helper's side of handing files over.

A launch request names the VM's files by path; the daemon owns them (they sit below
its state and runtime directories), so any of those names could be a symlink it
planted. Each is opened here without following one (:func:`banger.fsutil.open_beneath`)
and checked on the open descriptor: the daemon's own regular file (or FIFO), or the
VM's dm-snapshot device. The VMM then gets the descriptor (QEMU) or a hard link made
through it (a Firecracker jail), never the name.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from banger.errors import HostError, Refused
from banger.fsutil import open_beneath
from banger.hostops import blockdev, ops
from banger.hostops.policy import Policy
from banger.vmmuser import VMMUser


def open_vm_file(policy: Policy, op: str, vm_id: str, name: str, f: ops.VMFile, *,
                 user: VMMUser) -> int:
    """Open one of VM ``vm_id``'s files below the state or runtime dir, never through a
    symlink; only the daemon's own files, and with ``f.give`` made the VMM user's group's.

    Raises:
        Refused: a symlink on the way, not a regular file or FIFO, not the daemon's.
        OSError: it cannot be opened.
    """
    path = Path(f.path)
    flags = os.O_RDONLY if f.mode == "r" else os.O_RDWR
    if path == policy.dm_device(vm_id):
        return _open_dm_device(op, name, path, flags, user)
    root = policy.state_dir if path.is_relative_to(policy.state_dir) else policy.runtime_dir
    # O_NONBLOCK: a FIFO put where a file was expected must not hang the helper.
    fd = open_beneath(root, path, flags | os.O_NONBLOCK)

    def check(fd: int) -> None:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise Refused(f"{op}: {name} ({path}) is not a regular file or a FIFO")
        if stat.S_ISREG(st.st_mode):
            os.set_blocking(fd, True)
        if st.st_uid != policy.daemon_uid:
            raise Refused(f"{op}: {name} ({path}) is not the daemon's file "
                          f"(uid {st.st_uid})")
        if f.give:
            give(fd, user, writable=f.mode == "rw")

    return kept_if(fd, check)


def _open_dm_device(op: str, name: str, path: Path, flags: int, user: VMMUser) -> int:
    """The VM's dm-snapshot device, given to the VMM user's group."""
    try:
        fd = blockdev.BlockDevices.open_dm(path, flags)
    except Refused as exc:
        raise Refused(f"{op}: {name}: {exc.message}") from exc
    return kept_if(fd, lambda fd: give(fd, user, writable=True))


def open_log(policy: Policy, op: str, path: Path) -> int:
    """A VMM's log below the state dir, for appending: the daemon's own regular file
    with one link (never a hard link to someone else's), or made here and given to
    the daemon."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK
    try:
        fd = open_beneath(policy.state_dir, path, flags)
    except FileNotFoundError:
        fd = open_beneath(policy.state_dir, path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchown(fd, policy.daemon_uid, -1)

    def check(fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 \
                or st.st_uid != policy.daemon_uid:
            raise Refused(f"{op}: {path} is not the daemon's own plain file")
        os.set_blocking(fd, True)

    return kept_if(fd, check)


@contextlib.contextmanager
def launch_files(what: str) -> Iterator[dict[str, int]]:
    """The descriptors one VMM launch opens (name -> fd), all closed when it is done,
    whatever happens; an ``OSError`` on the way is a ``HostError`` that names ``what``."""
    fds: dict[str, int] = {}
    try:
        yield fds
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise HostError(f"cannot set up {what}: {exc.strerror or exc}{where}") from exc
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def kept_if(fd: int, check: Callable[[int], object]) -> int:
    """``fd`` once ``check(fd)`` returned; closed when it raised."""
    try:
        check(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def give(fd: int, user: VMMUser, *, writable: bool) -> None:
    """Let the VMM user's group read (and, ``writable``, write) the file behind ``fd``;
    its owner keeps it. QEMU re-opens its files through /proc/self/fd and a jailed
    Firecracker opens hard links to them, which both check the file's own permissions;
    the directories above stay closed to the VMM."""
    os.fchown(fd, -1, user.gid)
    os.fchmod(fd, 0o660 if writable else 0o640)
