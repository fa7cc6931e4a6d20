""":class:`HostOps`: the daemon's one way to do what needs root.

Each method builds a request of :mod:`banger.hostops.ops` and hands it to a
transport: in process (the single-process root mode of development and CI), the
request goes through a JSON round trip and the same :class:`Executor` the helper
runs; installed, it goes over the root helper's socket (:func:`socket_transport`).
Either way the request is parsed and checked against the install's policy before
anything is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal as signal_mod
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from banger.errors import BadRequest, BadVersion, DaemonUnavailable, from_code
from banger.hostops import ops
from banger.hostops.executor import Executor
from banger.hostops.nft import GuestRule
from banger.proc import ProcessIdentity

Transport = Callable[[ops.Request], Any]
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 120.0  # above the executor's own budgets (nft: 30 s)
MAX_REPLY = 1 << 20  # a link list is the largest answer
MAX_FDS = 4  # descriptors one reply may carry (dns.sockets: 2)

_REQUEST: TypeAdapter[ops.Request] = TypeAdapter(ops.Request)


def local_transport(executor: Executor) -> Transport:
    """Run requests in this process, parsed back from their JSON as the helper would."""

    def send(req: ops.Request) -> Any:
        return executor.handle(_REQUEST.validate_json(_REQUEST.dump_json(req)))

    return send


def socket_transport(path: Path) -> Transport:
    """Send each request over its own connection to the helper at ``path``."""
    counter = iter(range(1, 2**53))

    def send(req: ops.Request) -> Any:
        env = ops.Envelope(v=ops.HELPER_PROTOCOL, id=next(counter), req=req)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(CONNECT_TIMEOUT_S)
                s.connect(str(path))
                s.settimeout(REPLY_TIMEOUT_S)
                s.sendall(env.model_dump_json().encode() + b"\n")
                raw, fds = _read_line(s)
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot reach banger's root helper at {path}: {exc.strerror or exc}",
                hint="`banger system status` shows the helper service") from exc
        try:
            reply = ops.Reply.model_validate_json(raw)
        except ValidationError as exc:
            raise BadVersion(f"the root helper at {path} answered in a form this banger "
                             "does not know", hint="reinstall banger so the daemon and "
                             "the helper are one version") from exc
        if reply.error is not None:
            _close(fds)
            raise from_code(reply.error.code, reply.error.message, reply.error.hint)
        if fds or reply.result == {"fds": 0}:
            if reply.result != {"fds": len(fds)}:
                _close(fds)
                raise BadVersion("the root helper sent descriptors its reply does not name")
            return ops.Handover(fds)
        return reply.result

    return send


def _read_line(s: socket.socket) -> tuple[bytes, list[int]]:
    """One reply line, and the descriptors that came with it (at most :data:`MAX_FDS`)."""
    buf = bytearray()
    fds: list[int] = []
    while b"\n" not in buf:
        chunk, got, _flags, _addr = socket.recv_fds(s, 65536, MAX_FDS)
        fds += got
        if not chunk:
            _close(fds)
            raise ConnectionResetError("the helper closed the connection without answering")
        buf += chunk
        if len(buf) > MAX_REPLY or len(fds) > MAX_FDS:
            _close(fds)
            raise ConnectionResetError("the helper's answer is too long")
    return bytes(buf[: buf.index(b"\n")]), fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _rule(g: GuestRule) -> ops.Rule:
    entries = [str(n) for n in g.allowlist.networks] + list(g.allowlist.domains)
    return ops.Rule(tap=g.tap, ip=g.ip, mac=g.mac, nat=g.nat, allow_private=g.allow_private,
                    allow_out=entries)


class HostOps:
    """Bridge, TAPs, the guests' nftables policy and forwarding, through one transport."""

    def __init__(self, transport: Transport) -> None:
        self._send = transport

    @classmethod
    def local(cls, executor: Executor) -> HostOps:
        """Host operations done in this process (the daemon runs as root)."""
        return cls(local_transport(executor))

    @classmethod
    def connect(cls, path: Path) -> HostOps:
        """Host operations done by the root helper listening at ``path``."""
        return cls(socket_transport(path))

    def ensure_bridge(self, name: str, cidr: str) -> None:
        """Create bridge ``name`` if missing, give it ``cidr``'s address, bring it up."""
        self._send(ops.EnsureBridge(name=name, cidr=cidr))

    def create_tap(self, name: str, bridge: str) -> None:
        """Create TAP ``name``, enslave it to ``bridge`` and bring it up."""
        self._send(ops.CreateTap(name=name, bridge=bridge))

    def delete_link(self, name: str) -> None:
        """Delete link ``name``; a missing link is not an error."""
        self._send(ops.DeleteLink(name=name))

    def links(self) -> list[str]:
        """The names of every network link on the host."""
        names = self._send(ops.ListLinks())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadVersion("the root helper's link list is not a list of names")
        return names

    def nft_load(self, drop_legacy: bool = False) -> None:
        """Load (or replace) the install's tables, empty of guests."""
        self._send(ops.NftLoad(drop_legacy=drop_legacy))

    def nft_admit(self, rule: GuestRule,
                  previous: Sequence[tuple[GuestRule, Iterable[str]]] = ()) -> None:
        """Give ``rule``'s TAP its address pair and egress, replacing ``previous``."""
        self._send(ops.NftAdmit(rule=_rule(rule), previous=[
            ops.Stale(rule=_rule(old), pins=list(pins)) for old, pins in previous]))

    def nft_forget(self, rule: GuestRule, pins: Iterable[str] = ()) -> None:
        """Remove every element of ``rule`` and the addresses pinned for it."""
        self._send(ops.NftForget(rule=_rule(rule), pins=list(pins)))

    def nft_pin(self, guest_ip: str, pins: dict[str, int]) -> None:
        """Let ``guest_ip`` reach each address for its seconds."""
        self._send(ops.NftPin(guest_ip=guest_ip, pins=pins))

    def nft_delete(self, table: str) -> None:
        """Delete banger's tables named ``table`` (if present)."""
        self._send(ops.NftDelete(table=table))

    def ip_forward(self, value: str | None = None) -> str:
        """IPv4 forwarding before this call, set to ``value`` (``"0"``/``"1"``) if given."""
        before = self._send(ops.IPForward(set=value))  # type: ignore[arg-type]
        if before not in ("0", "1"):
            raise BadVersion(f"the root helper read ip_forward as {json.dumps(before)[:40]}")
        return str(before)

    def signal(self, ident: ProcessIdentity, sig: int) -> bool:
        """Send ``sig`` to the VMM ``ident`` names, if it is still that process (its
        marker is ``banger-<vm id>``); False when it is gone."""
        name = signal_mod.Signals(sig).name.removeprefix("SIG")
        if name not in ops.SIGNALS:
            raise BadRequest(f"SIG{name} is not a signal banger sends to a VMM",
                             hint="one of " + ", ".join(sorted(ops.SIGNALS)))
        sent = self._send(ops.Signal(vm_id=_vm_id(ident), pid=ident.pid,
                                     start_time=ident.start_time, sig=name))  # type: ignore[arg-type]
        return bool(sent)

    def cgroup_create(self, vm_id: str, memory_mib: int, vcpu: int) -> None:
        """Make VM ``vm_id``'s cgroup with the limits of its size."""
        self._send(ops.CgroupCreate(vm_id=vm_id, memory_mib=memory_mib, vcpu=vcpu))

    def cgroup_adopt(self, ident: ProcessIdentity) -> None:
        """Move the live VMM ``ident`` into its VM's cgroup."""
        self._send(ops.CgroupAdopt(vm_id=_vm_id(ident), pid=ident.pid,
                                   start_time=ident.start_time))

    def cgroup_remove(self, vm_id: str, wait_s: float = 0.0) -> None:
        """Remove VM ``vm_id``'s cgroup (absent is fine), waiting up to ``wait_s``."""
        self._send(ops.CgroupRemove(vm_id=vm_id, wait_s=wait_s))

    def qemu_launch(self, req: ops.QemuLaunch) -> int:
        """Start QEMU as ``req`` says; its pid."""
        return _pid(self._send(req))

    def fc_launch(self, req: ops.FcLaunch) -> int:
        """Build a jail and start Firecracker in it as ``req`` says; its pid."""
        return _pid(self._send(req))

    def fc_connect(self, vm_id: str, which: str) -> socket.socket:
        """A connection to VM ``vm_id``'s jailed Firecracker ``api`` or ``vsock`` socket."""
        got = self._send(ops.FcConnect(vm_id=vm_id, socket=which))  # type: ignore[arg-type]
        if not isinstance(got, ops.Handover) or len(got.fds) != 1:
            for fd in got.fds if isinstance(got, ops.Handover) else []:
                os.close(fd)
            raise BadVersion("the root helper did not hand over a Firecracker socket")
        return socket.socket(fileno=got.fds[0])

    def fc_snapshot_out(self, vm_id: str, state: Path, memory: Path) -> None:
        """Move the snapshot VM ``vm_id``'s Firecracker wrote in its jail to ``state`` and
        ``memory`` (their directories exist), made this daemon's."""
        self._send(ops.FcSnapshotOut(vm_id=vm_id, state=str(state), memory=str(memory)))

    def fc_status(self) -> tuple[str, str]:
        """The Firecracker and jailer binaries the helper runs (``""``: none found)."""
        got = self._send(ops.FcStatus())
        if not (isinstance(got, dict) and all(isinstance(got.get(k), str)
                                              for k in ("firecracker", "jailer"))):
            raise BadVersion("the root helper answered fc.status with something else")
        return got["firecracker"], got["jailer"]

    def fc_cleanup(self, vm_id: str, wait_s: float = 0.0) -> None:
        """Remove VM ``vm_id``'s jail, network namespace and cgroup (absent is fine)."""
        self._send(ops.FcCleanup(vm_id=vm_id, wait_s=wait_s))

    def fc_netns_vms(self) -> list[str]:
        """The ids of the VMs with a network namespace of this install."""
        got = self._send(ops.FcNetnsList())
        if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
            raise BadVersion("the root helper answered fc.netns_list with something else")
        return got

    def dns_sockets(self) -> tuple[socket.socket, socket.socket]:
        """The ``.vm`` DNS server's UDP and TCP sockets, bound to the bridge's address
        and the DNS port by root (port 53 is privileged)."""
        got = self._send(ops.DNSSockets())
        if not isinstance(got, ops.Handover) or len(got.fds) != 2:
            raise BadVersion("the root helper did not hand over two DNS sockets")
        udp_fd, tcp_fd = got.fds
        return socket.socket(fileno=udp_fd), socket.socket(fileno=tcp_fd)


    def loop_attach(self, path: Path, *, read_only: bool) -> str:
        """Attach the daemon's file ``path`` (below the state dir) to a loop device."""
        return _device(self._send(ops.LoopAttach(path=str(path), read_only=read_only)))

    def loop_detach(self, device: str) -> None:
        """Detach loop ``device`` (one with nothing attached is fine)."""
        self._send(ops.LoopDetach(device=device))

    def loops(self) -> list[tuple[str, str]]:
        """``(device, file)`` of every loop device whose file is below the state dir."""
        got = self._send(ops.LoopList())
        if not isinstance(got, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                for e in got):
            raise BadVersion("the root helper answered loop.list with something else")
        return [(device, back) for device, back in got]

    def dm_snapshot(self, vm_id: str, origin: str, cow: str) -> str:
        """Make VM ``vm_id``'s dm snapshot of loop ``origin`` over loop ``cow``; its device."""
        return _device(self._send(ops.DmSnapshot(vm_id=vm_id, origin=origin, cow=cow)))

    def dm_remove(self, vm_id: str) -> None:
        """Remove VM ``vm_id``'s dm snapshot (a missing one is fine)."""
        self._send(ops.DmRemove(vm_id=vm_id))

    def dm_vms(self) -> list[str]:
        """The ids of the VMs with a dm snapshot of this install."""
        got = self._send(ops.DmList())
        if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
            raise BadVersion("the root helper answered dm.list with something else")
        return got

    def dm_read(self, vm_id: str) -> int:
        """A read-only descriptor on VM ``vm_id``'s dm snapshot (the caller closes it)."""
        got = self._send(ops.DmRead(vm_id=vm_id))
        if not isinstance(got, ops.Handover) or len(got.fds) != 1:
            raise BadVersion("the root helper did not hand over the dm device")
        return got.fds[0]


    def userns_map(self, pid: int) -> None:
        """Map the new user namespace of this daemon's process ``pid`` (0: the daemon's
        ids, 1..65535: its user's subordinate ids)."""
        self._send(ops.UsernsMap(pid=pid))


def _pid(answer: Any) -> int:
    if not isinstance(answer, int) or isinstance(answer, bool) or answer <= 0:
        raise BadVersion(f"the root helper answered a launch with {str(answer)[:40]!r}")
    return answer


def _device(answer: Any) -> str:
    if not isinstance(answer, str) or not answer.startswith("/dev/"):
        raise BadVersion(f"the root helper answered {str(answer)[:40]!r}, not a device")
    return answer


def _vm_id(ident: ProcessIdentity) -> str:
    return ident.marker.removeprefix("banger-")
