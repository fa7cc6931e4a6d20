"""Doing a host operation: the root side of :mod:`banger.hostops`.

:meth:`Executor.handle` checks a parsed request against the install's
:class:`~banger.hostops.policy.Policy` and only then acts: netlink for links, ``nft``
(scripts built here from the request's typed values, never taken from it) for the
guests' policy, the ``ip_forward`` file. The daemon reaches it in process
(:meth:`banger.hostops.client.HostOps.local`) or through the helper's socket
(:mod:`banger.hostops.server`); both call this one method.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger.errors import CommandFailed, HostError, Refused, VMMError
from banger.fsutil import dir_beneath, open_beneath
from banger.hostops import blockdev, nft, ops, userns
from banger.hostops.cgroups import (
    CgroupHost,
    VMCgroup,
    detect,
    in_vm_group,
    limits_for,
    vm_group,
)
from banger.hostops.confine import kvm_groups, privilege_drop
from banger.hostops.fcjail import Jails
from banger.hostops.netlink import (
    IP_FORWARD,
    HostNetwork,
    IPNetwork,
    bind_dns,
    ip_forward,
)
from banger.hostops.policy import Policy
from banger.hostops.vmfiles import kept_if, launch_files, open_log, open_vm_file
from banger.proc import ProcessIdentity, matches, send_signal
from banger.runner import Runner
from banger.vmm import vm_marker
from banger.vmmuser import VMMUser, check_unprivileged, lookup_user

log = logging.getLogger("banger.hostops")

NFT_TIMEOUT_S = 30.0  # one short transaction
SPAWN_TIMEOUT_S = 30.0  # the launcher joins a cgroup, forks and execs: well under a second
LAUNCHER = Path(__file__).with_name("vmm_spawn.py")
# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


class Executor:
    """Runs requests that pass ``policy`` on this host (or in this network namespace)."""

    def __init__(self, policy: Policy, runner: Runner, net: HostNetwork | None = None,
                 ip_forward_path: Path = IP_FORWARD, *,
                 cgroups: Callable[[], CgroupHost] = detect,
                 open_tap: Callable[[str], int] | None = None,
                 sys_block: Path = blockdev.SYS_BLOCK) -> None:
        self.policy = policy
        self.blocks = blockdev.BlockDevices(runner, policy.state_dir, policy.daemon_uid,
                                            sys_block)
        self._open_tap = open_tap or attach_tap
        self.runner = runner
        self.net: HostNetwork = net if net is not None else IPNetwork()
        self.ip_forward_path = ip_forward_path
        self._cgroups = cgroups
        self._cgroup_host: CgroupHost | None = None
        self.jails = Jails(policy, self.hierarchy, self.vmm_user, self._spawn, self.net)

    def handle(self, req: ops.Request) -> Any:
        """Check ``req`` and do it; returns the request's result (see :mod:`.ops`).

        Raises:
            Refused: the request is out of policy (nothing was done).
            HostError: the host refused (netlink, nft, the forwarding file).
        """
        self.policy.check(req)
        s = self.policy.firewall
        match req:
            case ops.EnsureBridge(name=name, cidr=cidr):
                self.net.ensure_bridge(name, cidr)
            case ops.CreateTap(name=name, bridge=bridge):
                self.net.create_tap(name, bridge)
            case ops.DeleteLink(name=name):
                self.net.delete_link(name)
            case ops.ListLinks():
                return self.net.links()
            case ops.NftLoad(drop_legacy=drop_legacy):
                legacy = nft.nft_delete_tables(nft.LEGACY_NFT_TABLE) if drop_legacy else ""
                self._nft(legacy + nft.ruleset(s), "load banger's guest network rules")
            case ops.NftAdmit(rule=rule, previous=previous):
                g = self.policy.rule(req.op, rule)
                stale = [(self.policy.rule(req.op, p.rule), p.pins) for p in previous]
                self._nft(nft.admit_script(s, g, stale), f"admit {g.tap} to the guest network")
            case ops.NftForget(rule=rule, pins=pins):
                g = self.policy.rule(req.op, rule)
                self._nft(nft.forget_script(s, g, pins), f"remove {g.tap} from the guest network")
            case ops.NftPin(guest_ip=guest_ip, pins=pins):
                self._nft(nft.pin_script(s, guest_ip, dict(pins)),
                          f"pin DNS answers for {guest_ip}")
            case ops.NftDelete(table=table):
                self._nft(nft.nft_delete_tables(table), f"delete the nftables tables {table}")
            case ops.IPForward(set=value):
                return ip_forward(value, self.ip_forward_path)
            case ops.Signal(vm_id=vm_id, pid=pid, start_time=st, sig=sig):
                ident = self._vmm(req.op, vm_id, pid, st)
                return ident is not None and send_signal(ident, signal.Signals["SIG" + sig])
            case ops.CgroupCreate(vm_id=vm_id, memory_mib=memory, vcpu=vcpu):
                self.cgroup(vm_id).create(limits_for(memory, vcpu))
            case ops.CgroupAdopt(vm_id=vm_id, pid=pid, start_time=st):
                ident = self._vmm(req.op, vm_id, pid, st, adopting=True)
                if ident is None:
                    raise HostError(f"VM {vm_id}'s VMM (pid {pid}) is gone")
                self.cgroup(vm_id).adopt(pid)
            case ops.CgroupRemove(vm_id=vm_id, wait_s=wait_s):
                self.cgroup(vm_id).remove(wait_s=wait_s)
            case ops.QemuLaunch():
                return self._qemu_launch(req)
            case ops.DNSSockets():
                gateway = str(ipaddress.IPv4Interface(s.cidr).ip)
                udp, tcp = bind_dns(gateway, s.dns_port)
                return ops.Handover([udp.detach(), tcp.detach()])
            case ops.LoopAttach(path=path, read_only=read_only):
                return self._loop_attach(req.op, Path(path), read_only)
            case ops.LoopDetach(device=device):
                self.blocks.detach(req.op, device)
            case ops.LoopList():
                return [[loop.device, str(loop.backing)] for loop in self.blocks.loops()]
            case ops.DmSnapshot(vm_id=vm_id, origin=origin, cow=cow):
                self.blocks.snapshot(req.op, self.policy.dm_name(vm_id), vm_id, origin, cow)
                return str(self.policy.dm_device(vm_id))
            case ops.DmRemove(vm_id=vm_id):
                self.blocks.remove(self.policy.dm_name(vm_id))
            case ops.DmList():
                prefix = self.policy.dm_name("")
                return ops.vm_ids(self.blocks.target_names(prefix), prefix)
            case ops.UsernsMap(pid=pid):
                p = self.policy
                userns.map_ids(pid, p.daemon_uid, p.daemon_gid, p.subuids, p.subgids)
            case ops.FcLaunch():
                return self.jails.launch(req)
            case ops.FcConnect(vm_id=vm_id, socket=which):
                return ops.Handover([self.jails.connect(vm_id, which)])
            case ops.FcSnapshotOut(vm_id=vm_id, state=state, memory=memory):
                self.jails.snapshot_out(vm_id, Path(state), Path(memory))
            case ops.FcCleanup(vm_id=vm_id, wait_s=wait_s):
                self.jails.cleanup(vm_id, wait_s)
            case ops.FcNetnsList():
                return self.jails.netns_vms()
            case ops.FcStatus():
                return {"firecracker": self.policy.firecracker_bin,
                        "jailer": self.policy.jailer_bin}
            case ops.DmRead(vm_id=vm_id):
                return ops.Handover([self.blocks.open_dm(self.policy.dm_device(vm_id),
                                                         os.O_RDONLY)])
        return None

    def _loop_attach(self, op: str, path: Path, read_only: bool) -> str:
        """Open the daemon's file ``path`` (no symlink below the state dir) and attach
        that descriptor to a loop device."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK
        try:
            fd = open_beneath(self.policy.state_dir, path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused(f"{op}: {path} is reached through a symlink") from exc
            raise HostError(f"{op}: cannot open {path}: {exc.strerror or exc}") from exc
        try:
            return self.blocks.attach(f"{op}: {path}", fd, read_only=read_only)
        finally:
            os.close(fd)

    def hierarchy(self) -> CgroupHost:
        """The host's cgroup hierarchy, found once."""
        if self._cgroup_host is None:
            self._cgroup_host = self._cgroups()
        return self._cgroup_host

    def cgroup(self, vm_id: str) -> VMCgroup:
        """VM ``vm_id``'s cgroup (it may not exist)."""
        return self.hierarchy().group(vm_group(self.policy.install_tag, vm_id))

    def vmm_user(self) -> VMMUser:
        """The account VMMs run as.

        Raises:
            HostError: it does not exist (the daemon or the installer makes it).
            BadRequest: it is root's.
        """
        user = lookup_user(self.policy.vmm_user)
        if user is None:
            raise HostError(f"the VMM user {self.policy.vmm_user!r} does not exist",
                            hint="run scripts/install-deps or `banger system install`")
        return check_unprivileged(user)

    def _vmm(self, op: str, vm_id: str, pid: int, start_time: int, *,
             adopting: bool = False) -> ProcessIdentity | None:
        """VM ``vm_id``'s VMM if ``pid`` still is it (None when gone).

        The VM's marker is in every install's VMM command lines, so the process must
        also be this install's: in the VM's cgroup (QEMU's, or a jailed Firecracker's),
        or, for a process being moved into it (``adopting``) or one started without
        one, running wholly (real, effective and saved uid) as the VMM user or as the
        daemon's own user.

        Raises:
            Refused: the process is neither.
        """
        ident = ProcessIdentity(pid, start_time, vm_marker(vm_id))
        if not matches(ident):
            return None
        if not adopting and in_vm_group(pid, self.policy.install_tag, vm_id):
            return ident
        allowed = {self.policy.daemon_uid}
        user = lookup_user(self.policy.vmm_user)
        if user is not None:
            allowed.add(user.uid)
        uids = _uids(pid)
        if not uids or not set(uids) <= allowed or len(set(uids)) != 1:
            raise Refused(f"{op}: pid {pid} is not a VMM of this install "
                          f"(uids {uids or 'unreadable'})")
        return ident

    def _qemu_launch(self, req: ops.QemuLaunch) -> int:
        """Open what QEMU gets, make its cgroup, start it through the launcher."""
        user = self.vmm_user()
        with launch_files(f"QEMU for VM {req.vm_id}") as fds:
            for name, f in req.files.items():
                fds[name] = open_vm_file(self.policy, req.op, req.vm_id, name, f, user=user)
            fds["tap"] = self._open_tap(req.tap)
            fds["qmp"] = self._listen(Path(req.qmp))
            if req.agent is not None:
                fds["agent"] = self._listen(Path(req.agent))
            out_fd = open_log(self.policy, req.op, Path(req.stderr))
            fds["_stderr"] = out_fd
            group = self.cgroup(req.vm_id)
            group.create(limits_for(req.memory_mib, req.vcpu))
            command = [*privilege_drop(user, kvm_groups(req.accel)), self.policy.qemu_bin,
                       *req.args]
            spec: dict[str, object] = {
                "fds": {k: v for k, v in fds.items() if not k.startswith("_")},
                "stderr_fd": out_fd, "command": command, "own_netns": True,
                "cgroup_procs": [str(p) for p in group.procs_files]}
            return self._spawn(f"start QEMU for VM {req.vm_id}", spec, list(fds.values()))

    def _spawn(self, desc: str, spec: dict[str, object], pass_fds: list[int]) -> int:
        """Start a VMM through the launcher (:mod:`.vmm_spawn`) as ``spec`` says; its pid.

        Raises:
            VMMError: the launcher failed (its reason) or printed no pid.
        """
        try:
            res = self.runner.run([sys.executable, "-I", str(LAUNCHER)], desc=desc,
                                  timeout=SPAWN_TIMEOUT_S, input=json.dumps(spec).encode(),
                                  pass_fds=pass_fds)
        except CommandFailed as exc:
            reason = (str(exc.details.get("stderr") or "").strip()
                      or f"exit status {exc.details.get('returncode')}")
            raise VMMError(reason) from exc
        try:
            return int(res.out.strip())
        except ValueError as exc:
            raise VMMError(f"the VMM launcher printed {res.out.strip()[:80]!r}, "
                           "not a pid") from exc

    def _listen(self, path: Path) -> int:
        """Bind a socket QEMU serves (its QMP monitor, the guest agent's port) at ``path``
        (the VM's runtime directory, reached without a symlink), owned by the daemon's
        user, mode 0600, and listen.

        It is bound, chmod'ed and chown'ed in a directory of the helper's own inside
        that one (root's, 0700: the daemon cannot swap anything in it), then renamed
        into place; nothing here follows a name the daemon could change.
        """
        dfd = dir_beneath(self.policy.runtime_dir, path.parent)
        private = f".sock-{secrets.token_hex(4)}"
        try:
            os.mkdir(private, 0o700, dir_fd=dfd)
            pfd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dfd)
            try:
                where = f"/proc/self/fd/{pfd}/{path.name}"
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind(where)
                    os.chmod(where, 0o600)
                    os.chown(where, self.policy.daemon_uid, -1)
                    os.rename(path.name, path.name, src_dir_fd=pfd, dst_dir_fd=dfd)
                    sock.listen(8)
                except BaseException:
                    sock.close()
                    raise
                return sock.detach()
            finally:
                os.close(pfd)
                with contextlib.suppress(OSError):
                    os.rmdir(private, dir_fd=dfd)
        finally:
            os.close(dfd)

    def _nft(self, script: str, desc: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script.encode(), desc=desc,
                        timeout=NFT_TIMEOUT_S)


def attach_tap(name: str) -> int:
    """A descriptor attached to TAP ``name`` (``TUNSETIFF`` needs CAP_NET_ADMIN)."""
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    return kept_if(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC),
                    lambda fd: fcntl.ioctl(fd, TUNSETIFF, ifr))


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of ``pid``; empty when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        return []
    return []

