"""What the root helper will do for this install, and nothing else.

The daemon is trusted less than the helper: it parses guest output, git data and
image layers. A request that parsed (:mod:`banger.hostops.ops`) is still refused
unless every value in it is this install's own: its bridge and address, a TAP name
with its prefix, its nftables table, a guest address inside its network with a MAC
and an egress list that mean what they say. Values are compared, never quoted: a
name that is not exactly this install's is an error, so nothing a request carries can
change the meaning of an nft script or reach another interface.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from banger import egress
from banger.config import Config
from banger.errors import BangerError, Refused
from banger.hostops import ops
from banger.hostops.confine import SANDBOX
from banger.hostops.jail import JAIL_FILES, find_firecracker, find_jailer
from banger.hostops.netlink import tap_prefix_for
from banger.hostops.nft import (
    LEGACY_NFT_TABLE,
    PIN_MAX_S,
    PIN_MIN_S,
    FirewallSettings,
    GuestRule,
    table_name,
)
from banger.hostops.userns import SUBGID, SUBUID, IdRange, subordinate
from banger.layout import dm_prefix_for, install_tag
from banger.vmm import vm_marker

TAP_SUFFIX = re.compile(r"[0-9a-f]{6}")  # network.tap_name: the prefix, 6 hex digits
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# QEMU's command line, as banger writes it (qemuproc.build_argv), as an allowlist: for
# each option, the first items it may start with (None: none) and the keys it may have.
# Every file is a descriptor the executor opened ("/proc/self/fd/{fd:NAME}") and nothing
# else may name a path, a program, a host device or a listening port.
QEMU_FLAGS = frozenset({"-nodefaults", "-no-user-config", "-S"})
QEMU_ITEMS: dict[str, tuple[frozenset[str] | None, frozenset[str]]] = {
    "-M": (frozenset({"microvm"}), frozenset({"pit", "pic", "rtc"})),
    "-drive": (None, frozenset({"id", "file", "format", "if", "cache", "discard"})),
    "-device": (frozenset({"virtio-blk-device", "virtio-net-device", "virtio-serial-device",
                           "virtserialport"}),
                frozenset({"drive", "netdev", "mac", "chardev", "name", "max_ports"})),
    "-netdev": (frozenset({"tap"}), frozenset({"id", "fd"})),
    "-chardev": (frozenset({"socket", "pipe"}),
                 frozenset({"id", "fd", "path", "server", "wait"})),
    "-mon": (None, frozenset({"chardev", "mode"})),
}
QEMU_VALUES = {
    "-accel": re.compile(r"kvm|tcg(,tb-size=\d{1,5})?"),
    "-cpu": re.compile(r"host|max"),
    "-m": re.compile(r"\d{1,7}"),
    "-smp": re.compile(r"\d{1,3}"),
    "-display": re.compile(r"none"),
}
ITEM_VALUE = re.compile(r"[A-Za-z0-9_:.-]{0,64}")  # no "/", no "=", no ","
FD_REF = re.compile(r"/proc/self/fd/\{fd:([a-z][a-z0-9_]*)\}")
FD_ONLY = re.compile(r"\{fd:([a-z][a-z0-9_]*)\}")
RESERVED_FDS = frozenset({"tap", "qmp", "agent"})  # the executor's own: never a file's name


@dataclass(frozen=True)
class Policy:
    """This install's names, fixed when the helper starts (its config is read once)."""

    firewall: FirewallSettings
    state_dir: Path = Path("/nonexistent/state")
    runtime_dir: Path = Path("/nonexistent/run")
    install_tag: str = "000000"
    vmm_user: str = "banger-vmm"
    qemu_bin: str = "qemu-system-x86_64"
    # Firecracker under its jailer ("" : none found, or jailer_enabled = false), and
    # where jails live: fixed when the helper starts, never named by a request.
    firecracker_bin: str = ""
    jailer_bin: str = ""
    jailer_chroot_base: Path = Path("/nonexistent/jail")
    jailer_netns: bool = False  # every jailed VM in a namespace of its own, never fewer
    daemon_uid: int = 0  # whose files the daemon may hand to the VMM, and who owns sockets
    daemon_gid: int = 0
    # The daemon's user's subordinate ids (/etc/subuid, /etc/subgid): its build namespaces'.
    subuids: IdRange | None = None
    subgids: IdRange | None = None

    @classmethod
    def from_config(cls, cfg: Config, daemon_uid: int | None = None,
                    daemon_gid: int | None = None, daemon_user: str = "") -> Policy:
        """The policy of the install ``cfg`` describes, for a daemon running as
        ``daemon_uid``/``daemon_gid`` (default: this process's), user ``daemon_user``
        (whose subordinate ids its build namespaces get)."""
        tag = install_tag(cfg.state_dir)
        uid = os.getuid() if daemon_uid is None else daemon_uid
        jailed = cfg.jailer_enabled is not False
        return cls(FirewallSettings(
            table=table_name(tag), bridge=cfg.bridge_name, cidr=cfg.bridge_cidr,
            tap_prefix=tap_prefix_for(tag), dns_port=cfg.dns_port, vm_to_vm=cfg.vm_to_vm),
            state_dir=cfg.state_dir, runtime_dir=cfg.runtime_dir, install_tag=tag,
            vmm_user=cfg.vmm_user, qemu_bin=cfg.qemu_bin,
            firecracker_bin=(find_firecracker(cfg) or "") if jailed else "",
            jailer_bin=(find_jailer(cfg) or "") if jailed else "",
            jailer_chroot_base=cfg.jailer_chroot_base, jailer_netns=cfg.jailer_netns,
            daemon_uid=uid,
            daemon_gid=os.getgid() if daemon_gid is None else daemon_gid,
            subuids=subordinate(SUBUID, daemon_user, uid) if daemon_user else None,
            subgids=subordinate(SUBGID, daemon_user, uid) if daemon_user else None)

    @property
    def runs_firecracker(self) -> bool:
        """A Firecracker binary and its jailer were found when the helper started."""
        return bool(self.firecracker_bin and self.jailer_bin)

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The guests' network (the bridge's)."""
        return ipaddress.IPv4Interface(self.firewall.cidr).network

    def check(self, req: ops.Request) -> None:
        """Refuse ``req`` unless every value in it is this install's.

        Raises:
            Refused: naming the request and the value out of policy.
        """
        s = self.firewall
        match req:
            case ops.EnsureBridge(name=name, cidr=cidr):
                self._bridge(name)
                if cidr != s.cidr:
                    raise Refused(f"bridge.ensure: address {cidr!r} is not {s.cidr}")
            case ops.CreateTap(name=name, bridge=bridge):
                self._tap(req.op, name)
                self._bridge(bridge)
            case ops.DeleteLink(name=name):
                if name != s.bridge:
                    self._tap(req.op, name)
            case ops.ListLinks() | ops.NftLoad() | ops.IPForward() | ops.DNSSockets():
                pass
            case ops.NftAdmit(rule=rule, previous=previous):
                self.rule(req.op, rule)
                for stale in previous:
                    self.rule(req.op, stale.rule)
                    self._addresses(req.op, stale.pins)
            case ops.NftForget(rule=rule, pins=pins):
                self.rule(req.op, rule)
                self._addresses(req.op, pins)
            case ops.NftPin(guest_ip=guest_ip, pins=pins):
                self._guest_ip(req.op, guest_ip)
                self._addresses(req.op, list(pins))
                for addr, seconds in pins.items():
                    if not PIN_MIN_S <= seconds <= PIN_MAX_S:
                        raise Refused(f"nft.pin: {seconds} s for {addr} is outside "
                                      f"{PIN_MIN_S}..{PIN_MAX_S}")
            case ops.NftDelete(table=table):
                if table not in (s.table, LEGACY_NFT_TABLE):
                    raise Refused(f"nft.delete: table {table!r} is not banger's ({s.table})")
            case ops.Signal() | ops.CgroupCreate() | ops.CgroupAdopt() | ops.CgroupRemove():
                pass  # the VM id's shape is the model's; the process is checked live
            case ops.QemuLaunch():
                self._qemu_launch(req)
            case ops.LoopAttach(path=path):
                self.beneath(req.op, Path(path), (self.state_dir,), "file")
            case ops.LoopDetach() | ops.LoopList() | ops.DmSnapshot() | ops.DmRemove() \
                    | ops.DmList() | ops.DmRead() | ops.UsernsMap():
                pass  # what a loop device holds is checked live, in the kernel's words
            case ops.FcLaunch():
                self._fc_launch(req)
            case ops.FcSnapshotOut(state=state, memory=memory):
                for what, path in (("state", state), ("memory", memory)):
                    self.beneath(req.op, Path(path), (self.state_dir,), what)
            case ops.FcConnect() | ops.FcCleanup() | ops.FcStatus() | ops.FcNetnsList():
                pass  # the jail's path is the helper's own, from the VM id's shape
            case _:
                raise Refused(f"{req.op}: no policy for this request")

    def _qemu_launch(self, req: ops.QemuLaunch) -> None:
        vm_run = self.runtime_dir / "vms" / req.vm_id
        vm_state = self.state_dir / "vms" / req.vm_id
        for name, f in req.files.items():
            if name in RESERVED_FDS:
                raise Refused(f"{req.op}: a file may not be called {name!r}")
            if Path(f.path) != self.dm_device(req.vm_id):
                self.beneath(req.op, Path(f.path), (self.state_dir, self.runtime_dir), name)
        self.beneath(req.op, Path(req.qmp), (vm_run,), "qmp")
        if req.agent is not None:
            self.beneath(req.op, Path(req.agent), (vm_run,), "agent")
        self.beneath(req.op, Path(req.stderr), (vm_state,), "stderr")
        self._tap(req.op, req.tap)
        sockets = {"tap", "qmp"} | ({"agent"} if req.agent is not None else set())
        self.qemu_args(req.vm_id, req.args, {*req.files, *sockets})

    def _fc_launch(self, req: ops.FcLaunch) -> None:
        if not self.runs_firecracker:
            raise Refused(f"{req.op}: no Firecracker with its jailer was found when the "
                          "root helper started (jailer_enabled, firecracker_bin, jailer_bin)")
        for name, f in req.files.items():
            if name not in JAIL_FILES:
                raise Refused(f"{req.op}: {name!r} is not a file a jail holds")
            if Path(f.path) != self.dm_device(req.vm_id):
                self.beneath(req.op, Path(f.path), (self.state_dir, self.runtime_dir), name)
        self.beneath(req.op, Path(req.serial), (self.state_dir / "vms" / req.vm_id,), "serial")
        if self.jailer_netns and req.port is None:
            raise Refused(f"{req.op}: this install runs every Firecracker VM in a network "
                          "namespace of its own (jailer_netns), and the request names no port")
        if req.port is not None:
            if not self.jailer_netns:
                raise Refused(f"{req.op}: a port for a network namespace of the VM's own, "
                              "but this install has jailer_netns off")
            self._tap(req.op, req.port)

    def dm_name(self, vm_id: str) -> str:
        """The name of VM ``vm_id``'s dm target: the install's prefix and the id."""
        return dm_prefix_for(self.install_tag) + vm_id

    def dm_device(self, vm_id: str) -> Path:
        """VM ``vm_id``'s dm-snapshot root disk (``cow_strategy = dmsnap``): the one
        device outside the state directory a launch may name."""
        return Path("/dev/mapper") / self.dm_name(vm_id)

    @staticmethod
    def beneath(op: str, path: Path, roots: tuple[Path, ...], what: str) -> Path:
        """``path`` if it is a plain absolute path below one of ``roots``.

        Raises:
            Refused: a relative path, ``..``, or a path elsewhere.
        """
        if not path.is_absolute() or ".." in path.parts or str(path) != os.path.normpath(path):
            raise Refused(f"{op}: {what} {str(path)!r} is not a plain absolute path")
        if not any(path != r and path.is_relative_to(r) for r in roots):
            raise Refused(f"{op}: {what} {path} is outside "
                          f"{' and '.join(str(r) for r in roots)}")
        return path

    def qemu_args(self, vm_id: str, args: list[str], names: set[str]) -> None:
        """Refuse a QEMU command line banger would not write (see :data:`QEMU_ITEMS`):
        an unknown option, a file by path, a descriptor not handed over, a helper
        program, another VM's name, no seccomp filter.

        Raises:
            Refused: naming the option.
        """
        op = "qemu.launch"
        i, sandboxed, named = 0, False, False
        while i < len(args):
            opt = args[i]
            if opt in QEMU_FLAGS:
                i += 1
                continue
            known = opt in QEMU_ITEMS or opt in QEMU_VALUES or opt in (
                "-name", "-sandbox", "-kernel", "-initrd", "-append", "-serial", "-incoming")
            if not known or i + 1 >= len(args):
                raise Refused(f"{op}: QEMU option {opt[:40]!r} is not one banger uses")
            value = args[i + 1]
            i += 2
            if opt == "-append":
                continue  # the guest kernel's command line: the guest's business
            if opt == "-sandbox":
                if value != SANDBOX:
                    raise Refused(f"{op}: -sandbox must be {SANDBOX}")
                sandboxed = True
                continue
            if opt == "-name":
                if value.split(",")[0] != vm_marker(vm_id):
                    raise Refused(f"{op}: -name must start with {vm_marker(vm_id)}")
                named = True
                continue
            self._qemu_value(op, opt, value, names)
        if not (sandboxed and named):
            raise Refused(f"{op}: the command line lacks -sandbox or -name")

    @staticmethod
    def _qemu_value(op: str, opt: str, value: str, names: set[str]) -> None:
        for ref in FD_ONLY.findall(value):
            if ref not in names:
                raise Refused(f"{op}: {opt} names descriptor {ref!r}, which is not handed over")
        if opt in QEMU_VALUES:
            if not QEMU_VALUES[opt].fullmatch(value):
                raise Refused(f"{op}: {opt} {value[:40]!r} is not a value banger uses")
            return
        if opt in ("-kernel", "-initrd"):
            if not FD_REF.fullmatch(value):
                raise Refused(f"{op}: {opt} must be a descriptor")
            return
        if opt == "-serial":
            if not (value.startswith("file:") and FD_REF.fullmatch(value[5:])):
                raise Refused(f"{op}: -serial must be a file descriptor")
            return
        if opt == "-incoming":
            if not (value.startswith("fd:") and FD_ONLY.fullmatch(value[3:])):
                raise Refused(f"{op}: -incoming must be a descriptor")
            return
        firsts, keys = QEMU_ITEMS[opt]
        items = value.split(",")
        if firsts is not None:
            if items[0] not in firsts:
                raise Refused(f"{op}: {opt} {items[0][:30]!r} is not one banger uses")
            items = items[1:]
        for item in items:
            key, eq, val = item.partition("=")
            if not eq or key not in keys:
                raise Refused(f"{op}: {opt} {key[:30]!r} is not an option banger uses")
            if key in ("file", "path"):
                if not FD_REF.fullmatch(val):
                    raise Refused(f"{op}: {opt} {key}= must be a descriptor")
            elif key == "fd":
                if not FD_ONLY.fullmatch(val):
                    raise Refused(f"{op}: {opt} fd= must be a descriptor banger hands over")
            elif not ITEM_VALUE.fullmatch(val):
                raise Refused(f"{op}: {opt} {key}={val[:30]!r} is not a value banger uses")

    def rule(self, op: str, rule: ops.Rule) -> GuestRule:
        """``rule`` as the nft module's ``GuestRule``, once every value is in policy.

        Raises:
            Refused: a foreign TAP, an address outside the guests' network, a bad MAC
                or egress entry.
        """
        self._tap(op, rule.tap)
        self._guest_ip(op, rule.ip)
        if not MAC.fullmatch(rule.mac):
            raise Refused(f"{op}: {rule.mac!r} is not a MAC address")
        try:
            allowlist = egress.parse(rule.allow_out)
        except BangerError as exc:
            raise Refused(f"{op}: egress entry refused: {exc.message}") from exc
        return GuestRule(tap=rule.tap, ip=rule.ip, mac=rule.mac, nat=rule.nat,
                         allow_private=rule.allow_private, allowlist=allowlist)

    def _bridge(self, name: str) -> None:
        if name != self.firewall.bridge:
            raise Refused(f"bridge {name!r} is not this install's ({self.firewall.bridge})")

    def _tap(self, op: str, name: str) -> None:
        prefix = self.firewall.tap_prefix
        if not (name.startswith(prefix) and TAP_SUFFIX.fullmatch(name[len(prefix):])):
            raise Refused(f"{op}: {name!r} is not one of this install's TAPs "
                          f"({prefix} and 6 hex digits)")

    def _guest_ip(self, op: str, ip: str) -> None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise Refused(f"{op}: {ip!r} is not an IPv4 address") from exc
        net = self.network
        gw = ipaddress.IPv4Interface(self.firewall.cidr).ip
        if addr not in net or addr in (net.network_address, net.broadcast_address, gw):
            raise Refused(f"{op}: {ip} is not a guest address in {net}")

    @staticmethod
    def _addresses(op: str, addresses: list[str]) -> None:
        for a in addresses:
            try:
                ipaddress.IPv4Address(a)
            except ValueError as exc:
                raise Refused(f"{op}: {a!r} is not an IPv4 address") from exc
