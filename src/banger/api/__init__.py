"""The RPC contract between ``banger`` and ``bangerd``: framing, envelopes, value types.

Transport: one Unix stream socket, newline-delimited JSON, one JSON-RPC 2.0
object per line, at most :data:`MAX_FRAME` bytes per line. Every request names
the :data:`PROTOCOL_VERSION` it speaks; the daemon refuses other versions with
``bad_version`` rather than guessing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError

from banger.config import Config
from banger.errors import BadRequest, BadVersion, BangerError
from banger.protocol import MAX_FRAME, PROTOCOL_VERSION

# JSON-RPC 2.0 numeric codes (jsonrpc.org/specification section 5.1); banger's
# stable string code travels in error.data.code.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
SERVER_ERROR = -32000


class UnknownMethod(BadRequest):
    code = "unknown_method"
    default_hint = "the CLI and daemon may differ; `banger daemon stop` restarts it"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Request(Model):
    jsonrpc: Literal["2.0"]
    id: int | str
    method: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = {}
    protocol: int


def encode(obj: dict[str, Any]) -> bytes:
    """One frame: compact JSON plus newline."""
    data = json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
    if len(data) > MAX_FRAME:
        raise BadRequest(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return data


def _parse(frame: bytes) -> Any:
    """``frame`` as a JSON value, or :class:`BadRequest` naming why it is not one.

    Every way decoding can refuse input becomes a ``BadRequest``: invalid UTF-8,
    malformed JSON text, nesting deeper than the interpreter's
    recursion limit (``RecursionError``), and an integer of more than
    ``sys.get_int_max_str_digits()`` digits (a plain ``ValueError`` since Python
    3.11). A string holding a lone UTF-16 surrogate (``"\\ud800"``, valid JSON but no
    Unicode text) is refused too, so no handler ever sees one.
    """
    try:
        obj = json.loads(frame.decode("utf-8"))  # strict: never json's UTF-16/32 guessing
    except RecursionError as exc:
        raise BadRequest("malformed JSON: nested too deeply",
                         hint="send one JSON-RPC object per line") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}",
                         hint="send one JSON-RPC object per line") from exc
    except UnicodeDecodeError as exc:
        raise BadRequest(f"malformed JSON: not UTF-8 text ({exc.reason} at byte {exc.start})",
                         hint="send one JSON-RPC object per line, UTF-8 encoded") from exc
    except ValueError as exc:
        # json raises a bare ValueError only for an integer longer than the int-string
        # conversion limit (4300 digits by default).
        raise BadRequest(f"malformed JSON: a number has more than "
                         f"{sys.get_int_max_str_digits()} digits",
                         hint="send one JSON-RPC object per line") from exc
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise BadRequest("malformed JSON: a string holds a lone UTF-16 surrogate",
                         hint="strings must be valid Unicode text") from exc
    except (ValueError, RecursionError) as exc:  # cannot happen for what loads accepted
        raise BadRequest(f"malformed JSON: {exc}"[:200]) from exc
    return obj


def first_error(exc: ValidationError, whole: str, *, extra: str | None = None) -> str:
    """The first error pydantic found, as ``FIELD: MESSAGE`` (``whole`` names the value
    itself when the error is not about one field); ``extra``, when given, is what an
    unexpected field's message reads."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or whole
    msg = extra if extra is not None and first["type"] == "extra_forbidden" else first["msg"]
    return f"{where}: {msg}"


def decode_request(frame: bytes) -> Request:
    """Parse one frame into a :class:`Request` or raise the error to send back.

    Raises:
        BadRequest: the frame is not JSON (its message starts ``malformed JSON``) or not
            a valid request.
        BadVersion: the request names another protocol version.
    """
    obj = _parse(frame)
    if not isinstance(obj, dict):
        raise BadRequest("request must be a JSON object")
    if "protocol" in obj and obj["protocol"] != PROTOCOL_VERSION:
        raise BadVersion(
            f"protocol version {_short(obj['protocol'])} is not supported; "
            f"this daemon speaks {PROTOCOL_VERSION}"
        )
    try:
        return Request.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {first_error(exc, 'request')}") from exc


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: a client's value quoted in a message."""
    scalar = isinstance(value, int | float | str | bool | None)
    text = repr(value) if scalar else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def request_id_of(frame: bytes) -> int | str | None:
    """Best-effort id from a frame that failed validation, to echo in the error."""
    try:
        obj = _parse(frame)
    except BadRequest:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("id"), int | str) \
            and not isinstance(obj.get("id"), bool):
        rid: int | str = obj["id"]
        return rid
    return None


