"""QMP client against a scripted QMP server on a Unix socket: the conversation, a
descriptor handed over with ``getfd``, errors, bounded and hostile replies, and the
save's migration polling (the real QEMU runs in tests/e2e/test_suspend.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.daemon import qemuproc
from banger.daemon.qemuproc import QemuDriver
from banger.daemon.qemuproc.qmp import MAX_REPLY, QMPSession, qmp_command, qmp_status
from banger.errors import VMMError
from banger.layout import VMPaths

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'
Handler = Callable[[dict[str, Any], list[int]], bytes]


class FakeQMP:
    """Serves one connection at a time: the greeting, then ``handler``'s reply to each
    command (``qmp_capabilities`` is answered here). Records commands and received fds."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.commands: list[dict[str, Any]] = []
        self.fds: list[int] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:  # a client may hang up mid-reply
                conn.sendall(GREETING)
                buf = b""
                while True:
                    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
                    if not data:
                        break
                    self.fds += fds
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = json.loads(line)
                        self.commands.append(cmd)
                        if cmd["execute"] == "qmp_capabilities":
                            conn.sendall(b'{"return": {}}\n')
                        else:
                            conn.sendall(self.handler(cmd, fds))

    def names(self) -> list[str]:
        return [c["execute"] for c in self.commands if c["execute"] != "qmp_capabilities"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() in serve
        self.srv.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    # AF_UNIX paths are short: not under pytest's long tmp dir names
    short = Path(f"/tmp/qmp-{os.getpid()}-{threading.get_ident() % 10000}")
    short.mkdir(exist_ok=True)
    yield short / "qmp.sock"
    for f in short.iterdir():
        f.unlink()
    short.rmdir()


def reply(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_a_command_skips_events_and_returns_its_value(sock: Path) -> None:
    srv = FakeQMP(sock, lambda c, f: b'{"event": "STOP"}\n' + reply({"return": {
        "status": "paused", "running": False}}))
    try:
        assert qmp_status(sock) == "paused"
        assert qmp_command(sock, "query-status")["running"] is False
    finally:
        srv.close()


def test_errors_and_hostile_replies_are_vmm_errors(sock: Path) -> None:
    answers = iter([
        reply({"error": {"class": "GenericError", "desc": "no way"}}),
        b"not json\n",
        b"[1, 2]\n",
        b'{"return": "' + b"x" * (MAX_REPLY + 10) + b'"}\n',
    ])
    srv = FakeQMP(sock, lambda c, f: next(answers))
    try:
        with pytest.raises(VMMError, match="no way"):
            qmp_command(sock, "stop")
        with pytest.raises(VMMError, match="not JSON"):
            qmp_command(sock, "stop")
        with pytest.raises(VMMError, match="not a JSON object"):
            qmp_command(sock, "stop")
        with pytest.raises(VMMError, match="longer than"):
            qmp_command(sock, "stop")
    finally:
        srv.close()
    assert qmp_status(sock) is None  # nobody listens now: None, not an exception


def test_save_hands_qemu_the_file_and_waits_for_the_migration(sock: Path,
                                                              tmp_path: Path) -> None:
    polls = iter([{"status": "setup"}, {"status": "active", "ram": {"transferred": 100}},
                  {"status": "completed", "ram": {"transferred": 300}}])

    def qemu(cmd: dict[str, Any], fds: list[int]) -> bytes:
        if cmd["execute"] == "getfd":
            assert len(fds) == 1
            os.write(fds[0], b"migration stream")  # what QEMU would write
        if cmd["execute"] == "query-migrate":
            return reply({"return": next(polls)})
        return reply({"return": {}})

    srv = FakeQMP(sock, qemu)
    paths = VMPaths(tmp_path / "s", sock.parent)
    into = tmp_path / "saved.partial"
    into.mkdir()
    seen: list[int] = []
    drv = QemuDriver.__new__(QemuDriver)
    try:
        size = drv.save(paths, into, seen.append)
    finally:
        srv.close()
    assert size == len(b"migration stream")
    assert (into / qemuproc.MIGRATION_FILE).read_bytes() == b"migration stream"
    assert seen == [100, 300]
    assert srv.names() == ["stop", "migrate-set-parameters", "getfd", "migrate",
                           "query-migrate", "query-migrate", "query-migrate"]
    getfd = srv.commands[[c["execute"] for c in srv.commands].index("getfd")]
    migrate = srv.commands[[c["execute"] for c in srv.commands].index("migrate")]
    assert migrate["arguments"]["uri"] == f"fd:{getfd['arguments']['fdname']}"


def test_a_failed_migration_is_an_error_and_the_file_is_not_reused(sock: Path,
                                                                  tmp_path: Path) -> None:
    def qemu(cmd: dict[str, Any], fds: list[int]) -> bytes:
        if cmd["execute"] == "query-migrate":
            return reply({"return": {"status": "failed", "error-desc": "disk full"}})
        return reply({"return": {}})

    srv = FakeQMP(sock, qemu)
    paths = VMPaths(tmp_path / "s", sock.parent)
    into = tmp_path / "saved.partial"
    into.mkdir()
    drv = QemuDriver.__new__(QemuDriver)
    try:
        with pytest.raises(VMMError, match="disk full"):
            drv.save(paths, into)
        with pytest.raises(Exception, match="exists"):  # O_EXCL: never over an old file
            drv.save(paths, into)
    finally:
        srv.close()


def test_a_session_is_one_connection(sock: Path) -> None:
    srv = FakeQMP(sock, lambda c, f: reply({"return": {}}))
    try:
        with QMPSession(sock) as qmp:
            qmp.execute("stop")
            qmp.execute("cont")
    finally:
        srv.close()
    assert [c["execute"] for c in srv.commands] == ["qmp_capabilities", "stop", "cont"]
