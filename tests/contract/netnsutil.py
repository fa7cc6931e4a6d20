"""Network namespaces for tests: :func:`own_netns` moves the calling thread (and the
processes it starts) into a fresh network namespace and back, so a test can make
bridges and veths without touching the host's links (see :mod:`banger.netns`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from banger.netns import join_network, unshare_network


@contextlib.contextmanager
def own_netns() -> Iterator[None]:
    """Run the body in a new, empty network namespace (this thread only), then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare_network()
        try:
            yield
        finally:
            join_network(home)
    finally:
        os.close(home)
