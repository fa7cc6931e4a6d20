"""The one place banger errors become exit codes and printed lines.

``vm run`` and ``vm exec`` return the guest command's own status, so banger's
failures use a code commands rarely use themselves: 125, as ``docker run``
does. Usage errors exit 2 (click's convention); Ctrl-C exits 130. The stable
error code (``not_found``, ``bad_name``, ...) is printed with ``--json``.
"""

from __future__ import annotations

import json
import sys

from banger.errors import BangerError

BANGER_ERROR = 125


def code_for(err: BangerError) -> int:
    """The exit status for ``err``: always ``BANGER_ERROR`` (125) for now."""
    return BANGER_ERROR


def print_error(err: BangerError, as_json: bool) -> None:
    """Print ``err`` as ``error:``/``hint:`` lines on stderr, or as JSON on stdout."""
    if as_json:
        print(json.dumps({"error": {"code": err.code, "message": err.message,
                                    "hint": err.hint}}, indent=2))
        return
    print(f"error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)
