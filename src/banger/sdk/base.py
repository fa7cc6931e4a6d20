"""What the SDK's namespaces share: the progress callback's type, answers made into
view models, and operations followed to a typed result."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from banger import client as rpc
from banger.api import Model, OpView
from banger.api.methods import parse_result

Progress = Callable[[OpView], None]
M = TypeVar("M", bound=Model)


class Caller(Protocol):
    """What a namespace needs of its client (:class:`banger.sdk.client.Client`)."""

    rpc: rpc.Client

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """One RPC call by name."""
        ...

    def send(self, method: str, params: Model, timeout: float | None = None) -> Any:
        """One RPC call with its parameters as their model."""
        ...

    def operation(self, kind: str, op: dict[str, Any], *, on_progress: Progress | None = None,
                  cancel: threading.Event | None = None) -> Any:
        """Wait for operation ``op`` to end; its result."""
        ...


def view(kind: type[M], value: Any, what: str) -> M:
    """``value`` (the answer to ``what``) as a ``kind`` model.

    Raises:
        BadVersion: it is not one: a daemon of another banger version answered.
    """
    return cast(M, parse_result(kind, value, what))


def views(kind: type[M], value: Any, what: str) -> list[M]:
    """``value`` (the answer to ``what``) as a list of ``kind`` models (see :func:`view`)."""
    return cast(list[M], parse_result(list[kind], value, what))  # type: ignore[valid-type]


class DaemonPath(str):
    """A path on the daemon's machine (a remote host's), passed to it as it is: never
    resolved against this machine's files."""


def absolute(path: str | Path) -> str:
    """``path`` made absolute here: bangerd's working directory is not the caller's (a
    :class:`DaemonPath` is already the daemon's)."""
    if isinstance(path, DaemonPath):
        return str(path)
    return str(Path(path).resolve())


class Namespace:
    """A group of the client's methods (``client.vms``, ``client.images``, ...)."""

    def __init__(self, client: Caller) -> None:
        self._c = client

    def _wait(self, kind: str, op: Any, result: type[M], on_progress: Progress | None,
              cancel: threading.Event | None) -> M:
        """Operation ``op`` (the answer to ``<kind>.begin``) followed to its end
        (:meth:`Client.operation`); its result as a ``result`` model."""
        done = self._c.operation(kind, op, on_progress=on_progress, cancel=cancel)
        return view(result, done, kind)
