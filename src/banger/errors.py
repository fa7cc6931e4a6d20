"""banger's one error tree.

Every failure a user can see is a :class:`BangerError` carrying a stable ``code``
(travels in the JSON-RPC error's ``data``) and a ``hint`` saying what to do next.
Foreign exceptions (``CalledProcessError``, ``OSError``, ``sqlite3.Error``) are
translated at the boundary that raised them, with ``raise ... from exc``.

    BangerError                 code
    +-- BadRequest              bad_request      malformed or invalid input
    |   +-- BadName             bad_name         not a DNS label
    +-- BadVersion              bad_version      client/daemon protocol mismatch
    +-- NotFound                not_found        unknown VM, image, kernel, op
    +-- AlreadyExists           already_exists   duplicate name
    +-- InvalidState            invalid_state    VM in the wrong state for the op
    |   +-- NotRunning          not_running
    +-- HostError               host_error       the host lacks a tool or ability
    |   +-- CommandFailed       command_failed   a subprocess exited non-zero
    |   +-- CommandTimeout      timeout          a subprocess or wait ran out
    +-- VMMError                vmm_failed       the VMM did not start or died
    +-- GuestError              guest_error      SSH or a guest command failed
    +-- RegistryError           registry_error   an image registry failed, refused or lied
    +-- Cancelled               cancelled        the user cancelled an operation
    +-- Refused                 refused          the root helper's policy said no
    +-- DaemonUnavailable       daemon_unavailable  the CLI cannot reach bangerd
    +-- InternalError           internal         a bug; its message names the daemon log
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from typing import Any, ClassVar


class BangerError(Exception):
    """Base of every user-facing banger failure."""

    code: ClassVar[str] = "error"
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details

    def to_data(self) -> dict[str, Any]:
        """The JSON-RPC error ``data`` object for this error."""
        data: dict[str, Any] = {"code": self.code, "hint": self.hint}
        if self.details:
            data["details"] = self.details
        return data

    def __str__(self) -> str:
        return self.message


class BadRequest(BangerError):
    code = "bad_request"


class BadName(BadRequest):
    code = "bad_name"
    default_hint = (
        "names are DNS labels: 1-63 characters of a-z, 0-9 and '-', "
        "not starting or ending with '-'"
    )


class BadVersion(BangerError):
    code = "bad_version"
    default_hint = "the CLI and bangerd differ; run `banger daemon stop` so the CLI restarts it"


class NotFound(BangerError):
    code = "not_found"


class AlreadyExists(BangerError):
    code = "already_exists"


class InvalidState(BangerError):
    code = "invalid_state"


class NotRunning(InvalidState):
    code = "not_running"
    default_hint = "start it with `banger vm start NAME`"


class Busy(InvalidState):
    """Someone else holds what was asked for (a session's write side)."""

    code = "busy"


class HostError(BangerError):
    code = "host_error"
    default_hint = "run `banger doctor` to check the host"


class CommandFailed(HostError):
    code = "command_failed"


class CommandTimeout(HostError):
    code = "timeout"


class VMMError(BangerError):
    code = "vmm_failed"
    default_hint = "see `banger vm logs NAME` and the daemon log (`banger daemon status`)"


class GuestError(BangerError):
    code = "guest_error"


class RegistryError(BangerError):
    """An OCI registry (or its token server or blob storage) could not be reached,
    refused the request, or sent something banger will not use: content that does
    not match its digest, more bytes than declared, an oversized or malformed
    manifest."""

    code = "registry_error"
    default_hint = "check the image reference, the registry's address and credentials"


class Cancelled(BangerError):
    code = "cancelled"


class Refused(BangerError):
    """The root helper refused a request outside its policy (banger.hostops.policy)."""

    code = "refused"
    default_hint = "the daemon asked for something its install does not allow; see the helper log"


class DaemonUnavailable(BangerError):
    code = "daemon_unavailable"
    default_hint = "check `banger daemon status` and the daemon log"


class InternalError(BangerError):
    code = "internal"
    default_hint = "this is a bug in banger: please report it with that traceback"


_BY_CODE: dict[str, type[BangerError]] = {}


def _register(cls: type[BangerError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(BangerError)


def from_code(code: str, message: str, hint: str = "", **details: Any) -> BangerError:
    """Rebuild the most specific error class for a code received over RPC."""
    cls = _BY_CODE.get(code, BangerError)
    err = cls(message, hint=hint, **details)
    if cls is BangerError:
        # Keep unknown codes from newer daemons instead of flattening them.
        err.code = code  # type: ignore[misc]
    return err


def from_foreign(exc: BaseException, doing: str, log: str | None = None) -> BangerError:
    """The banger error for a foreign exception that escaped to a boundary (an RPC
    handler, an operation thread, a background boot).

    Real host failures become :class:`HostError` with a hint: ``OSError``,
    ``sqlite3.Error`` and subprocess failures (``CalledProcessError``,
    ``TimeoutExpired``) that no one translated. Anything else is a bug in banger: an
    :class:`InternalError` whose message names ``log``, where the caller writes the
    traceback (``None``: "the daemon log").
    """
    if isinstance(exc, BangerError):
        return exc
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        denied = f"bangerd runs as {who}; check the path's permissions"
        hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space",
                errno.EACCES: denied, errno.EPERM: denied}.get(
                    exc.errno or 0, "run `banger doctor` to check the host")
        return HostError(f"{doing} failed: {exc.strerror or exc}{where}", hint=hint)
    if isinstance(exc, sqlite3.Error):
        return HostError(f"{doing} failed: the store reported: {exc}",
                         hint="check free space and permissions of state_dir")
    if isinstance(exc, subprocess.TimeoutExpired):
        return CommandTimeout(f"{doing} failed: {_argv0(exc.cmd)} timed out after "
                              f"{exc.timeout:g}s")
    if isinstance(exc, subprocess.CalledProcessError):
        return CommandFailed(f"{doing} failed: {_argv0(exc.cmd)} exited with status "
                             f"{exc.returncode}")
    what = f"{type(exc).__name__}: {exc}"
    if len(what) > MAX_BUG_TEXT:
        what = what[: MAX_BUG_TEXT - 3] + "..."
    return InternalError(f"{doing} failed unexpectedly ({what}); the traceback is in "
                         f"{log or 'the daemon log'}")


MAX_BUG_TEXT = 300  # characters of a bug's own message quoted in an InternalError


def _argv0(cmd: Any) -> str:
    """The program name of a subprocess command (a list or a string)."""
    if isinstance(cmd, list | tuple) and cmd:
        return str(cmd[0])
    return str(cmd).split(" ", 1)[0]
