"""A client for Firecracker's REST API on its Unix socket.

Firecracker is configured entirely through HTTP requests on the socket named
by ``--api-sock``: ``PUT`` a resource before boot, ``PUT /actions`` to start
or poke the guest, ``PATCH /vm`` to pause and resume, ``GET /`` to read the
instance state. A successful ``PUT``/``PATCH`` answers ``204 No Content``; a
refused one answers ``4xx`` with ``{"fault_message": "..."}``.

The transport is :mod:`httpx` over the socket (``HTTPTransport(uds=...)``);
tests pass their own transport. Every failure becomes a
:class:`~banger.errors.VMMError` whose message names the request
(``PUT /drives/rootfs``) and whose ``details`` carry ``method``, ``path``,
``status`` and Firecracker's ``fault_message``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import httpcore
import httpx

from banger.errors import BangerError, InvalidState, VMMError

# Configuration requests touch nothing but Firecracker's own state and answer
# in milliseconds; InstanceStart loads the kernel and initrd into guest memory,
# well under a second even for a large initrd. Ten seconds only trips when the
# VMM is wedged.
REQUEST_TIMEOUT_S = 10.0

# Creating a snapshot writes all of guest memory to disk (GiBs for a big VM on
# a slow disk) and loading one maps it back; give those minutes, not seconds.
SNAPSHOT_TIMEOUT_S = 300.0

# Connections to the socket are local; anything this long is a hung VMM.
CONNECT_TIMEOUT_S = 2.0
# Pause between connect() attempts while the API socket's backlog is full.
BACKLOG_RETRY_S = 0.01

# Longest fault_message kept in an error message (Firecracker's are one line).
FAULT_MAX = 500


class ActionType(StrEnum):
    """The ``action_type`` values ``PUT /actions`` accepts."""

    INSTANCE_START = "InstanceStart"
    SEND_CTRL_ALT_DEL = "SendCtrlAltDel"
    FLUSH_METRICS = "FlushMetrics"


class InstanceState(StrEnum):
    """``GET /`` ``state``, with the transitions the API can make.

    ``Not started`` becomes ``Running`` on InstanceStart, or ``Paused`` when a
    snapshot is loaded without ``resume_vm``; ``Running`` and ``Paused`` swap
    through ``PATCH /vm``. Nothing returns to ``Not started``: a Firecracker
    process boots one guest, once.
    """

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"

    def can_become(self, target: InstanceState) -> bool:
        """Whether the API can move an instance from this state to ``target``."""
        return target in _TRANSITIONS[self]

    def check_can_become(self, target: InstanceState, what: str) -> None:
        """Raise :class:`~banger.errors.InvalidState` unless ``target`` is reachable.

        Args:
            target: The state the caller is about to request.
            what: The operation, for the message (``"pause"``).

        Raises:
            InvalidState: The transition is not one Firecracker makes.
        """
        if not self.can_become(target):
            raise InvalidState(
                f"cannot {what} a Firecracker instance that is {self.value!r}",
                hint=_STATE_HINTS.get(self, ""),
            )


_TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.NOT_STARTED: frozenset({InstanceState.RUNNING, InstanceState.PAUSED}),
    InstanceState.RUNNING: frozenset({InstanceState.PAUSED}),
    InstanceState.PAUSED: frozenset({InstanceState.RUNNING}),
}

_STATE_HINTS: dict[InstanceState, str] = {
    InstanceState.NOT_STARTED: "the guest has not booted yet",
    InstanceState.RUNNING: "the VM is already running",
    InstanceState.PAUSED: "the VM is already paused; resume it first",
}


class SnapshotType(StrEnum):
    """``snapshot_type`` of ``PUT /snapshot/create``."""

    FULL = "Full"
    DIFF = "Diff"


@dataclass(frozen=True)
class InstanceInfo:
    """The answer to ``GET /``."""

    app_name: str
    id: str
    state: InstanceState
    vmm_version: str

    @classmethod
    def from_json(cls, data: Any) -> InstanceInfo:
        """Parse a ``GET /`` body.

        Raises:
            VMMError: The body is not an InstanceInfo object.
        """
        try:
            return cls(
                app_name=str(data["app_name"]),
                id=str(data["id"]),
                state=InstanceState(data["state"]),
                vmm_version=str(data["vmm_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VMMError(f"Firecracker GET / answered an unexpected body: {data!r:.200}",
                           method="GET", path="/") from exc


class UnixSocketTransport(httpx.BaseTransport):
    """httpx's Unix-socket transport, plus a pre-flight ``connect()``.

    httpcore does not close the socket object of a failed Unix ``connect()``
    (it is left to the garbage collector, which warns). Polling a VMM that is
    still starting, or poking one that just exited, fails that way often, so
    each request first connects once itself and closes that socket whatever
    happens; a refused or missing socket then fails here, cleanly, as the
    same ``httpx.ConnectError`` httpx would raise.

    A Unix ``connect()`` with a timeout does not wait for room in a full
    listen backlog, it fails at once with EAGAIN. The pre-flight waits that
    out, as a blocking connect would. Firecracker's API backlog is 128 and
    banger is its only client, so once the pre-flight got in, so does httpx.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._inner = httpx.HTTPTransport(uds=str(socket_path))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Connect once to the socket ourselves, then send ``request`` through httpx.

        Raises:
            httpx.ConnectTimeout: the connect did not finish within the connect timeout.
            httpx.ConnectError: the socket is missing or refuses connections.
        """
        timeout = request.extensions.get("timeout", {}).get("connect", CONNECT_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(max(deadline - time.monotonic(), 0.01))
                    sock.connect(str(self.socket_path))
                break
            except BlockingIOError as exc:  # full backlog: wait, as a blocking connect would
                if time.monotonic() >= deadline:
                    raise httpx.ConnectTimeout("listen backlog full", request=request) from exc
                time.sleep(BACKLOG_RETRY_S)
            except TimeoutError as exc:
                raise httpx.ConnectTimeout(str(exc), request=request) from exc
            except OSError as exc:
                raise httpx.ConnectError(f"{exc.strerror or exc}", request=request) from exc
        return self._inner.handle_request(request)

    def close(self) -> None:
        """Close the wrapped httpx transport and its pooled connections."""
        self._inner.close()


class _SocketStream(httpcore.NetworkStream):
    """httpcore's view of one connected socket (HTTP/1.1, no TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(timeout)
        return self._sock.recv(max_bytes)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._sock.settimeout(timeout)
        self._sock.sendall(buffer)

    def close(self) -> None:
        self._sock.close()


