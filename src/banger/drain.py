"""Reading a child process's pipes in threads, bounded: :class:`Drain` keeps the last
bytes of a stream, or all of it up to a cap (past which the writer is stopped).

Shared by everything that captures a program's output it does not trust to be small:
guest steps (:mod:`banger.daemon.workspace.transfer`), host git
(:mod:`banger.daemon.workspace.hostpack`) and a remote host's banger
(:func:`banger.remote.run_bounded`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import IO

OUTPUT_LIMIT = 1 << 20  # bytes of a process's stdout/stderr kept in memory


class Drain:
    """Reads a pipe to EOF in a thread, keeping the last ``limit`` bytes.

    With ``cap``, keeps everything instead but stops at ``cap`` bytes: ``over_cap``
    is set and ``on_cap`` called (it kills the writer, which would otherwise block).
    """

    def __init__(self, stream: IO[bytes] | None, limit: int | None = OUTPUT_LIMIT, *,
                 cap: int | None = None, on_cap: Callable[[], None] | None = None) -> None:
        self.data = bytearray()
        self._limit = None if cap is not None else limit
        self._cap = cap
        self._on_cap = on_cap
        self.over_cap = False
        self._thread: threading.Thread | None = None
        if stream is not None:
            self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
            self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := stream.read(65536):
                if self._cap is not None and len(self.data) + len(chunk) > self._cap:
                    self.over_cap = True
                    if self._on_cap is not None:
                        self._on_cap()
                    return
                self.data += chunk
                if self._limit is not None and len(self.data) > self._limit:
                    del self.data[: len(self.data) - self._limit]

    def join(self, timeout: float = 5.0) -> bytes:
        """Wait (at most ``timeout``) for the end of the stream; what was kept."""
        if self._thread is not None:
            self._thread.join(timeout)
        return bytes(self.data)


def close(*streams: IO[bytes] | None) -> None:
    """Close each stream that is not None, ignoring errors."""
    for stream in streams:
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
