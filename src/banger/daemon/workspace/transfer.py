"""Streams into the guest: a tar of the work tree (and the history's pack), a script's stdin.

:class:`GuestSink` owns one guest process (``guest.popen``) and feeds its stdin.
A watchdog thread kills the process group (the ssh client; for a local test
double, the shell and its children) when the operation is cancelled, when one
write has been blocked longer than the stall budget, or when the process runs
past its deadline after its input ended. A blocked write then fails at once and
the caller sees :class:`Cancelled` or :class:`GuestError`, never a hang.

The tar is generated file by file from the work tree (:func:`send_tree`, given the
entries the guest cannot check out of the pack); the history's pack, built on the
host beforehand (:mod:`.hostpack`), rides in the same tar as two more files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from banger.daemon.session import step_error
from banger.drain import OUTPUT_LIMIT, Drain, close
from banger.errors import BangerError, Cancelled, GuestError
from banger.runner import CancelToken, Result

from .gitdir import Kind, Member
from .hosttree import HostTree, _changed
from .model import EntryKind, GuestChannel, PlanEntry
from .scripts import CHANNEL_PORT, CHANNEL_STDIN

log = logging.getLogger("banger.workspace")

CHUNK = 1 << 20  # bytes per read/write: large enough for throughput, small enough for progress
TAR_BUFFER = 64 << 10  # tarfile's write size: the unit progress is counted in
POLL_S = 0.05
FIRST_LINE_MAX = 64  # `banger-port 65535\n` and then some
CONNECT_TIMEOUT_S = 10.0  # the guest's listener is up before it names its port


class OutputTooLarge(GuestError):
    """A guest step printed more than the caller's ``stdout_cap`` (it was killed)."""


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it was started in a session of its own)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


