"""The client side of ``vm session attach`` and ``vm session logs -f``.

Output is long-polled (``client.sessions.logs`` with the attachment's id, which also
keeps the attachment alive); input goes out in ``client.sessions.write`` calls. On a
terminal the keyboard is in raw mode for a ``--tty`` session (keys, Ctrl-C included,
reach the guest) and Ctrl-P Ctrl-Q detaches, as in docker; the window size follows the
client's.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator

from banger.api import SessionLogs
from banger.errors import BangerError, NotFound
from banger.sdk import Client

DETACH = (0x10, 0x11)  # Ctrl-P, Ctrl-Q
POLL_S = 5.0  # long-poll wait per logs call (well inside the attachment's lease)
CALL_TIMEOUT_S = 300.0  # a logs call: the daemon's own guest step is bounded at 90 s + wait
# Calls that do not reach the guest (detach, write: queued for the writer) or take one
# short guest step (resize).
DETACH_TIMEOUT_S = 10.0
RESIZE_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0


def write_out(reply: SessionLogs) -> bool:
    """Copy a logs reply's bytes to our stdout/stderr; True if there were any."""
    out, err = reply.stdout, reply.stderr
    if out:
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    if err:
        sys.stderr.buffer.write(err)
        sys.stderr.buffer.flush()
    return bool(out or err)


def follow_logs(client: Client, vm: str, name: str, cursor: str, *,
                attachment: str | None = None,
                stop: threading.Event | None = None) -> SessionLogs | None:
    """Print the session's output from ``cursor`` until it ends (returns the last reply)
    or ``stop`` is set (returns None)."""
    while stop is None or not stop.is_set():
        reply = client.sessions.logs(vm, name, cursor, POLL_S, attachment=attachment,
                                     timeout=CALL_TIMEOUT_S)
        write_out(reply)
        cursor = reply.next
        if reply.ended and not reply.more:
            return reply
    return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal ``fd`` in raw mode for the block (restored after, whatever happens)."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class KeyFilter:
    """Finds the detach sequence (Ctrl-P Ctrl-Q) in typed bytes; a lone Ctrl-P is
    passed on once the next key shows it was not the start of the sequence."""

    def __init__(self) -> None:
        self.pending = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes to send on, and whether the client asked to detach."""
        out = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b == DETACH[1]:
                    return bytes(out), True
                out.append(DETACH[0])
            if b == DETACH[0]:
                self.pending = True
                continue
            out.append(b)
        return bytes(out), False


def attach(connect: Callable[[], Client], vm: str, name: str, *, read_only: bool) -> int:
    """Attach to ``vm``'s session ``name`` until it ends or the user detaches; returns
    the session's exit status when it ended, else 0."""
    client = connect()
    info = client.sessions.attach(vm, name, write=not read_only)
    att = info.attachment
    stop = threading.Event()
    ended: list[SessionLogs] = []
    failure: list[BangerError] = []

    def read() -> None:
        try:
            last = follow_logs(connect(), vm, name, info.next, attachment=att, stop=stop)
            if last is not None:
                ended.append(last)
        except BangerError as exc:
            # A call already on its way when we detached finds the attachment gone.
            if not (isinstance(exc, NotFound) and stop.is_set()):
                failure.append(exc)
        finally:
            stop.set()

    reader = threading.Thread(target=read, daemon=True, name="attach-reader")
    reader.start()
    stdin_tty = sys.stdin.isatty()
    note = "Ctrl-P Ctrl-Q detaches" if stdin_tty and info.tty else "Ctrl-C detaches"
    print(f"[attached to {vm}/{name}{'' if read_only else ' for writing'}; {note}]",
          file=sys.stderr)
    try:
        if read_only:
            stop.wait()
        else:
            _pump_input(client, att, stop, raw=stdin_tty and info.tty)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        with contextlib.suppress(BangerError):
            client.sessions.detach(att, timeout=DETACH_TIMEOUT_S)
    reader.join(CALL_TIMEOUT_S if ended or failure else 0.1)
    if failure:
        raise failure[0]
    if ended:
        code = ended[0].exit_code
        print(f"\r\n[{vm}/{name} ended: {ended[0].end_reason or 'ended'}]",
              file=sys.stderr)
        return code if code is not None else 0
    print(f"\r\n[detached from {vm}/{name}]", file=sys.stderr)
    return 0


def _pump_input(client: Client, att: str, stop: threading.Event, *, raw: bool) -> None:
    fd = sys.stdin.fileno()
    keys = KeyFilter()

    def resize(*_: object) -> None:
        with contextlib.suppress(OSError, BangerError):
            size = os.get_terminal_size(fd)
            client.sessions.resize(att, size.lines, size.columns, timeout=RESIZE_TIMEOUT_S)

    with raw_mode(fd) if raw else contextlib.nullcontext():
        if raw:
            resize()
            signal.signal(signal.SIGWINCH, resize)
        eof = False
        while not stop.is_set():
            if eof:
                stop.wait(0.5)
                continue
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data:
                eof = True  # our input ended; the session's stays open
                continue
            send, detach = keys.feed(data) if raw else (data, False)
            if send:
                client.sessions.write(att, send, timeout=WRITE_TIMEOUT_S)
            if detach:
                return
