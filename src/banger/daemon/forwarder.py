"""TCP port forwards from the host to guests, relayed by the daemon (``vm forward``).

A :class:`Forward` is one listening socket on the host (``127.0.0.1`` unless the
user named an address) whose connections are piped to ``guest_ip:guest_port``: an
accept thread, and two pump threads per connection. :class:`ForwardTable` holds the
open forwards by VM; its lock is a leaf, held only to change the table (never while
a socket is opened, bound or closed).

Nothing here knows about VMs' state or the store: :mod:`banger.daemon.forwards`
decides what is open and records it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass

from banger.errors import AlreadyExists, BadRequest

log = logging.getLogger("banger.forward")

MAX_CONNECTIONS = 128  # open at once per forward; more wait in the listen backlog
CONNECT_TIMEOUT_S = 5.0
CHUNK = 64 << 10
ANY = "0.0.0.0"  # noqa: S104 - a forward on every address, when the user names it


@dataclass(frozen=True, order=True)
class ForwardSpec:
    """``[HOST_ADDR:]HOST_PORT:GUEST_PORT``, checked."""

    host_addr: str
    host_port: int
    guest_port: int

    def __str__(self) -> str:
        return f"{self.host_addr}:{self.host_port}:{self.guest_port}"

    def to_json(self) -> dict[str, str | int]:
        """As the VM row's ``runtime["forwards"]`` keeps it."""
        return {"host_addr": self.host_addr, "host_port": self.host_port,
                "guest_port": self.guest_port}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ForwardSpec:
        """Back from :meth:`to_json` (checked again: the row is read from disk)."""
        return check(str(data["host_addr"]), data["host_port"], data["guest_port"])


def _port(value: object, what: str) -> int:
    try:
        port = int(str(value), 10)
    except ValueError:
        raise BadRequest(f"{what} {value!r} is not a port number",
                         hint="ports are 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise BadRequest(f"{what} {port} is out of range", hint="ports are 1 to 65535")
    return port


def check(host_addr: str, host_port: object, guest_port: object) -> ForwardSpec:
    """A :class:`ForwardSpec` from its parts.

    Raises:
        BadRequest: a port out of 1-65535, or a host address that is not an IPv4 address.
    """
    try:
        addr = ipaddress.ip_address(host_addr)
    except ValueError:
        raise BadRequest(f"host address {host_addr!r} is not an IP address",
                         hint="give an IPv4 address such as 127.0.0.1 or 0.0.0.0") from None
    if addr.version != 4:
        raise BadRequest("forwards listen on IPv4 addresses only",
                         hint="give an IPv4 address such as 127.0.0.1 or 0.0.0.0")
    return ForwardSpec(str(addr), _port(host_port, "host port"), _port(guest_port, "guest port"))


def parse(text: str) -> ForwardSpec:
    """``[HOST_ADDR:]HOST_PORT:GUEST_PORT`` (the CLI's and ``-p``'s form).

    Raises:
        BadRequest: not of that form, or a bad address or port.
    """
    parts = text.split(":")
    if len(parts) == 2:
        return check("127.0.0.1", parts[0], parts[1])
    if len(parts) == 3:
        return check(parts[0], parts[1], parts[2])
    raise BadRequest(f"forward {text!r} is not [HOST_ADDR:]HOST_PORT:GUEST_PORT",
                     hint="e.g. 8080:80, or 0.0.0.0:8080:80 to listen on every address")


class Forward:
    """One open forward: a listening socket and its relaying threads."""

    def __init__(self, spec: ForwardSpec, guest_ip: str, label: str) -> None:
        """Bind and listen at once, so a busy port fails here, in the caller.

        Raises:
            AlreadyExists: the host port is in use.
            BadRequest: the address is not one of this host's.
        """
        self.spec = spec
        self.guest_ip = guest_ip
        self.label = label
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._conns: set[socket.socket] = set()
        self._mu = threading.Lock()  # leaf: guards _conns only
        self._closed = threading.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((spec.host_addr, spec.host_port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            where = f"{spec.host_addr}:{spec.host_port}"
            if exc.errno == errno.EADDRINUSE:
                raise AlreadyExists(f"host port {where} is already in use",
                                    hint="pick another host port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise BadRequest(f"{spec.host_addr} is not an address of this host",
                                 hint="use 127.0.0.1, 0.0.0.0 or one of the host's "
                                      "addresses") from None
            raise BadRequest(f"cannot listen on {where}: {exc.strerror}") from None
        self._listener = sock
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name=f"fwd-{label}-{spec.host_port}")
        self._thread.start()

    def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._mu:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._slots.acquire()
            threading.Thread(target=self._relay, args=(client,), daemon=True,
                             name=f"fwd-{self.label}-conn").start()

    def _relay(self, client: socket.socket) -> None:
        try:
            try:
                guest = socket.create_connection((self.guest_ip, self.spec.guest_port),
                                                 timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                log.info("forward %s -> %s:%d: %s", self.spec, self.guest_ip,
                         self.spec.guest_port, exc)
                client.close()
                return
            guest.settimeout(None)
            with self._mu:
                self._conns.update((client, guest))
            back = threading.Thread(target=_pump, args=(guest, client), daemon=True)
            back.start()
            _pump(client, guest)
            back.join()
            with self._mu:
                self._conns.difference_update((client, guest))
            guest.close()
            client.close()
        finally:
            self._slots.release()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(CHUNK):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class ForwardTable:
    """The open forwards, by VM id."""

    def __init__(self) -> None:
        self._mu = threading.Lock()  # leaf
        self._open: dict[str, dict[ForwardSpec, Forward]] = {}

    def open(self, vm_id: str, spec: ForwardSpec, guest_ip: str, label: str) -> None:
        """Start forwarding ``spec`` to ``guest_ip`` (a no-op when it is already open).

        Raises:
            AlreadyExists: another forward, or another program, holds the host port.
        """
        with self._mu:
            if spec in self._open.get(vm_id, {}):
                return
            for specs in self._open.values():
                for s, other in specs.items():
                    if s.host_port == spec.host_port and (
                            ANY in (s.host_addr, spec.host_addr)
                            or s.host_addr == spec.host_addr):
                        raise AlreadyExists(
                            f"host port {spec.host_addr}:{spec.host_port} is already "
                            f"forwarded ({s} of VM {other.label})",
                            hint="pick another host port, or remove that forward first")
        fwd = Forward(spec, guest_ip, label)  # binds: may raise, outside the lock
        with self._mu:
            if spec in self._open.get(vm_id, {}):  # a racing open of the same forward won
                lost = fwd
            else:
                self._open.setdefault(vm_id, {})[spec] = fwd
                lost = None
        if lost is not None:
            lost.close()

    def close(self, vm_id: str, spec: ForwardSpec) -> bool:
        """Stop one forward; False if it was not open."""
        with self._mu:
            fwd = self._open.get(vm_id, {}).pop(spec, None)
        if fwd is None:
            return False
        fwd.close()
        return True

    def close_vm(self, vm_id: str) -> None:
        """Stop every forward of a VM."""
        with self._mu:
            fwds = list(self._open.pop(vm_id, {}).values())
        for fwd in fwds:
            fwd.close()

    def close_all(self) -> None:
        """Stop every forward (daemon shutdown; they are re-opened at the next start)."""
        with self._mu:
            fwds = [f for specs in self._open.values() for f in specs.values()]
            self._open.clear()
        for fwd in fwds:
            fwd.close()

    def opened(self, vm_id: str) -> list[ForwardSpec]:
        """The forwards open for a VM, sorted."""
        with self._mu:
            return sorted(self._open.get(vm_id, {}))