def config_values(cfg: Config) -> dict[str, Any]:
    """The effective values of ``cfg`` (defaults filled in), JSON-ready and flat.

    A table's keys are flattened to ``table.key`` (``vm_defaults.vcpu``) so a change
    can be named precisely; a list (``file_sync``) is one value.
    """
    flat: dict[str, Any] = {}
    for key, value in cfg.model_dump(mode="json").items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[key] = value
    return flat


def config_hash(values: dict[str, Any]) -> str:
    """A short digest of :func:`config_values` output: equal exactly when the values are."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def changed_keys(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two :func:`config_values` results, sorted."""
    missing = object()
    return sorted(k for k in mine.keys() | theirs.keys()
                  if mine.get(k, missing) != theirs.get(k, missing))


def error_response(req_id: int | str | None, err: BangerError, numeric: int) -> dict[str, Any]:
    """A JSON-RPC error object for ``err``.

    ``numeric`` is the JSON-RPC error number (e.g. ``INVALID_PARAMS``); banger's own
    stable code, hint and details travel in ``data`` (:meth:`BangerError.to_data`).
    """
    return {
        "jsonrpc": "2.0",
        "id": req_id,
        "error": {"code": numeric, "message": err.message, "data": err.to_data()},
    }


def result_response(req_id: int | str, result: Any) -> dict[str, Any]:
    """A JSON-RPC success object carrying ``result``."""
    return {"jsonrpc": "2.0", "id": req_id, "result": result}


# --------------------------------------------------------------------------- values


class VMState(StrEnum):
    """A VM's lifecycle state. ``TRANSITIONS`` lists the legal moves."""

    CREATING = "creating"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    DELETING = "deleting"
    ERROR = "error"
    # The VMM runs with the guest's vCPUs stopped (`vm pause`); memory stays in place.
    PAUSED = "paused"
    # The guest's memory and device state are being written to disk (`vm suspend`) ...
    SUSPENDING = "suspending"
    # ... and were: no VMM runs, and `vm start` resumes the guest where it was.
    SUSPENDED = "suspended"
    # The guest is stopped while its memory, devices and disks are copied to a snapshot
    # (`vm snapshot`); it then runs (or stays paused) as before.
    SNAPSHOTTING = "snapshotting"
    # A clone of a boot snapshot, restored with its vCPUs stopped and kept for the next
    # create of its image and size (``vmpool``). Not a user's VM: no command names it.
    POOLED = "pooled"

    @property
    def busy(self) -> bool:
        """A transition is under way; other lifecycle operations must wait."""
        return self in (VMState.CREATING, VMState.STARTING, VMState.STOPPING, VMState.DELETING,
                        VMState.SUSPENDING, VMState.SNAPSHOTTING)

    def can_become(self, other: VMState) -> bool:
        """True when ``TRANSITIONS`` allows moving from this state to ``other``."""
        return other in TRANSITIONS[self]


TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.CREATING: frozenset({VMState.STOPPED, VMState.STARTING, VMState.RUNNING,
                                 VMState.ERROR, VMState.DELETING, VMState.POOLED}),
    VMState.STOPPED: frozenset({VMState.STARTING, VMState.DELETING}),
    # A failed resume of a suspended VM leaves it suspended: its saved state is kept.
    VMState.STARTING: frozenset({VMState.RUNNING, VMState.STOPPING, VMState.STOPPED,
                                 VMState.ERROR, VMState.DELETING, VMState.SUSPENDED}),
    VMState.RUNNING: frozenset({VMState.STOPPING, VMState.STOPPED, VMState.DELETING,
                                VMState.PAUSED, VMState.SUSPENDING, VMState.SNAPSHOTTING}),
    VMState.STOPPING: frozenset({VMState.STOPPED, VMState.ERROR}),
    VMState.ERROR: frozenset({VMState.STARTING, VMState.STOPPING, VMState.STOPPED,
                              VMState.DELETING}),
    VMState.DELETING: frozenset({VMState.ERROR}),  # only when removal itself failed
    VMState.PAUSED: frozenset({VMState.RUNNING, VMState.STOPPING, VMState.DELETING,
                               VMState.SUSPENDING, VMState.SNAPSHOTTING}),
    # A suspend that fails leaves the guest as it was (running or paused), or failed.
    VMState.SUSPENDING: frozenset({VMState.SUSPENDED, VMState.RUNNING, VMState.PAUSED,
                                   VMState.ERROR}),
    VMState.SUSPENDED: frozenset({VMState.STARTING, VMState.DELETING}),
    # A snapshot leaves the guest as it was (running or paused), or failed.
    VMState.SNAPSHOTTING: frozenset({VMState.RUNNING, VMState.PAUSED, VMState.ERROR}),
    # Taken by a create (which renames it), or removed.
    VMState.POOLED: frozenset({VMState.CREATING, VMState.DELETING}),
}


