"""QMP, QEMU's JSON control protocol, over the VM's Unix socket.

One connection per call (:func:`qmp_command`), or a :class:`QMPSession` for a
conversation that must stay on one connection: a descriptor handed over with
``getfd`` belongs to the monitor connection that received it. Replies are read a
line at a time, at most :data:`MAX_REPLY` bytes each: the monitor runs in a process
a hostile guest may have taken over.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from banger.errors import VMMError

QMP_TIMEOUT_S = 5.0
MAX_REPLY = 1 << 20  # a query-migrate or query-status reply is a few hundred bytes


class QMPSession:
    """An open, negotiated QMP connection. Use as a context manager.

    Raises (from every method):
        VMMError: the connection failed, closed, sent something that is not QMP, or
            QEMU answered with an error.
    """

    def __init__(self, sock_path: Path, timeout_s: float = QMP_TIMEOUT_S) -> None:
        self.path = sock_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.reader = self.sock.makefile("rb")
        try:
            try:
                self.sock.connect(str(sock_path))
            except OSError as exc:
                raise VMMError(f"QMP on {sock_path}: cannot connect: {exc}") from exc
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> QMPSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                fds: tuple[int, ...] = ()) -> Any:
        """Run ``command`` and return its ``return`` value; ``fds`` ride along with it
        (``getfd``)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    err = reply["error"]
                    desc = err.get("desc") if isinstance(err, dict) else None
                    raise VMMError(f"QMP {command} on {self.path}: "
                                   f"{str(desc or 'error')[:200]}")
                # anything else is an asynchronous event: keep reading
        except OSError as exc:
            raise VMMError(f"QMP {command} on {self.path} failed: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        try:
            line = self.reader.readline(MAX_REPLY + 1)
        except OSError as exc:
            raise VMMError(f"QMP on {self.path} failed: {exc}") from exc
        if not line:
            raise VMMError(f"QMP on {self.path}: connection closed")
        if len(line) > MAX_REPLY or not line.endswith(b"\n"):
            raise VMMError(f"QMP on {self.path}: a reply longer than {MAX_REPLY} bytes")
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise VMMError(f"QMP on {self.path}: not JSON: {line[:80]!r}") from exc
        if not isinstance(obj, dict):
            raise VMMError(f"QMP on {self.path}: not a JSON object: {line[:80]!r}")
        return obj


def qmp_command(sock_path: Path, command: str, **arguments: Any) -> Any:
    """Run one QMP command on a connection of its own; its ``return`` value.

    Raises:
        VMMError: see :class:`QMPSession`.
    """
    with QMPSession(sock_path) as qmp:
        return qmp.execute(command, arguments or None)


def qmp_status(sock_path: Path) -> str | None:
    """The VM run state (``running``, ``paused``, ...) or None when QMP does not answer."""
    with contextlib.suppress(VMMError):
        ret = qmp_command(sock_path, "query-status")
        if isinstance(ret, dict):
            return str(ret.get("status"))
    return None


def wait_qmp_ready(sock_path: Path, budget_s: float) -> bool:
    """True once QEMU answers ``query-status`` on QMP; False if QEMU went away first.

    The launcher made the socket listen before QEMU ran, so the connect succeeds at
    once. QEMU 7.2 may greet before it has set up guest memory and devices, but it
    dispatches commands only from its main loop, which runs once they are set up:
    an answer means start-up is over. If QEMU dies first, the last descriptor of the
    socket closes and the read sees EOF or a reset. ``budget_s`` bounds a QEMU that
    neither answers nor dies.
    """
    try:
        with QMPSession(sock_path, timeout_s=budget_s) as qmp:
            qmp.execute("query-status")
    except VMMError:
        return False
    return True


def wait_status(qmp: QMPSession, want: Callable[[str], bool], budget_s: float,
                what: str) -> str:
    """Poll ``query-status`` until ``want(status)``; the status.

    Raises:
        VMMError: QEMU stopped answering, or ``budget_s`` passed (``what`` says for what).
    """
    deadline = time.monotonic() + budget_s
    while True:
        ret = qmp.execute("query-status")
        status = str(ret.get("status")) if isinstance(ret, dict) else ""
        if want(status):
            return status
        if time.monotonic() > deadline:
            raise VMMError(f"QEMU still {status!r} after {budget_s:.0f}s of {what}")
        time.sleep(0.05)
