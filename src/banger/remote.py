"""A bangerd on another machine, reached over SSH (``--host ssh://[user@]box[:port]``).

The system ``ssh`` does the connecting, with the user's own config, keys and agent.
One command opens one SSH connection (a private ``ControlMaster``) and uses it for
everything:

1. ``banger daemon where --json`` on the remote host (the remote CLI, which finds or
   starts its daemon as it would for a local command) names the daemon's socket and
   its version; a version or protocol other than this CLI's is an error naming both;
2. the socket is forwarded to one in a private directory here (``ssh -O forward -L``),
   so every RPC of the command is a channel of that one connection;
3. ``vm ssh`` and ``vm exec`` run the remote CLI's own command over the same
   connection, so the guest's key and known_hosts stay on the remote host.

The connection ends with the command (:meth:`SSHLink.close`, also at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from banger.drain import Drain, close
from banger.errors import BadRequest, DaemonUnavailable
from banger.protocol import PROTOCOL_VERSION, __version__

SCHEME = "ssh://"
CONNECT_TIMEOUT_S = 15  # ssh's ConnectTimeout: an unreachable host fails this fast
WHERE_TIMEOUT_S = 120.0  # the remote CLI may start its daemon first
FORWARD_WAIT_S = 10.0
MAX_ANSWER = 64 << 10  # what the remote CLI may print for `daemon where`
# A user name as OpenSSH and useradd accept it; a host name of DNS labels or an address.
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
REMOTE_BANGER = "banger"


@dataclass(frozen=True)
class SSHTarget:
    """Where the remote daemon is: ``ssh://[user@]host[:port]``."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> SSHTarget:
        """``url`` checked, word by word.

        Raises:
            BadRequest: not ``ssh://[user@]host[:port]`` with a valid user, host and port.
        """
        hint = "give ssh://[user@]host[:port], e.g. ssh://dev@box.example.com:2222"
        if not url.startswith(SCHEME):
            raise BadRequest(f"host {url!r} is not an ssh:// address", hint=hint)
        rest = url[len(SCHEME):].rstrip("/")
        user, at, hostport = rest.rpartition("@")
        if not at:
            user, hostport = "", rest
        host, port = hostport, None
        if hostport.startswith("["):  # [IPv6]:port
            inner, _, tail = hostport[1:].partition("]")
            host = inner
            if tail:
                if not tail.startswith(":"):
                    raise BadRequest(f"host {url!r}: cannot read {hostport!r}", hint=hint)
                port = _port(url, tail[1:], hint)
        elif hostport.count(":") == 1:
            host, text = hostport.split(":")
            port = _port(url, text, hint)
        if at and not _USER.fullmatch(user):
            raise BadRequest(f"host {url!r}: {user!r} is not a user name", hint=hint)
        if not _valid_host(host):
            raise BadRequest(f"host {url!r}: {host!r} is not a host name or address",
                             hint=hint)
        return cls(host=host, user=user or None, port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{SCHEME}{self.user + '@' if self.user else ''}{host}"
                f"{':' + str(self.port) if self.port else ''}")

    @property
    def destination(self) -> str:
        """ssh's destination argument."""
        return f"{self.user}@{self.host}" if self.user else self.host


def _port(url: str, text: str, hint: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadRequest(f"host {url!r}: port {text!r} is not 1-65535", hint=hint)
    return int(text)


def _valid_host(host: str) -> bool:
    if "%" in host:
        return False  # an IPv6 scope: ssh hands %h to the user's ProxyCommand and shells
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(p) for p in host.split("."))


