"""The RPC contract between ``banger`` and ``bangerd``: framing, envelopes, value types.

Transport: one Unix stream socket, newline-delimited JSON, one JSON-RPC 2.0
object per line, at most :data:`MAX_FRAME` bytes per line. Every request names
the :data:`PROTOCOL_VERSION` it speaks; the daemon refuses other versions with
``bad_version`` rather than guessing.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from banger.errors import BadRequest, BadVersion, BangerError

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # 1 MiB: generous for any request banger sends, small enough to bound memory

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


def decode_request(frame: bytes) -> Request:
    """Parse one frame into a :class:`Request` or raise the error to send back."""
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}",
                         hint="send one JSON-RPC object per line") from exc
    if not isinstance(obj, dict):
        raise BadRequest("request must be a JSON object")
    if "protocol" in obj and obj["protocol"] != PROTOCOL_VERSION:
        raise BadVersion(
            f"protocol version {obj['protocol']!r} is not supported; "
            f"this daemon speaks {PROTOCOL_VERSION}"
        )
    try:
        return Request.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise BadRequest(f"invalid request: {where}: {first['msg']}") from exc


def request_id_of(frame: bytes) -> int | str | None:
    """Best-effort id from a frame that failed validation, to echo in the error."""
    try:
        obj = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("id"), int | str):
        rid: int | str = obj["id"]
        return rid
    return None


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

    @property
    def busy(self) -> bool:
        """A transition is under way; other lifecycle operations must wait."""
        return self in (VMState.CREATING, VMState.STARTING, VMState.STOPPING, VMState.DELETING)

    def can_become(self, other: VMState) -> bool:
        """True when ``TRANSITIONS`` allows moving from this state to ``other``."""
        return other in TRANSITIONS[self]


TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.CREATING: frozenset({VMState.STOPPED, VMState.STARTING, VMState.RUNNING,
                                 VMState.ERROR, VMState.DELETING}),
    VMState.STOPPED: frozenset({VMState.STARTING, VMState.DELETING}),
    VMState.STARTING: frozenset({VMState.RUNNING, VMState.STOPPING, VMState.STOPPED,
                                 VMState.ERROR, VMState.DELETING}),
    VMState.RUNNING: frozenset({VMState.STOPPING, VMState.STOPPED, VMState.DELETING}),
    VMState.STOPPING: frozenset({VMState.STOPPED, VMState.ERROR}),
    VMState.ERROR: frozenset({VMState.STARTING, VMState.STOPPING, VMState.STOPPED,
                              VMState.DELETING}),
    VMState.DELETING: frozenset({VMState.ERROR}),  # only when removal itself failed
}


class VMSpec(Model):
    """What the user asked for. Never changed by the daemon after create."""

    image: str
    vcpu: int = Field(ge=1, le=64)
    memory_mib: int = Field(ge=128, le=262144)
    disk_size: int = Field(gt=0)
    work_disk_size: int = Field(gt=0)
    vmm: Literal["auto", "qemu", "firecracker"] = "auto"


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
