"""Live display of an operation's stages: a spinner on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.status import Status

from banger.cli.output import op_line

PLAIN_PROGRESS_EVERY_S = 5.0  # without a TTY, repeat progress within a stage at most this often


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.tty = enabled and sys.stderr.isatty()
        self._status: Status | None = None
        self._stage: str | None = None
        self._last_plain = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        if self.tty:
            self._status = self.console.status("starting...")
            self._status.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()

    def update(self, op: dict[str, Any]) -> None:
        """Show the state of ``op`` (an op view from the daemon).

        On a TTY the spinner line is replaced and each finished stage gets a tick;
        otherwise a line is printed per new stage, and within a stage at most every
        ``PLAIN_PROGRESS_EVERY_S`` seconds.
        """
        if not self.enabled:
            return
        line = op_line(op)
        elapsed = f"{time.monotonic() - self._started:5.1f}s"
        if self._status is not None:
            if op["stage"] != self._stage and self._stage is not None:
                self.console.print(f"[green]✓[/green] {self._stage}")
            self._status.update(f"{line}  [dim]{elapsed}[/dim]")
            self._stage = op["stage"]
            return
        now = time.monotonic()
        if op["stage"] != self._stage or now - self._last_plain >= PLAIN_PROGRESS_EVERY_S:
            print(f"{elapsed} {line}", file=sys.stderr, flush=True)
            self._stage = op["stage"]
            self._last_plain = now

    def note(self, text: str) -> None:
        """Print ``text`` on stderr above the spinner (or plainly), unless disabled."""
        if self._status is not None:
            self.console.print(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)
