"""The host-operations protocol: one typed request per thing the daemon needs root for.

A request is a JSON object whose ``op`` names its model; every model refuses fields
it does not know, and every string and list is bounded, so a request of a shape this
version does not know fails to parse before anything looks at its values. What the
values may be (this install's bridge, its TAP names, its nftables table) is
:mod:`banger.hostops.policy`'s to check.

On the helper's socket each request travels in an :class:`Envelope` (protocol
version, a request id), one JSON document per line; the answer is a :class:`Reply`.
In process the same models are built and parsed, so both modes take one path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

HELPER_PROTOCOL: Literal[1] = 1
MAX_REQUEST = 4 << 20  # bytes in one request line (a guest's pins can be thousands)
MAX_ALLOW_OUT = 256  # a VM's --allow-out entries
MAX_PINS = 65536  # addresses pinned for one guest: the allow_dns set's own size
MAX_STALE = 16  # rules one admission replaces (same TAP or same IP)

IfName = Annotated[str, StringConstraints(min_length=1, max_length=15)]
Address = Annotated[str, StringConstraints(min_length=7, max_length=15)]  # IPv4 dotted
Text = Annotated[str, StringConstraints(max_length=253)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EnsureBridge(_Model):
    """Create the bridge if missing, give it its address, bring it up."""

    op: Literal["bridge.ensure"] = "bridge.ensure"
    name: IfName
    cidr: Annotated[str, StringConstraints(max_length=18)]


class CreateTap(_Model):
    """Create a TAP enslaved to the bridge, up."""

    op: Literal["tap.create"] = "tap.create"
    name: IfName
    bridge: IfName


class DeleteLink(_Model):
    """Delete a TAP or the bridge (a missing one is not an error)."""

    op: Literal["link.delete"] = "link.delete"
    name: IfName


class ListLinks(_Model):
    """The names of every link in the helper's network namespace."""

    op: Literal["link.list"] = "link.list"


class Rule(_Model):
    """One guest's entry in the nftables policy (``nft.GuestRule`` on the wire)."""

    tap: IfName
    ip: Address
    mac: Annotated[str, StringConstraints(min_length=17, max_length=17)]
    nat: bool = False
    allow_private: bool = False
    allow_out: Annotated[list[Text], Field(max_length=MAX_ALLOW_OUT)] = []


class Stale(_Model):
    """A rule being replaced, with the addresses pinned for it."""

    rule: Rule
    pins: Annotated[list[Address], Field(max_length=MAX_PINS)] = []


class NftLoad(_Model):
    """Load (or replace) the install's two tables; with ``drop_legacy``, also delete the
    single ``ip banger`` table of earlier versions in the same transaction."""

    op: Literal["nft.load"] = "nft.load"
    drop_legacy: bool = False


class NftAdmit(_Model):
    """Give a guest's TAP its address pair and egress, replacing ``previous``."""

    op: Literal["nft.admit"] = "nft.admit"
    rule: Rule
    previous: Annotated[list[Stale], Field(max_length=MAX_STALE)] = []

    @model_validator(mode="after")
    def _bounded(self) -> NftAdmit:
        # One guest's pins are bounded by the set's size; so are all a request carries.
        if sum(len(p.pins) for p in self.previous) > MAX_PINS:
            raise ValueError(f"more than {MAX_PINS} pins in one request")
        return self


class NftForget(_Model):
    """Remove every element of a guest's rule and its pins."""

    op: Literal["nft.forget"] = "nft.forget"
    rule: Rule
    pins: Annotated[list[Address], Field(max_length=MAX_PINS)] = []


class NftPin(_Model):
    """Let a guest reach each address for its seconds (a DNS answer it was served)."""

    op: Literal["nft.pin"] = "nft.pin"
    guest_ip: Address
    pins: Annotated[dict[Address, int], Field(max_length=MAX_PINS)]


class NftDelete(_Model):
    """Delete one of banger's tables (this install's pair, or the legacy ``ip`` one)."""

    op: Literal["nft.delete"] = "nft.delete"
    table: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class IPForward(_Model):
    """Read ``net.ipv4.ip_forward`` and, with ``set``, change it; answers the value before."""

    op: Literal["ip_forward"] = "ip_forward"
    set: Literal["0", "1"] | None = None


VM_ID = re.compile(r"[0-9a-f]{12}")  # a VM id, as every request carries it


def vm_ids(names: list[str], prefix: str) -> list[str]:
    """The VM ids of the ``names`` that are ``prefix`` and a VM id (an install's dm
    targets, its VMs' network namespaces)."""
    return [name.removeprefix(prefix) for name in names
            if name.startswith(prefix) and VM_ID.fullmatch(name[len(prefix):])]