class HandedSocketTransport(httpx.BaseTransport):
    """One request per connection, each connection from ``dial``: how the daemon reaches
    a jailed Firecracker, whose socket the root helper connects to and hands over
    (``fc.connect``). A ``dial`` that fails is httpx's ``ConnectError``, as a missing
    socket is for :class:`UnixSocketTransport`.
    """

    def __init__(self, dial: Callable[[], socket.socket]) -> None:
        self.dial = dial

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a fresh connection and read the whole answer.

        Raises:
            httpx.ConnectError: no connection was handed over.
            httpx.ReadTimeout: the answer did not come within the read timeout.
            httpx.ReadError: the connection broke or the answer was not HTTP.
        """
        try:
            sock = self.dial()
        except (BangerError, OSError) as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        conn = httpcore.HTTP11Connection(origin=httpcore.Origin(b"http", b"localhost", 80),
                                         stream=_SocketStream(sock))
        try:
            answer = conn.handle_request(httpcore.Request(
                method=request.method,
                url=httpcore.URL(scheme=b"http", host=b"localhost", port=80,
                                 target=request.url.raw_path),
                headers=request.headers.raw, content=request.stream,
                extensions=request.extensions))
            body = answer.read()
        except (httpcore.TimeoutException, TimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc), request=request) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        finally:
            conn.close()
        return httpx.Response(answer.status, headers=answer.headers, content=body,
                              request=request)


def _fault_message(resp: httpx.Response) -> str:
    """Firecracker's ``fault_message``, or the raw body when it sent something else."""
    text = resp.text.strip()
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
        fault: str = body["fault_message"]
    else:
        fault = text or resp.reason_phrase or "no error message"
    return fault[:FAULT_MAX]


