"""The one chokepoint for subprocesses.

Argument lists only (never a shell string), always a timeout and a one-line
description, output captured, secrets redacted from anything that reaches a
log or an error message. A failure becomes :class:`CommandFailed` carrying the
argv and the tail of stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from banger.errors import Cancelled, CommandFailed, CommandTimeout, HostError

log = logging.getLogger("banger.runner")

STDERR_TAIL = 2000  # characters of stderr kept in an error message


class Hidden(str):
    """An argv element that is redacted in logs and errors (a key, a token)."""

    __slots__ = ()


def redact(argv: Iterable[str]) -> list[str]:
    """argv with :class:`Hidden` elements replaced by ``****``."""
    return ["****" if isinstance(a, Hidden) else str(a) for a in argv]


def shell_line(argv: Iterable[str]) -> str:
    """A readable (not executable) one-line rendering of a redacted argv."""
    return " ".join(shlex.quote(a) for a in redact(argv))


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        """stdout as text, undecodable bytes replaced."""
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        """stderr as text, undecodable bytes replaced (empty for streamed runs)."""
        return self.stderr.decode(errors="replace")


@dataclass
class CancelToken:
    """Cooperative cancellation shared between an operation and the commands it runs."""

    _event: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Request cancellation; ``reason`` becomes the :class:`Cancelled` message."""
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled(self.reason)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if cancelled meanwhile."""
        return self._event.wait(seconds)


class Runner(Protocol):
    """What the daemon and its helpers need from subprocesses."""

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv this runner would really execute for ``argv`` (for pipelines that
        must spawn a process themselves but keep the runner's identity rules)."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        timeout: float = 60.0,
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Result:
        """Run ``argv`` to completion with captured output (``pass_fds`` stay open in it).

        Raises:
            CommandFailed: non-zero exit while ``check`` is true.
            CommandTimeout: ``timeout`` seconds passed.
            HostError: the program could not be started.
        """
        ...

    def stream(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        on_line: Callable[[str], None],
        timeout: float = 3600.0,
        env: Mapping[str, str] | None = None,
        cancel: CancelToken | None = None,
    ) -> Result:
        """Run ``argv``, passing each output line to ``on_line`` as it arrives."""
        ...


def as_root_owner() -> list[str]:
    """The prefix under which a command sees this process's files as root's.

    ``mkfs.ext4 -d`` copies each file's owner into the file system: a work disk's
    ``authorized_keys`` must be root's for the guest's sshd, and a pulled image's files
    are root's unless the image says otherwise. A daemon running as its owner user made
    those files as itself, so mkfs runs in a user namespace that maps that user to root
    (its files then read as uid 0, and it may read them whatever their mode); a root
    daemon needs nothing.
    """
    return [] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--"]


def _failure(desc: str, argv: Sequence[str], rc: int, stderr: bytes) -> CommandFailed:
    tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
    msg = f"{desc} failed (exit {rc}): {shell_line(argv)}"
    if tail:
        msg += f"\n{tail}"
    return CommandFailed(msg, argv=redact(argv), returncode=rc, stderr=tail)


def _missing(desc: str, argv: Sequence[str], exc: OSError) -> HostError:
    return HostError(
        f"{desc}: cannot run {argv[0]!r}: {exc.strerror}",
        hint=f"install {Path(argv[0]).name} (see `banger doctor`)",
    )


class SubprocessRunner:
    """The real runner."""

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` unchanged, as strings: the real runner adds no wrapper."""
        return [str(a) for a in argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        timeout: float = 60.0,
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Result:
        """Run ``argv`` with captured output and ``env`` added to the daemon's own;
        ``pass_fds`` are inherited by it.

        stdin is ``/dev/null`` unless ``input`` is given.

        Raises:
            CommandFailed: non-zero exit while ``check`` is true (stderr tail attached).
            CommandTimeout: ``timeout`` seconds passed; the child is killed.
            HostError: the program could not be started (e.g. not installed).
        """
        args = [str(a) for a in argv]
        log.debug("run: %s (%s)", shell_line(argv), desc)
        full_env = {**os.environ, **env} if env is not None else None
        try:
            proc = subprocess.run(
                args,
                input=input,
                capture_output=True,
                timeout=timeout,
                env=full_env,
                cwd=cwd,
                stdin=None if input is not None else subprocess.DEVNULL,
                check=False,
                pass_fds=tuple(pass_fds),
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(
                f"{desc} timed out after {timeout:g}s: {shell_line(argv)}",
                argv=redact(argv),
            ) from exc
        except OSError as exc:
            raise _missing(desc, argv, exc) from exc
        result = Result(redact(argv), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise _failure(desc, argv, proc.returncode, proc.stderr)
        return result

    def stream(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        on_line: Callable[[str], None],
        timeout: float = 3600.0,
        env: Mapping[str, str] | None = None,
        cancel: CancelToken | None = None,
    ) -> Result:
        """Run, feeding each stdout/stderr line to ``on_line``; kill on timeout or cancel."""
        args = [str(a) for a in argv]
        log.debug("stream: %s (%s)", shell_line(argv), desc)
        full_env = {**os.environ, **env} if env is not None else None
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        except OSError as exc:
            raise _missing(desc, argv, exc) from exc
        lines: list[str] = []
        assert proc.stdout is not None
        reader = threading.Thread(
            target=_pump, args=(proc.stdout, lines, on_line), daemon=True
        )
        reader.start()
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if cancel is not None and cancel.cancelled:
                    _kill_group(proc)
                    reader.join(5)
                    raise Cancelled(f"{desc}: {cancel.reason}")
                if time.monotonic() > deadline:
                    _kill_group(proc)
                    reader.join(5)
                    raise CommandTimeout(f"{desc} timed out after {timeout:g}s",
                                         argv=redact(argv))
                time.sleep(0.1)
            reader.join(5)
        finally:
            proc.stdout.close()
        output = "\n".join(lines).encode()
        if proc.returncode != 0:
            raise _failure(desc, argv, proc.returncode, output)
        return Result(redact(argv), proc.returncode, output, b"")


# A longer "line" is handed on in pieces: the output may come from a hostile guest.
MAX_LINE = 64 << 10


def _pump(stream: IO[bytes], lines: list[str], on_line: Callable[[str], None]) -> None:
    for raw in iter(lambda: stream.readline(MAX_LINE), b""):
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        del lines[:-200]  # keep a tail for the error message, not the whole log
        try:
            on_line(line)
        except Exception:  # a progress callback must never kill the command
            log.exception("progress callback failed")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.wait()


class WrappingRunner:
    """Runs every command through an inner runner after :meth:`wrap` (a prefix that
    changes who or where it runs)."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as the inner runner would run it (subclasses add their prefix)."""
        return self.inner.wrap(argv)

    def run(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        timeout: float = 60.0,
        input: bytes | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Result:
        """Run the wrapped ``argv`` through the inner runner."""
        return self.inner.run(self.wrap(argv), desc=desc, timeout=timeout, input=input,
                              check=check, env=env, cwd=cwd, pass_fds=pass_fds)

    def stream(
        self,
        argv: Sequence[str],
        *,
        desc: str,
        on_line: Callable[[str], None],
        timeout: float = 3600.0,
        env: Mapping[str, str] | None = None,
        cancel: CancelToken | None = None,
    ) -> Result:
        """Stream the wrapped ``argv`` through the inner runner."""
        return self.inner.stream(self.wrap(argv), desc=desc, on_line=on_line,
                                 timeout=timeout, env=env, cancel=cancel)


class PrefixRunner(WrappingRunner):
    """Runs every command after a fixed ``prefix`` (``nsenter ... --``, ``env ...``)."""

    def __init__(self, inner: Runner, prefix: Sequence[str]) -> None:
        super().__init__(inner)
        self.prefix = list(prefix)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` after the prefix."""
        return self.inner.wrap([*self.prefix, *argv])


class OwnerRunner(WrappingRunner):
    """Runs commands as another user (a repository's owner) through ``setpriv``.

    bangerd is root; a user's git repository must not make root run its hooks,
    filters or ``core.fsmonitor``, and git's ``safe.directory`` check refuses it
    anyway. Every command goes through the wrapped runner with
    ``setpriv --reuid --regid --init-groups`` and the owner's HOME.
    """

    def __init__(self, inner: Runner, uid: int, gid: int, home: str) -> None:
        super().__init__(inner)
        self.uid = uid
        self.gid = gid
        self.home = home

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``setpriv`` and the owner's HOME, unless the owner is root
        or this process's own user (a daemon running as its owner)."""
        args = self.inner.wrap(argv)
        if self.uid in (0, os.getuid()):
            return args
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "--", "env", f"HOME={self.home}", *args]
