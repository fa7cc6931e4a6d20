"""The OpenSSH options banger uses, shared by the daemon's guest channel and the CLI.

Guest commands share one OpenSSH master connection per VM boot (connection
multiplexing: ``ControlMaster``/``ControlPath``/``ControlPersist``). The first
command to a booted VM logs in and leaves a master behind; later ones open a session
over it, which costs a few milliseconds instead of a key exchange and a login.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

GUEST_USER = "root"


# Covers the TCP connect and sshd's banner. A TCG guest that has just answered (its sshd
# starts early in boot) can take more than 5 s to send a banner while the rest of its
# boot competes for the host's CPUs.
CONNECT_TIMEOUT_S = 20


# AES-GCM first: guests (and TCG's `-cpu max`) have AES-NI, and there an sshd
# decrypting a workspace copy spends far less CPU on it than on ChaCha20 (OpenSSH's
# first choice): a 550 MB tar into a TCG guest took 53 s instead of 87 s. Both stay
# allowed, so a peer without AES still connects.
CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com"

# Key exchange: X25519 first. OpenSSH's first choice since 9.0, the post-quantum hybrid
# sntrup761x25519, costs a TCG guest's sshd about 0.17 s more per new connection
# (0.68 s against 0.50 s to `ssh guest true` here), and every boot's first command, every
# restored clone's first login and every `vm ssh` without the shared master pays it. The
# link never leaves this host (host to guest over banger's bridge), so nothing recorded
# of it can be decrypted later by anyone who could not read the guest's memory anyway.
# Names every OpenSSH since 7.4 knows; a guest sshd without X25519 still gets ECDH.
KEX = ("curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,"
       "diffie-hellman-group14-sha256")


# How long a master with no session left stays up (ssh_config(5) ControlPersist). Long
# enough that a burst of commands (an edit-run loop, a workspace prepare's steps) pays
# one login; short enough that an idle VM holds no ssh process for long. The next
# command after it expired logs in again and starts a new master.
CONTROL_PERSIST_S = 90
# A held master (a pool's clone: vmpool) stays until its VM is torn down, and sends no
# keepalives: its guest sleeps paused for as long as the pool keeps it, and must find
# the connection there when it wakes. ssh takes the first value of an option it is
# given, so these go before ssh_options'.
HELD_MASTER = ["-o", "ServerAliveInterval=0", "-o", "TCPKeepAlive=no"]


def mux_options(control_path: Path | None, *, held: bool = False) -> list[str]:
    """``-o`` options that share the master at ``control_path``, starting it if none runs.

    ``ControlMaster=auto``: use a live master, else become one; a socket whose master
    died is unlinked and replaced, and one that cannot be used at all (bound by
    another client a moment earlier) falls back to a connection of this command's
    own. ``None`` turns sharing off. ``held``: a master started now never expires
    (``ControlPersist=yes``; see ``HELD_MASTER``).
    """
    if control_path is None:
        return ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return [
        "-o", "ControlMaster=auto",
        # ssh expands %-tokens in ControlPath: a literal % must be doubled.
        "-o", "ControlPath=" + str(control_path).replace("%", "%%"),
        "-o", f"ControlPersist={'yes' if held else CONTROL_PERSIST_S}",
    ]


def private_control_path(path: str | Path | None) -> tuple[Path | None, str]:
    """``path`` if this process may share the master there, else None and why not.

    A master runs commands as whoever reaches its socket, so only a directory owned by
    this process's effective user and closed to everyone else (mode 0700, not a
    symlink) will do: a CLI run as another user than bangerd's never uses (or makes)
    bangerd's master, and runs its command over a connection of its own instead.
    """
    if path is None:
        return None, "the VM has no shared connection"
    control = Path(path)
    try:
        st = os.lstat(control.parent)
    except OSError as exc:
        return None, f"{control.parent} cannot be read: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return None, f"{control.parent} is not a directory"
    if st.st_uid != os.geteuid():
        return None, f"{control.parent} belongs to uid {st.st_uid}, not to this user"
    if st.st_mode & 0o077:
        return None, f"{control.parent} is open to other users (mode {st.st_mode & 0o777:o})"
    return control, ""


def ssh_options(key_path: Path, known_hosts: Path, *, batch: bool = True,
                connect_timeout: int = CONNECT_TIMEOUT_S) -> list[str]:
    """``-o`` options: banger's key only, banger's known_hosts, trust on first use."""
    opts = [
        "-i", str(key_path),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        # Each VM makes its own host key on first boot; accept it once, refuse changes after.
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "HashKnownHosts=no",
        "-o", f"ConnectTimeout={connect_timeout}",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "-o", "LogLevel=ERROR",
        "-o", f"Ciphers={CIPHERS}",
        "-o", f"KexAlgorithms={KEX}",
        "-F", "/dev/null",
    ]
    if batch:
        opts += ["-o", "BatchMode=yes"]
    return opts


def ssh_argv(ssh_bin: str, key_path: Path, known_hosts: Path, ip: str, *,
             tty: bool = False, batch: bool = True,
             control_path: Path | None = None, held: bool = False) -> list[str]:
    """``ssh [opts] root@ip`` without the remote command, over the master at
    ``control_path`` when one is given (see :func:`mux_options`; ``held``: a master
    this command starts is a held one)."""
    held = held and control_path is not None
    argv = [ssh_bin, *(HELD_MASTER if held else []),
            *ssh_options(key_path, known_hosts, batch=batch),
            *mux_options(control_path, held=held)]
    argv.append("-tt" if tty else "-T")
    argv.append(f"{GUEST_USER}@{ip}")
    return argv


def forget_host(known_hosts: Path, host: str) -> None:
    """Drop ``host``'s entries from known_hosts (a deleted VM's address gets reused)."""
    # Imported here: the CLI's fast path (banger.cli.quick) imports this module and
    # never needs it.
    from banger.fsutil import atomic_write

    try:
        lines = known_hosts.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [ln for ln in lines if host not in ln.split(" ", 1)[0].split(",")]
    if kept != lines:
        atomic_write(known_hosts, "".join(kept).encode(), 0o600)


def end_master_argv(ssh_bin: str, control_path: Path) -> list[str]:
    """``ssh -O exit``: ask the master at ``control_path`` to close its connection and exit
    (it removes its socket); fails harmlessly when no master listens there."""
    return [ssh_bin, "-F", "/dev/null", "-o", "ControlPath=" + str(control_path).replace("%", "%%"),
            "-O", "exit", "banger-guest"]


def remote_command(command: list[str], *, workdir: str | None, shell_string: bool) -> str:
    """The command line the guest's login shell runs for ``vm exec``/``vm ssh``.

    ``shell_string`` (``vm ssh``) joins the words with spaces and lets the guest's
    shell interpret them, exactly as OpenSSH does (``'a; b'`` runs two commands);
    otherwise (``vm exec``) every word is quoted, so argv arrives unchanged.

    The command never replaces the shell (no ``exec``): the shell outlives it and
    reports a death by signal N as status 128+N, like any shell. With no command
    the result starts an interactive login shell (empty when there is no workdir
    either: ssh's own default).
    """
    if shell_string:
        body = f"eval {shlex.quote(' '.join(command))}" if command else ""
    else:
        body = " ".join(shlex.quote(c) for c in command)
    cd = f"cd {shlex.quote(workdir)} && " if workdir else ""
    if not body:
        return f'{cd}exec "$SHELL" -l' if workdir else ""
    # "; exit $?" keeps the shell from exec'ing the last command (bash does for a
    # lone one), so a signal death still comes back as an exit status.
    return f"{cd}{body}; exit $?"
