"""The daemon's channel into a guest: OpenSSH with the install's key.

:class:`GuestDialer` is the seam: the real one runs the system ``ssh``; unit
tests substitute a fake that records scripts. :func:`wait_for_ssh` is the
bounded boot wait shared by create and start.

Commands to one boot of a VM share one OpenSSH master connection (see
:mod:`banger.sshopts`): its socket is ``VMPaths.ssh_control(boot_key(vmm))``, so a
restarted VM never reaches the previous boot's master, and :func:`end_masters`
ends it when the VM is torn down.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from banger.errors import BangerError, CommandFailed, CommandTimeout, GuestError, VMMError
from banger.proc import ProcessIdentity, find_by_marker, identify, send_signal, wait_gone
from banger.runner import CancelToken, Result, Runner
from banger.sshopts import end_master_argv, ssh_argv

log = logging.getLogger("banger.guest")

SSH_PORT = 22
# What OpenSSH prints when a known host presents a different key.
HOST_KEY_CHANGED = ("REMOTE HOST IDENTIFICATION HAS CHANGED", "Host key verification failed")
# Hex digits of a boot key: unique among one VM's boots (its directory holds only the
# current one's socket), and short for the 108-byte socket path limit.
BOOT_KEY_HEX = 8
# Budgets for ending a master at teardown: `ssh -O exit` answers at once from a live
# master; SIGTERM then SIGKILL for one that does not.
END_MASTER_S = 5.0
MASTER_TERM_S = 2.0


class Guest(Protocol):
    ip: str

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        """Run the shell string ``script`` in the guest and wait for it.

        Raises:
            GuestError: it failed (non-zero exit only with ``check``), or ``timeout`` passed.
        """
        ...

    def popen(self, script: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``script`` in the guest without waiting; the caller owns the process."""
        ...

    def argv(self, script: str, *, forwards: Sequence[str] = ()) -> list[str]:
        """The host command line that runs ``script`` in the guest, with each of
        ``forwards`` (``[bind:]port:host:hostport``) opened as an ``ssh -R`` remote
        forward: a guest port that reaches that address from the host."""
        ...


def boot_key(vmm: ProcessIdentity) -> str:
    """A name for one boot of a VM: its VMM process's pid and start time, hashed.

    Every launch gives a new one, so a master of an earlier boot (whose connection
    may be half dead) is never reached by a later boot's commands.
    """
    digest = hashlib.sha256(f"{vmm.pid}:{vmm.start_time}".encode()).hexdigest()
    return digest[:BOOT_KEY_HEX]


