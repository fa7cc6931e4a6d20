"""Network namespaces of this process: a new, empty one (``unshare``), or one named by a
path (``setns``). Python before 3.12 has neither call, so they go through libc.

The VMM launcher (:mod:`banger.hostops.vmm_spawn`) gives QEMU an empty namespace of its
own; the contract tests' fake jailer joins a VM's as the real jailer does.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000  # linux/sched.h


def _libc_call(name: str, *args: int) -> None:
    """Call libc's ``name`` with ``args``; an OSError with its errno when it fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def unshare_network() -> None:
    """Move the calling thread (a whole single-threaded process) into a new, empty
    network namespace.

    Raises:
        OSError: the kernel refused (no CAP_SYS_ADMIN, or namespaces are off).
    """
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        unshare(CLONE_NEWNET)
        return
    _libc_call("unshare", CLONE_NEWNET)


def join_network(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``.

    Raises:
        OSError: ``fd`` is not a network namespace, or the kernel refused.
    """
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    _libc_call("setns", fd, CLONE_NEWNET)
