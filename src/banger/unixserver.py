"""A Unix-socket listener shared by bangerd's RPC server and the root helper.

The socket is born 0600 (bound under a 0177 umask, so no other user can connect in a
window before a chmod), every connection is served on a thread of its own, at most
``max_connections`` at once (more are closed at once), and only peers whose uid
``admits`` (``SO_PEERCRED``) are served: anyone else is closed without a word. A
subclass reads and answers a connection's requests in :meth:`serve`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

from banger.proc import peer_uid

log = logging.getLogger("banger.unixserver")

ACCEPT_POLL_S = 0.5  # how often the accept loop checks for shutdown


class UnixServer:
    """Listens on ``path``; :meth:`serve` is each admitted connection's work."""

    thread_name = "conn"

    def __init__(self, path: Path, *, max_connections: int, backlog: int,
                 idle_timeout_s: float) -> None:
        self.path = path
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: no window where another user can connect
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(backlog)
        self.sock.settimeout(ACCEPT_POLL_S)

    def admits(self, uid: int) -> bool:
        """Whether a peer running as ``uid`` is served."""
        raise NotImplementedError

    def serve(self, conn: socket.socket) -> None:
        """Read and answer ``conn``'s requests until it closes (it is closed after)."""
        raise NotImplementedError

    def serve_until(self, stop: threading.Event) -> None:
        """Accept connections until ``stop`` is set, one thread each."""
        while not stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                log.warning("%s: too many connections; refusing one", self.path)
                conn.close()
                continue
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True,
                             name=self.thread_name).start()

    def close(self) -> None:
        """Stop listening and remove the socket (errors ignored)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
            if not self.admits(uid):
                log.warning("%s: closed a connection from uid %d", self.path, uid)
                return
            conn.settimeout(self.idle_timeout_s)
            self.serve(conn)
        except (TimeoutError, ConnectionError):
            pass  # a silent or vanished client
        except OSError as exc:
            log.debug("connection error: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._slots.release()
