"""The ``vm.session.*`` RPC methods' handlers, merged into the dispatch table by
:mod:`banger.daemon.rpc` (their parameter models are in :mod:`banger.api.params`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from banger.api.params import SessionListParams, SessionLogsParams, SessionStartParams
from banger.daemon import sessions

if TYPE_CHECKING:
    from banger.daemon.core import Daemon


def handlers(d: Daemon) -> dict[str, Callable[[Any], Any]]:
    """``vm.session.*`` handlers, each taking its params parsed (``rpc.register``)."""

    def start(r: SessionStartParams) -> Any:
        return sessions.start(d, sessions.StartRequest(
            vm=r.vm, argv=tuple(r.argv), name=r.name, cwd=r.cwd, env=tuple(r.env.items()),
            tty=r.tty, rows=r.rows, cols=r.cols))

    def logs(r: SessionLogsParams) -> Any:
        return sessions.logs(d, r.vm, r.name, cursor=r.cursor, wait_s=r.wait_s,
                             attachment=r.attachment)

    def listing(r: SessionListParams) -> Any:
        return sessions.list_sessions(d, r.vm, fresh=r.fresh)

    return {
        "vm.session.start": start,
        "vm.session.list": listing,
        "vm.session.show": lambda r: sessions.show(d, r.vm, r.name),
        "vm.session.logs": logs,
        "vm.session.send": lambda r: sessions.send(d, r.vm, r.name, r.text, r.newline),
        "vm.session.stop": lambda r: sessions.stop(d, r.vm, r.name, r.timeout_s),
        "vm.session.kill": lambda r: sessions.kill(d, r.vm, r.name, r.signal),
        "vm.session.rm": lambda r: sessions.remove(d, r.vm, r.name),
        "vm.session.attach": lambda r: sessions.attach(d, r.vm, r.name, r.write),
        "vm.session.write": lambda r: sessions.write(d, r.attachment, r.data),
        "vm.session.resize": lambda r: sessions.resize(d, r.attachment, r.rows, r.cols),
        "vm.session.detach": lambda r: sessions.detach(d, r.attachment),
    }
