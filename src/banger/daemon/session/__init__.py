"""Guest-session helpers: building guest shell scripts and explaining their failures.

The daemon reaches a guest through one channel (``ssh root@guest <script>``) where
``<script>`` is a single string run by the guest's ``/bin/sh``. Everything that
interpolates a value into such a string goes through :func:`quote` or
:func:`join_argv`, and every failed guest step is reported through
:func:`format_step_error` / :func:`step_error` so the user sees which step failed,
its exit status and the tail of what it printed.

A leaf: imports only top-level ``banger`` modules, never ``banger.daemon``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from banger.errors import BadRequest, GuestError
from banger.runner import Result

__all__ = [
    "STEP_OUTPUT_TAIL",
    "check_step",
    "format_step_error",
    "join_argv",
    "quote",
    "script",
    "step_error",
]

# Characters of a failed step's output kept in its message (as runner.STDERR_TAIL).
STEP_OUTPUT_TAIL = 2000

# Exit statuses with a meaning of their own. 255 is what OpenSSH returns when the
# connection itself failed; 126/127 are the shell's "cannot execute"/"not found".
_EXIT_MEANINGS = {
    255: "the ssh connection failed or was closed",
    127: "a command was not found in the guest",
    126: "a command in the guest could not be executed",
}


def quote(value: str) -> str:
    """Quote ``value`` as one word for the guest's POSIX ``sh``.

    Raises:
        BadRequest: ``value`` contains a NUL byte, which no shell word can carry.
    """
    if "\0" in value:
        raise BadRequest(f"cannot pass a value containing a NUL byte to the guest: {value!r}")
    return shlex.quote(value)


def join_argv(argv: Sequence[str]) -> str:
    """A shell command line that runs ``argv`` exactly, every word quoted."""
    return " ".join(quote(a) for a in argv)


def script(*lines: str) -> str:
    """Join script lines under ``set -eu`` so the first failing command ends the step."""
    return "\n".join(("set -eu", *lines)) + "\n"


def _tail(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return "..." + text[-limit:]


def format_step_error(step: str, result: Result, *, limit: int = STEP_OUTPUT_TAIL) -> str:
    """A one-paragraph message for a guest step that exited non-zero.

    Names the step, the exit status (with its conventional meaning where there is
    one) and the tail of stderr, falling back to stdout when stderr is empty.

    Args:
        step: what the step was doing, e.g. ``"extract files into /root/x"``.
        result: the finished step.
        limit: how many characters of output to keep.
    """
    msg = f"guest step {step!r} failed (exit {result.returncode})"
    meaning = _EXIT_MEANINGS.get(result.returncode)
    if meaning:
        msg += f": {meaning}"
    output = _tail(result.err, limit) or _tail(result.out, limit)
    if output:
        msg += "\n" + output
    return msg


def step_error(step: str, result: Result, *, hint: str | None = None) -> GuestError:
    """The :class:`GuestError` for a failed step (see :func:`format_step_error`)."""
    return GuestError(format_step_error(step, result), hint=hint, step=step,
                      returncode=result.returncode)


def check_step(step: str, result: Result, *, hint: str | None = None) -> Result:
    """Return ``result`` if it succeeded, else raise :func:`step_error`."""
    if result.returncode != 0:
        raise step_error(step, result, hint=hint)
    return result
