"""A restored clone's own identity, and the message that carries it into the guest.

Every clone of one snapshot wakes up as the machine that was snapshotted: its address,
MAC, host name, machine-id, SSH host key and random state are the snapshot's, and its
clock is the snapshot's instant. banger gives each clone its own before its vCPUs run:
the daemon makes a fresh :class:`Identity` (the SSH host key is made here, on the host,
and recorded in banger's known_hosts before the guest answers: there is no first-use
trust for a clone), encodes it (:func:`encode`), and the VMM driver writes it into the
guest's identity channel (``VMMDriver.reidentify``). In the guest, ``banger-ident``
(``imagemgr.GUEST_IDENT``), blocked reading that channel since before the snapshot,
applies it: clock, RNG reseed, machine-id, host name, host key (sshd reloaded, the
snapshot's connections ended), then MAC and address. Only then can the host reach it.

The channel runs one way, host to guest: nothing the guest says is read back from it.
The guest also says on its serial console when it has applied an identity, which the
daemon reads only to know when to probe SSH (:func:`announced`); the probe itself
(:func:`applied_probe`) decides that the clone is ready.
"""

from __future__ import annotations

import re
import secrets
import select
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.console import ConsoleWatch
from banger.errors import HostError
from banger.fsutil import atomic_write
from banger.names import check_name
from banger.runner import Runner
from banger.sshopts import forget_host

SEED_BYTES = 32  # 256 bits for the guest's RNG
HOST_KEY_TIMEOUT_S = 30.0
# The guest records what it applied here (``gen=<generation> rng=reseeded|mixed``), and
# ``banger-ident.listening`` once it waits on its channel.
GUEST_STATUS = "/run/banger-ident"
GUEST_LISTENING = "/run/banger-ident.listening"
GUEST_IDENT_PATH = "/usr/local/sbin/banger-ident"  # where images carry it (imagemgr)


@dataclass(frozen=True)
class Identity:
    """What makes a clone its own machine."""

    ip_cidr: str  # address/prefix
    gateway: str
    mac: str
    hostname: str
    machine_id: str  # 32 hex digits, systemd's format
    host_key: str  # the OpenSSH ed25519 private key
    host_key_pub: str  # its public line: "ssh-ed25519 AAAA..."
    seed: bytes
    generation: str  # names this message in the guest's status file

    @property
    def ip(self) -> str:
        """The address without its prefix length."""
        return self.ip_cidr.split("/", 1)[0]


def fresh(runner: Runner, scratch: Path, *, ip_cidr: str, gateway: str, mac: str,
          hostname: str) -> Identity:
    """A new identity for a clone at ``ip_cidr``: a new host key (made in ``scratch``, a
    root-only directory), machine-id, RNG seed and generation.

    Raises:
        HostError: ssh-keygen failed.
    """
    private, public = new_host_key(runner, scratch)
    return Identity(ip_cidr=ip_cidr, gateway=gateway, mac=mac, hostname=hostname,
                    machine_id=secrets.token_hex(16), host_key=private, host_key_pub=public,
                    seed=secrets.token_bytes(SEED_BYTES), generation=secrets.token_hex(8))


def new_host_key(runner: Runner, scratch: Path) -> tuple[str, str]:
    """A fresh ed25519 key pair: (private key file text, public key line without comment).

    Raises:
        HostError: ssh-keygen failed or wrote nothing usable.
    """
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".hostkey-") as tmp:
        key = Path(tmp) / "key"
        runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)],
                   desc="make the clone's SSH host key", timeout=HOST_KEY_TIMEOUT_S)
        private = key.read_text()
        fields = key.with_suffix(".pub").read_text().split()
    if len(fields) < 2 or fields[0] != "ssh-ed25519":
        raise HostError("ssh-keygen made no ed25519 public key")
    return private, f"{fields[0]} {fields[1]}"


