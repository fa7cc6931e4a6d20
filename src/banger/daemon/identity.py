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
"""

from __future__ import annotations

import secrets
import select
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.guest import Guest
from banger.errors import GuestError, HostError
from banger.fsutil import atomic_write
from banger.runner import Runner
from banger.sshopts import forget_host

SEED_BYTES = 32  # 256 bits for the guest's RNG
APPLIED_TIMEOUT_S = 30.0  # from SSH answering to the guest's clock, RNG and syncs done
HOST_KEY_TIMEOUT_S = 30.0
# The guest records what it applied here (``gen=<generation> rng=reseeded|mixed``), and
# ``banger-ident.listening`` once it waits on its channel.
GUEST_STATUS = "/run/banger-ident"
GUEST_LISTENING = "/run/banger-ident.listening"


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


def wait_applied(guest: Guest, ident: Identity) -> None:
    """Wait until the guest says it applied ``ident`` whole (its status file names the
    generation): SSH answers once its address and host key are in place, and the clock,
    RNG and syncs finish just after. One guest command, polling inside the guest.

    Raises:
        GuestError: it did not within :data:`APPLIED_TIMEOUT_S`.
    """
    polls = int(APPLIED_TIMEOUT_S * 10)
    script = (f"i=0; while [ $i -lt {polls} ]; do "
              f"if read -r s _ < {GUEST_STATUS} 2>/dev/null "
              f"&& [ \"$s\" = gen={ident.generation} ]; then exit 0; fi; "
              "sleep 0.1; i=$((i + 1)); done; exit 1")
    try:
        guest.run(script, timeout=APPLIED_TIMEOUT_S + 15, desc="wait for the clone's identity")
    except GuestError as exc:
        raise GuestError(f"the clone did not finish taking its identity within "
                         f"{APPLIED_TIMEOUT_S:.0f}s", hint=f"see {GUEST_STATUS} in the guest"
                         ) from exc
