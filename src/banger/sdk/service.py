"""``client.daemon``: bangerd itself."""

from __future__ import annotations

from typing import Any

from banger import client as rpc
from banger.api import OpView
from banger.sdk.base import Namespace, views


class Service(Namespace):
    """``client.daemon``."""

    def status(self) -> dict[str, Any]:
        """pid, version, paths, uptime, VM and operation counts, the VM pool and the
        config the daemon runs with."""
        result: dict[str, Any] = self._c.call("daemon.status")
        return result

    def operations(self) -> list[OpView]:
        """Every operation the daemon knows of (running and recently ended), oldest first."""
        return views(OpView, self._c.call("daemon.operations.list"), "daemon.operations.list")

    def alive(self) -> bool:
        """True when bangerd answers a ping within 5 s."""
        return self._c.rpc.alive()

    def stop(self) -> dict[str, Any] | None:
        """Stop bangerd and wait (bounded) until its process is gone; running VMs keep
        running. Its status just before the stop, or None when it was not running."""
        return rpc.stop_daemon(self._c.rpc)
