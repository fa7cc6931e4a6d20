"""Start a command fully detached from its caller; run as a script, never imported.

Usage::

    python -I _spawn.py --output FILE -- COMMAND [ARG...]

Firecracker has no ``--daemonize`` (the jailer's sends the guest's serial
console to /dev/null), so banger detaches it itself, the way ``setsid --fork``
does: fork, ``setsid()`` in the child, fork again, exec in the grandchild. The
intermediate child exits at once, so the command is re-parented to init (or
the nearest subreaper): bangerd is never its parent and never leaves a zombie,
and the VM survives a daemon restart. The grandchild's stdin is /dev/null and
its stdout and stderr append to ``FILE`` (the guest's serial console).

Running this as a separate short-lived program keeps the fork away from
bangerd's threads and lets it go through :mod:`banger.runner` like every other
subprocess. On success it prints ``<pid>`` and exits 0 once the command has
been exec'd; if exec fails it prints the reason on stderr and exits 127.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EXEC_FAILED = 127


def _exec_detached(command: list[str], out_fd: int, null_fd: int, report_fd: int) -> None:
    """In the grandchild: wire stdio, restore signals, exec; report errno on failure."""
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


def main(argv: list[str]) -> int:
    """Detach ``argv``'s command; print its pid. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="_spawn.py")
    parser.add_argument("--output", required=True, help="file for stdout and stderr (appended)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command: list[str] = args.command
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("no command given after --")

    out_fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # Close-on-exec pipe: EOF means every writer is gone, i.e. the intermediate
    # child exited and the grandchild either exec'd (closing its end) or failed
    # (after writing why).
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(read_fd)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _exec_detached(command, out_fd, null_fd, write_fd)
            os.write(write_fd, f"pid {grandchild}\n".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
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
        sys.stderr.write("cannot execute " + "; ".join(errors) + "\n")
        return EXEC_FAILED
    if pid is None:
        sys.stderr.write("the detaching child exited without starting the command\n")
        return 1
    sys.stdout.write(f"{pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
