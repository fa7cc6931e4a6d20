"""The Unix-socket JSON-RPC server.

One thread per connection (bounded), newline-delimited frames of at most
``MAX_FRAME`` bytes, several requests per connection. The socket is mode 0600
and every peer's uid is checked with ``SO_PEERCRED``: a foreign uid is dropped
without a reply. A slow, silent or half-closed client only ever occupies its
own thread until the idle timeout.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger import api
from banger.daemon.core import current_op
from banger.errors import BadRequest, BadVersion, BangerError, HostError, InternalError
from banger.protocol import MAX_FRAME
from banger.unixserver import UnixServer

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.server")

MAX_CONNECTIONS = 128  # concurrent clients; more are refused by closing at once
IDLE_TIMEOUT_S = 300.0  # a connection that sends nothing for this long is closed


class RPCServer(UnixServer):
    """bangerd's socket: root and the daemon's own user may connect."""

    thread_name = "rpc-conn"

    def __init__(self, d: Daemon, path: Path) -> None:
        self.d = d
        if path.exists():
            if _alive(path):
                raise HostError(f"another bangerd is already serving {path}",
                                hint="`banger daemon status` shows it")
            path.unlink()
        super().__init__(path, max_connections=MAX_CONNECTIONS, backlog=64,
                         idle_timeout_s=IDLE_TIMEOUT_S)
        self.allowed_uids = {0, os.getuid()}

    def admits(self, uid: int) -> bool:
        """Root and the daemon's own user."""
        return uid in self.allowed_uids

    def serve(self, conn: socket.socket) -> None:
        """Answer one JSON-RPC request per line until the client closes."""
        reader = conn.makefile("rb")
        while True:
            frame = reader.readline(MAX_FRAME + 1)
            if not frame:
                return  # client closed (or half-closed) its side
            if len(frame) > MAX_FRAME:
                err = BadRequest(f"frame exceeds {MAX_FRAME} bytes",
                                 hint="requests are one JSON object per line")
                conn.sendall(api.encode(api.error_response(None, err, api.INVALID_REQUEST)))
                return  # cannot find the next frame boundary safely
            if not frame.strip():
                continue
            conn.sendall(_encode_reply(self._answer(frame), self.d.log_location))

    def _answer(self, frame: bytes) -> dict[str, Any]:
        """:meth:`handle_frame`, with a last guard so that a bug in it costs one error
        reply, never the connection (a thread that dies drops the client's later
        requests without a word)."""
        try:
            return self.handle_frame(frame)
        except Exception as exc:
            err = self.d.error_of(exc, "reading a request")
            return api.error_response(None, err, api.SERVER_ERROR)

    def handle_frame(self, frame: bytes) -> dict[str, Any]:
        """Decode, dispatch and encode one request; never raises."""
        try:
            req = api.decode_request(frame)
        except BadVersion as exc:
            return api.error_response(api.request_id_of(frame), exc, api.INVALID_REQUEST)
        except BadRequest as exc:
            code = api.PARSE_ERROR if "malformed JSON" in exc.message else api.INVALID_REQUEST
            return api.error_response(api.request_id_of(frame), exc, code)
        token = current_op.set(f"{req.method}#{secrets.token_hex(3)}")
        try:
            handler = self.d.methods.get(req.method)
            if handler is None:
                raise api.UnknownMethod(f"unknown method {req.method!r}")
            log.debug("call %s", req.method)
            result = handler(req.params)
            return api.result_response(req.id, result)
        except api.UnknownMethod as exc:
            return api.error_response(req.id, exc, api.METHOD_NOT_FOUND)
        except BadRequest as exc:
            return api.error_response(req.id, exc, api.INVALID_PARAMS)
        except BangerError as exc:
            log.info("%s failed: [%s] %s", req.method, exc.code, exc.message)
            return api.error_response(req.id, exc, api.SERVER_ERROR)
        except Exception as exc:
            # A host failure nobody translated, or a bug (logged with its traceback,
            # reported as `internal` naming the log): never a host error with a doctor hint.
            return api.error_response(req.id, self.d.error_of(exc, req.method),
                                      api.SERVER_ERROR)
        finally:
            current_op.reset(token)


def _encode_reply(resp: dict[str, Any], log_location: str) -> bytes:
    """Encode a reply; one that cannot be sent becomes an error reply instead.

    Too large for a frame is the caller's to fix (ask for less); a value JSON cannot
    encode (nesting past the recursion limit, an integer past the int-string limit)
    is a bug in the handler that produced it.
    """
    err: BangerError
    try:
        return api.encode(resp)
    except BangerError as exc:
        log.warning("reply not sent: %s", exc.message)
        err = BadRequest(f"the reply is too large to send: {exc.message}",
                         hint="ask for less (e.g. a shorter log tail)")
    except (ValueError, TypeError, RecursionError) as exc:
        log.error("reply not encodable", exc_info=exc)
        err = InternalError(f"the reply could not be encoded ({type(exc).__name__}); the "
                            f"traceback is in {log_location}")
    return api.encode(api.error_response(resp.get("id"), err, api.SERVER_ERROR))


def _alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
