"""``banger``: the command line. Each command parses flags and makes one call of the
SDK (:mod:`banger.sdk`).

The commands are :mod:`banger.cli.commands` (click); :func:`main` imports them only
when :func:`banger.cli.quick.exec_fast` did not run the command already (the plain
``vm exec NAME -- CMD...``, kept at interactive speed without click and pydantic).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``banger`` console script."""
    from banger.cli.quick import exec_fast

    status = exec_fast(sys.argv[1:] if argv is None else argv)
    if status is not None:
        # Nothing is left to clean up: skip the interpreter's teardown (milliseconds
        # that every `vm exec` would wait for).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    from banger.cli.commands import main as full

    full(argv)