class VMSpec(Model):
    """What the user asked for. Only the user changes it after create (the egress
    fields, with ``vm set-egress``)."""

    image: str
    vcpu: int = Field(ge=1, le=64)
    memory_mib: int = Field(ge=128, le=262144)
    disk_size: int = Field(gt=0)
    work_disk_size: int = Field(gt=0)
    vmm: Literal["auto", "qemu", "firecracker"] = "auto"
    # The guest network (banger.daemon.firewall): out to the world through NAT, and
    # with it the private and special ranges too. Rows from before these existed
    # read as False: closed.
    nat: bool = False
    allow_private: bool = False
    # Egress allowlist (banger.egress): normalised entries; empty for none.
    allow_out: list[str] = Field(default_factory=list, max_length=64)
    # Port forwards opened at every start (`-p`): "HOST_ADDR:HOST_PORT:GUEST_PORT".
    forwards: list[str] = Field(default_factory=list, max_length=64)
    # Raw disks attached after the work disk. Set only inside the daemon (image
    # finalize's helper VM, banger.daemon.imagefinalize), never by a request.
    extra_disks: list[str] = Field(default_factory=list, max_length=2)


class WorkspaceView(Model):
    guest_path: str
    host_path: str
    base_commit: str | None = None  # None: the host repository had no commit yet
    branch: str | None = None
    mode: str = "shallow"
    prepared_at: datetime | None = None
    prepared: bool = False
    files: int = 0
    bytes: int = 0
    error: str | None = None


class SavedStateView(Model):
    """A suspended guest's saved memory and device state."""

    bytes: int
    saved_at: datetime
    vmm: str


class VMView(Model):
    """A VM as the CLI sees it: spec, then what is true now."""

    id: str
    name: str
    state: VMState
    spec: VMSpec
    vmm: str
    ip: str
    mac: str
    created_at: datetime
    updated_at: datetime
    pid: int | None = None
    tap: str | None = None
    last_error: str | None = None
    stop_reason: str | None = None
    workspace: WorkspaceView | None = None
    # How the running VMM is confined (qemuproc.QemuDriver.confinement): user, seccomp,
    # cgroup path and limits; None when stopped or for an unconfined VMM.
    confinement: dict[str, Any] | None = None
    # Port forwards open now ("HOST_ADDR:HOST_PORT:GUEST_PORT"; banger.daemon.forwards).
    forwards: list[str] = Field(default_factory=list)
    # A suspended VM's saved state (banger.daemon.savedstate): bytes on disk and when.
    suspended: SavedStateView | None = None
    # The snapshot a clone was restored from (`vm create --from-snapshot`).
    from_snapshot: str | None = None
    from_pool: bool = False  # taken ready-restored from the pool (config pool_size)
    # Its guest agent answered (banger.agent): `vm exec`/`vm run` commands skip SSH.
    agent: bool = False


class VMDetail(VMView):
    """``vm show``: the view, and the guest changes a workspace re-prepare saved
    (patch files, oldest first)."""

    workspace_backups: list[str] = Field(default_factory=list)


class ForwardView(Model):
    """A port forward (``vm forward``): host address and port to the guest's port."""

    name: str  # the VM
    host_addr: str
    host_port: int
    guest_port: int
    guest: str  # IP:PORT
    open: bool  # listening now (the VM runs and the port could be bound)
    from_create: bool  # a `-p` of the VM's spec, reopened at every start


class SnapshotView(Model):
    """A snapshot (``vm snapshot``): what ``vm create --from-snapshot`` clones."""

    id: str
    name: str
    kind: Literal["user", "boot"]  # boot: made by banger at an image's first boot (bootsnap)
    image: str
    source_vm: str
    vmm: str
    vcpu: int
    memory_mib: int
    disk_size: int
    work_disk_size: int
    size_bytes: int
    created_at: datetime


class ImageView(Model):
    name: str
    source: str
    rootfs: str
    kernel: str
    initrd: str | None
    kernel_name: str | None = None
    size_bytes: int
    created_at: datetime
    recipe_hash: str | None = None
    origin: str | None = None  # a pulled image's REFERENCE@MANIFEST-DIGEST


class OpView(Model):
    id: str
    kind: str
    target: str
    stage: str
    stages: list[str]
    progress: str = ""
    done: bool
    error: dict[str, Any] | None = None
    result: Any = None
    started_at: datetime
    updated_at: datetime