VMId = Annotated[str, StringConstraints(pattern=f"^{VM_ID.pattern}$")]
HostPath = Annotated[str, StringConstraints(min_length=2, max_length=4096)]
Pid = Annotated[int, Field(ge=1, le=1 << 22)]
SignalName = Literal["TERM", "KILL", "INT", "QUIT", "HUP", "USR1", "USR2", "STOP", "CONT",
                     "ALRM", "WINCH", "TSTP"]
SIGNALS: frozenset[str] = frozenset(get_args(SignalName))
MAX_VMM_ARGS = 256
MAX_VMM_FILES = 16


class Signal(_Model):
    """Signal VM ``vm_id``'s VMM, if ``pid`` is still that process (its start time and
    the VM's marker in its command line); answers whether a signal was sent."""

    op: Literal["vmm.signal"] = "vmm.signal"
    vm_id: VMId
    pid: Pid
    start_time: Annotated[int, Field(ge=0)]
    sig: SignalName


class CgroupCreate(_Model):
    """Make VM ``vm_id``'s cgroup with the limits of its size."""

    op: Literal["cgroup.create"] = "cgroup.create"
    vm_id: VMId
    memory_mib: Annotated[int, Field(ge=1, le=1 << 20)]
    vcpu: Annotated[int, Field(ge=1, le=256)]


class CgroupAdopt(_Model):
    """Move VM ``vm_id``'s live VMM (``pid`` with ``start_time``) into its cgroup."""

    op: Literal["cgroup.adopt"] = "cgroup.adopt"
    vm_id: VMId
    pid: Pid
    start_time: Annotated[int, Field(ge=0)]


class CgroupRemove(_Model):
    """Remove VM ``vm_id``'s cgroup, retrying up to ``wait_s`` while it empties."""

    op: Literal["cgroup.remove"] = "cgroup.remove"
    vm_id: VMId
    wait_s: Annotated[float, Field(ge=0, le=30)] = 0.0


class VMFile(_Model):
    """A file the VMM gets as a descriptor; ``give``: made the VMM user's group's
    (readable, and writable for mode ``rw``), its owner still the daemon."""

    path: HostPath
    mode: Literal["r", "rw"]
    give: bool = False


class QemuLaunch(_Model):
    """Start QEMU for VM ``vm_id``, confined, with ``args`` after the binary (files,
    the TAP, the QMP socket and the agent's socket as ``{fd:NAME}`` placeholders);
    answers its pid."""

    op: Literal["qemu.launch"] = "qemu.launch"
    vm_id: VMId
    args: Annotated[list[Annotated[str, StringConstraints(max_length=8192)]],
                    Field(max_length=MAX_VMM_ARGS)]
    files: Annotated[dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,15}$")],
                          VMFile], Field(max_length=MAX_VMM_FILES)]
    tap: IfName
    qmp: HostPath
    stderr: HostPath
    memory_mib: Annotated[int, Field(ge=1, le=1 << 20)]
    vcpu: Annotated[int, Field(ge=1, le=256)]
    accel: Literal["kvm", "tcg"]
    agent: HostPath | None = None  # the guest agent's port: a socket QEMU serves, like qmp


JailName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,15}$")]


class FcLaunch(_Model):
    """Build VM ``vm_id``'s jail from ``files`` (named as in ``hostops.jail.JAIL_FILES``)
    and start Firecracker in it under the jailer fixed when the helper started, confined to
    the VM's size; its console goes to ``serial``. With ``port``, the jailer puts it in a
    network namespace of the VM's own, whose only TAP reaches the bridge through ``port``
    (a TAP's name, made here). Answers its pid."""

    op: Literal["fc.launch"] = "fc.launch"
    vm_id: VMId
    files: Annotated[dict[JailName, VMFile], Field(max_length=MAX_VMM_FILES)]
    serial: HostPath
    memory_mib: Annotated[int, Field(ge=1, le=1 << 20)]
    vcpu: Annotated[int, Field(ge=1, le=256)]
    port: IfName | None = None


class FcConnect(_Model):
    """A connection to VM ``vm_id``'s Firecracker ``api`` or ``vsock`` socket inside its
    jail (handed over as a descriptor)."""

    op: Literal["fc.connect"] = "fc.connect"
    vm_id: VMId
    socket: Literal["api", "vsock"]


