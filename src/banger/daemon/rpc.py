"""The RPC dispatch table: method name -> handler taking validated params.

Handlers parse their params with a pydantic model (``bad_request`` on any
mismatch, naming the field) and return JSON-ready values. This table is the
daemon's whole control surface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field, ValidationError

from banger.api import Model
from banger.daemon import images, vms
from banger.errors import BadRequest

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

M = TypeVar("M", bound=Model)


def parse(model: type[M], params: dict[str, Any]) -> M:
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
    since: str | None = None


class KillParams(Model):
    name: str = Field(min_length=1, max_length=256)
    signal: str = "KILL"


class ImageBuildParams(Model):
    name: str | None = None


class RegisterParams(Model):
    name: str
    rootfs: str
    kernel: str
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
        return vms.op_view(vms.begin_create(d, parse(vms.CreateParams, p)))

    def create_status(p: dict[str, Any]) -> Any:
        r = parse(OpRef, p)
        return vms.op_status(d, r.id, r.wait_s, r.since)

    def create_cancel(p: dict[str, Any]) -> Any:
        op = d.create_ops.get(parse(OpRef, p).id)
        op.cancel.cancel("cancelled by the user")
        return vms.op_view(op)

    def image_build_begin(p: dict[str, Any]) -> Any:
        name = parse(ImageBuildParams, p).name or d.cfg.default_image_name
        return vms.op_view(images.begin_build(d, name))

    def image_build_status(p: dict[str, Any]) -> Any:
        r = parse(OpRef, p)
        op = d.image_ops.get(r.id)
        if r.wait_s:
            op.wait_change(op.updated_at, r.wait_s)
        return vms.op_view(op)

    def image_build_cancel(p: dict[str, Any]) -> Any:
        op = d.image_ops.get(parse(OpRef, p).id)
        op.cancel.cancel("cancelled by the user")
        return vms.op_view(op)

    def image_register(p: dict[str, Any]) -> Any:
        r = parse(RegisterParams, p)
        return images.register(d, r.name, r.rootfs, r.kernel, r.initrd)

    def kill(p: dict[str, Any]) -> Any:
        r = parse(KillParams, p)
        return vms.kill(d, r.name, r.signal)

    def stop() -> Any:
        d.shutdown()
        return {"stopping": True}

    def operations() -> Any:
        ops = [*d.create_ops.all(), *d.image_ops.all()]
        return [vms.op_view(o) for o in sorted(ops, key=lambda o: o.started_at)]

    d.methods.update({
        "daemon.ping": no(lambda: {"pong": True, **d.status()}),
        "daemon.status": no(d.status),
        "daemon.stop": no(stop),
        "daemon.operations.list": no(operations),
        "vm.create": lambda p: vms.create_sync(d, parse(vms.CreateParams, p)),
        "vm.create.begin": create_begin,
        "vm.create.status": create_status,
        "vm.create.cancel": create_cancel,
        "vm.start": ref(vms.start),
        "vm.stop": ref(vms.stop),
        "vm.restart": ref(vms.restart),
        "vm.kill": kill,
        "vm.delete": ref(vms.delete),
        "vm.list": no(lambda: vms.list_vms(d)),
        "vm.show": ref(vms.show),
        "vm.logs": ref(vms.logs),
        "vm.ssh_info": ref(vms.ssh_info),
        "image.build.begin": image_build_begin,
        "image.build.status": image_build_status,
        "image.build.cancel": image_build_cancel,
        "image.register": image_register,
        "image.list": no(lambda: images.list_images(d)),
        "image.show": ref(images.show),
        "image.delete": ref(images.delete),
    })
