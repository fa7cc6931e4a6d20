"""banger's configuration: ``config.toml``, every key optional.

Found at ``--config``, else ``$BANGER_CONFIG``, else ``~/.config/banger/config.toml``.
Only that default file may be missing (all defaults then); an explicit path must
exist. Unknown keys are refused so a typo is not silently ignored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import posixpath
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from banger.errors import BadRequest
from banger.names import check_name

_SIZE = re.compile(r"(?i)^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: str | int) -> int:
    """Bytes from ``4G``, ``512M``, ``2GiB`` or a plain integer of bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise BadRequest(f"size must be positive, got {value}")
        return value
    match = _SIZE.match(value)
    if not match:
        raise BadRequest(
            f"cannot read size {value!r}", hint="use a number with a unit, e.g. 4G or 512M"
        )
    unit = (match.group(2) or "").lower()[:1]
    size = int(match.group(1)) * _UNITS[unit]
    if size <= 0:
        raise BadRequest(f"size must be positive, got {value!r}")
    return size


def format_size(n: int) -> str:
    """The shortest exact unit spelling of ``n`` bytes (``4G``, ``1536M``)."""
    for suffix, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


class VMMChoice(StrEnum):
    AUTO = "auto"
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


class AccelChoice(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VMDefaults(_Strict):
    vcpu: Annotated[int, Field(ge=1, le=64)] = 2
    memory_mib: Annotated[int, Field(ge=128, le=262144)] = 1024
    disk_size: str = "4G"
    work_disk_size: str = "2G"

    @field_validator("disk_size", "work_disk_size")
    @classmethod
    def _size(cls, v: str) -> str:
        try:
            parse_size(v)
        except BadRequest as exc:
            raise ValueError(f"{exc.message} ({exc.hint})") from None
        return v


def check_sync_target(guest: str) -> str:
    """A ``[[file_sync]]`` guest path: absolute, normalised, strictly under /root."""
    norm = posixpath.normpath(guest)
    if not guest.startswith("/") or norm != guest.rstrip("/") or not norm.startswith("/root/"):
        raise BadRequest(f"file_sync guest path {guest!r} must be a normalised path under /root")
    if any(ord(c) < 32 for c in norm):
        raise BadRequest(f"file_sync guest path {guest!r} has control characters")
    return norm


class FileSync(_Strict):
    """A host file copied into the guest's /root at VM start (used by workspaces)."""

    host: str
    guest: str
    mode: str = "0600"

    @field_validator("guest")
    @classmethod
    def _guest(cls, v: str) -> str:
        try:
            check_sync_target(v)
        except BadRequest as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        try:
            bits = int(v, 8)
        except ValueError:
            raise ValueError(f"file_sync mode {v!r} is not an octal number such as 0600") \
                from None
        if not 0 <= bits <= 0o7777:
            raise ValueError(f"file_sync mode {v!r} is outside 0000-7777")
        return v


class Config(_Strict):
    state_dir: Path = Path("/var/lib/banger")
    cache_dir: Path = Path("/var/cache/banger")
    runtime_dir: Path = Path("/run/banger")
    log_level: str = "info"
    vmm: VMMChoice = VMMChoice.AUTO
    qemu_accel: AccelChoice = AccelChoice.AUTO
    qemu_bin: str = "qemu-system-x86_64"
    firecracker_bin: str = ""
    jailer_enabled: bool | None = None
    jailer_bin: str = ""
    jailer_chroot_base: Path = Path("/srv/jailer")
    # A jailed Firecracker VM in a network namespace of its own (the jailer's --netns).
    jailer_netns: bool = False
    cow_strategy: Literal["auto", "reflink", "copy", "dmsnap"] = "auto"
    bridge_name: str = "br-banger"
    bridge_cidr: str = "172.29.0.1/24"
    ssh_key_path: Path | None = None
    default_image_name: str = "debian-bookworm"
    debian_mirror: str = "http://deb.debian.org/debian"
    # Where a pulled Ubuntu image's apt gets what finalize installs (imagefinalize).
    ubuntu_mirror: str = "http://archive.ubuntu.com/ubuntu"
    nat: bool = False  # a new VM's default for --nat/--no-nat
    vm_to_vm: bool = False  # guests may reach each other on the bridge
    dns_enabled: bool = True
    dns_port: Annotated[int, Field(ge=1, le=65535)] = 53
    # Where names outside .vm are forwarded: "" for the host's first non-loopback
    # nameserver (/etc/resolv.conf), "none" for nowhere, or "IP" / "IP:PORT".
    dns_upstream: str = ""
    tap_pool_size: Annotated[int, Field(ge=0, le=64)] = 2
    # Root disks copied ahead of the creates that take them, where root disks are plain
    # copies (cow_strategy copy; banger.daemon.spares): how many of the last used image.
    spare_root_disks: Annotated[int, Field(ge=0, le=8)] = 1
    # Boot snapshots (banger.daemon.bootsnap): a VM's first boot of an image and size (QEMU,
    # or a jailed Firecracker) is snapshotted, and later creates restore a clone of it.
    boot_snapshots: bool = True
    # Clones of an image's boot snapshot kept restored and paused, ready for the next
    # create of that image at the default size (banger.daemon.vmpool): image name -> how
    # many. Together they hold at most pool_memory_mib of guest memory.
    pool_size: dict[str, Annotated[int, Field(ge=0, le=32)]] = {}
    pool_memory_mib: Annotated[int, Field(ge=0, le=1 << 20)] = 4096
    boot_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 180.0
    vm_defaults: VMDefaults = VMDefaults()
    file_sync: list[FileSync] = []
    # Bound on a workspace export's guest output, held in the daemon's memory.
    workspace_export_max_mib: Annotated[int, Field(ge=1, le=16384)] = 256
    # How `vm workspace prepare` sends the files: "auto" over a TCP connection to the
    # guest when it has perl (a token-checked one-shot listener), else over ssh;
    # "ssh" always over ssh (a guest whose own firewall blocks inbound connections).
    workspace_transport: Literal["auto", "ssh"] = "auto"
    # The unprivileged system user QEMU runs as (created by bangerd if missing).
    vmm_user: str = "banger-vmm"
    # Where the root helper (`banger-helper`) listens. Set: the daemon does what needs
    # root (bridge, TAPs, nftables, ip_forward) through it; unset: in its own process.
    helper_socket: Path | None = None
    # The bundle catalog `image pull NAME` and `kernel pull NAME` resolve names in
    # (a file:// or http(s):// URL of a JSON document); "" for none.
    catalog_url: str = ""

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    @field_validator("bridge_name")
    @classmethod
    def _bridge(cls, v: str) -> str:
        # IFNAMSIZ is 16 including the NUL (linux/if.h).
        if not 1 <= len(v) <= 15 or not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("must be 1-15 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("bridge_cidr")
    @classmethod
    def _cidr(cls, v: str) -> str:
        iface = ipaddress.ip_interface(v)
        if iface.version != 4 or iface.network.prefixlen > 29:
            raise ValueError("must be an IPv4 gateway address with a prefix of /29 or wider")
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise ValueError("the address part is the gateway; it must be a host address")
        return v

    @field_validator("dns_upstream")
    @classmethod
    def _dns_upstream(cls, v: str) -> str:
        if v in ("", "none"):
            return v
        host, _, port = v.rpartition(":") if v.count(":") == 1 else (v, "", "")
        try:
            ipaddress.IPv4Address(host)
            if port and not 1 <= int(port) <= 65535:
                raise ValueError
        except ValueError:
            raise ValueError('must be "", "none", an IPv4 address or IPv4:PORT') from None
        return v

    @property
    def dns_upstream_address(self) -> tuple[str, int] | None:
        """``dns_upstream`` as (address, port); None for "" and "none"."""
        if self.dns_upstream in ("", "none"):
            return None
        host, _, port = self.dns_upstream.partition(":")
        return host, int(port or 53)

    @field_validator("jailer_netns", mode="before")
    @classmethod
    def _jailer_netns(cls, v: object) -> object:
        # Before it was a switch, jailer_netns was a path and only "" was accepted.
        if v == "":
            return False
        if isinstance(v, str):
            raise ValueError("is true or false: with true, banger makes each jailed "
                             "Firecracker VM a network namespace of its own (there is no "
                             "path to give)")
        return v

    @field_validator("vmm_user")
    @classmethod
    def _vmm_user(cls, v: str) -> str:
        # useradd's default NAME_REGEX (useradd(8)), and never root.
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v) or v == "root":
            raise ValueError("must be a system user name (lower case, at most 32 "
                             "characters) other than root")
        return v

    @field_validator("helper_socket")
    @classmethod
    def _helper_socket(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path")
        return v

    @field_validator("catalog_url")
    @classmethod
    def _catalog_url(cls, v: str) -> str:
        if v and not re.match(r"(?i)(https?|file)://[^\s]+$", v):
            raise ValueError('must be "" (no catalog), or a file:// or http(s):// URL')
        return v

    @field_validator("default_image_name")
    @classmethod
    def _image(cls, v: str) -> str:
        try:
            check_name(v, "image")
        except BadRequest as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("pool_size")
    @classmethod
    def _pool_images(cls, v: dict[str, int]) -> dict[str, int]:
        for image in v:
            try:
                check_name(image, "image")
            except BadRequest as exc:
                raise ValueError(exc.message) from None
        return v

    @property
    def key_path(self) -> Path:
        """The install's SSH private key (public key beside it with ``.pub``)."""
        return self.ssh_key_path or self.state_dir / "ssh" / "id_ed25519"


SYSTEM_CONFIG = Path("/etc/banger/config.toml")  # written by `banger system install`


def config_path(env: dict[str, str] | None = None, system: Path = SYSTEM_CONFIG) -> Path:
    """Where the config file is looked for: ``$BANGER_CONFIG``; else the user's own
    file when it exists; else the system install's (``/etc/banger/config.toml``) when
    that exists; else the user's default path (absent: all defaults)."""
    env = dict(os.environ) if env is None else env
    if env.get("BANGER_CONFIG"):
        return Path(env["BANGER_CONFIG"])
    own = default_config_path(env)
    if not own.exists() and system.exists():
        return system
    return own


def default_config_path(env: dict[str, str] | None = None) -> Path:
    """``~/.config/banger/config.toml``: the one config path that may be absent."""
    env = dict(os.environ) if env is None else env
    return Path(env.get("HOME", "/root")) / ".config" / "banger" / "config.toml"


def load_config(path: Path | None = None) -> Config:
    """Load and validate the config.

    ``path`` None looks in :func:`config_path`. Only the default path may be
    missing (all defaults then); a path named explicitly (``--config``,
    ``$BANGER_CONFIG``) must exist, so a typo never silently starts a daemon
    on other state.

    Raises:
        BadRequest: the file is missing (explicit path), unreadable or invalid.
    """
    return read_config(path)[0]


def read_config(path: Path | None = None) -> tuple[Config, str]:
    """:func:`load_config`, and the SHA-256 of the bytes it parsed (of no bytes when
    the default file is absent): two configs with one digest have the same values."""
    path = path or config_path()
    raw = b""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        if path != default_config_path():
            raise BadRequest(
                f"config file {path} does not exist",
                hint="create it, or drop --config / BANGER_CONFIG to use "
                     f"{default_config_path()} (optional) and the defaults") from exc
    except OSError as exc:
        raise BadRequest(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadRequest(f"{path}: {exc}", hint="fix the TOML syntax") from exc
    return parse_config(data, source=str(path)), hashlib.sha256(raw).hexdigest()


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a config mapping, turning pydantic errors into one readable line."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise BadRequest(
            f"{source}: {where}: {msg}",
            hint="see the configuration section of the README for valid keys",
        ) from exc