def encode(ident: Identity, now: float | None = None) -> bytes:
    """The message ``banger-ident`` reads: ``name=value`` lines ending with ``end`` (the
    private key as one ``key=`` line per line of it), in one piece no longer than
    ``PIPE_BUF`` (written at once, never interleaved).

    Raises:
        ValueError: a field holds a line break or the message would be too long (a bug:
            every field is made by banger).
    """
    when = time.time() if now is None else now
    fields = [
        ("gen", ident.generation),
        ("ip", ident.ip_cidr),
        ("gw", ident.gateway),
        ("mac", ident.mac),
        ("host", ident.hostname),
        ("machine_id", ident.machine_id),
        ("time", f"{when:.3f}"),
        ("seed", ident.seed.hex()),
        # The private key line by line: the guest joins them with built-ins alone.
        *(("key", line) for line in ident.host_key.splitlines()),
        ("pub", ident.host_key_pub),
    ]
    for name, value in fields:
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"identity field {name} holds a line break")
    data = "".join(f"{k}={v}\n" for k, v in fields) + "end\n"
    if len(data) > select.PIPE_BUF:
        raise ValueError(f"identity message of {len(data)} bytes is over {select.PIPE_BUF}")
    return data.encode()


def trust_host_key(known_hosts: Path, ip: str, public: str) -> None:
    """Record ``public`` as the only host key of ``ip`` in banger's known_hosts, before the
    guest answers there: ssh then refuses any other key at that address."""
    forget_host(known_hosts, ip)
    try:
        current = known_hosts.read_text()
    except FileNotFoundError:
        current = ""
    if current and not current.endswith("\n"):
        current += "\n"
    atomic_write(known_hosts, f"{current}{ip} {public}\n".encode(), 0o600)


def applied_probe(ident: Identity) -> str:
    """The readiness probe of a clone: passes once the guest's status file names
    ``ident``'s generation (all of it applied: clock, RNG, host key, address), else
    fails saying so. SSH itself answers once the address and host key are in place,
    just before the status is written."""
    return (f'if read -r s _ < {GUEST_STATUS} 2>/dev/null && [ "$s" = gen={ident.generation} ]; '
            f'then exit 0; fi; echo "banger: the clone has not applied its identity yet '
            f'(see {GUEST_STATUS})" >&2; exit 1')


def announced(serial_log: Path, ident: Identity) -> Callable[[], bool]:
    """Whether the guest said on its console that it applied ``ident``: a check to call
    while waiting (a :class:`~banger.daemon.console.ConsoleWatch`).

    The guest writes ``banger-ident: applied gen=<generation>`` there right after its
    status file. Only the wait's timing depends on it: a guest that says so falsely is
    probed sooner, and the probe (:func:`applied_probe`) decides.
    """
    line = f"banger-ident: applied gen={ident.generation}".encode()
    return ConsoleWatch(serial_log, re.compile(re.escape(line)))


RENAME_TIMEOUT_S = 30.0


def rename_script(hostname: str, now: float) -> str:
    """What a pool's clone runs when a create takes it (``vmpool``): its clock set to
    ``now`` (it slept paused since it was made) and its host name made ``hostname``,
    as ``banger-ident`` names a clone (the kernel's, ``/etc/hostname``, and the
    ``127.0.1.1`` line of ``/etc/hosts``). Its other identity is its own since then.

    Raises:
        BadName: ``hostname`` is not a DNS label (a bug: VM names are checked).
    """
    check_name(hostname)
    return (f"date -u -s @{now:.3f} >/dev/null && h={hostname} && "
            'echo "$h" > /proc/sys/kernel/hostname && echo "$h" > /etc/hostname && '
            "grep -v '^127\\.0\\.1\\.1[[:space:]]' /etc/hosts > /etc/hosts.banger; "
            "printf '127.0.1.1\\t%s\\n' \"$h\" >> /etc/hosts.banger && "
            "mv /etc/hosts.banger /etc/hosts")
