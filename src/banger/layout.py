"""Every path banger uses, and every per-VM file name, in one place.

Nothing else in the tree joins file names onto the state, cache or runtime
directories. Unix socket paths are checked against the kernel's limit where
they are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from banger.config import Config
from banger.errors import BadRequest

# sizeof(sockaddr_un.sun_path) is 108 on Linux (sys/un.h), including the NUL.
UNIX_PATH_MAX = 108


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
        return self.run.name

    @property
    def rootfs(self) -> Path:
        return self.state / "rootfs.ext4"

    @property
    def work_disk(self) -> Path:
        return self.state / "work.ext4"

    @property
    def serial_log(self) -> Path:
        return self.state / "serial.log"

    @property
    def vmm_log(self) -> Path:
        return self.state / "vmm.log"

    @property
    def handles(self) -> Path:
        return self.state / "handles.json"

    @property
    def pid_file(self) -> Path:
        return self.run / "vmm.pid"

    @property
    def qmp_socket(self) -> Path:
        return check_socket_path(self.run / "qmp.sock")

    @property
    def api_socket(self) -> Path:
        """Firecracker's API socket."""
        return check_socket_path(self.run / "fc.sock")

    @property
    def vsock_socket(self) -> Path:
        return check_socket_path(self.run / "vsock.sock")

    @property
    def metrics(self) -> Path:
        return self.run / "fc.metrics"


@dataclass(frozen=True)
class Layout:
    """Root directories from the config and the files directly under them."""

    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    key_path: Path

    @classmethod
    def from_config(cls, cfg: Config) -> Layout:
        return cls(cfg.state_dir, cfg.cache_dir, cfg.runtime_dir, cfg.key_path)

    @property
    def db(self) -> Path:
        return self.state_dir / "banger.db"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "bangerd.log"

    @property
    def socket(self) -> Path:
        return check_socket_path(self.runtime_dir / "bangerd.sock")

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "bangerd.pid"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def kernels_dir(self) -> Path:
        return self.state_dir / "kernels"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def vms_run_dir(self) -> Path:
        return self.runtime_dir / "vms"

    @property
    def staging_dir(self) -> Path:
        """Half-built images and kernels; anything here at start-up is debris."""
        return self.state_dir / "staging"

    @property
    def ssh_dir(self) -> Path:
        return self.state_dir / "ssh"

    @property
    def public_key(self) -> Path:
        return self.key_path.with_name(self.key_path.name + ".pub")

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """The file users ``Include`` from ~/.ssh/config to reach ``<name>.vm``."""
        return self.ssh_dir / "config"

    @property
    def debootstrap_cache(self) -> Path:
        return self.cache_dir / "debootstrap"

    def vm(self, vm_id: str) -> VMPaths:
        return VMPaths(self.vms_dir / vm_id, self.vms_run_dir / vm_id)

    def image_dir(self, name: str) -> Path:
        return self.images_dir / name

    def kernel_dir(self, name: str) -> Path:
        return self.kernels_dir / name