class SSHInfo(Model):
    """What the CLI needs to run the system ssh against a VM."""

    name: str
    ip: str
    user: str
    key_path: str
    known_hosts: str
    workdir: str | None = None
    # The socket of the OpenSSH master this boot's commands share (bangerd's, in a 0700
    # directory it owns); the CLI uses it only when it runs as that directory's owner.
    control_path: str | None = None
    # The VM's runtime directory when its guest agent answers there (banger.agent): the
    # CLI runs a command that needs no terminal through it, under the same rule.
    agent_dir: str | None = None
    # Who answered: the CLI's fast path (banger.cli.quick) trusts this reply only from a
    # daemon of its own version that read a config file with the same bytes as it did.
    daemon_version: str | None = None
    config_sha256: str | None = None


# ------------------------------------------------------- views of the other methods

# Timestamps in the form the daemon writes them, so that a view dumps back to the JSON
# it was read from (``--json`` prints what the daemon sent): kernels with
# ``datetime.isoformat()``, sessions with ``str(datetime)`` (a space before the time:
# :func:`encode`'s ``default=str``). The views above are pydantic's own dumps.
IsoTime = Annotated[datetime, PlainSerializer(datetime.isoformat, return_type=str,
                                              when_used="json")]
SpacedTime = Annotated[datetime, PlainSerializer(str, return_type=str, when_used="json")]


def _from_base64(value: Any) -> Any:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


# Bytes that travel base64-encoded (a session's output need not be text).
Base64Data = Annotated[bytes, BeforeValidator(_from_base64),
                       PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str,
                                       when_used="json")]


class KernelView(Model):
    """A registered guest kernel (``kernel list/show``)."""

    name: str
    vmlinux: str | None  # ELF, for Firecracker (and QEMU when it has a PVH entry)
    bzimage: str | None  # for QEMU
    initrd: str | None
    vmms: list[str]
    version: str | None
    source: str  # imported, built or bundle
    size_bytes: int
    created_at: IsoTime
    origin: str | None = None  # a pulled kernel's bundle: URL-OR-PATH#sha256:DIGEST


class CatalogEntry(Model):
    """A bundle the catalog (config ``catalog_url``) lists (``image list --available``)."""

    name: str
    version: str
    kind: Literal["image", "kernel"]
    url: str
    sha256: str
    size_bytes: int


class BundleMember(Model):
    size: int
    sha256: str


class BundleView(Model):
    """An image written as a bundle (``image export``): the file, its digest and manifest."""

    name: str
    path: str
    size_bytes: int
    sha256: str
    members: dict[str, BundleMember]
    kernel: dict[str, str | None]  # the boot files' names in the bundle


class PrunedBlob(Model):
    digest: str
    size_bytes: int


class CachePruneView(Model):
    """``image cache prune``: the blobs removed (with ``dry_run``: that would be)."""

    removed: list[PrunedBlob]
    freed_bytes: int
    dry_run: bool
    kept: int  # blobs kept because an image was pulled from them


class EgressView(Model):
    """A VM's egress policy after ``vm set-egress``."""

    name: str
    applied: bool  # the running VM's rules changed now (False: from its next start)
    nat: bool
    allow_private: bool
    allow_out: list[str]


class VMLogs(Model):
    """``vm logs``: the serial console log's path and its last 128 KiB."""

    name: str
    path: str
    content: str


class ListenerView(Model):
    """One listening socket in a guest."""

    proto: str  # tcp or udp
    address: str
    port: int
    process: str | None
    pid: int | None
    endpoint: str | None  # NAME.vm:PORT; None: bound to the guest's loopback only


class PortsView(Model):
    """``vm ports``: one running VM's listening sockets, or why they could not be read."""

    name: str
    ip: str
    listeners: list[ListenerView]
    error: str | None


class SessionAttached(Model):
    readers: int
    writer: bool


class SessionView(Model):
    """A guest session (``vm session list/show``)."""

    vm: str
    name: str
    ref: str  # VM/NAME
    argv: list[str]
    cwd: str
    tty: bool
    env_keys: list[str]  # the values are never stored
    state: Literal["starting", "running", "ended"]
    pid: int | None
    exit_code: int | None
    signal: int | None  # the signal that ended it
    end_reason: str | None
    started_at: SpacedTime
    ended_at: SpacedTime | None
    attached: SessionAttached
    # Sent only when the guest was read just now (its VM runs): output so far.
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    stale: bool = False  # ``vm.session.list`` only: the guest could not be read


class SessionLogs(Model):
    """A chunk of a session's output (``vm session logs``); ``next`` continues after it."""

    stdout: Base64Data
    stderr: Base64Data
    next: str  # "OUT:ERR" byte offsets
    ended: bool
    more: bool  # a full chunk: more output is waiting
    exit_code: int | None
    end_reason: str | None


class SessionAttachment(Model):
    """An attachment to a session (``vm session attach``): its id, and where its output
    continues."""

    attachment: str
    writer: bool
    tty: bool
    vm: str
    name: str
    next: str
