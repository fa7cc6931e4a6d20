"""``client.forwards``: host TCP ports relayed to VMs' guest ports."""

from __future__ import annotations

import builtins
from typing import Any

from banger.api import ForwardView
from banger.sdk.base import Namespace, view, views


class Forwards(Namespace):
    """``client.forwards``."""

    def list(self, vm: str | None = None) -> builtins.list[ForwardView]:
        """The forwards of VM ``vm`` (of every VM when None)."""
        return views(ForwardView, self._c.call("vm.forward.list", name=vm), "vm.forward.list")

    def add(self, vm: str, forward: str) -> ForwardView:
        """Forward ``[ADDR:]HOST_PORT:GUEST_PORT`` to running VM ``vm`` until it stops."""
        res = self._c.call("vm.forward.add", name=vm, forward=forward)
        return view(ForwardView, res, "vm.forward.add")

    def remove(self, vm: str, forward: str) -> dict[str, Any]:
        """Close a forward of VM ``vm`` (``{"name": VM, "removed": FORWARD}``)."""
        result: dict[str, Any] = self._c.call("vm.forward.remove", name=vm, forward=forward)
        return result
