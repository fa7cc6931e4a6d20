"""Start a command fully detached from its caller and report its pid: the VMM launchers' core.

The two VMM launchers (``daemon/fcproc/_spawn.py`` and ``daemon/qemuproc/_spawn.py``)
are scripts that bangerd runs through :mod:`banger.runner` as ``python -I
<script>``; each does its own set-up and then calls :func:`run` here. They
import this module from the installed ``banger`` package: ``-I`` keeps the
environment, the user's site-packages and the script's directory off
``sys.path``, but not the interpreter's site-packages, which is where bangerd
itself was imported from. So this module must import only the standard library
(and nothing of banger's), to stay cheap and safe in a root helper.

The detach is what ``setsid --fork`` does: fork, ``setsid()`` in the child,
fork again, exec in the grandchild. The intermediate child exits at once, so
the command is re-parented to init (or the nearest subreaper): bangerd is never
its parent and never leaves a zombie, and the VM survives a daemon restart. The
command's session has no leader, so it cannot regain a controlling terminal.

The report protocol between the processes is a close-on-exec pipe: the
intermediate child writes ``pid <n>``, a grandchild whose exec failed writes
``error <argv0>: <reason>``, and EOF means every writer is gone (the child
exited, the grandchild exec'd or failed). The launcher then prints ``<pid>``
and exits 0, or prints the reason on stderr and exits :data:`EXEC_FAILED`
(exec failed) or 1 (the intermediate child died first).
"""

from __future__ import annotations

import os
import signal
import sys

EXEC_FAILED = 127  # the shell's "command not found / not executable" status


class DetachError(Exception):
    """The command was not started; ``status`` is the launcher's exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _exec_in_grandchild(command: list[str], out_fd: int, null_fd: int, report_fd: int) -> None:
    """Wire stdio, restore signals, exec; report the reason and exit if exec fails."""
    try:
        os.dup2(null_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.chdir("/")
        # Python ignores SIGPIPE and SIGXFSZ; an exec'd program must get the defaults.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(command[0], command)  # noqa: S606 (an argv list; there is no shell)
    except OSError as exc:
        os.write(report_fd, f"error {command[0]}: {exc.strerror}\n".encode())
    os._exit(EXEC_FAILED)


def detach(command: list[str], out_fd: int) -> int:
    """Start ``command`` detached; return its pid once it has been exec'd.

    Its stdin is /dev/null, its stdout and stderr go to ``out_fd``, its working
    directory is ``/``. Descriptors the caller made inheritable are passed on.
    Call it only from a single-threaded process (a launcher script).

    Raises:
        DetachError: exec failed (the message names the command and the reason),
            or the intermediate child exited without reporting a pid.
    """
    if not command:
        raise DetachError("no command to start", 1)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(read_fd)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _exec_in_grandchild(command, out_fd, null_fd, write_fd)
            os.write(write_fd, f"pid {grandchild}\n".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    os.close(null_fd)
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(child, 0)

    pid = None
    errors = []
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "pid":
            pid = int(rest)
        elif kind == "error":
            errors.append(rest)
    if errors:
        raise DetachError("cannot execute " + "; ".join(errors), EXEC_FAILED)
    if pid is None:
        raise DetachError(f"the detaching child exited without starting {command[0]}", 1)
    return pid


def run(command: list[str], out_fd: int) -> int:
    """A launcher's last step: :func:`detach`, print the pid; returns the exit status.

    On failure the reason goes to stderr and the status is :data:`EXEC_FAILED`
    (exec failed) or 1.
    """
    try:
        pid = detach(command, out_fd)
    except DetachError as exc:
        sys.stderr.write(f"{exc}\n")
        return exc.status
    sys.stdout.write(f"{pid}\n")
    return 0