@dataclass
class SSHGuest:
    """A guest reached with the system ssh; every call is one ssh process, a session over
    the boot's shared master when ``control_path`` is set (the first call starts it)."""

    runner: Runner
    key_path: Path
    known_hosts: Path
    ip: str
    ssh_bin: str = "ssh"
    control_path: Path | None = None
    held: bool = False  # a master this guest starts never expires (sshopts.HELD_MASTER)

    def argv(self, script: str, *, forwards: Sequence[str] = ()) -> list[str]:
        """The ssh command line that runs ``script`` in the guest as one ``sh -c`` argument.

        With ``forwards`` the command gets a connection of its own: a forward asked of a
        master outlives the session that asked for it (until ``ssh -O cancel`` or the
        master's exit), and ``ExitOnForwardFailure`` must fail this command only.
        """
        # The remote side always gets one argument run by sh -c, so quoting is ours.
        base = ssh_argv(self.ssh_bin, self.key_path, self.known_hosts, self.ip,
                        control_path=None if forwards else self.control_path,
                        held=self.held)
        if forwards:
            # A forward that cannot be opened fails the command instead of leaving the
            # script without the address it was promised.
            extra = ["-o", "ExitOnForwardFailure=yes"]
            for spec in forwards:
                extra += ["-R", spec]
            base = [base[0], *extra, *base[1:]]
        return [*base, script]

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        """Run ``script`` in the guest over one ssh process and wait for it.

        Raises:
            GuestError: ssh or the script failed (with ``check``), or ``timeout`` passed.
        """
        try:
            return self.runner.run(self.argv(script), desc=f"{desc} on {self.ip}",
                                   timeout=timeout, input=input, check=check)
        except CommandFailed as exc:
            raise GuestError(exc.message, **exc.details) from exc
        except CommandTimeout as exc:
            raise GuestError(exc.message, hint="the guest may be overloaded or hung") from exc

    def popen(self, script: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ssh without waiting (streaming copies); the caller owns the process."""
        return subprocess.Popen(self.argv(script), **kwargs)  # type: ignore[call-overload,no-any-return]


def find_masters(under: Path) -> list[tuple[ProcessIdentity, Path]]:
    """The live OpenSSH masters whose socket is (or was) below ``under``, with its path.

    A master names itself ``ssh: <ControlPath> [mux]`` (OpenSSH's setproctitle in
    ``control_persist_detach``); its clients carry ``ControlPath=<path>`` instead, so
    they are never taken for one.
    """
    marker = f"ssh: {under}/"
    found = []
    for pid, argv in find_by_marker(marker).items():
        title = argv[0].rstrip() if argv else ""
        if title.startswith(marker) and title.endswith(" [mux]"):
            ident = identify(pid, marker)
            if ident is not None:
                found.append((ident, Path(title.removeprefix("ssh: ").removesuffix(" [mux]"))))
    return found


def stop_master(ident: ProcessIdentity) -> bool:
    """SIGTERM a master, SIGKILL it after :data:`MASTER_TERM_S`; True when it is gone."""
    if not send_signal(ident, signal.SIGTERM) or wait_gone(ident, MASTER_TERM_S):
        return True
    send_signal(ident, signal.SIGKILL)
    return wait_gone(ident, MASTER_TERM_S)


def end_masters(runner: Runner, ssh_dir: Path, ssh_bin: str = "ssh") -> list[str]:
    """End every OpenSSH master of one VM (sockets in ``ssh_dir``); the problems left.

    Each master found running there, even one whose socket is gone, gets SIGTERM (it
    closes its connection and removes its socket as it exits) and, after
    :data:`MASTER_TERM_S`, SIGKILL. A socket whose master is not found that way (not
    named as banger's masters are) is asked to exit with ``ssh -O exit``. The directory
    itself is left to the caller.
    """
    problems = _stop_masters(ssh_dir)
    try:
        sockets = sorted(p for p in ssh_dir.iterdir() if p.is_socket())
    except FileNotFoundError:
        sockets = []
    for path in sockets:
        try:
            runner.run(end_master_argv(ssh_bin, path), desc="end the VM's ssh master",
                       timeout=END_MASTER_S, check=False)
        except BangerError as exc:
            problems.append(f"ssh -O exit {path}: {exc.message}")
    if sockets:  # a master that was still starting (not yet named) when first looked for
        problems += _stop_masters(ssh_dir)
    return problems


def _stop_masters(ssh_dir: Path) -> list[str]:
    """:func:`stop_master` for each master found under ``ssh_dir``; those left running."""
    return [f"ssh master pid {ident.pid} would not exit"
            for ident, _ in find_masters(ssh_dir) if not stop_master(ident)]


class GuestDialer(Protocol):
    def __call__(self, ip: str) -> Guest:
        """A :class:`Guest` for the VM at ``ip``."""
        ...


PROBE_CONNECT_S = 0.5
PROBE_PAUSE_S = 0.25  # between probes


def tcp_open(ip: str, port: int | None = None, timeout: float = 1.0,
             until: Callable[[], bool] | None = None) -> bool:
    """True when a TCP connect to ``ip`` (port 22 by default) succeeds within ``timeout``.

    ``until``: checked every 50 ms while the connect is pending; once it is true the
    wait ends early (False: the connect did not succeed, the caller knows why it
    stopped). A guest taking its address has no ARP entry yet, and a connect to it
    waits out the whole timeout even when the guest says it is ready meanwhile.
    """
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        if sock.connect_ex((ip, port or SSH_PORT)) not in (0, errno.EINPROGRESS):
            return False
        while (left := end - time.monotonic()) > 0:
            _, writable, _ = select.select([], [sock], [], min(left, 0.05))
            if writable:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            if until is not None and until():
                return False
        return False


def wait_for_ssh(
    guest: Guest,
    *,
    budget_s: float,
    alive: Callable[[], bool],
    cancel: CancelToken | None = None,
    on_wait: Callable[[float], None] | None = None,
    serial_tail: Callable[[], str] = lambda: "",
    new_host_key: bool = False,
    probe: str = "true",
    probe_timeout: float = 15.0,
    announced: Callable[[], bool] | None = None,
    agent: Callable[[], bool] | None = None,
) -> float:
    """Wait until ``ssh guest <probe>`` succeeds; returns the seconds waited.

    ``new_host_key``: the guest is a clone taking its own identity. Until it has, it may
    answer at its address with the snapshot's host key (a clone of a VM that had the same
    address); ssh refuses that key before authenticating, and the wait goes on for the
    trusted one. Otherwise a changed key ends the wait at once.

    The budget is ``boot_timeout_s`` from the config (180 s by default: a stock
    Debian guest under TCG reaches sshd in 10-25 s on a loaded two-core host).
    Each probe is a 0.5 s TCP connect (the guest is on a local bridge: an answer takes
    milliseconds), then a full ssh login running ``probe`` bounded at ``probe_timeout``
    (a clone's probe passes only once its identity is applied whole). ``announced``:
    whether the guest said it is reachable now (a clone, on its console); once it has,
    the next probe comes at once and goes straight to ssh. ``agent``: asked before each
    ssh probe whether the guest's agent says it is ready (``agentready``): then no ssh
    login is needed.
    Fails fast when the VMM dies or the operation is cancelled.
    """
    start = time.monotonic()
    deadline = start + budget_s
    last_error = ""
    while True:
        if cancel is not None:
            cancel.check()
        if not alive():
            raise VMMError("the VMM exited while the guest was booting",
                           hint=_serial_hint(serial_tail()))
        told = announced is not None and announced()
        # An announcement that comes while the connect is pending ends that wait.
        if (told or tcp_open(guest.ip, timeout=PROBE_CONNECT_S, until=announced)
                or (announced is not None and announced())):
            if agent is not None and agent():
                return time.monotonic() - start
            try:
                guest.run(probe, timeout=probe_timeout, desc="ssh readiness probe")
                return time.monotonic() - start
            except GuestError as exc:
                last_error = str(exc.details.get("stderr") or exc.message).strip()
                if not new_host_key and any(m in last_error for m in HOST_KEY_CHANGED):
                    # Retrying cannot help, and accepting the new key silently would
                    # defeat trust-on-first-use: stop and say so.
                    raise GuestError(
                        f"the SSH host key of {guest.ip} changed since banger first saw it",
                        hint="if the VM's root disk was replaced, forget the old key with "
                             f"`ssh-keygen -R {guest.ip} -f <state_dir>/ssh/known_hosts`",
                    ) from exc
        now = time.monotonic()
        if now >= deadline:
            detail = f" (last ssh error: {last_error.splitlines()[-1]})" if last_error else ""
            raise GuestError(f"the guest did not answer SSH within {budget_s:g}s{detail}",
                             hint=_serial_hint(serial_tail()))
        if on_wait is not None:
            on_wait(now - start)
        _pause(PROBE_PAUSE_S, None if told else announced)


def _pause(seconds: float, until: Callable[[], bool] | None) -> None:
    """Sleep ``seconds``, or less once ``until()`` is true (checked every 50 ms)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if until is not None and until():
            return
        time.sleep(min(left, 0.05))


def _serial_hint(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()][-5:]
    if not lines:
        return "see `banger vm logs NAME` for the serial console"
    return "last serial console lines:\n  " + "\n  ".join(lines)