class SSHLink:
    """One SSH connection to ``target`` for the life of one command (see the module)."""

    def __init__(self, target: SSHTarget, *, remote_banger: str = REMOTE_BANGER) -> None:
        self.target = target
        self.remote_banger = remote_banger
        self._dir = Path(tempfile.mkdtemp(prefix="banger-ssh-"))
        self.control = self._dir / "ctl"
        self.socket = self._dir / "bangerd.sock"
        self.remote: dict[str, Any] = {}
        self._master: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    def ssh(self, *extra: str, master: bool = False) -> list[str]:
        """``ssh`` with this link's options: its control socket (a session of the one
        connection; ``master`` makes it), the port, batch mode (a password prompt would
        hang a script)."""
        argv = ["ssh", "-o", f"ControlPath={self.control}",
                "-o", f"ControlMaster={'yes' if master else 'no'}", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        return [*argv, *extra]

    def remote_command(self, argv: list[str]) -> str:
        """The remote banger running ``argv`` against its own machine's daemon (``--host
        ''``: never onwards, whatever that host's environment or contexts say)."""
        return shlex.join([self.remote_banger, "--host", "", *argv])

    def connect(self) -> None:
        """Open the connection (idempotent).

        Raises:
            DaemonUnavailable: ssh could not connect or log in.
        """
        if self._master is not None:
            return
        if shutil.which("ssh") is None:
            raise DaemonUnavailable("no ssh here to reach the remote host with",
                                    hint="install OpenSSH's client (openssh-client)")
        # Its messages go to a file: a pipe nobody reads could fill and stall it.
        with (self._dir / "ssh.err").open("wb") as err:
            self._master = subprocess.Popen(
                self.ssh("-N", "-o", "ControlPersist=no", self.target.destination,
                         master=True),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        _close_on_signals()
        self._wait_for_master()

    def open(self, *, start: bool = True) -> Path:
        """Connect, check the remote daemon's version and forward its socket; the local
        socket to give :class:`banger.client.Client`. ``start``: the remote banger
        starts its daemon when none runs (else ``remote["running"]`` says so).

        Raises:
            DaemonUnavailable: ssh could not connect or log in, the remote host has no
                banger, or its daemon did not answer.
            BadRequest: the remote banger's version or protocol is not this one's.
        """
        self.connect()
        self.remote = self._where(start)
        self._check_version()
        self._forward(str(self.remote["socket"]))
        return self.socket

    def check_sends_to_own_daemon(self) -> None:
        """Refuse to send a repository or files the remote daemon will not read: they are
        unpacked as the login user, and a daemon that runs as another user and is not
        root (a service daemon) copies only its own user's.

        Raises:
            BadRequest: the remote daemon runs as another, unprivileged user.
        """
        daemon_uid, login_uid = self.remote.get("daemon_uid"), self.remote.get("login_uid")
        if not isinstance(daemon_uid, int) or daemon_uid in (0, login_uid):
            return
        name = self.remote.get("daemon_user")
        if isinstance(name, str) and _USER.fullmatch(name):
            owner = name
            hint = f"log in as {owner}: {replace(self.target, user=owner)}"
        else:
            owner, hint = f"uid {daemon_uid}", "log in as the daemon's user"
        raise BadRequest(
            f"the daemon on {self.target} runs as {owner} and copies only {owner}'s "
            f"repositories and files, but this login (uid {str(login_uid)[:12]}) would "
            "send yours",
            hint=hint)

    def _wait_for_master(self) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + 15
        assert self._master is not None
        while not self.control.exists():
            if self._master.poll() is not None:
                with (self._dir / "ssh.err").open("rb") as fh:
                    raise self._unreachable(fh.read(MAX_ANSWER).decode(errors="replace"))
            if time.monotonic() > deadline:
                raise self._unreachable("timed out")
            time.sleep(0.05)

    def _unreachable(self, err: str) -> DaemonUnavailable:
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no reason"]
        return DaemonUnavailable(
            f"cannot reach {self.target} over SSH: {last[0][:300]}",
            hint=f"check that `ssh {shlex.join(self._plain_args())}` logs in without a "
                 "prompt (your key or agent, ~/.ssh/config)")

    def _plain_args(self) -> list[str]:
        port = ["-p", str(self.target.port)] if self.target.port else []
        return [*port, self.target.destination]

    def copy_out(self, argv: list[str], out: IO[bytes], *, limit: int,
                 chunk: Callable[[bytes], None] | None = None
                 ) -> subprocess.CompletedProcess[bytes]:
        """Run the remote banger with ``argv`` over the connection, its standard output
        written to ``out`` (each piece also given to ``chunk``: a digest, progress) up
        to ``limit`` bytes; the last :data:`MAX_ANSWER` bytes of its errors come back.

        Raises:
            OutputTooLarge: it printed more than ``limit`` bytes (it is killed).
        """
        argv = self.ssh("-T", self.target.destination, "--", self.remote_command(argv))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        err = Drain(proc.stderr, MAX_ANSWER)
        total = 0
        try:
            assert proc.stdout is not None
            while data := proc.stdout.read(1 << 20):
                total += len(data)
                if total > limit:
                    raise OutputTooLarge(f"more than {limit} bytes")
                out.write(data)
                if chunk is not None:
                    chunk(data)
            proc.wait()
        except BaseException:  # too much, a full disk, or this command interrupted
            proc.kill()
            proc.wait()
            raise
        finally:
            stderr = err.join()
            close(proc.stdout, proc.stderr)
        return subprocess.CompletedProcess(argv, proc.returncode, b"", stderr)

    def capture(self, argv: list[str], *, timeout: float,
                input: bytes | Callable[[IO[bytes]], None] | None = None,
                limit: int = MAX_ANSWER) -> subprocess.CompletedProcess[bytes]:
        """Run the remote banger with ``argv`` over the connection, its output captured:
        at most ``limit`` bytes of standard output (what it says is read, not trusted
        to be small) and the last :data:`MAX_ANSWER` bytes of its errors. ``input`` as
        for :func:`run_bounded`.

        Raises:
            DaemonUnavailable: it did not end within ``timeout`` seconds, or printed
                more than ``limit`` bytes.
            Exception: what writing ``input`` raised.
        """
        what = f"`banger {shlex.join(argv)}`"
        try:
            return run_bounded(
                self.ssh("-T", self.target.destination, "--", self.remote_command(argv)),
                timeout=timeout, input=input, limit=limit)
        except subprocess.TimeoutExpired as exc:
            raise DaemonUnavailable(f"the banger on {self.target} did not answer "
                                    f"{what} within {timeout:g}s") from exc
        except OutputTooLarge as exc:
            raise DaemonUnavailable(f"the banger on {self.target} answered {what} with "
                                    f"more than {limit} bytes; nothing of it was used") from exc

    def _where(self, start: bool) -> dict[str, Any]:
        res = self.capture(["daemon", "where", "--json", *([] if start else ["--no-start"])],
                           timeout=WHERE_TIMEOUT_S)
        out, err = res.stdout, res.stderr.decode(errors="replace").strip()
        if res.returncode == 127:
            raise DaemonUnavailable(
                f"{self.target} has no banger ({self.remote_banger!r} is not a command "
                "there)",
                hint=f"install banger {__version__} on it, on the PATH of a "
                     "non-interactive ssh session")
        if res.returncode == 255:
            raise self._unreachable(err)
        try:
            info = json.loads(out)
        except ValueError:
            info = None
        if isinstance(info, dict) and isinstance(info.get("error"), dict):
            raise DaemonUnavailable(f"{self.target}: {str(info['error'].get('message'))[:300]}",
                                    hint=str(info["error"].get("hint") or "")[:300])
        if res.returncode != 0 or not isinstance(info, dict):
            # An older banger has no `daemon where` (or no --host): its usage error says so.
            detail = err.splitlines()[-1][:300] if err else f"exit status {res.returncode}"
            raise DaemonUnavailable(
                f"the banger on {self.target} did not say where its daemon is: {detail}",
                hint=f"it may be older than this banger ({__version__}): install "
                     f"{__version__} there")
        return info

    def _check_version(self) -> None:
        version, protocol = self.remote.get("version"), self.remote.get("protocol")
        if version != __version__ or protocol != PROTOCOL_VERSION:
            raise BadRequest(
                f"the banger on {self.target} is {str(version)[:40]} (protocol "
                f"{str(protocol)[:10]}), this one is {__version__} (protocol "
                f"{PROTOCOL_VERSION})",
                hint="install the same version on both machines")
        if not isinstance(self.remote.get("socket"), str):
            raise DaemonUnavailable(f"the banger on {self.target} named no daemon socket")

    def _forward(self, remote_socket: str) -> None:
        try:
            res = subprocess.run(
                self.ssh("-O", "forward", "-L", f"{self.socket}:{remote_socket}",
                         self.target.destination),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=FORWARD_WAIT_S,
                check=False)
        except subprocess.TimeoutExpired as exc:
            raise DaemonUnavailable(f"forwarding {self.target}'s daemon socket timed out") \
                from exc
        if res.returncode != 0:
            raise DaemonUnavailable(
                f"cannot forward {self.target}'s daemon socket {remote_socket}: "
                f"{res.stderr.decode(errors='replace').strip()[:300]}",
                hint="the remote sshd must allow stream-local forwarding "
                     "(AllowStreamLocalForwarding)")

    def run(self, argv: list[str], *, tty: bool) -> int:
        """Run the remote banger with ``argv`` over this connection (``-t`` for a
        terminal), its output this process's; its exit status."""
        self.connect()
        res = subprocess.run(self.ssh("-t" if tty else "-T", self.target.destination, "--",
                                      self.remote_command(argv)), check=False)
        return res.returncode

    def close(self) -> None:
        """End the connection and remove the private directory (idempotent)."""
        if self._master is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(self.ssh("-O", "exit", self.target.destination),
                               capture_output=True, timeout=10, check=False)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._master.terminate()
                self._master.wait(10)
            self._master = None
        shutil.rmtree(self._dir, ignore_errors=True)


def _close_on_signals() -> None:
    """SIGTERM and SIGHUP end this process through ``sys.exit`` (128+N), so atexit closes
    the connection; by default they would end it at once and leave the ssh master."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


class OutputTooLarge(Exception):
    """A command printed more than it was allowed to (see :func:`run_bounded`)."""


def run_bounded(argv: list[str], *, timeout: float,
                input: bytes | Callable[[IO[bytes]], None] | None = None,
                limit: int) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end, holding at most ``limit`` bytes of its standard output
    and the last :data:`MAX_ANSWER` bytes of its standard error, both read while
    ``input`` (bytes, or what a function writes to the stream) goes to its standard
    input. ``timeout`` counts from the end of the input.

    Raises:
        OutputTooLarge: it printed more than ``limit`` bytes (it is killed).
        subprocess.TimeoutExpired: it did not end within ``timeout`` seconds (killed).
        Exception: what writing ``input`` raised (it is killed), but a broken pipe:
            the program stopped reading, and its exit says why.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None
                            else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Drain(proc.stdout, cap=limit, on_cap=proc.kill)
    err = Drain(proc.stderr, MAX_ANSWER)
    try:
        if input is not None:
            assert proc.stdin is not None
            try:
                if callable(input):
                    input(proc.stdin)
                else:
                    proc.stdin.write(input)
            except BrokenPipeError:
                pass
            finally:
                close(proc.stdin)  # the end of the input
        proc.wait(timeout)
    except BaseException:  # the timeout, or this command interrupted: ssh goes too
        proc.kill()
        proc.wait()
        raise
    finally:
        # ssh is gone (or killed above): its pipes end, and so do the readers.
        stdout, stderr = out.join(), err.join()
        close(proc.stdout, proc.stderr)
    if out.over_cap:
        raise OutputTooLarge(f"more than {limit} bytes")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
