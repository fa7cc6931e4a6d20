"""The host end of Firecracker's vsock (``fcproc.vsock``) against a Unix socket that
answers as Firecracker does: ``CONNECT <port>`` closed without an answer while nothing in
the guest listens, ``OK <port>`` once something does. The fake Firecracker of the
contract tests plays the same part behind the real driver."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from banger.daemon.fcproc import vsock


class Muxer:
    """Firecracker's side: refuses the first ``refusals`` connections, then takes one
    stream whole (``received``)."""

    def __init__(self, path: Path, refusals: int, answer: bytes = b"OK 1073741824\n") -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.refusals, self.answer = refusals, answer
        self.requests: list[bytes] = []
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def __enter__(self) -> Muxer:
        return self

    def __exit__(self, *_: object) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                self.requests.append(conn.recv(64))
                if len(self.requests) <= self.refusals:
                    continue  # nothing listens in the guest: closed
                try:
                    conn.sendall(self.answer)
                    while chunk := conn.recv(4096):
                        self.received += chunk
                except OSError:
                    pass  # the host hung up
                return


def test_a_message_waits_until_the_guest_listens(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    with Muxer(uds, refusals=3) as fc:
        thread = vsock.hand_over(uds, 10500, b"gen=1\nend\n", what="test")
        thread.join(10)
        fc.thread.join(10)
    assert fc.requests == [b"CONNECT 10500\n"] * 4
    assert fc.received == b"gen=1\nend\n"


def test_a_guest_that_never_listens_gets_nothing_and_the_wait_ends(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    with Muxer(uds, refusals=10**6) as fc:
        started = time.monotonic()
        assert not vsock.send(uds, 10500, b"gen=1\nend\n", deadline=started + 0.5)
    assert fc.received == b"" and len(fc.requests) >= 2


def test_an_answer_that_is_not_ok_is_no_connection(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    with Muxer(uds, refusals=0, answer=b"x" * 200):  # no newline within 64 bytes
        assert vsock.connect(uds, 10500, timeout_s=2) is None
    assert vsock.connect(tmp_path / "absent.sock", 10500, timeout_s=2) is None
