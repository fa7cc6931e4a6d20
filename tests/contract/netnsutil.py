"""Network namespaces for tests, in process: Python 3.11 has no ``os.setns``.

:func:`own_netns` moves the calling thread (and the processes it starts) into a fresh
network namespace and back, so a test can make bridges and veths without touching the
host's links. The fake jailer (``tests.contract.fake_firecracker``) joins a ``--netns``
with :func:`join`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000  # linux/sched.h
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def join(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_netns() -> Iterator[None]:
    """Run the body in a new, empty network namespace (this thread only), then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare a network namespace")
        try:
            yield
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "return to the test's network namespace")
    finally:
        os.close(home)
