"""A guest's serial console, watched for the line that says it can be reached.

The VMM writes the guest's console to ``serial.log`` (truncated at each launch). While
the daemon waits for SSH it polls the guest's address; a line on the console says
sooner when to try: systemd's ``Started ssh.service`` on a boot, ``banger-ident``'s
``applied gen=...`` on a clone (``identity.announced``). The line is only a hint of
*when* to probe: a guest that writes it falsely is probed sooner, and the SSH probe
decides. The log is the guest's, so it is read in bounded pieces, from where the last
look ended, and never parsed beyond the one pattern.
"""

from __future__ import annotations

import re
from pathlib import Path

READ_MAX = 1 << 20  # bytes read per look; a guest that floods its console only delays it
CARRY = 512  # bytes of the previous read kept, for a line split between two reads

# systemd's status line once sshd has started, with or without its colour codes.
SSH_STARTED = re.compile(rb"Started (?:\x1b\[[0-9;]*m)?ssh\.service")


class ConsoleWatch:
    """Callable: whether ``pattern`` has appeared in ``path`` since the watch began
    (from byte ``start``); once it has, always True."""

    def __init__(self, path: Path, pattern: re.Pattern[bytes], start: int = 0) -> None:
        self.path, self.pattern = path, pattern
        self.pos = start
        self.carry = b""
        self.seen = False

    def __call__(self) -> bool:
        """Look at what the console got since the last look; True once the pattern is
        there."""
        if self.seen:
            return True
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.pos)
                data = fh.read(READ_MAX)
        except OSError:
            return False
        self.pos += len(data)
        window = self.carry + data
        self.seen = self.pattern.search(window) is not None
        self.carry = window[-CARRY:]
        return self.seen