class FcSnapshotOut(_Model):
    """Move the snapshot VM ``vm_id``'s Firecracker wrote in its jail to ``state`` and
    ``memory`` (below the state directory), made the daemon's."""

    op: Literal["fc.snapshot_out"] = "fc.snapshot_out"
    vm_id: VMId
    state: HostPath
    memory: HostPath


class FcStatus(_Model):
    """The Firecracker and jailer binaries the helper found when it started (``""``:
    none): whether it runs jailed Firecracker VMs at all."""

    op: Literal["fc.status"] = "fc.status"


class FcCleanup(_Model):
    """Remove VM ``vm_id``'s jail, its network namespace and the cgroup the jailer made,
    retrying up to ``wait_s`` while it empties (a missing one is not an error)."""

    op: Literal["fc.cleanup"] = "fc.cleanup"
    vm_id: VMId
    wait_s: Annotated[float, Field(ge=0, le=30)] = 0.0


class FcNetnsList(_Model):
    """The ids of the VMs that have a network namespace of this install."""

    op: Literal["fc.netns_list"] = "fc.netns_list"


class DNSSockets(_Model):
    """Bind the ``.vm`` DNS server's UDP and TCP sockets on the bridge's address and the
    install's DNS port; they come back as descriptors (``SCM_RIGHTS`` on the socket)."""

    op: Literal["dns.sockets"] = "dns.sockets"


LoopDevice = Annotated[str, StringConstraints(pattern=r"^/dev/loop[0-9]{1,6}$")]


class LoopAttach(_Model):
    """Attach the daemon's file ``path`` below the state directory to a free loop
    device; answers the device (``/dev/loopN``)."""

    op: Literal["loop.attach"] = "loop.attach"
    path: HostPath
    read_only: bool


class LoopDetach(_Model):
    """Detach ``device`` when its file lies below the state directory (a device with
    nothing attached is not an error)."""

    op: Literal["loop.detach"] = "loop.detach"
    device: LoopDevice


class LoopList(_Model):
    """The loop devices whose files lie below the state directory: ``[[device, file]]``."""

    op: Literal["loop.list"] = "loop.list"


class DmSnapshot(_Model):
    """Make VM ``vm_id``'s dm snapshot: ``origin`` (a read-only loop of a file below the
    state directory) with its exceptions in ``cow`` (a loop of a file in the VM's own
    directory); answers the device (``/dev/mapper/<install prefix><vm id>``)."""

    op: Literal["dm.snapshot"] = "dm.snapshot"
    vm_id: VMId
    origin: LoopDevice
    cow: LoopDevice


class DmRemove(_Model):
    """Remove VM ``vm_id``'s dm snapshot (a missing one is not an error)."""

    op: Literal["dm.remove"] = "dm.remove"
    vm_id: VMId


class DmList(_Model):
    """The ids of the VMs that have a dm snapshot of this install."""

    op: Literal["dm.list"] = "dm.list"


class DmRead(_Model):
    """A read-only descriptor on VM ``vm_id``'s dm snapshot (``image promote`` copies it)."""

    op: Literal["dm.read"] = "dm.read"
    vm_id: VMId


class UsernsMap(_Model):
    """Map the new user namespace of the daemon's process ``pid``: 0 to the daemon's ids,
    1..65535 to its user's subordinate ids (an image build runs in it)."""

    op: Literal["userns.map"] = "userns.map"
    pid: Pid


Request = Annotated[
    EnsureBridge | CreateTap | DeleteLink | ListLinks | NftLoad | NftAdmit | NftForget
    | NftPin | NftDelete | IPForward | Signal | CgroupCreate | CgroupAdopt | CgroupRemove
    | QemuLaunch | DNSSockets | LoopAttach | LoopDetach | LoopList | DmSnapshot | DmRemove
    | DmList | DmRead | UsernsMap | FcLaunch | FcConnect | FcSnapshotOut | FcCleanup
    | FcStatus | FcNetnsList,
    Field(discriminator="op"),
]


class Envelope(_Model):
    """One request on the helper's socket."""

    v: Literal[1]
    id: Annotated[int, Field(ge=0, le=2**53)]
    req: Request


class Handover:
    """A result that is descriptors: the executor's, sent with the reply line."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds


class Failure(_Model):
    """Why a request failed: a banger error code, its message and hint."""

    code: Annotated[str, StringConstraints(max_length=64)]
    message: Annotated[str, StringConstraints(max_length=4096)]
    hint: Annotated[str, StringConstraints(max_length=4096)] = ""


class Reply(BaseModel):
    """The helper's answer to one :class:`Envelope` (``id`` -1: it could not be read)."""

    model_config = ConfigDict(extra="forbid")

    id: int
    result: Any = None
    error: Failure | None = None
