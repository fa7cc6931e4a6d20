"""The OpenSSH options banger uses, shared by the daemon's guest channel and the CLI."""

from __future__ import annotations

from pathlib import Path

from banger.fsutil import atomic_write

GUEST_USER = "root"


# Covers the TCP connect and sshd's banner. A TCG guest that has just answered (its sshd
# starts early in boot) can take more than 5 s to send a banner while the rest of its
# boot competes for the host's CPUs.
CONNECT_TIMEOUT_S = 20


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
        "-F", "/dev/null",
    ]
    if batch:
        opts += ["-o", "BatchMode=yes"]
    return opts


def ssh_argv(ssh_bin: str, key_path: Path, known_hosts: Path, ip: str, *,
             tty: bool = False, batch: bool = True) -> list[str]:
    """``ssh [opts] root@ip`` without the remote command."""
    argv = [ssh_bin, *ssh_options(key_path, known_hosts, batch=batch)]
    argv.append("-tt" if tty else "-T")
    argv.append(f"{GUEST_USER}@{ip}")
    return argv


def forget_host(known_hosts: Path, host: str) -> None:
    """Drop ``host``'s entries from known_hosts (a deleted VM's address gets reused)."""
    try:
        lines = known_hosts.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [ln for ln in lines if host not in ln.split(" ", 1)[0].split(",")]
    if kept != lines:
        atomic_write(known_hosts, "".join(kept).encode(), 0o600)
