"""The agent's frames, and the host's end: a hello, a readiness check, one command.

A frame is a type byte, a stream number and a length (both unsigned 32-bit, big
endian), then that many bytes, at most :data:`MAX_PAYLOAD`. See the guest's script
(:mod:`banger.agent.guest`) for the types. Standard library only: ``banger vm exec``'s
fast path imports this.

One connection at a time reaches the guest (the VMM serves one client of its socket);
a lock file beside the socket says who has it, and a caller that finds it taken uses
SSH instead (:func:`connect` returns None), so parallel commands never queue behind one
another. Everything the guest sends is bounded: a frame longer than the maximum, a
hello that is not the answer to this one, or an exit status out of range ends the
connection with :class:`AgentError`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

PORT_NAME = "org.banger.agent"  # the virtio-serial port's name in the guest
PROTOCOL = 1
MAX_PAYLOAD = 65536
MAX_STREAMS = 64  # commands at once (one connection runs one; the guest's bound)
GUEST_LISTENING = "/run/banger-agent.listening"  # made once the port is open
CONSOLE_LISTENING = b"banger-agent: listening"  # said on the console then too
SOCKET_NAME = "agent.sock"  # in the VM's runtime directory
LOCK_NAME = "agent.lock"

HEADER = struct.Struct(">cII")
# Ahead of the guest's answer to a hello: the client finds the frames' boundaries again
# after it, whatever an earlier connection left half-sent.
SYNC = b"\x00banger-agent-sync\x00"
WINDOW = 1 << 18  # stdin bytes sent and not yet taken by the command (its "A" frames)
HELLO_TIMEOUT_S = 2.0  # a running agent answers in milliseconds, a just-restored one in tenths
READ_CHUNK = 65536
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class AgentError(Exception):
    """The channel failed or the guest said something banger does not accept."""


@dataclass(frozen=True)
class Frame:
    kind: bytes
    stream: int
    data: bytes


def encode(kind: bytes, stream: int, data: bytes = b"") -> bytes:
    """One frame."""
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"a frame carries at most {MAX_PAYLOAD} bytes")
    return HEADER.pack(kind, stream, len(data)) + data


class Decoder:
    """Frames out of a byte stream, each bounded by :data:`MAX_PAYLOAD`. Unsynced, it
    first skips everything up to :data:`SYNC` (keeping at most its length)."""

    def __init__(self, *, synced: bool = True) -> None:
        self.buf = bytearray()
        self.synced = synced

    def feed(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completes.

        Raises:
            AgentError: a frame longer than the maximum.
        """
        self.buf += data
        if not self.synced:
            at = self.buf.find(SYNC)
            if at < 0:
                del self.buf[:max(0, len(self.buf) - len(SYNC))]
                return []
            del self.buf[:at + len(SYNC)]
            self.synced = True
        out = []
        while len(self.buf) >= HEADER.size:
            kind, stream, length = HEADER.unpack_from(self.buf)
            if length > MAX_PAYLOAD:
                raise AgentError(f"the guest agent sent a frame of {length} bytes")
            if len(self.buf) < HEADER.size + length:
                break
            out.append(Frame(kind, stream, bytes(self.buf[HEADER.size:HEADER.size + length])))
            del self.buf[:HEADER.size + length]
        return out


def exit_status(text: bytes) -> int:
    """A command's status from its ``X`` frame: ``exit N`` is N, ``signal N`` 128+N (as a
    shell says).

    Raises:
        AgentError: the guest could not run it (``error ...``), or said something else.
    """
    words = text.decode("ascii", "replace").split(" ", 1)
    if len(words) == 2 and words[0] == "error":
        raise AgentError(f"the guest agent could not run the command: {words[1][:200]}")
    if len(words) == 2 and words[1].isdigit() and len(words[1]) <= 3:
        n = int(words[1])
        if words[0] == "exit" and n <= 255:
            return n
        if words[0] == "signal" and 1 <= n <= 64:
            return 128 + n
    raise AgentError(f"the guest agent ended the command with {text[:80]!r}")


