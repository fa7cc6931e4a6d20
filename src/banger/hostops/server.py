"""The root helper's socket: one request per line, from one uid only.

The helper (``banger-helper``, run as root by ``banger-helper.service``) listens on
a Unix socket owned by the daemon's user, mode 0600, and checks every peer with
``SO_PEERCRED``: a connection from any uid but the owner's is closed without a
word. Each line is an :class:`~banger.hostops.ops.Envelope`; it is parsed (bounded
length, known shapes only), checked against the install's policy and done by the
:class:`~banger.hostops.executor.Executor`, and answered with a
:class:`~banger.hostops.ops.Reply`. A line that cannot be read costs an error reply,
never the helper: nothing a daemon sends can stop it serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from banger.api import first_error
from banger.errors import BadRequest, BangerError, HostError, from_foreign
from banger.hostops import ops
from banger.hostops.executor import Executor
from banger.unixserver import UnixServer

log = logging.getLogger("banger.helper")

MAX_CONNECTIONS = 32  # one daemon, one short request per connection
IDLE_TIMEOUT_S = 300.0


class HelperServer(UnixServer):
    """Serves ``executor`` on ``path`` to the processes of ``owner_uid`` (the socket is
    theirs, mode 0600)."""

    thread_name = "helper-conn"

    def __init__(self, executor: Executor, path: Path, owner_uid: int,
                 owner_gid: int) -> None:
        self.executor = executor
        self.owner_uid = owner_uid
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        super().__init__(path, max_connections=MAX_CONNECTIONS, backlog=16,
                         idle_timeout_s=IDLE_TIMEOUT_S)
        os.chown(path, owner_uid, owner_gid)

    def admits(self, uid: int) -> bool:
        """The owner's processes, and no one else's (root's neither: it has the host)."""
        return uid == self.owner_uid

    def serve(self, conn: socket.socket) -> None:
        """Answer one request per line until the daemon closes the connection."""
        reader = conn.makefile("rb")
        while True:
            line = reader.readline(ops.MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > ops.MAX_REQUEST:
                conn.sendall(_encode(ops.Reply(id=-1, error=_failure(BadRequest(
                    f"request longer than {ops.MAX_REQUEST} bytes")))))
                return  # the next line's start cannot be found safely
            if line.strip():
                _send(conn, answer_fds(self.executor, line))


def answer_fds(executor: Executor, line: bytes) -> tuple[ops.Reply, list[int]]:
    """:func:`answer`, with a result that is descriptors taken out of the reply: the
    reply says how many (``{"fds": n}``) and they travel beside it."""
    reply, fds = answer(executor, line), []
    if isinstance(reply.result, ops.Handover):
        fds = reply.result.fds
        reply = ops.Reply(id=reply.id, result={"fds": len(fds)})
    return reply, fds


def _send(conn: socket.socket, answered: tuple[ops.Reply, list[int]]) -> None:
    reply, fds = answered
    try:
        if fds:
            socket.send_fds(conn, [_encode(reply)], fds)
        else:
            conn.sendall(_encode(reply))
    finally:
        for fd in fds:
            os.close(fd)


def answer(executor: Executor, line: bytes) -> ops.Reply:
    """Parse ``line``, check it and do it with ``executor``; never raises."""
    try:
        env = ops.Envelope.model_validate_json(line)
    except ValidationError as exc:
        return ops.Reply(id=_id_of(line), error=_failure(BadRequest(
            f"not a request this helper knows: {first_error(exc, 'request')}")))
    try:
        result = executor.handle(env.req)
    except BangerError as exc:
        log.info("%s refused or failed: [%s] %s", env.req.op, exc.code, exc.message)
        return ops.Reply(id=env.id, error=_failure(exc))
    except Exception as exc:
        log.exception("%s failed", env.req.op)
        return ops.Reply(id=env.id, error=_failure(from_foreign(exc, env.req.op,
                                                                "the helper's log")))
    log.debug("%s done", env.req.op)
    return ops.Reply(id=env.id, result=result)


def _failure(exc: BangerError) -> ops.Failure:
    return ops.Failure(code=exc.code[:64], message=exc.message[:4096], hint=exc.hint[:4096])


def _encode(reply: ops.Reply) -> bytes:
    return reply.model_dump_json().encode() + b"\n"


def _id_of(line: bytes) -> int:
    """The request id of a line that did not parse, when it has a plain one (else -1)."""
    try:
        obj: Any = json.loads(line)
    except (ValueError, RecursionError):
        return -1
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2**53 \
        else -1


def check_root() -> None:
    """Refuse to start as anyone but root: the helper exists to hold root for the daemon.

    Raises:
        HostError: not root.
    """
    if os.geteuid() != 0:
        raise HostError("banger-helper must run as root",
                        hint="start it with `banger system install` (a systemd service)")
