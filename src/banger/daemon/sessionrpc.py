"""The ``vm.session.*`` RPC methods: parameter models and their handlers
(merged into the dispatch table by :mod:`banger.daemon.rpc`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from banger.api import Model
from banger.daemon import sessions
from banger.daemon.sessionctl import MAX_WRITE

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

Parse = Callable[[type[Any], dict[str, Any]], Any]

VMRef = Annotated[str, Field(min_length=1, max_length=256)]
SessionName = Annotated[str, Field(min_length=1, max_length=63)]
AttachmentId = Annotated[str, Field(min_length=1, max_length=64)]


class StartParams(Model):
    vm: VMRef
    argv: list[str] = Field(min_length=1, max_length=sessions.MAX_ARGV)
    name: str | None = None
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=sessions.MAX_ENV)
    tty: bool = False
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)


class SessionRef(Model):
    vm: VMRef
    name: SessionName


class ListParams(Model):
    vm: str | None = None
    fresh: bool = True  # False: the rows as last known, no guest read (completion)


class LogsParams(Model):
    vm: VMRef
    name: SessionName
    cursor: str = Field(default="0:0", max_length=40)
    wait_s: float = Field(default=0.0, ge=0, le=30)
    attachment: str | None = Field(default=None, max_length=64)


class SendParams(Model):
    vm: VMRef
    name: SessionName
    text: str = Field(max_length=sessions.MAX_TEXT)
    newline: bool = True


class StopParams(Model):
    vm: VMRef
    name: SessionName
    timeout_s: float = Field(default=10.0, ge=0, le=300)


class KillParams(Model):
    vm: VMRef
    name: SessionName
    signal: str = Field(default="KILL", max_length=16)


class AttachParams(Model):
    vm: VMRef
    name: SessionName
    write: bool = True


class WriteParams(Model):
    attachment: AttachmentId
    data: str = Field(max_length=(MAX_WRITE * 4) // 3 + 4)


class ResizeParams(Model):
    attachment: AttachmentId
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class AttachmentRef(Model):
    attachment: AttachmentId


def methods(d: Daemon, parse: Parse) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """``vm.session.*`` handlers; ``parse`` validates params (``rpc.parse``)."""

    def start(p: dict[str, Any]) -> Any:
        r = parse(StartParams, p)
        return sessions.start(d, sessions.StartRequest(
            vm=r.vm, argv=tuple(r.argv), name=r.name, cwd=r.cwd, env=tuple(r.env.items()),
            tty=r.tty, rows=r.rows, cols=r.cols))

    def logs(p: dict[str, Any]) -> Any:
        r = parse(LogsParams, p)
        return sessions.logs(d, r.vm, r.name, cursor=r.cursor, wait_s=r.wait_s,
                             attachment=r.attachment)

    return {
        "vm.session.start": start,
        "vm.session.list": lambda p: _list(d, parse(ListParams, p)),
        "vm.session.show": lambda p: sessions.show(d, (r := parse(SessionRef, p)).vm, r.name),
        "vm.session.logs": logs,
        "vm.session.send": lambda p: sessions.send(
            d, (r := parse(SendParams, p)).vm, r.name, r.text, r.newline),
        "vm.session.stop": lambda p: sessions.stop(
            d, (r := parse(StopParams, p)).vm, r.name, r.timeout_s),
        "vm.session.kill": lambda p: sessions.kill(
            d, (r := parse(KillParams, p)).vm, r.name, r.signal),
        "vm.session.rm": lambda p: sessions.remove(d, (r := parse(SessionRef, p)).vm, r.name),
        "vm.session.attach": lambda p: sessions.attach(
            d, (r := parse(AttachParams, p)).vm, r.name, r.write),
        "vm.session.write": lambda p: sessions.write(
            d, (r := parse(WriteParams, p)).attachment, r.data),
        "vm.session.resize": lambda p: sessions.resize(
            d, (r := parse(ResizeParams, p)).attachment, r.rows, r.cols),
        "vm.session.detach": lambda p: sessions.detach(
            d, parse(AttachmentRef, p).attachment),
    }


def _list(d: Daemon, p: ListParams) -> list[dict[str, Any]]:
    return sessions.list_sessions(d, p.vm, fresh=p.fresh)