class GuestSink:
    """One guest process whose stdin we feed (see the module docstring).

    Use as a context manager: leaving it with an exception kills the process.

    Args:
        guest: the guest channel.
        script: the guest shell script; it reads its input from stdin.
        step: the step's name, used in errors.
        cancel: cooperative cancellation.
        stall_timeout: the longest one write may block (the guest not reading).
        on_bytes: called with the size of each chunk written.
        stdout_limit: bytes of stdout kept (the last ones); None keeps it all.
        stdout_cap: keep all of stdout but at most this many bytes: a script that
            prints more is killed and :class:`OutputTooLarge` raised (overrides
            ``stdout_limit``).
        data_token: the script says on its first line of stdout where it reads its
            input (``scripts.extract``): stdin, or a TCP port on the guest's address
            that takes one connection starting with this token. Writes go there.
    """

    def __init__(self, guest: GuestChannel, script: str, *, step: str,
                 cancel: CancelToken | None = None, stall_timeout: float = 120.0,
                 on_bytes: Callable[[int], None] | None = None,
                 stdout_limit: int | None = OUTPUT_LIMIT,
                 stdout_cap: int | None = None, data_token: str | None = None) -> None:
        self.step = step
        self._cancel = cancel
        self._stall = stall_timeout
        self._on_bytes = on_bytes
        self._killed: str | None = None
        self._writing_since: float | None = None
        self._deadline: float | None = None
        self._done = threading.Event()
        self._also_kill: list[subprocess.Popen[bytes]] = []
        self._stdout_cap = stdout_cap
        self.sent = 0
        self.channel = "stdin"
        self._sock: socket.socket | None = None
        self.proc = guest.popen(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self._err = Drain(self.proc.stderr)
        first = b""
        if data_token is not None:
            first = self._first_line()
        self._out = Drain(self.proc.stdout, stdout_limit, cap=stdout_cap,
                          on_cap=self._over_cap)
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name=f"watchdog: {step}")
        self._watchdog.start()
        if data_token is not None:
            try:
                self._open_channel(guest.ip, first, data_token)
            except BaseException:
                self._reap()
                raise

    def _first_line(self) -> bytes:
        """The script's first line of stdout (at most ``FIRST_LINE_MAX`` bytes; empty at
        EOF), waiting at most the stall budget: the guest says where it reads."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line = b""
        deadline = time.monotonic() + self._stall
        while not line.endswith(b"\n") and len(line) < FIRST_LINE_MAX:
            if self._cancel is not None and self._cancel.cancelled:
                break
            if time.monotonic() > deadline:
                break
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if not ready:
                continue
            byte = os.read(fd, 1)  # one at a time: the rest of stdout is the Drain's
            if not byte:
                break
            line += byte
        return line

    def _open_channel(self, ip: str, first: bytes, token: str) -> None:
        """Follow the script's first line: stay on stdin, or connect to the port it
        names and send the token."""
        words = first.decode("ascii", errors="replace").split()
        if words == [CHANNEL_STDIN]:
            return
        if len(words) != 2 or words[0] != CHANNEL_PORT or not words[1].isdigit():
            if first and self._killed is None:
                self._killed = f"it did not say where it reads its input ({first!r})"
                self.kill()
            raise self._interrupted()  # or, at EOF, the script's own exit and complaint
        try:
            sock = socket.create_connection((ip, int(words[1])), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:  # the caller reaps the guest step
            raise GuestError(
                f"guest step {self.step!r} failed: cannot connect to the guest's data port "
                f"{ip}:{words[1]}: {exc.strerror or exc}",
                hint="a firewall inside the guest may block inbound connections: allow "
                     "them from the host, or set workspace_transport = \"ssh\" in the "
                     "config") from exc
        sock.settimeout(POLL_S * 4)  # so a blocked send notices the watchdog
        self._sock = sock
        self.channel = "tcp"
        close(self.proc.stdin)
        self._send(token.encode())

    def _send(self, data: memoryview | bytes) -> None:
        """Write all of ``data`` to the guest, or raise what stopped it."""
        if self._sock is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()  # so a blocked guest shows as a blocked write here
            return
        view = memoryview(data)
        while view:
            try:
                n = self._sock.send(view)
            except TimeoutError:
                if self._killed is not None:
                    raise BrokenPipeError("the guest step was stopped") from None
                continue
            view = view[n:]

    def _over_cap(self) -> None:
        self._killed = f"it printed more than {self._stdout_cap} bytes"
        self.kill()

    def also_kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill ``proc`` too when this sink is cancelled or stalls (a host producer)."""
        self._also_kill.append(proc)

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            reason = None
            now = time.monotonic()
            if self._cancel is not None and self._cancel.cancelled:
                reason = "cancelled"
            elif self._writing_since is not None and now - self._writing_since > self._stall:
                reason = f"the guest stopped reading for {self._stall:g}s"
            elif self._deadline is not None and now > self._deadline:
                reason = "timed out after its input ended"
            if reason is not None:
                self._killed = reason
                self.kill()
                return

    def kill(self) -> None:
        """Kill the guest process and any registered host producer."""
        for proc in (self.proc, *self._also_kill):
            kill_group(proc)

    def _interrupted(self) -> BangerError:
        if self._out.over_cap:
            return OutputTooLarge(f"guest step {self.step!r} failed: {self._killed}")
        if self._killed == "cancelled" or (self._cancel is not None and self._cancel.cancelled):
            reason = self._cancel.reason if self._cancel is not None else "cancelled"
            return Cancelled(f"{self.step}: {reason}")
        if self._killed is None:
            # The script ended on its own (an error, e.g. a full disk): report its exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.returncode is not None:
                self._done.set()
                return step_error(self.step, Result([self.step], self.proc.returncode,
                                                    self._out.join(), self._err.join()))
        err = self._err.join(1).decode(errors="replace").strip()[-2000:]
        msg = f"guest step {self.step!r} failed: {self._killed or 'the guest stopped reading'}"
        return GuestError(msg + (f"\n{err}" if err else ""),
                          hint="the guest may be out of disk space, overloaded or hung")

    def write(self, data: bytes) -> int:
        """Send ``data``; raises :class:`Cancelled` or :class:`GuestError` instead of
        blocking past the stall budget or writing into a dead process."""
        if self._cancel is not None:
            self._cancel.check()
        view = memoryview(data)
        for off in range(0, len(view), CHUNK):
            piece = view[off:off + CHUNK]
            self._writing_since = time.monotonic()
            try:
                self._send(piece)
            except (BrokenPipeError, ValueError, OSError) as exc:
                raise self._interrupted() from exc
            finally:
                self._writing_since = None
            if self._killed is not None:
                raise self._interrupted()
            self.sent += len(piece)
            if self._on_bytes is not None:
                self._on_bytes(len(piece))
        return len(data)

    def finish(self, timeout: float, *, check: bool = True) -> Result:
        """Close stdin and wait (at most ``timeout`` seconds) for the script to exit.

        Raises:
            Cancelled: cancelled meanwhile.
            GuestError: the script failed (with ``check``; message from
                :func:`session.format_step_error`), or ran past ``timeout``.
        """
        self._deadline = time.monotonic() + timeout
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)  # the guest's tar sees the end
        with contextlib.suppress(BrokenPipeError, OSError):
            close(self.proc.stdin)
        self.proc.wait()
        self._close_sock()
        self._done.set()
        out, err = self._out.join(), self._err.join()
        close(self.proc.stdout, self.proc.stderr)
        if self._killed is not None:
            raise self._interrupted()
        result = Result([self.step], self.proc.returncode, out, err)
        if check and result.returncode != 0:
            raise step_error(self.step, result)
        return result

    def __enter__(self) -> GuestSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc_type is not None or not self._done.is_set():
            # An error, or a caller that never called finish(): never leave it running.
            self._reap()
        self._close_sock()

    def _reap(self) -> None:
        """Kill the process, wait for it, and close every pipe and the socket."""
        self.kill()
        self._done.set()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.join()
        self._err.join()
        close(self.proc.stdin, self.proc.stdout, self.proc.stderr)
        self._close_sock()

    def _close_sock(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def run_script(guest: GuestChannel, script: str, *, step: str, input: bytes = b"",
               timeout: float, cancel: CancelToken | None = None, check: bool = True,
               stdout_limit: int | None = OUTPUT_LIMIT,
               stdout_cap: int | None = None) -> Result:
    """Run a (possibly long) guest script that cancellation can interrupt.

    ``stdout_limit`` and ``stdout_cap`` are as for :class:`GuestSink`.
    """
    if cancel is not None:
        cancel.check()
    with GuestSink(guest, script, step=step, cancel=cancel, stdout_limit=stdout_limit,
                   stdout_cap=stdout_cap) as sink:
        if input:
            sink.write(input)
        return sink.finish(timeout, check=check)


def send_tree(sink: GuestSink, root: str, entries: Sequence[PlanEntry],
              extra: Iterable[Member] = (), *,
              trailer: Iterable[tuple[str, Path]] = (),
              cancel: CancelToken | None = None,
              on_file: Callable[[], None] | None = None) -> None:
    """Write a tar (PAX) of ``entries`` read from the host tree ``root`` into ``sink``.

    ``extra`` are banger's own members (the git directories) written first; ``trailer`` are
    (name, host file) pairs written last: bangerd's own files (the history's pack),
    read as they are, mode 0444. Files keep their
    content, mtime and executable bit (mode 0755 or 0644, as git records it);
    symlinks keep their target verbatim; gitlinks become empty directories.
    Owners are root.

    Raises:
        BadRequest: a file vanished, changed type, or changed size or mtime while
            it was being read.
    """
    with HostTree(root) as tree, tarfile.open(
            fileobj=cast(Any, sink), mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
            bufsize=TAR_BUFFER) as tar:
        now = time.time()
        for member in extra:
            if member.kind is Kind.DIR:
                info = _info(member.name, 0o755, now)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif member.kind is Kind.SYMLINK:
                info = _info(member.name, 0o777, now)
                info.type = tarfile.SYMTYPE
                info.linkname = member.data.decode()
                tar.addfile(info)
            else:
                info = _info(member.name, 0o644, now)
                info.size = len(member.data)
                tar.addfile(info, _BytesReader(member.data))
        for entry in entries:
            if cancel is not None:
                cancel.check()
            if entry.kind is EntryKind.FILE:
                _add_file(tar, tree, entry.path)
            elif entry.kind is EntryKind.SYMLINK:
                info = _info(entry.path, 0o777, 0)
                info.type = tarfile.SYMTYPE
                info.linkname = tree.readlink(entry.path)
                tar.addfile(info)
            else:
                info = _info(entry.path, 0o755, 0)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue  # a submodule's directory: its files are entries of their own
            if on_file is not None:
                on_file()
        for name, path in trailer:
            with open(path, "rb") as fh:
                info = _info(name, 0o444, time.time())
                info.size = os.fstat(fh.fileno()).st_size
                tar.addfile(info, fh)


def _info(name: str, mode: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_file(tar: tarfile.TarFile, tree: HostTree, path: str) -> None:
    fd, st = tree.open_file(path)
    with os.fdopen(fd, "rb") as fh:
        info = _info(path, 0o755 if st.st_mode & stat.S_IXUSR else 0o644, st.st_mtime)
        info.size = st.st_size
        try:
            tar.addfile(info, fh)
        except OSError as exc:  # tarfile: "unexpected end of data" (the file shrank)
            raise _changed(path) from exc
        after = os.fstat(fh.fileno())
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise _changed(path)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos:end].tobytes()
        self._pos += len(chunk)
        return chunk
