"""The wrapper that gives a test's child default signal handling, checked where it
matters: under a parent that ignores SIGINT and SIGTERM, as a background shell does."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.childsignals import with_default_signals

# Runs its arguments with SIGINT and SIGTERM ignored: what a test inherits from a shell
# running the suite in the background (plus TERM, which nohup-like wrappers ignore).
IGNORING = ["sh", "-c", 'trap "" INT TERM; exec "$@"', "sh"]


def _ignored(status: str) -> int:
    line = next(x for x in status.splitlines() if x.startswith("SigIgn:"))
    return int(line.split()[1], 16)


def _bit(sig: signal.Signals) -> int:
    return 1 << (sig - 1)


def test_the_ignoring_parent_really_hands_down_ignored_signals() -> None:
    # Without this the test below would prove nothing.
    out = subprocess.run([*IGNORING, "cat", "/proc/self/status"], capture_output=True,
                         text=True, check=True).stdout
    assert _ignored(out) & _bit(signal.SIGINT) and _ignored(out) & _bit(signal.SIGTERM)


def test_the_wrapped_child_has_default_handling() -> None:
    out = subprocess.run([*IGNORING, *with_default_signals(["cat", "/proc/self/status"])],
                         capture_output=True, text=True, check=True).stdout
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        assert not _ignored(out) & _bit(sig), sig.name


def test_sigint_reaches_a_wrapped_python_child_as_keyboard_interrupt() -> None:
    """The case that broke the Ctrl-C test: the pid held is the program's own."""
    script = ("import sys, time\n"
              "print('ready', flush=True)\n"
              "try:\n    time.sleep(60)\n"
              "except KeyboardInterrupt:\n    sys.exit(42)\n")
    proc = subprocess.Popen([*IGNORING, *with_default_signals([sys.executable, "-c", script])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.1)  # past the print: inside the sleep
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 42
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes the pipe
