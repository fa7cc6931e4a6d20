"""``client.sessions``: long-running guest commands that outlive the caller, and
attachments to them (output followed live, input typed in)."""

from __future__ import annotations

import base64
import builtins
from typing import Any

from banger.api import SessionAttachment, SessionLogs, SessionView
from banger.sdk.base import Namespace, view, views

# Past a stop's TERM-to-KILL wait: the daemon's own bounded guest steps (signal, then
# read the status; 90 s each at most, banger.daemon.sessions.GUEST_TIMEOUT_S, seldom
# more than a second).
STOP_ANSWER_S = 120.0


class Sessions(Namespace):
    """``client.sessions``."""

    def start(self, vm: str, argv: builtins.list[str], *, name: str | None = None,
              cwd: str | None = None, env: dict[str, str] | None = None, tty: bool = False,
              rows: int = 24, cols: int = 80) -> SessionView:
        """Start ``argv`` detached in VM ``vm`` (on a ``rows`` x ``cols`` terminal with
        ``tty``); returns once the guest runs it."""
        res = self._c.call("vm.session.start", vm=vm, argv=argv, name=name, cwd=cwd,
                           env=env or {}, tty=tty, rows=rows, cols=cols)
        return view(SessionView, res, "vm.session.start")

    def list(self, vm: str | None = None, *, fresh: bool = True) -> builtins.list[SessionView]:
        """The sessions of VM ``vm`` (of every VM when None); ``fresh=False``: as last
        known, no guest is read."""
        res = self._c.call("vm.session.list", vm=vm, fresh=fresh)
        return views(SessionView, res, "vm.session.list")

    def show(self, vm: str, name: str) -> SessionView:
        """One session: command, state, exit status, attachments."""
        res = self._c.call("vm.session.show", vm=vm, name=name)
        return view(SessionView, res, "vm.session.show")

    def logs(self, vm: str, name: str, cursor: str = "0:0", wait_s: float = 0.0, *,
             attachment: str | None = None, timeout: float | None = None) -> SessionLogs:
        """Output after ``cursor`` (its ``next`` continues), waiting up to ``wait_s`` for
        some; ``attachment`` keeps that attachment alive; ``timeout`` bounds the call."""
        res = self._c.call("vm.session.logs", timeout, vm=vm, name=name, cursor=cursor,
                           wait_s=wait_s, attachment=attachment)
        return view(SessionLogs, res, "vm.session.logs")

    def send(self, vm: str, name: str, text: str, newline: bool = True) -> dict[str, Any]:
        """Write ``text`` (and a newline) to the session's input (``{"sent": BYTES, ...}``)."""
        result: dict[str, Any] = self._c.call("vm.session.send", vm=vm, name=name, text=text,
                                              newline=newline)
        return result

    def stop(self, vm: str, name: str, timeout_s: float = 10.0) -> SessionView:
        """End the session's command: TERM, then KILL after ``timeout_s``."""
        res = self._c.call("vm.session.stop", timeout_s + STOP_ANSWER_S, vm=vm, name=name,
                           timeout_s=timeout_s)
        return view(SessionView, res, "vm.session.stop")

    def kill(self, vm: str, name: str, signal: str = "KILL") -> SessionView:
        """Send ``signal`` (TERM, INT, HUP, KILL, ...) to the session's processes."""
        res = self._c.call("vm.session.kill", vm=vm, name=name, signal=signal)
        return view(SessionView, res, "vm.session.kill")

    def remove(self, vm: str, name: str) -> dict[str, Any]:
        """Forget an ended session and delete its output (``{"removed": NAME, ...}``)."""
        result: dict[str, Any] = self._c.call("vm.session.rm", vm=vm, name=name)
        return result

    def attach(self, vm: str, name: str, *, write: bool = True) -> SessionAttachment:
        """Attach to a session: its output is then read with :meth:`logs` (passing the
        attachment) and, with ``write``, its input written with :meth:`write`."""
        res = self._c.call("vm.session.attach", vm=vm, name=name, write=write)
        return view(SessionAttachment, res, "vm.session.attach")

    def write(self, attachment: str, data: bytes, *, timeout: float | None = None
              ) -> dict[str, Any]:
        """Queue ``data`` for the session's input (the writing attachment only)."""
        result: dict[str, Any] = self._c.call("vm.session.write", timeout,
                                              attachment=attachment,
                                              data=base64.b64encode(data).decode())
        return result

    def resize(self, attachment: str, rows: int, cols: int, *, timeout: float | None = None
               ) -> dict[str, Any]:
        """Set a ``tty`` session's window size (the writing attachment only)."""
        result: dict[str, Any] = self._c.call("vm.session.resize", timeout,
                                              attachment=attachment, rows=rows, cols=cols)
        return result

    def detach(self, attachment: str, *, timeout: float | None = None) -> dict[str, Any]:
        """End an attachment (one already gone is not an error: ``{"detached": False}``)."""
        result: dict[str, Any] = self._c.call("vm.session.detach", timeout,
                                              attachment=attachment)
        return result
