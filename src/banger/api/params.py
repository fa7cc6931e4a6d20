"""The parameters of every RPC method: one pydantic model per request shape.

The daemon validates each request's ``params`` against the model its method names
(:func:`banger.daemon.rpc.parse`: ``bad_request`` naming the field); clients build
their requests from the same models. Limits a request is held to (argv length,
write size) live here, where both sides read them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from banger.api import Model

# Session limits: a command's argv and environment, `send` text, attachment writes
# (bytes; a write travels base64-encoded).
SESSION_MAX_ARGV = 256
SESSION_MAX_ENV = 64
SESSION_MAX_TEXT = 64 << 10
ATTACH_MAX_WRITE = 64 << 10

VMRef = Annotated[str, Field(min_length=1, max_length=256)]
SessionName = Annotated[str, Field(min_length=1, max_length=63)]
AttachmentId = Annotated[str, Field(min_length=1, max_length=64)]


# --------------------------------------------------------------------------- general

class NoParams(Model):
    pass


class NameRef(Model):
    name: str = Field(min_length=1, max_length=256)


class OpRef(Model):
    id: str = Field(min_length=1, max_length=64)
    wait_s: float = Field(default=0.0, ge=0, le=30)
    since: datetime | None = None


# ------------------------------------------------------------------------ vms

class CreateParams(Model):
    name: str | None = None
    image: str | None = None
    vcpu: int | None = Field(default=None, ge=1, le=64)
    memory_mib: int | None = Field(default=None, ge=128, le=262144)
    disk_size: str | int | None = None
    work_disk_size: str | int | None = None
    vmm: str = "auto"
    start: bool = True
    nat: bool | None = None  # None: config `nat`
    allow_private: bool = False
    allow_out: list[str] = Field(default_factory=list)
    forwards: list[str] = Field(default_factory=list, max_length=64)  # -p, forwarder.parse
    from_snapshot: str | None = None  # a clone of this snapshot (`vm snapshot`)
    cold: bool = False  # boot, even when a boot snapshot could be restored (bootsnap)


class VMKillParams(Model):
    name: str = Field(min_length=1, max_length=256)
    signal: str = "KILL"


class EgressParams(Model):
    name: str
    nat: bool | None = None  # None: unchanged (implied on with a new allowlist)
    allow_private: bool | None = None  # None: unchanged
    allow_out: list[str] | None = None  # None: unchanged; []: remove the allowlist


class SnapshotParams(Model):
    vm: str = Field(min_length=1, max_length=256)
    name: str


class PortsParams(Model):
    names: list[str] = Field(default_factory=list, max_length=256)


class ForwardParams(Model):
    name: str = Field(min_length=1, max_length=256)
    forward: str = Field(min_length=1, max_length=64)


class ForwardListParams(Model):
    name: str | None = None


# ----------------------------------------------------------------- workspaces

class WorkspaceOrigin(Model):
    """Where a repository sent from another machine came from (``banger --host``): that
    machine's name, the work tree there and its state when it was sent. The daemon keeps
    it in the workspace record for the client's ``vm exec --auto-prepare``."""

    host: str = Field(min_length=1, max_length=255)
    path: str = Field(min_length=1, max_length=4096)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    # Names this one prepare; the client keeps its own record of it (the daemon's copy
    # of the origin is never trusted to name a path on the client).
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")


class WorkspacePrepareParams(Model):
    name: str = Field(min_length=1, max_length=256)
    path: str = Field(min_length=1, max_length=4096)
    guest_path: str | None = None
    branch: str | None = None
    from_ref: str | None = None
    mode: str = "shallow"
    discard_guest_changes: bool = False
    origin: WorkspaceOrigin | None = None


class WorkspaceExportParams(Model):
    name: str = Field(min_length=1, max_length=256)
    base_commit: str | None = None


# ------------------------------------------------------------------- sessions

class SessionStartParams(Model):
    vm: VMRef
    argv: list[str] = Field(min_length=1, max_length=SESSION_MAX_ARGV)
    name: str | None = None
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=SESSION_MAX_ENV)
    tty: bool = False
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)


class SessionRef(Model):
    vm: VMRef
    name: SessionName


class SessionListParams(Model):
    vm: str | None = None
    fresh: bool = True  # False: the rows as last known, no guest read (completion)


class SessionLogsParams(Model):
    vm: VMRef
    name: SessionName
    cursor: str = Field(default="0:0", max_length=40)
    wait_s: float = Field(default=0.0, ge=0, le=30)
    attachment: str | None = Field(default=None, max_length=64)


class SessionSendParams(Model):
    vm: VMRef
    name: SessionName
    text: str = Field(max_length=SESSION_MAX_TEXT)
    newline: bool = True


class SessionStopParams(Model):
    vm: VMRef
    name: SessionName
    timeout_s: float = Field(default=10.0, ge=0, le=300)


class SessionKillParams(Model):
    vm: VMRef
    name: SessionName
    signal: str = Field(default="KILL", max_length=16)


class SessionAttachParams(Model):
    vm: VMRef
    name: SessionName
    write: bool = True


class AttachWriteParams(Model):
    attachment: AttachmentId
    data: str = Field(max_length=(ATTACH_MAX_WRITE * 4) // 3 + 4)


class AttachResizeParams(Model):
    attachment: AttachmentId
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class AttachmentRef(Model):
    attachment: AttachmentId


# --------------------------------------------------------- images and kernels

class ImageBuildParams(Model):
    name: str | None = None


class ImagePullParams(Model):
    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = None
    size_bytes: int | None = None
    kernel: str | None = None
    insecure: bool = False
    # A bundle file a remote client sent: where it read it (HOST:PATH), recorded as the
    # image's origin instead of the sent copy's path (removed after the pull).
    sent_from: str | None = Field(default=None, min_length=1, max_length=4096)


class ImageExportParams(Model):
    name: str = Field(min_length=1, max_length=256)
    output: str = Field(min_length=1, max_length=4096)
    owner_uid: int | None = Field(default=None, ge=0, le=2**32 - 2)
    owner_gid: int | None = Field(default=None, ge=0, le=2**32 - 2)


class KernelPullParams(Model):
    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = None
    insecure: bool = False
    # As ImagePullParams.sent_from: a sent bundle file's HOST:PATH, the kernel's origin.
    sent_from: str | None = Field(default=None, min_length=1, max_length=4096)


class CatalogParams(Model):
    kind: Literal["image", "kernel"] = "image"
    insecure: bool = False


class ImagePromoteParams(Model):
    vm: str = Field(min_length=1, max_length=256)
    name: str


class CachePruneParams(Model):
    dry_run: bool = False


class ImageRegisterParams(Model):
    name: str
    rootfs: str
    kernel: str | None = None
    initrd: str | None = None
    kernel_name: str | None = None


class SetKernelParams(Model):
    name: str
    kernel: str | None = None


class KernelBuildParams(Model):
    name: str = "banger-6.1"
    base_config: str | None = None
    source: str | None = None
    jobs: int | None = Field(default=None, ge=1, le=256)


class KernelImportParams(Model):
    name: str
    paths: list[str] = Field(min_length=1, max_length=2)
    initrd: str | None = None
