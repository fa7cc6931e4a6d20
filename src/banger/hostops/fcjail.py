"""Firecracker's jails, run by the root helper (``fc.*`` requests).

Everything a jailed Firecracker needs root for happens here: building the jail
from descriptors of the VM's files (:func:`banger.hostops.jail.prepare_jail`),
starting the jailer found when the helper started (:class:`~banger.hostops.policy.Policy`),
connecting to the API and vsock sockets inside the jail, moving a snapshot out of
it, and removing the jail and the cgroup the jailer made. Requests name a VM id and
the VM's own files; the jailer, the Firecracker binary and the chroot base are the
helper's.

The jail's root is the VMM user's, and the VMM runs what the guest asks of it, so
nothing in it is trusted: a socket is connected to only when it is the VMM user's
own socket with one link (never a world-writable socket linked in, which root would
then reach for the daemon), found without following a symlink; a snapshot file is
moved out only as a plain file with one link.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from banger.errors import HostError, Refused
from banger.fsutil import dir_beneath
from banger.hostops import ops
from banger.hostops.cgroups import CgroupHost, install_group, limits_for, vm_group
from banger.hostops.jail import (
    JAIL_API_SOCKET,
    JAIL_FILES,
    JAIL_SNAPSHOT_MEM,
    JAIL_SNAPSHOT_STATE,
    JAIL_VSOCK,
    JailerSettings,
    JailLayout,
    jailer_argv,
    move_out,
    prepare_jail,
    remove_jail,
)
from banger.hostops.netlink import NETNS_DIR, HostNetwork, vm_netns_prefix
from banger.hostops.policy import Policy
from banger.hostops.vmfiles import launch_files, open_log, open_vm_file
from banger.proc import identify, send_signal
from banger.vmm import vm_marker
from banger.vmmuser import VMMUser

CONNECT_TIMEOUT_S = 5.0  # a local socket: anything slower is a VMM that is not listening
# The jailer joins the VM's namespace after building the chroot, before it execs
# Firecracker: a second or so, unless the host is in trouble.
JOIN_WAIT_S = 10.0
SOCKETS = {"api": JAIL_API_SOCKET, "vsock": JAIL_VSOCK}

# (description, spec, descriptors to pass) -> the launched process's pid
Spawn = Callable[[str, dict[str, object], list[int]], int]


class Jails:
    """This install's Firecracker jails (under the policy's chroot base)."""

    def __init__(self, policy: Policy, cgroups: Callable[[], CgroupHost],
                 vmm_user: Callable[[], VMMUser], spawn: Spawn, net: HostNetwork) -> None:
        self.policy = policy
        self._cgroups = cgroups
        self._vmm_user = vmm_user
        self._spawn = spawn
        self.net = net
        self._joined = joined_netns
        # One request per VM's jail at a time: a second launch must not rebuild a root
        # the first one's jailer is giving to the VMM user meanwhile. _mu guards the dict.
        self._mu = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def _jail_of(self, vm_id: str) -> Iterator[None]:
        with self._mu:
            lock = self._locks.setdefault(vm_id, threading.Lock())
        with lock:
            yield

    def layout(self, vm_id: str) -> JailLayout:
        """Where VM ``vm_id``'s jail is.

        Raises:
            Refused: the helper found no Firecracker and jailer when it started.
        """
        if not self.policy.runs_firecracker:
            raise Refused("this root helper runs no Firecracker: none was found with its "
                          "jailer when it started (jailer_enabled, firecracker_bin, "
                          "jailer_bin)")
        return JailLayout.for_vm(self.policy.jailer_chroot_base, self.policy.firecracker_bin,
                                 vm_marker(vm_id))

    def launch(self, req: ops.FcLaunch) -> int:
        """Build the jail from the request's files and start the jailer; its pid."""
        with self._jail_of(req.vm_id):
            return self._launch(req)

    def _launch(self, req: ops.FcLaunch) -> int:
        layout = self.layout(req.vm_id)
        user = self._vmm_user()
        settings = JailerSettings(self.policy.jailer_bin, self.policy.jailer_chroot_base, user,
                                  self._cgroups(), install_group(self.policy.install_tag))
        with launch_files(f"Firecracker's jail for VM {req.vm_id}") as fds:
            for name, f in req.files.items():
                fds[name] = open_vm_file(self.policy, req.op, req.vm_id, name, f, user=user)
            serial = open_log(self.policy, req.op, Path(req.serial))
            fds["_serial"] = serial
            prepare_jail(layout, user, {JAIL_FILES[name]: (fds[name], f.mode == "rw")
                                        for name, f in req.files.items()})
            netns = None
            if req.port is not None:
                netns = self.netns_name(req.vm_id)
                self.net.delete_netns(netns)  # a failed launch's, before this one
                self.net.create_vm_netns(netns, req.port, self.policy.firewall.bridge,
                                         (user.uid, user.gid))
            argv = jailer_argv(settings, self.policy.firecracker_bin, layout.jail_id,
                               limits_for(req.memory_mib, req.vcpu),
                               NETNS_DIR / netns if netns is not None else None)
            # The jailer makes the VM's cgroup and joins it itself.
            spec: dict[str, object] = {"fds": {}, "stderr_fd": serial, "command": argv,
                                       "cgroup_procs": []}
            try:
                pid = self._spawn(f"start Firecracker for VM {req.vm_id}", spec, [serial])
                if netns is not None:
                    self._await_join(req.vm_id, pid, netns)
            except BaseException:
                if netns is not None:
                    with contextlib.suppress(HostError):
                        self.net.delete_netns(netns)
                raise
        if netns is not None:
            # Firecracker holds its namespace now: the name is dropped, so the namespace
            # and its links go with the VMM, whatever becomes of this helper (its mount
            # namespace, where a service's names live, does not outlive it).
            self.net.unname_netns(netns)
        return pid

    def _await_join(self, vm_id: str, pid: int, netns: str) -> None:
        """Wait until the jailer ``pid`` has joined ``netns`` (before it execs
        Firecracker); kill it when it has not within :data:`JOIN_WAIT_S`.

        Raises:
            HostError: it ended first, or did not join in time.
        """
        deadline = time.monotonic() + JOIN_WAIT_S
        while True:
            try:
                if self._joined(pid, netns):
                    return
            except OSError as exc:
                raise HostError(f"Firecracker's jailer for VM {vm_id} ended before it joined "
                                "the VM's network namespace (its output is in the VM's "
                                "serial log)") from exc
            if time.monotonic() > deadline:
                ident = identify(pid, vm_marker(vm_id))
                if ident is not None:
                    send_signal(ident, signal.SIGKILL)
                raise HostError(f"Firecracker's jailer for VM {vm_id} did not join the VM's "
                                f"network namespace within {JOIN_WAIT_S:g}s")
            time.sleep(0.01)

    def netns_name(self, vm_id: str) -> str:
        """The name of VM ``vm_id``'s own network namespace (``fc.launch`` with a port)."""
        return vm_netns_prefix(self.policy.install_tag) + vm_id

    def netns_vms(self) -> list[str]:
        """The ids of the VMs that have a network namespace of this install."""
        return ops.vm_ids(self.net.netns_names(), vm_netns_prefix(self.policy.install_tag))

    def connect(self, vm_id: str, which: Literal["api", "vsock"]) -> int:
        """A connected descriptor to VM ``vm_id``'s ``which`` socket in its jail.

        Raises:
            HostError: there is no such socket (yet), or it does not accept.
            Refused: the name is not the VMM user's own socket.
        """
        path = self.layout(vm_id).host_path(SOCKETS[which])
        try:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(f"VM {vm_id} has no Firecracker {which} socket: "
                            f"{exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            user = self._vmm_user()
            if not stat.S_ISSOCK(st.st_mode) or st.st_nlink != 1 or st.st_uid != user.uid:
                raise Refused(f"fc.connect: {path} is not a socket of the VMM user's own")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(f"/proc/self/fd/{fd}")
                sock.settimeout(None)
            except OSError as exc:
                sock.close()
                raise HostError(f"VM {vm_id}'s Firecracker {which} socket does not accept: "
                                f"{exc.strerror or exc}") from exc
            return sock.detach()
        finally:
            os.close(fd)

    def snapshot_out(self, vm_id: str, state: Path, memory: Path) -> None:
        """Move the snapshot Firecracker wrote in the jail to ``state`` and ``memory``
        (their directories exist below the state dir), made the daemon's.

        Raises:
            HostError: a file is missing or not plain, or the host refused.
        """
        layout = self.layout(vm_id)
        owner = (self.policy.daemon_uid, self.policy.daemon_gid)
        with self._jail_of(vm_id):
            self._move_out(layout, owner, state, memory)

    def _move_out(self, layout: JailLayout, owner: tuple[int, int], state: Path,
                  memory: Path) -> None:
        for jailed, target in ((JAIL_SNAPSHOT_STATE, state), (JAIL_SNAPSHOT_MEM, memory)):
            try:
                dfd = dir_beneath(self.policy.state_dir, target.parent)
            except OSError as exc:
                raise HostError(f"cannot move the snapshot to {target.parent}: "
                                f"{exc.strerror or exc}") from exc
            try:
                move_out(layout, jailed, dfd, target.name, owner)
            finally:
                os.close(dfd)

    def cleanup(self, vm_id: str, wait_s: float) -> None:
        """Remove VM ``vm_id``'s network namespace, its jail and the cgroup the jailer
        made for it."""
        with self._jail_of(vm_id):
            steps: list[Callable[[], object]] = [
                lambda: self.net.delete_netns(self.netns_name(vm_id))]  # a launch's leftover
            if self.policy.runs_firecracker:  # else no jail was ever made by this helper
                group = vm_group(self.policy.install_tag, vm_marker(vm_id))
                steps += [lambda: remove_jail(self.layout(vm_id)),
                          lambda: self._cgroups().group(group).remove(wait_s=wait_s)]
            failed: list[HostError] = []
            for step in steps:  # each one, whatever became of the one before
                try:
                    step()
                except HostError as exc:
                    failed.append(exc)
            if failed:
                raise failed[0]


def joined_netns(pid: int, netns: str) -> bool:
    """Whether process ``pid`` is in the named network namespace ``netns``.

    Raises:
        OSError: there is no process ``pid`` (or the name is gone).
    """
    return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(NETNS_DIR / netns).st_ino}]"
