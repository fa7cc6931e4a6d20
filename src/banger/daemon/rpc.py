"""The RPC dispatch table: method name -> handler taking validated params.

Handlers parse their params with a pydantic model (``bad_request`` on any
mismatch, naming the field) and return JSON-ready values. This table is the
daemon's whole control surface.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field, ValidationError

from banger.api import Model
from banger.daemon import (
    bundles,
    catalog,
    forwards,
    imagepromote,
    imagepull,
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


def parse(model: type[M], params: dict[str, Any]) -> M:
    """Validate ``params`` against ``model``.

    Raises:
        BadRequest: the first validation error, naming the field (``invalid params: ...``).
    """
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "params"
        msg = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"invalid params: {where}: {msg}") from exc


class NoParams(Model):
    pass


class Ref(Model):
    name: str = Field(min_length=1, max_length=256)


class OpRef(Model):
    id: str = Field(min_length=1, max_length=64)
    wait_s: float = Field(default=0.0, ge=0, le=30)
    since: datetime | None = None


class KillParams(Model):
    name: str = Field(min_length=1, max_length=256)
    signal: str = "KILL"


class ImageBuildParams(Model):
    name: str | None = None


class PullParams(Model):
    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = None
    size_bytes: int | None = None
    kernel: str | None = None
    insecure: bool = False


class ExportParams(Model):
    name: str = Field(min_length=1, max_length=256)
    output: str = Field(min_length=1, max_length=4096)
    owner_uid: int | None = Field(default=None, ge=0, le=2**32 - 2)
    owner_gid: int | None = Field(default=None, ge=0, le=2**32 - 2)


class KernelPullParams(Model):
    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = None
    insecure: bool = False


class CatalogParams(Model):
    kind: Literal["image", "kernel"] = "image"
    insecure: bool = False


class PromoteParams(Model):
    vm: str = Field(min_length=1, max_length=256)
    name: str


class SnapshotParams(Model):
    vm: str = Field(min_length=1, max_length=256)
    name: str


class PruneParams(Model):
    dry_run: bool = False


class PortsParams(Model):
    names: list[str] = Field(default_factory=list, max_length=256)


class ForwardParams(Model):
    name: str = Field(min_length=1, max_length=256)
    forward: str = Field(min_length=1, max_length=64)


class ForwardListParams(Model):
    name: str | None = None


class RegisterParams(Model):
    name: str
    rootfs: str
    kernel: str | None = None
    initrd: str | None = None
    kernel_name: str | None = None


class SetKernelParams(Model):
    name: str
    kernel: str | None = None


class KernelBuildParams(Model):
    name: str = "banger-6.1"
    base_config: str | None = None
    source: str | None = None
    jobs: int | None = Field(default=None, ge=1, le=256)


class KernelImportParams(Model):
    name: str
    paths: list[str] = Field(min_length=1, max_length=2)
    initrd: str | None = None


def register(d: Daemon) -> None:
    """Fill ``d.methods``."""

    def no(fn: Callable[[], Any]) -> Callable[[dict[str, Any]], Any]:
        def handler(p: dict[str, Any]) -> Any:
            parse(NoParams, p)
            return fn()
        return handler

    def ref(fn: Callable[[Daemon, str], Any]) -> Callable[[dict[str, Any]], Any]:
        return lambda p: fn(d, parse(Ref, p).name)

    def create_begin(p: dict[str, Any]) -> Any:
        return vms.op_view(vmcreate.begin_create(d, parse(vmcreate.CreateParams, p)))

    def op_methods(prefix: str, registry: Registry[Operation]
                   ) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """``<prefix>.status`` (long-polls with wait_s) and ``<prefix>.cancel``."""

        def status(p: dict[str, Any]) -> Any:
            r = parse(OpRef, p)
            op = registry.get(r.id)
            if r.wait_s:
                since = r.since or op.updated_at
                if since.tzinfo is None:  # a client's naive timestamp is UTC, like ours
                    since = since.replace(tzinfo=UTC)
                op.wait_change(since, r.wait_s)
            return vms.op_view(op)

        def cancel(p: dict[str, Any]) -> Any:
            op = registry.get(parse(OpRef, p).id)
            op.request_cancel("cancelled by the user")
            return vms.op_view(op)

        return {f"{prefix}.status": status, f"{prefix}.cancel": cancel}

    def image_build_begin(p: dict[str, Any]) -> Any:
        name = parse(ImageBuildParams, p).name or d.cfg.default_image_name
        return vms.op_view(images.begin_build(d, name))

    def image_pull_begin(p: dict[str, Any]) -> Any:
        r = parse(PullParams, p)
        req = imagepull.check_request(d, r.reference, name=r.name, size_bytes=r.size_bytes,
                                      kernel_name=r.kernel, insecure=r.insecure)
        return vms.op_view(imagepull.begin_pull(d, req))

    def image_export_begin(p: dict[str, Any]) -> Any:
        r = parse(ExportParams, p)
        owner = (r.owner_uid, r.owner_gid) if r.owner_uid is not None \
            and r.owner_gid is not None else None
        return vms.op_view(bundles.begin_export(d, r.name, r.output, owner))

    def kernel_pull_begin(p: dict[str, Any]) -> Any:
        r = parse(KernelPullParams, p)
        req = bundles.check_request(d, r.reference, kind="kernel", name=r.name,
                                    size_bytes=None, insecure=r.insecure)
        return vms.op_view(bundles.begin_pull(d, req))

    def catalog_list(p: dict[str, Any]) -> Any:
        r = parse(CatalogParams, p)
        return catalog.available(d.cfg.catalog_url, kind=r.kind, insecure=r.insecure)

    def prepare_begin(p: dict[str, Any]) -> Any:
        return vms.op_view(workspaces.begin_prepare(d, parse(workspaces.PrepareParams, p)))

    def image_register(p: dict[str, Any]) -> Any:
        r = parse(RegisterParams, p)
        return images.register(d, r.name, r.rootfs, r.kernel, r.initrd,
                               kernel_name=r.kernel_name)

    def image_set_kernel(p: dict[str, Any]) -> Any:
        r = parse(SetKernelParams, p)
        return images.set_kernel(d, r.name, r.kernel)

    def kernel_build(p: dict[str, Any]) -> Any:
        r = parse(KernelBuildParams, p)
        return vms.op_view(kernels.begin_build(d, r.name, r.base_config, r.source, r.jobs))

    def kernel_import(p: dict[str, Any]) -> Any:
        r = parse(KernelImportParams, p)
        return kernels.import_files(d, r.name, r.paths, r.initrd)

    def kill(p: dict[str, Any]) -> Any:
        r = parse(KillParams, p)
        return vmpower.kill(d, r.name, r.signal)

    def stop() -> Any:
        d.shutdown()
        return {"stopping": True}

    def operations() -> Any:
        ops = [o for r in d.op_registries for o in r.all()]
        return [vms.op_view(o) for o in sorted(ops, key=lambda o: o.started_at)]

    d.methods.update({
        "daemon.ping": no(lambda: {"pong": True, **d.status()}),
        "daemon.status": no(lambda: {**d.status(), "vm_pool": vmpool.status(d)}),
        "daemon.stop": no(stop),
        "daemon.operations.list": no(operations),
        "vm.create": lambda p: vmcreate.create_sync(d, parse(vmcreate.CreateParams, p)),
        "vm.create.begin": create_begin,
        **op_methods("vm.create", d.create_ops),
        "vm.start": ref(vmpower.start),
        "vm.start.begin": ref(lambda d, name: vms.op_view(vmpower.begin_start(d, name))),
        **op_methods("vm.start", d.power_ops),
        "vm.stop": ref(vmpower.stop),
        "vm.stop.begin": ref(lambda d, name: vms.op_view(vmpower.begin_stop(d, name))),
        **op_methods("vm.stop", d.power_ops),
        "vm.restart": ref(vmpower.restart),
        "vm.restart.begin": ref(lambda d, name: vms.op_view(vmpower.begin_restart(d, name))),
        **op_methods("vm.restart", d.power_ops),
        "vm.kill": kill,
        "vm.pause": ref(vmsuspend.pause),
        "vm.resume": ref(vmsuspend.resume),
        "vm.suspend": ref(vmsuspend.suspend),
        "vm.suspend.begin": ref(lambda d, name: vms.op_view(vmsuspend.begin_suspend(d, name))),
        **op_methods("vm.suspend", d.power_ops),
        "vm.snapshot": lambda p: snapshots.take(d, (r := parse(SnapshotParams, p)).vm, r.name),
        "vm.snapshot.begin": lambda p: vms.op_view(snapshots.begin_snapshot(
            d, (r := parse(SnapshotParams, p)).vm, r.name)),
        **op_methods("vm.snapshot", d.power_ops),
        "snapshot.list": no(lambda: snapshots.list_snapshots(d)),
        "snapshot.rm": ref(snapshots.remove),
        "vm.set_egress": lambda p: vmegress.set_egress(d, parse(vmegress.EgressParams, p)),
        "vm.delete": ref(vmdelete.delete),
        "vm.list": no(lambda: vms.list_vms(d)),
        "vm.show": ref(vms.show),
        "vm.logs": ref(vms.logs),
        "vm.ssh_info": ref(vms.ssh_info),
        "vm.ports": lambda p: ports.ports(d, parse(PortsParams, p).names),
        "vm.forward.add": lambda p: forwards.add(
            d, (r := parse(ForwardParams, p)).name, r.forward),
        "vm.forward.remove": lambda p: forwards.remove(
            d, (r := parse(ForwardParams, p)).name, r.forward),
        "vm.forward.list": lambda p: forwards.list_forwards(
            d, parse(ForwardListParams, p).name),
        **sessionrpc.methods(d, parse),
        "image.build.begin": image_build_begin,
        **op_methods("image.build", d.image_ops),
        "image.pull.begin": image_pull_begin,
        **op_methods("image.pull", d.image_ops),
        "image.export.begin": image_export_begin,
        **op_methods("image.export", d.image_ops),
        "catalog.list": catalog_list,
        "image.promote": lambda p: imagepromote.promote(
            d, (r := parse(PromoteParams, p)).vm, r.name),
        "image.cache.prune": lambda p: imagepull.prune_cache(
            d, dry_run=parse(PruneParams, p).dry_run),
        "vm.workspace.prepare.begin": prepare_begin,
        **op_methods("vm.workspace.prepare", d.workspace_ops),
        "vm.workspace.export": lambda p: workspaces.export(
            d, parse(workspaces.ExportParams, p)),
        "vm.workspace.status": ref(workspaces.status),
        "image.register": image_register,
        "image.list": no(lambda: images.list_images(d)),
        "image.show": ref(images.show),
        "image.delete": ref(images.delete),
        "image.set_kernel": image_set_kernel,
        "kernel.import": kernel_import,
        "kernel.build.begin": kernel_build,
        **op_methods("kernel.build", d.kernel_ops),
        "kernel.pull.begin": kernel_pull_begin,
        **op_methods("kernel.pull", d.kernel_ops),
        "kernel.list": no(lambda: kernels.list_kernels(d)),
        "kernel.show": ref(kernels.show),
        "kernel.rm": ref(kernels.remove),
    })
