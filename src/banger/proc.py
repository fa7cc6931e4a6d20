"""Process identity: find, signal and wait for VMM processes without ever hitting a recycled pid.

A pid alone is not an identity: after a crash or reboot the number may belong
to someone else. banger records ``(pid, start time, marker)`` where the start
time is field 22 of ``/proc/<pid>/stat`` and the marker is a string the
process's command line must contain (``banger-<vm id>``). Signals are sent
through a pidfd opened *after* the identity check, so the check and the signal
refer to the same process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: int
    marker: str

    def to_json(self) -> dict[str, Any]:
        """The identity as a JSON object (stored in ``handles.json``)."""
        return {"pid": self.pid, "start_time": self.start_time, "marker": self.marker}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessIdentity:
        """Rebuild an identity from :meth:`to_json` output."""
        return cls(int(data["pid"]), int(data["start_time"]), str(data["marker"]))


def _stat_fields(pid: int, proc: Path = PROC) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may itself contain ") ": split after the last one.
    rest = raw[raw.rfind(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """Clock ticks after boot at which ``pid`` started, or None if it does not exist."""
    fields = _stat_fields(pid, proc)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])  # field 22 overall


def cmdline(pid: int, proc: Path = PROC) -> list[str]:
    """The argv of ``pid`` from ``/proc``; empty when it is gone or unreadable."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def identify(pid: int, marker: str, proc: Path = PROC) -> ProcessIdentity | None:
    """The identity of a live ``pid`` whose command line contains ``marker``."""
    st = start_time(pid, proc)
    if st is None:
        return None
    ident = ProcessIdentity(pid, st, marker)
    return ident if matches(ident, proc) else None


def matches(ident: ProcessIdentity, proc: Path = PROC) -> bool:
    """True when ``ident`` still names the same live (non-zombie) process."""
    fields = _stat_fields(ident.pid, proc)
    if fields is None or len(fields) < 20:
        return False
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped: not a running VMM
        return False
    if int(fields[19]) != ident.start_time:
        return False
    argv = cmdline(ident.pid, proc)
    if not argv:
        # cmdline reads empty for an instant during execve (the jailer execs Firecracker)
        # and during exit; pid + start time already pin the process, so keep believing it.
        return True
    return any(ident.marker in arg for arg in argv)


def send_signal(ident: ProcessIdentity, sig: int = signal.SIGTERM) -> bool:
    """Signal the process if it is still ``ident``; False when it is already gone."""
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return False
    try:
        if not matches(ident):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(ident: ProcessIdentity, timeout: float) -> bool:
    """Wait until the process is gone or ``timeout`` seconds pass; True if gone.

    Woken by the process's exit (a pidfd) where the kernel has them, else polled.
    """
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(ident.pid)
    except OSError:  # gone already (ESRCH), or no pidfds here
        fd = None
    exited = select.poll()  # not select(): a daemon's descriptors may number past 1024
    if fd is not None:
        exited.register(fd, select.POLLIN)  # readable once the process has exited
    try:
        while matches(ident):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _reap(ident.pid)
            if fd is not None:
                exited.poll(min(left, 0.5) * 1000)
            else:
                time.sleep(0.05)
    finally:
        if fd is not None:
            os.close(fd)
    _reap(ident.pid)
    return True


def _reap(pid: int) -> None:
    """Collect ``pid`` if it happens to be our child (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def find_by_marker(prefix: str, proc: Path = PROC) -> dict[int, list[str]]:
    """Live processes whose argv contains an element starting with ``prefix``."""
    found: dict[int, list[str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name), proc)
        if any(prefix in a for a in argv):
            fields = _stat_fields(int(entry.name), proc)
            if fields and fields[0] not in ("Z", "X"):
                found[int(entry.name)] = argv
    return found


def open_files(pid: int, proc: Path = PROC) -> list[str]:
    """Where ``pid``'s open descriptors point (``/proc/<pid>/fd`` links); empty when gone."""
    try:
        entries = list((proc / str(pid) / "fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        with contextlib.suppress(OSError):
            out.append(os.readlink(entry))
    return out


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
