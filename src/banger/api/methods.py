"""Every RPC method by name: the model its params are validated against and its result's type.

The daemon's dispatch table (:mod:`banger.daemon.rpc`) has exactly these methods (a
unit test holds the two together); a client checks its params before sending them
(:func:`check_params`: a misspelt field is refused here, not on the daemon) and every
reply against the result type (:func:`check_result`). A result typed ``Any`` is JSON
the caller reads as such (status documents, receipts such as ``{"deleted": NAME}``, the
workspace's records). An operation's result (its view's ``result``) is checked by the
SDK method that waits for it (:mod:`banger.sdk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from banger.api import (
    CachePruneView,
    CatalogEntry,
    EgressView,
    ForwardView,
    ImageView,
    KernelView,
    Model,
    OpView,
    PortsView,
    SessionAttachment,
    SessionLogs,
    SessionView,
    SnapshotView,
    SSHInfo,
    VMDetail,
    VMLogs,
    VMView,
    first_error,
)
from banger.api import params as p
from banger.errors import BadRequest, BadVersion


@dataclass(frozen=True)
class Method:
    params: type[Model]
    result: Any = Any  # a view model, a list of them, or Any (plain JSON)


def _op(begin: type[Model]) -> dict[str, Method]:
    """An operation's begin method takes ``begin``; ``status`` and ``cancel`` take its id.
    All three answer with the operation's view."""
    return {"begin": Method(begin, OpView), "status": Method(p.OpRef, OpView),
            "cancel": Method(p.OpRef, OpView)}


def _ops(prefix: str, begin: type[Model]) -> dict[str, Method]:
    return {f"{prefix}.{verb}": m for verb, m in _op(begin).items()}


METHODS: dict[str, Method] = {
    "daemon.ping": Method(p.NoParams),
    "daemon.status": Method(p.NoParams),
    "daemon.stop": Method(p.NoParams),
    "daemon.operations.list": Method(p.NoParams, list[OpView]),
    "vm.create": Method(p.CreateParams, VMView),
    **_ops("vm.create", p.CreateParams),
    "vm.start": Method(p.NameRef, VMView),
    **_ops("vm.start", p.NameRef),
    "vm.stop": Method(p.NameRef, VMView),
    **_ops("vm.stop", p.NameRef),
    "vm.restart": Method(p.NameRef, VMView),
    **_ops("vm.restart", p.NameRef),
    "vm.kill": Method(p.VMKillParams, VMView),
    "vm.pause": Method(p.NameRef, VMView),
    "vm.resume": Method(p.NameRef, VMView),
    "vm.suspend": Method(p.NameRef, VMView),
    **_ops("vm.suspend", p.NameRef),
    "vm.snapshot": Method(p.SnapshotParams, SnapshotView),
    **_ops("vm.snapshot", p.SnapshotParams),
    "snapshot.list": Method(p.NoParams, list[SnapshotView]),
    "snapshot.rm": Method(p.NameRef, SnapshotView),
    "vm.set_egress": Method(p.EgressParams, EgressView),
    "vm.delete": Method(p.NameRef),
    "vm.list": Method(p.NoParams, list[VMView]),
    "vm.show": Method(p.NameRef, VMDetail),
    "vm.logs": Method(p.NameRef, VMLogs),
    "vm.ssh_info": Method(p.NameRef, SSHInfo),
    "vm.ports": Method(p.PortsParams, list[PortsView]),
    "vm.forward.add": Method(p.ForwardParams, ForwardView),
    "vm.forward.remove": Method(p.ForwardParams),
    "vm.forward.list": Method(p.ForwardListParams, list[ForwardView]),
    "vm.session.start": Method(p.SessionStartParams, SessionView),
    "vm.session.list": Method(p.SessionListParams, list[SessionView]),
    "vm.session.show": Method(p.SessionRef, SessionView),
    "vm.session.logs": Method(p.SessionLogsParams, SessionLogs),
    "vm.session.send": Method(p.SessionSendParams),
    "vm.session.stop": Method(p.SessionStopParams, SessionView),
    "vm.session.kill": Method(p.SessionKillParams, SessionView),
    "vm.session.rm": Method(p.SessionRef),
    "vm.session.attach": Method(p.SessionAttachParams, SessionAttachment),
    "vm.session.write": Method(p.AttachWriteParams),
    "vm.session.resize": Method(p.AttachResizeParams),
    "vm.session.detach": Method(p.AttachmentRef),
    **_ops("image.build", p.ImageBuildParams),
    **_ops("image.pull", p.ImagePullParams),
    **_ops("image.export", p.ImageExportParams),
    "catalog.list": Method(p.CatalogParams, list[CatalogEntry]),
    "image.promote": Method(p.ImagePromoteParams, ImageView),
    "image.cache.prune": Method(p.CachePruneParams, CachePruneView),
    **_ops("vm.workspace.prepare", p.WorkspacePrepareParams),
    "vm.workspace.export": Method(p.WorkspaceExportParams),
    "vm.workspace.status": Method(p.NameRef),
    "image.register": Method(p.ImageRegisterParams, ImageView),
    "image.list": Method(p.NoParams, list[ImageView]),
    "image.show": Method(p.NameRef, ImageView),
    "image.delete": Method(p.NameRef),
    "image.set_kernel": Method(p.SetKernelParams, ImageView),
    "kernel.import": Method(p.KernelImportParams, KernelView),
    **_ops("kernel.build", p.KernelBuildParams),
    **_ops("kernel.pull", p.KernelPullParams),
    "kernel.list": Method(p.NoParams, list[KernelView]),
    "kernel.show": Method(p.NameRef, KernelView),
    "kernel.rm": Method(p.NameRef),
}


def check_params(method: str, params: dict[str, Any]) -> None:
    """Refuse ``params`` that ``method``'s model would (an unknown method passes: the
    daemon names it in its answer).

    Raises:
        BadRequest: the first field at fault, as the daemon would name it.
    """
    known = METHODS.get(method)
    if known is None:
        return
    try:
        known.params.model_validate(params)
    except ValidationError as exc:
        raise invalid_params(method, exc) from exc


def invalid_params(method: str, exc: ValidationError) -> BadRequest:
    """The error for params of ``method`` its model refused: the first field at fault."""
    where = first_error(exc, "params", extra="unknown parameter")
    return BadRequest(f"invalid params for {method}: {where}")


def check_result(method: str, value: Any) -> Any:
    """``value`` unchanged once it has the shape ``method``'s result type says.

    Raises:
        BadVersion: it has not: a daemon of another banger version answered.
    """
    known = METHODS.get(method)
    if known is None or known.result is Any:
        return value
    parse_result(known.result, value, method)
    return value


def parse_result(kind: Any, value: Any, what: str) -> Any:
    """``value`` (the answer to ``what``: a method, or an operation's kind) validated as
    ``kind``: models made of the JSON.

    Raises:
        BadVersion: it does not have that shape: a daemon of another banger version
            answered.
    """
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as exc:
        raise BadVersion(f"bangerd's reply to {what} does not have the shape this banger "
                         f"expects ({first_error(exc, 'result')})",
                         hint="the CLI and the daemon are different versions: "
                              "`banger daemon restart` starts this one's") from exc


@cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)
