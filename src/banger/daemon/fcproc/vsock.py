"""The host end of a Firecracker VM's vsock: host-initiated connections.

Firecracker backs its virtio-vsock device with a Unix socket on the host (``PUT /vsock``
``uds_path``). A host program connects to it, writes ``CONNECT <port>\\n`` and, once a
guest program listening on that vsock port accepted, reads ``OK <host port>\\n``; the
Unix connection then carries the stream. When nothing in the guest listens (yet), the
connection is closed without the ``OK``.

banger uses it for a restored clone's identity (``identity``): ``banger-ident`` in the
guest listens on ``IDENT_VSOCK_PORT``, and :func:`hand_over` delivers the message. It
is called while the clone's vCPUs are still stopped, so the guest can accept only after
the driver resumes it: the delivery runs in a thread of its own and retries until the
guest answers or its time is up.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from banger.errors import BangerError

log = logging.getLogger(__name__)

HANDOVER_S = 60.0  # a clone's vCPUs run within seconds of the hand-over starting
RETRY_S = 0.1
ANSWER_MAX = 64  # "OK <u32>\n" is at most 14 bytes; anything longer is not Firecracker

# The VM's vsock socket: its path, or a function that connects to it (a jailed
# Firecracker's, through the root helper).
Endpoint = Path | Callable[[], socket.socket]


def connect(uds: Endpoint, port: int, *, timeout_s: float) -> socket.socket | None:
    """A stream to guest vsock ``port`` through Firecracker's socket ``uds``, or None
    when nothing in the guest accepted it (not listening, or the VMM is gone)."""
    try:
        sock = _dial(uds, timeout_s)
    except (OSError, BangerError):
        return None
    try:
        sock.sendall(f"CONNECT {port}\n".encode())
        if _answer(sock).startswith(b"OK "):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _dial(uds: Endpoint, timeout_s: float) -> socket.socket:
    if not isinstance(uds, Path):
        sock = uds()
        sock.settimeout(timeout_s)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(str(uds))
    except BaseException:
        sock.close()
        raise
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Firecracker's one-line answer, read a byte at a time (the stream follows it)."""
    line = b""
    while not line.endswith(b"\n") and len(line) < ANSWER_MAX:
        b = sock.recv(1)
        if not b:
            break
        line += b
    return line


def send(uds: Endpoint, port: int, message: bytes, *, deadline: float) -> bool:
    """Deliver ``message`` to the guest program listening on vsock ``port``, trying until
    it accepts or ``deadline`` (``time.monotonic``) passes; True when delivered whole."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock = connect(uds, port, timeout_s=min(left, 10.0))
        if sock is not None:
            with sock:
                try:
                    sock.sendall(message)
                    sock.shutdown(socket.SHUT_WR)
                    return True
                except OSError:
                    pass
        time.sleep(RETRY_S)


def hand_over(uds: Endpoint, port: int, message: bytes, *, what: str,
              timeout_s: float = HANDOVER_S) -> threading.Thread:
    """:func:`send` in a thread of its own (the guest answers only once its vCPUs run);
    a delivery that never happens is logged, and the caller's own wait for the guest
    fails with its own error."""
    deadline = time.monotonic() + timeout_s

    def run() -> None:
        if not send(uds, port, message, deadline=deadline):
            log.warning("%s: nothing in the guest took it on vsock port %d within %.0fs",
                        what, port, timeout_s)

    thread = threading.Thread(target=run, name=f"vsock-{port}", daemon=True)
    thread.start()
    return thread
