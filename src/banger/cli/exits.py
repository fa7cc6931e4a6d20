"""The one place banger errors become exit codes and printed lines.

``vm run``, ``vm exec`` and ``vm ssh`` return the guest command's own status
(128+N when a signal N killed it, as a shell reports), so banger's own
failures use a code commands rarely use themselves: 125, as ``docker run``
does. The codes banger itself uses (the README's table lists the same):

====  ==========================================================
0     success
1     ``banger doctor``: at least one check FAILed
2     usage error (bad flag, argument or combination)
3     ``banger daemon status``: bangerd is not running
125   banger failed (the ``error:``/``hint:`` lines say why)
130   interrupted (Ctrl-C)
====  ==========================================================

The stable error code (``not_found``, ``bad_name``, ...) is printed with ``--json``.
"""

from __future__ import annotations

import json
import sys

import click

from banger.errors import BangerError

DOCTOR_FAIL = 1
USAGE = 2
DAEMON_NOT_RUNNING = 3
BANGER_ERROR = 125
INTERRUPTED = 130


def code_for(err: BangerError) -> int:
    """The exit status for ``err``: always ``BANGER_ERROR`` (125) for now."""
    return BANGER_ERROR


class _Stdout:
    is_data = False  # set once, by claim_stdout: a process runs one command


def claim_stdout() -> None:
    """Say that standard output carries this command's data (``image export -o -``'s
    bundle): a JSON error then goes to stderr, not into the data."""
    _Stdout.is_data = True


def print_error(err: BangerError, as_json: bool) -> None:
    """Print ``err`` as ``error:``/``hint:`` lines on stderr, or as JSON on stdout
    (on stderr when standard output is the command's data: :func:`claim_stdout`)."""
    if as_json:
        print(json.dumps({"error": {"code": err.code, "message": err.message,
                                    "hint": err.hint}}, indent=2),
              file=sys.stderr if _Stdout.is_data else sys.stdout)
        return
    print(f"error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def print_usage_error(message: str, command_path: str, as_json: bool) -> None:
    """A usage error in banger's own ``error:``/``hint:`` form (code ``usage``)."""
    hint = f"`{command_path} --help` shows the usage"
    if as_json:
        print(json.dumps({"error": {"code": "usage", "message": message, "hint": hint}},
                         indent=2))
        return
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)


def run_service(command: click.Command, prog: str) -> None:
    """The entry point of a service program (``bangerd``, ``banger-helper``): click's
    errors keep click's exit status; a banger error is printed as ``PROG: error:`` and
    ``hint:`` lines and exits 1."""
    try:
        command.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BangerError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        sys.exit(1)