class FirecrackerAPI:
    """One Firecracker process's API, reached through its Unix socket.

    Use as a context manager (or call :meth:`close`) so the connection is
    released. One instance is not meant to be shared between threads.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        timeout: float = REQUEST_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Prepare a client; nothing is connected until the first request.

        Args:
            socket_path: The API socket (or a symlink to it: ``connect`` follows
                symlinks, which is how a jailed socket is reached by a short path).
                It is checked against the 108-byte limit by whoever built it
                (:class:`~banger.layout.VMPaths`).
            timeout: Default per-request budget in seconds.
            transport: An httpx transport to use instead of the socket (tests).
        """
        self.socket_path = socket_path
        self.timeout = timeout
        self._client = httpx.Client(
            transport=transport or UnixSocketTransport(socket_path),
            # The host part is ignored by Firecracker; httpx needs one.
            base_url="http://localhost",  # timeouts: per request, see request()
        )

    def close(self) -> None:
        """Release the connection."""
        self._client.close()

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- transport

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer, or None for 204.

        Args:
            method: ``GET``, ``PUT`` or ``PATCH``.
            path: The resource, e.g. ``/drives/rootfs``.
            body: The JSON body, if any.
            timeout: Budget for this request in seconds (default: the client's).

        Returns:
            The parsed JSON body of a 2xx answer, or None when it had none.

        Raises:
            VMMError: The socket did not answer in time, could not be reached,
                or Firecracker refused the request (its ``fault_message`` is in
                the message and in ``details``).
        """
        what = f"{method} {path}"
        budget = self.timeout if timeout is None else timeout
        try:
            resp = self._client.request(
                method, path, json=body,
                timeout=httpx.Timeout(budget, connect=min(budget, CONNECT_TIMEOUT_S)),
            )
        except httpx.TimeoutException as exc:
            raise VMMError(
                f"Firecracker API {what} timed out after {budget:g}s on {self.socket_path}",
                method=method, path=path,
            ) from exc
        except httpx.TransportError as exc:
            raise VMMError(
                f"Firecracker API {what}: cannot reach {self.socket_path}: {exc}",
                method=method, path=path,
            ) from exc
        if not resp.is_success:
            fault = _fault_message(resp)
            raise VMMError(
                f"Firecracker refused {what} (HTTP {resp.status_code}): {fault}",
                method=method, path=path, status=resp.status_code, fault_message=fault,
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise VMMError(
                f"Firecracker API {what} answered HTTP {resp.status_code} with non-JSON "
                f"{resp.text[:200]!r}",
                method=method, path=path, status=resp.status_code,
            ) from exc

    # ---------------------------------------------------------- pre-boot config

    def put_machine_config(self, vcpu_count: int, mem_size_mib: int, *,
                           smt: bool = False, track_dirty_pages: bool = False) -> None:
        """``PUT /machine-config``: vCPUs and memory.

        Args:
            vcpu_count: 1 to 32 (Firecracker's limit).
            mem_size_mib: Guest memory in MiB.
            smt: Expose hyper-threading to the guest.
            track_dirty_pages: Needed before a Diff snapshot can be taken.
        """
        self.request("PUT", "/machine-config", {
            "vcpu_count": vcpu_count,
            "mem_size_mib": mem_size_mib,
            "smt": smt,
            "track_dirty_pages": track_dirty_pages,
        })

    def put_boot_source(self, kernel_image_path: str, boot_args: str,
                        initrd_path: str | None = None) -> None:
        """``PUT /boot-source``: the kernel, its command line and an optional initrd.

        Args:
            kernel_image_path: An uncompressed ELF kernel (vmlinux), as the VMM sees it.
            boot_args: The kernel command line.
            initrd_path: The initramfs, as the VMM sees it, if any.
        """
        body: dict[str, Any] = {"kernel_image_path": kernel_image_path, "boot_args": boot_args}
        if initrd_path is not None:
            body["initrd_path"] = initrd_path
        self.request("PUT", "/boot-source", body)

    def put_drive(self, drive_id: str, path_on_host: str, *, is_root_device: bool,
                  is_read_only: bool = False, cache_type: str = "Unsafe") -> None:
        """``PUT /drives/{drive_id}``: a virtio-blk disk.

        Drives appear in the guest in the order they are added (``/dev/vda``,
        ``/dev/vdb``...), except that the root device always comes first.

        Args:
            drive_id: Name of the drive; also the last path component.
            path_on_host: Backing file or block device, as the VMM sees it.
            is_root_device: Firecracker adds ``root=/dev/vda`` for this one.
            is_read_only: Attach read-only.
            cache_type: ``Unsafe`` (no flush to the host) or ``Writeback``
                (guest flushes reach the host disk).
        """
        self.request("PUT", f"/drives/{drive_id}", {
            "drive_id": drive_id,
            "path_on_host": path_on_host,
            "is_root_device": is_root_device,
            "is_read_only": is_read_only,
            "cache_type": cache_type,
        })

    def put_network_interface(self, iface_id: str, host_dev_name: str,
                              guest_mac: str | None = None) -> None:
        """``PUT /network-interfaces/{iface_id}``: a virtio-net NIC on a host TAP.

        Args:
            iface_id: Name of the interface; also the last path component.
            host_dev_name: The TAP device (it must exist; Firecracker opens it).
            guest_mac: The guest's MAC address, if fixed.
        """
        body: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": host_dev_name}
        if guest_mac is not None:
            body["guest_mac"] = guest_mac
        self.request("PUT", f"/network-interfaces/{iface_id}", body)

    def put_vsock(self, guest_cid: int, uds_path: str) -> None:
        """``PUT /vsock``: a virtio-vsock device backed by a host Unix socket.

        Args:
            guest_cid: The guest's context id (3 or more).
            uds_path: Where Firecracker listens for host-initiated connections.
        """
        self.request("PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": uds_path})

    def put_logger(self, log_path: str, *, level: str = "Info", show_level: bool = True,
                   show_log_origin: bool = False) -> None:
        """``PUT /logger``: where Firecracker writes its own log.

        Args:
            log_path: An existing file or FIFO, as the VMM sees it.
            level: ``Error``, ``Warning``, ``Info``, ``Debug``, ``Trace`` or ``Off``.
            show_level: Prefix lines with their level.
            show_log_origin: Prefix lines with the source file and line.
        """
        self.request("PUT", "/logger", {
            "log_path": log_path,
            "level": level,
            "show_level": show_level,
            "show_log_origin": show_log_origin,
        })

    def put_metrics(self, metrics_path: str) -> None:
        """``PUT /metrics``: where Firecracker appends its JSON metrics lines.

        Args:
            metrics_path: An existing file or FIFO, as the VMM sees it.
        """
        self.request("PUT", "/metrics", {"metrics_path": metrics_path})

    # ---------------------------------------------------------------- actions

    def action(self, action_type: ActionType) -> None:
        """``PUT /actions`` with ``action_type``."""
        self.request("PUT", "/actions", {"action_type": action_type.value})

    def instance_start(self) -> None:
        """Boot the configured guest."""
        self.action(ActionType.INSTANCE_START)

    def send_ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the guest's i8042 keyboard (x86 only).

        A guest booted with ``reboot=k`` reboots through the keyboard
        controller, which makes Firecracker exit: this is its power button.
        """
        self.action(ActionType.SEND_CTRL_ALT_DEL)

    def flush_metrics(self) -> None:
        """Write a metrics line now instead of at the next periodic flush."""
        self.action(ActionType.FLUSH_METRICS)

    # ----------------------------------------------------------- state, snapshots

    def instance_info(self) -> InstanceInfo:
        """``GET /``: id, version and run state."""
        return InstanceInfo.from_json(self.request("GET", "/"))

    def pause(self) -> None:
        """``PATCH /vm`` to ``Paused``: stop the vCPUs (needed before a snapshot)."""
        self.request("PATCH", "/vm", {"state": "Paused"})

    def resume(self) -> None:
        """``PATCH /vm`` to ``Resumed``: run the vCPUs again."""
        self.request("PATCH", "/vm", {"state": "Resumed"})

    def create_snapshot(self, snapshot_path: str, mem_file_path: str, *,
                        snapshot_type: SnapshotType = SnapshotType.FULL) -> None:
        """``PUT /snapshot/create`` of a paused VM.

        Args:
            snapshot_path: Where the device/vCPU state goes, as the VMM sees it.
            mem_file_path: Where guest memory goes, as the VMM sees it.
            snapshot_type: Full, or Diff (needs ``track_dirty_pages``).
        """
        self.request("PUT", "/snapshot/create", {
            "snapshot_type": snapshot_type.value,
            "snapshot_path": snapshot_path,
            "mem_file_path": mem_file_path,
        }, timeout=SNAPSHOT_TIMEOUT_S)

    def load_snapshot(
        self,
        snapshot_path: str,
        mem_file_path: str,
        *,
        resume_vm: bool = False,
        track_dirty_pages: bool = False,
        network_overrides: dict[str, str] | None = None,
    ) -> None:
        """``PUT /snapshot/load`` into a fresh Firecracker process.

        Only the logger and metrics may be configured before this.

        Args:
            snapshot_path: The state file, as the VMM sees it.
            mem_file_path: The memory file, as the VMM sees it (``File`` backend).
            resume_vm: Run the vCPUs right after loading.
            track_dirty_pages: Allow Diff snapshots of the restored VM.
            network_overrides: ``iface_id -> TAP`` for NICs whose TAP differs
                from the one recorded in the snapshot. Only Firecracker
                releases that know ``network_overrides`` accept this; leave it
                None when the TAP names match.
        """
        body: dict[str, Any] = {
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "track_dirty_pages": track_dirty_pages,
            "resume_vm": resume_vm,
        }
        if network_overrides:
            body["network_overrides"] = [
                {"iface_id": iface, "host_dev_name": tap}
                for iface, tap in sorted(network_overrides.items())
            ]
        self.request("PUT", "/snapshot/load", body, timeout=SNAPSHOT_TIMEOUT_S)