class Connection:
    """A connection to a VM's agent that has been answered (:func:`connect`). Every
    failure of its socket is an :class:`AgentError`."""

    def __init__(self, sock: socket.socket, lock_fd: int) -> None:
        self.sock = sock
        self.lock_fd = lock_fd
        self.decoder = Decoder()
        self.pending: collections.deque[Frame] = collections.deque()

    def close(self) -> None:
        """Hang up (the guest ends what this connection started) and free the lock."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, kind: bytes, stream: int, data: bytes = b"") -> None:
        """Send one frame (a few bytes: blocking is fine)."""
        try:
            self.sock.sendall(encode(kind, stream, data))
        except OSError as exc:
            raise AgentError(f"the guest agent's connection failed: {exc}") from exc

    def receive(self, deadline: float | None) -> Frame | None:
        """The next frame, or None once ``deadline`` (a monotonic time) has passed, even
        while the guest keeps sending.

        Raises:
            AgentError: the connection ended or carried a bad frame.
        """
        while not self.pending:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            try:
                ready, _, _ = select.select([self.sock], [], [], wait)
                data = self.sock.recv(READ_CHUNK) if ready else None
            except OSError as exc:
                raise AgentError(f"the guest agent's connection failed: {exc}") from exc
            if data is None:
                return None
            if not data:
                raise AgentError("the guest agent's connection closed")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    def hello(self, timeout: float) -> None:
        """Say hello and wait for its answer, after the guest's :data:`SYNC` (anything
        before it is an earlier connection's).

        Raises:
            AgentError: no answer within ``timeout``, or a wrong one.
        """
        nonce = os.urandom(8).hex().encode()
        self.decoder = Decoder(synced=False)
        self.pending.clear()
        self.send(b"H", 0, nonce)
        deadline = time.monotonic() + timeout
        while True:
            frame = self.receive(deadline)
            if frame is None:
                raise AgentError(f"the guest agent did not answer within {timeout:g}s")
            if frame.kind == b"H" and frame.data.split(b" ", 1)[0] == nonce:
                return
            self.decoder.synced = False  # another answer: look for the next SYNC

    def ready(self, generation: str, timeout: float) -> str:
        """Wait until the guest applied identity ``generation`` (any, when empty) and
        its sshd listens; the guest's identity status line.

        Raises:
            AgentError: not within ``timeout``.
        """
        self.send(b"W", 1, generation.encode())
        deadline = time.monotonic() + timeout
        while True:
            frame = self.receive(deadline)
            if frame is None or (frame.kind == b"W" and frame.data == b"timeout"):
                raise AgentError(f"the guest was not ready within {timeout:g}s")
            if frame.kind == b"W" and frame.data.startswith(b"ok"):
                return frame.data[3:].decode("ascii", "replace")

    def run(self, command: str, *, stdin: int | None, stdout: int, stderr: int,
            interrupted: Callable[[], int | None] = lambda: None) -> int:
        """Run ``command`` with the guest's login shell (``-c``), copying ``stdin`` (a
        descriptor; None: nothing) to it and its output to ``stdout``/``stderr``; its
        exit status (141, as a shell says for SIGPIPE, when ``stdout`` or ``stderr``
        is a closed pipe: the command is hung up on). ``interrupted`` is asked between
        reads for a signal to forward.

        Never blocks on sending, and sends at most :data:`WINDOW` bytes of input the
        command has not taken yet (the guest acknowledges what it took), while the
        guest's output is always taken: a command that writes without reading its
        input cannot wedge the two ends, and signals and a hang-up always get through.

        Raises:
            AgentError: the connection ended before the command did.
        """
        data = command.encode()
        if len(data) > MAX_PAYLOAD:
            raise AgentError("the command is too long for the guest agent")
        out = bytearray(encode(b"E", 2, data))
        if stdin is None:
            out += encode(b"C", 2)
        unacked = 0
        self.sock.setblocking(False)
        frames, self.pending = list(self.pending), collections.deque()
        try:
            while True:
                for frame in frames:
                    if frame.stream != 2:
                        continue
                    if frame.kind in (b"O", b"R"):
                        _write_all(stdout if frame.kind == b"O" else stderr, frame.data)
                    elif frame.kind == b"A" and frame.data.isdigit():
                        unacked = max(0, unacked - int(frame.data[:12]))
                    elif frame.kind == b"X":
                        return exit_status(frame.data)
                sig = interrupted()
                if sig is not None:
                    out += encode(b"K", 2, str(sig).encode())
                reading = stdin is not None and not out and unacked < WINDOW
                reads = [self.sock] + ([stdin] if reading and stdin is not None else [])
                try:
                    readable, writable, _ = select.select(
                        reads, [self.sock] if out else [], [], 0.2)
                except InterruptedError:
                    readable, writable = [], []
                if writable:
                    with contextlib.suppress(BlockingIOError):
                        del out[:self.sock.send(out)]
                if stdin is not None and stdin in readable:
                    try:
                        chunk = os.read(stdin, MAX_PAYLOAD)
                    except BlockingIOError:
                        chunk = None
                    except OSError:
                        chunk = b""  # an unreadable stdin ends like an empty one
                    if chunk is not None:
                        out += encode(b"I" if chunk else b"C", 2, chunk)
                        unacked += len(chunk)
                        if not chunk:
                            stdin = None
                frames = []
                if self.sock in readable:
                    try:
                        got = self.sock.recv(READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not got:
                        raise AgentError("the guest agent's connection closed before the "
                                         "command ended")
                    frames = self.decoder.feed(got)
        except BrokenPipeError:
            return 128 + signal.SIGPIPE  # where the output went is closed
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                return 128 + signal.SIGPIPE
            raise AgentError(f"the guest agent's connection failed: {exc}") from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def connect(run_dir: str, timeout: float = HELLO_TIMEOUT_S) -> Connection | None:
    """An answered connection to the agent of the VM whose runtime directory is
    ``run_dir``; None when another caller has it (use SSH).

    Raises:
        AgentError: no socket, or no answer.
    """
    try:
        lock_fd = os.open(os.path.join(run_dir, LOCK_NAME),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise AgentError(f"cannot open the agent's lock: {exc.strerror}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except BlockingIOError:
        os.close(lock_fd)
        return None
    except OSError as exc:
        os.close(lock_fd)
        raise AgentError(f"cannot reach the guest agent: {exc.strerror or exc}") from exc
    conn = Connection(sock, lock_fd)
    try:
        sock.settimeout(timeout)
        sock.connect(os.path.join(run_dir, SOCKET_NAME))
        sock.settimeout(None)
        conn.hello(timeout)
    except (OSError, AgentError) as exc:
        conn.close()
        if isinstance(exc, AgentError):
            raise
        raise AgentError(f"cannot reach the guest agent: {exc.strerror or exc}") from exc
    return conn
