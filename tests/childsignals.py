"""Children that a test will signal start with that signal's default action.

A signal a parent ignores stays ignored across fork and exec. A shell ignores SIGINT
(and SIGQUIT) for every background job, so a suite started with ``&``, or under
``trap "" INT``, hands every child SIGINT ignored: a test that then sends SIGINT to
the CLI tests nothing (the CLI never sees it; Python does not even install its
KeyboardInterrupt handler). Python's ``restore_signals=True`` resets only SIGPIPE and
SIGXFSZ, and ``preexec_fn`` is unsafe with threads, so children go through coreutils'
``env --default-signal``: it resets the dispositions and execs the command in the same
process, so the pid a test holds is the command's.

The signals reset are the ones tests and the daemon send to processes tests start.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SIGNALS = ("INT", "TERM", "QUIT", "HUP")


def with_default_signals(argv: Sequence[str]) -> list[str]:
    """``argv`` run with :data:`DEFAULT_SIGNALS` at their default action."""
    return ["env", f"--default-signal={','.join(DEFAULT_SIGNALS)}", *argv]
