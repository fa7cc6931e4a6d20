"""The SDK's :class:`Client`: a connection to bangerd, its namespaces, and waiting for
an operation to end."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from banger import client as rpc
from banger.api import Model, OpView
from banger.config import Config, load_config
from banger.errors import from_code
from banger.sdk.base import Progress
from banger.sdk.forwards import Forwards
from banger.sdk.images import Images
from banger.sdk.kernels import Kernels
from banger.sdk.service import Service
from banger.sdk.sessions import Sessions
from banger.sdk.snapshots import Snapshots
from banger.sdk.vms import VMs
from banger.sdk.workspace import Workspace

# How long one status call waits for the operation to change (the daemon caps it at 30).
POLL_WAIT_S = 1.0


class Cancel(threading.Event):
    """A ``cancel`` event that also says when the daemon was asked: ``asked`` is set once
    the SDK has sent the operation's cancel (the CLI waits for it before it gives up)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()


class Client:
    """A connection to bangerd: the configured one (started when it is not running and
    this process is root), or the daemon listening on ``socket``."""

    def __init__(self, config: Config | None = None, *, socket: str | Path | None = None,
                 autostart: bool = True, connection: rpc.Client | None = None) -> None:
        if connection is not None:
            self.rpc = connection  # one the caller made (the CLI: after its drift check)
        elif socket is not None:
            self.rpc = rpc.Client(Path(socket))
        else:
            self.rpc = rpc.connect(config or load_config(), autostart=autostart)
        self.workspace = Workspace(self)
        self.vms = VMs(self, self.workspace)
        self.forwards = Forwards(self)
        self.images = Images(self)
        self.kernels = Kernels(self)
        self.snapshots = Snapshots(self)
        self.sessions = Sessions(self)
        self.daemon = Service(self)

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """One RPC call by name (``banger.api.methods.METHODS``): params and result
        are checked against the method's types; the result is plain JSON."""
        return self.rpc.call(method, timeout, **params)

    def send(self, method: str, params: Model, timeout: float | None = None) -> Any:
        """One RPC call with its parameters as their model (``banger.api.params``)."""
        return self.rpc.send(method, params, timeout)

    def operation(self, kind: str, op: dict[str, Any], *, on_progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Any:
        """Wait for operation ``op`` (a ``<kind>.begin`` answer) to end; its result.

        A cancel that comes after the operation's last cancellable step changes nothing:
        the operation's result is returned (a VM made is a VM the caller must know of).

        Raises:
            Cancelled: ``cancel`` was set and the daemon cancelled the operation.
            BangerError: the operation's own error.
        """
        asked = False
        while True:
            view = OpView.model_validate(op)
            if on_progress is not None:
                on_progress(view)
            if view.done:
                break
            if cancel is not None and cancel.is_set() and not asked:
                asked = True
                op = self.call(f"{kind}.cancel", id=view.id)
                if isinstance(cancel, Cancel):
                    cancel.asked.set()
                continue
            op = self.call(f"{kind}.status", id=view.id, wait_s=POLL_WAIT_S,
                           since=op["updated_at"])
        if view.error:
            raise from_code(view.error["code"], view.error["message"],
                            view.error.get("hint", ""))
        return view.result
