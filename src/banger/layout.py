"""Every path banger uses, and every per-VM file name, in one place.

Nothing else in the tree joins file names onto the state, cache or runtime
directories. Unix socket paths are checked against the kernel's limit where
they are built.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from banger.config import Config
from banger.errors import BadRequest

# sizeof(sockaddr_un.sun_path) is 108 on Linux (sys/un.h), including the NUL.
UNIX_PATH_MAX = 108
# Hex digits of the install tag: 16.7 million tags make two state dirs on one host
# sharing one unlikely, and "bgt" + 6 + 6 random digits fits a 15-character TAP name.
INSTALL_TAG_HEX = 6
# OpenSSH binds a master's socket as "<ControlPath>.<16 random characters>" and then
# renames it into place (mux.c, muxserver_listen), so that name must fit as well.
SSH_BIND_SUFFIX = 17


def install_tag(state_dir: Path) -> str:
    """The tag naming one install (one state dir) in host-wide names: TAPs and dm targets.

    The first :data:`INSTALL_TAG_HEX` hex digits of the SHA-256 of the state dir's
    resolved path, so two spellings of one directory give one tag.
    """
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()
    return digest[:INSTALL_TAG_HEX]


DM_PREFIX = "banger-"  # every dm target banger creates starts with this, then the install tag


def dm_prefix_for(install_tag: str) -> str:
    """The prefix of one install's dm targets: ``banger-<install tag>-`` (a VM id follows).

    Sweeps remove only targets with their own install's prefix, so two installs (two
    state dirs) on one host never remove each other's snapshots. dm names may have
    127 characters (DM_NAME_LEN in linux/dm-ioctl.h); this one has 26.
    """
    return f"{DM_PREFIX}{install_tag}-"


def check_socket_path(path: Path) -> Path:
    """Return ``path`` if it fits in ``sun_path``, else explain how to shorten it."""
    if len(str(path).encode()) >= UNIX_PATH_MAX:
        raise BadRequest(
            f"socket path {path} is {len(str(path).encode())} bytes; the limit is "
            f"{UNIX_PATH_MAX - 1}",
            hint="set a shorter runtime_dir in config.toml",
        )
    return path


@dataclass(frozen=True)
class VMPaths:
    """Files of one VM. Durable ones live under ``state``, sockets under ``run``."""

    state: Path
    run: Path

    @property
    def vm_id(self) -> str:
        """The VM's id: the name of its runtime directory (not a file)."""
        return self.run.name

    @property
    def rootfs(self) -> Path:
        """``rootfs.ext4``: the VM's copy-on-write root disk, made by ``vmcreate.make_disks``."""
        return self.state / "rootfs.ext4"

    @property
    def work_disk(self) -> Path:
        """``work.ext4``: the VM's second (work) disk, built by ``vms.make_work_disk``."""
        return self.state / "work.ext4"

    @property
    def workspace_backups(self) -> Path:
        """``workspace-backups/``: guest changes saved before a re-prepare replaced them
        (``<UTC time>.patch``), written by ``workspaces``."""
        return self.state / "workspace-backups"

    @property
    def saved_state(self) -> Path:
        """``saved/``: a suspended guest's memory and device state (``vm suspend``), made by
        the VMM driver's ``save`` in ``saved.partial/`` and renamed here once complete
        (``banger.daemon.savedstate``)."""
        return self.state / "saved"

    @property
    def saved_partial(self) -> Path:
        """``saved.partial/``: a ``saved/`` being written; never restored from."""
        return self.state / "saved.partial"

    @property
    def serial_log(self) -> Path:
        """``serial.log``: guest console output, written by QEMU or the Firecracker spawner."""
        return self.state / "serial.log"

    @property
    def vmm_log(self) -> Path:
        """``vmm.log``: QEMU's ``-D`` log or Firecracker's logger; named in launch errors."""
        return self.state / "vmm.log"

    @property
    def handles(self) -> Path:
        """``handles.json``: the VM's process/TAP/COW handles, kept by ``HandleCache``."""
        return self.state / "handles.json"

    @property
    def pid_file(self) -> Path:
        """``vmm.pid``: the VMM's pid, written by QEMU (``-pidfile``) or the FC driver."""
        return self.run / "vmm.pid"

    @property
    def qmp_socket(self) -> Path:
        """``qmp.sock``: QEMU's QMP socket; the QEMU driver sends powerdown/quit on it."""
        return check_socket_path(self.run / "qmp.sock")

    @property
    def api_socket(self) -> Path:
        """Firecracker's API socket."""
        return check_socket_path(self.run / "fc.sock")

    @property
    def vsock_socket(self) -> Path:
        """``vsock.sock``: the host end of Firecracker's vsock device (FC driver)."""
        return check_socket_path(self.run / "vsock.sock")

    @property
    def ssh_dir(self) -> Path:
        """``ssh/``: the directory (0700) of the VM's shared OpenSSH master sockets, made
        by ``Daemon.ssh_control`` and removed with the rest of ``run`` at teardown."""
        return self.run / "ssh"

    def ssh_control(self, boot: str) -> Path | None:
        """``ssh/<boot>``: the socket of the OpenSSH master this boot's guest commands share
        (``boot`` changes at every VMM launch: ``guest.boot_key``), or None when it would
        not fit in ``sun_path`` with the suffix OpenSSH binds it under first. Commands then
        run without a shared connection, as they would with no master."""
        path = self.ssh_dir / boot
        if len(str(path).encode()) + SSH_BIND_SUFFIX >= UNIX_PATH_MAX:
            return None
        return path

    @property
    def metrics(self) -> Path:
        """``fc.metrics``: where Firecracker writes metrics lines (FC driver only)."""
        return self.run / "fc.metrics"

    @property
    def agent_socket(self) -> Path:
        """``agent.sock``: the host end of the guest agent's virtio-serial port (QEMU
        driver), beside ``agent.lock``, which its one client holds (``banger.agent``)."""
        return check_socket_path(self.run / "agent.sock")

    @property
    def ident_fifo(self) -> Path:
        """``ident.fifo``: the host end of the guest's identity channel (QEMU driver): what
        is written here reaches ``banger-ident`` in the guest (``banger.daemon.identity``)."""
        return self.run / "ident.fifo"


