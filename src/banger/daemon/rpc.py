"""The RPC dispatch table: method name -> handler taking validated params.

Each method's params are parsed with the model :data:`banger.api.methods.METHODS`
gives it (``bad_request`` on any mismatch, naming the field) before its handler runs;
handlers return JSON-ready values. This table is the daemon's whole control surface.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from banger.api import Model, first_error
from banger.api.methods import METHODS
from banger.api.params import NoParams, OpRef
from banger.daemon import (
    forwards,
    imagepromote,
    images,
    kernels,
    ports,
    sessionrpc,
    snapshots,
    vmcreate,
    vmdelete,
    vmegress,
    vmpool,
    vmpower,
    vms,
    vmsuspend,
    workspaces,
)
from banger.daemon.opstate import Operation, Registry
from banger.errors import BadRequest

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

M = TypeVar("M", bound=Model)
# A method's handler: its params, parsed (banger.api.methods.METHODS names the model).
Handler = Callable[[Any], Any]


def parse(model: type[M], params: dict[str, Any]) -> M:
    """Validate ``params`` against ``model``.

    Raises:
        BadRequest: the first validation error, naming the field (``invalid params: ...``).
    """
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        where = first_error(exc, "params", extra="unknown parameter")
        raise BadRequest(f"invalid params: {where}") from exc


def register(d: Daemon) -> None:
    """Fill ``d.methods``: each method's params are parsed with its model from
    :data:`banger.api.methods.METHODS` before its handler sees them.

    Raises:
        RuntimeError: the handlers here and ``METHODS`` name different methods (a bug
            caught at start-up, not by a client).
    """

    def op_methods(prefix: str, registry: Registry[Operation]) -> dict[str, Handler]:
        """``<prefix>.status`` (long-polls with wait_s) and ``<prefix>.cancel``."""

        def status(r: OpRef) -> Any:
            op = registry.get(r.id)
            if r.wait_s:
                since = r.since or op.updated_at
                if since.tzinfo is None:  # a client's naive timestamp is UTC, like ours
                    since = since.replace(tzinfo=UTC)
                op.wait_change(since, r.wait_s)
            return vms.op_view(op)

        def cancel(r: OpRef) -> Any:
            op = registry.get(r.id)
            op.request_cancel("cancelled by the user")
            return vms.op_view(op)

        return {f"{prefix}.status": status, f"{prefix}.cancel": cancel}

    def stop(_: NoParams) -> Any:
        d.shutdown()
        return {"stopping": True}

    def operations(_: NoParams) -> Any:
        ops = [o for r in d.op_registries for o in r.all()]
        return [vms.op_view(o) for o in sorted(ops, key=lambda o: o.started_at)]

    handlers: dict[str, Handler] = {
        "daemon.ping": lambda _: {"pong": True, **d.status()},
        "daemon.status": lambda _: {**d.status(), "vm_pool": vmpool.status(d)},
        "daemon.stop": stop,
        "daemon.operations.list": operations,
        "vm.create": lambda r: vmcreate.create_sync(d, r),
        "vm.create.begin": lambda r: vms.op_view(vmcreate.begin_create(d, r)),
        **op_methods("vm.create", d.create_ops),
        "vm.start": lambda r: vmpower.start(d, r.name),
        "vm.start.begin": lambda r: vms.op_view(vmpower.begin_start(d, r.name)),
        **op_methods("vm.start", d.power_ops),
        "vm.stop": lambda r: vmpower.stop(d, r.name),
        "vm.stop.begin": lambda r: vms.op_view(vmpower.begin_stop(d, r.name)),
        **op_methods("vm.stop", d.power_ops),
        "vm.restart": lambda r: vmpower.restart(d, r.name),
        "vm.restart.begin": lambda r: vms.op_view(vmpower.begin_restart(d, r.name)),
        **op_methods("vm.restart", d.power_ops),
        "vm.kill": lambda r: vmpower.kill(d, r.name, r.signal),
        "vm.pause": lambda r: vmsuspend.pause(d, r.name),
        "vm.resume": lambda r: vmsuspend.resume(d, r.name),
        "vm.suspend": lambda r: vmsuspend.suspend(d, r.name),
        "vm.suspend.begin": lambda r: vms.op_view(vmsuspend.begin_suspend(d, r.name)),
        **op_methods("vm.suspend", d.power_ops),
        "vm.snapshot": lambda r: snapshots.take(d, r.vm, r.name),
        "vm.snapshot.begin": lambda r: vms.op_view(snapshots.begin_snapshot(d, r.vm, r.name)),
        **op_methods("vm.snapshot", d.power_ops),
        "snapshot.list": lambda _: snapshots.list_snapshots(d),
        "snapshot.rm": lambda r: snapshots.remove(d, r.name),
        "vm.set_egress": lambda r: vmegress.set_egress(d, r),
        "vm.delete": lambda r: vmdelete.delete(d, r.name),
        "vm.list": lambda _: vms.list_vms(d),
        "vm.show": lambda r: vms.show(d, r.name),
        "vm.logs": lambda r: vms.logs(d, r.name),
        "vm.ssh_info": lambda r: vms.ssh_info(d, r.name),
        "vm.ports": lambda r: ports.ports(d, r.names),
        "vm.forward.add": lambda r: forwards.add(d, r.name, r.forward),
        "vm.forward.remove": lambda r: forwards.remove(d, r.name, r.forward),
        "vm.forward.list": lambda r: forwards.list_forwards(d, r.name),
        **sessionrpc.handlers(d),
        "image.build.begin": lambda r: vms.op_view(
            images.begin_build(d, r.name or d.cfg.default_image_name)),
        **op_methods("image.build", d.image_ops),
        "image.pull.begin": lambda r: _distribution().image_pull_begin(d, r),
        **op_methods("image.pull", d.image_ops),
        "image.export.begin": lambda r: _distribution().image_export_begin(d, r),
        **op_methods("image.export", d.image_ops),
        "catalog.list": lambda r: _distribution().catalog_list(d, r),
        "image.promote": lambda r: imagepromote.promote(d, r.vm, r.name),
        "image.cache.prune": lambda r: _distribution().cache_prune(d, r),
        "vm.workspace.prepare.begin": lambda r: vms.op_view(workspaces.begin_prepare(d, r)),
        **op_methods("vm.workspace.prepare", d.workspace_ops),
        "vm.workspace.export": lambda r: workspaces.export(d, r),
        "vm.workspace.status": lambda r: workspaces.status(d, r.name),
        "image.register": lambda r: images.register(d, r.name, r.rootfs, r.kernel, r.initrd,
                                                    kernel_name=r.kernel_name),
        "image.list": lambda _: images.list_images(d),
        "image.show": lambda r: images.show(d, r.name),
        "image.delete": lambda r: images.delete(d, r.name),
        "image.set_kernel": lambda r: images.set_kernel(d, r.name, r.kernel),
        "kernel.import": lambda r: kernels.import_files(d, r.name, r.paths, r.initrd),
        "kernel.build.begin": lambda r: vms.op_view(
            kernels.begin_build(d, r.name, r.base_config, r.source, r.jobs)),
        **op_methods("kernel.build", d.kernel_ops),
        "kernel.pull.begin": lambda r: _distribution().kernel_pull_begin(d, r),
        **op_methods("kernel.pull", d.kernel_ops),
        "kernel.list": lambda _: kernels.list_kernels(d),
        "kernel.show": lambda r: kernels.show(d, r.name),
        "kernel.rm": lambda r: kernels.remove(d, r.name),
    }
    if set(handlers) != set(METHODS):
        raise RuntimeError("rpc handlers and api.methods.METHODS differ: "
                           f"{sorted(set(handlers) ^ set(METHODS))}")
    d.methods.update({name: _parsing(METHODS[name].params, fn)
                      for name, fn in handlers.items()})


def _distribution() -> ModuleType:
    """:mod:`.distrpc`, loaded on the first call of one of its methods: deliberately
    here and not at the top, so a daemon that never pulls or exports an image does not
    hold httpx (see that module)."""
    from banger.daemon import distrpc

    return distrpc


def _parsing(model: type[Model], handler: Handler) -> Callable[[dict[str, Any]], Any]:
    """``handler`` behind :func:`parse` with ``model``: what the server calls."""
    return lambda raw: handler(parse(model, raw))
