"""Start Firecracker fully detached from its caller; run as a script, never imported.

Usage::

    python -I _spawn.py --output FILE -- COMMAND [ARG...]

Firecracker has no ``--daemonize`` (the jailer's sends the guest's serial
console to /dev/null), so banger detaches it itself with
:func:`banger.detach.run` (double fork; see that module for the pid/error
report and the exit statuses). The command's stdout and stderr append to
``FILE`` (the guest's serial console).

Running this as a separate short-lived program keeps the fork away from
bangerd's threads and lets it go through :mod:`banger.runner` like every other
subprocess. On success it prints ``<pid>`` and exits 0 once the command has
been exec'd; if exec fails it prints the reason on stderr and exits 127.
"""

from __future__ import annotations

import argparse
import os
import sys

from banger.detach import run


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
    try:
        out_fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o640)
    except OSError as exc:
        sys.stderr.write(f"cannot open {args.output}: {exc.strerror}\n")
        return 1
    return run(command, out_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