@dataclass(frozen=True)
class SnapshotPaths:
    """Files of one snapshot (``banger.daemon.snapshots``): a guest's memory and device
    state and its disks at one instant, with the boot files it ran."""

    dir: Path

    @property
    def partial(self) -> Path:
        """``<id>.partial/``: a snapshot being written; never restored from."""
        return self.dir.with_name(self.dir.name + ".partial")

    @property
    def rootfs(self) -> Path:
        """``rootfs.ext4``: the root disk at the instant of the snapshot."""
        return self.dir / "rootfs.ext4"

    @property
    def work_disk(self) -> Path:
        """``work.ext4``: the work disk at the instant of the snapshot."""
        return self.dir / "work.ext4"

    @property
    def kernel(self) -> Path:
        """``kernel``: the kernel the guest runs (a restore needs the same)."""
        return self.dir / "kernel"

    @property
    def initrd(self) -> Path:
        """``initrd.img``: its initrd, when it had one."""
        return self.dir / "initrd.img"


@dataclass(frozen=True)
class Layout:
    """Root directories from the config and the files directly under them."""

    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    key_path: Path

    @classmethod
    def from_config(cls, cfg: Config) -> Layout:
        """The layout for ``cfg``'s state, cache and runtime dirs and SSH key path."""
        return cls(cfg.state_dir, cfg.cache_dir, cfg.runtime_dir, cfg.key_path)

    @property
    def db(self) -> Path:
        """``banger.db``: the daemon's SQLite store, opened by ``Store`` at start-up."""
        return self.state_dir / "banger.db"

    @property
    def daemon_log(self) -> Path:
        """``bangerd.log``: the daemon's log; ``banger`` points users at it on errors."""
        return self.state_dir / "bangerd.log"

    @property
    def install_tag(self) -> str:
        """This install's tag (:func:`install_tag` of ``state_dir``)."""
        return install_tag(self.state_dir)

    @property
    def host_network_state(self) -> Path:
        """``host-network.json``: what banger changed on the host network (``HostChanges``)."""
        return self.state_dir / "host-network.json"

    @property
    def socket(self) -> Path:
        """``bangerd.sock``: the RPC socket bangerd serves and ``client.Client`` dials."""
        return check_socket_path(self.runtime_dir / "bangerd.sock")

    @property
    def pid_file(self) -> Path:
        """``bangerd.pid``: the running daemon's pid, written by bangerd at start-up."""
        return self.runtime_dir / "bangerd.pid"

    @property
    def images_dir(self) -> Path:
        """``images/``: one directory per published image (see :meth:`image_dir`)."""
        return self.state_dir / "images"

    @property
    def kernels_dir(self) -> Path:
        """``kernels/``: one directory per imported kernel (see :meth:`kernel_dir`)."""
        return self.state_dir / "kernels"

    @property
    def vms_dir(self) -> Path:
        """``vms/``: the per-VM state directories; reconcile sweeps it for orphans."""
        return self.state_dir / "vms"

    @property
    def spares_dir(self) -> Path:
        """``spares/``: root disks copied ahead of the creates that take them
        (:mod:`banger.daemon.spares`)."""
        return self.state_dir / "spares"

    @property
    def vms_run_dir(self) -> Path:
        """``vms/`` in the runtime dir: the per-VM socket and pid-file directories."""
        return self.runtime_dir / "vms"

    @property
    def staging_dir(self) -> Path:
        """Half-built images and kernels, workspace history packs being sent; anything
        here at start-up is debris."""
        return self.state_dir / "staging"

    @property
    def ssh_dir(self) -> Path:
        """``ssh/``: banger's SSH client files (``known_hosts``, ``config``)."""
        return self.state_dir / "ssh"

    @property
    def public_key(self) -> Path:
        """The install's SSH public key (``<key_path>.pub``), put in each work disk."""
        return self.key_path.with_name(self.key_path.name + ".pub")

    @property
    def known_hosts(self) -> Path:
        """``ssh/known_hosts``: guest host keys for the daemon's ssh, ``vm ssh`` and ssh config."""
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """The file users ``Include`` from ~/.ssh/config to reach ``<name>.vm``."""
        return self.ssh_dir / "config"

    @property
    def debootstrap_cache(self) -> Path:
        """``debootstrap/`` in the cache dir: debootstrap's package cache for builds."""
        return self.cache_dir / "debootstrap"

    @property
    def kernel_build_cache(self) -> Path:
        """``kernels/`` in the cache dir: finished kernel builds, one dir per input hash."""
        return self.cache_dir / "kernels"

    @property
    def oci_blobs(self) -> Path:
        """``oci/blobs/`` in the cache dir: registry blobs by digest, shared by pulls."""
        return self.cache_dir / "oci" / "blobs"

    @property
    def snapshots_dir(self) -> Path:
        """``snapshots/``: one directory per snapshot (:meth:`snapshot`)."""
        return self.state_dir / "snapshots"

    def snapshot(self, snap_id: str) -> SnapshotPaths:
        """The files of snapshot ``snap_id``."""
        return SnapshotPaths(self.snapshots_dir / snap_id)

    def vm(self, vm_id: str) -> VMPaths:
        """The state and runtime paths of VM ``vm_id``."""
        return VMPaths(self.vms_dir / vm_id, self.vms_run_dir / vm_id)

    def image_dir(self, name: str) -> Path:
        """Image ``name``'s directory, filled by ``images.publish``.

        Holds ``rootfs.ext4`` and, when the image has them, ``vmlinuz``, ``initrd.img``
        and ``workseed/``.
        """
        return self.images_dir / name

    def kernel_dir(self, name: str) -> Path:
        """Kernel ``name``'s directory, filled by ``kernels.import_files``.

        Holds ``vmlinux`` and/or ``bzImage``, any ``initrd.img``, and ``manifest.json``.
        """
        return self.kernels_dir / name
