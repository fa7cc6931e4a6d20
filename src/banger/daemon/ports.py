"""``vm ports``: what running guests listen on, read with ``ss`` inside each guest.

The answer comes from the guest, which is untrusted: its output is capped at
:data:`MAX_OUTPUT` bytes (the ssh process is killed past that), at most
:data:`MAX_SOCKETS` sockets are kept, and each line must parse as ``ss`` prints it
or it is skipped. Process names are cut to printable text. Several VMs are asked at
once, one thread each, with no lock held while a guest answers.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.daemon.vms import resolve_running
from banger.daemon.workspace.transfer import OutputTooLarge, run_script
from banger.errors import BangerError

if TYPE_CHECKING:
    from banger.daemon.core import Daemon
    from banger.daemon.store import VMRecord

log = logging.getLogger("banger.ports")

MAX_OUTPUT = 256 << 10
MAX_SOCKETS = 1024
MAX_PROCESS_NAME = 64
TIMEOUT_S = 20.0
# Listening TCP and bound UDP sockets, numeric, with their processes, no header.
SCRIPT = "exec ss -H -l -n -p -t -u"

_PROCESS = re.compile(r'users:\(\("((?:[^"\\]|\\.){1,256})",pid=(\d{1,10}),')
_PORT = re.compile(r"^(.*):(\d{1,5})$")


@dataclass(frozen=True)
class Listener:
    """One listening socket in a guest."""

    proto: str  # "tcp" or "udp"
    address: str  # "0.0.0.0", "::", "127.0.0.1", "*" ...
    port: int
    process: str | None
    pid: int | None


def parse_ss(text: str) -> list[Listener]:
    """The listeners in ``ss -H -l -n -p -t -u`` output; lines that do not parse are
    skipped, duplicates dropped, at most :data:`MAX_SOCKETS` kept, sorted by port."""
    seen: dict[tuple[str, str, int], Listener] = {}
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[0] not in ("tcp", "udp"):
            continue
        local = _split_address(fields[4])
        if local is None:
            continue
        address, port = local
        process, pid = None, None
        m = _PROCESS.search(fields[5]) if len(fields) > 5 else None
        if m:
            process = _printable(m.group(1))
            pid = int(m.group(2))
        key = (fields[0], address, port)
        if key not in seen:
            seen[key] = Listener(fields[0], address, port, process, pid)
        if len(seen) >= MAX_SOCKETS:
            break
    return sorted(seen.values(), key=lambda x: (x.port, x.proto, x.address))


def _split_address(text: str) -> tuple[str, int] | None:
    """``0.0.0.0:22``, ``[::]:22``, ``*:68``, ``127.0.0.53%lo:53`` -> (address, port)."""
    m = _PORT.match(text)
    if not m:
        return None
    address, port = m.group(1), int(m.group(2))
    if not 0 < port < 65536:
        return None
    address = address.split("%", 1)[0]  # the interface a socket is bound to
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address or len(address) > 64 or not re.fullmatch(r"[0-9A-Fa-f.:*]+", address):
        return None
    return address, port


def _printable(name: str) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in name)
    return clean[:MAX_PROCESS_NAME]


def ports(d: Daemon, refs: list[str]) -> list[dict[str, Any]]:
    """``vm ports``: each VM's listeners (``refs``: named VMs, which must be running;
    none: every running VM), with the ``<name>.vm:PORT`` endpoint (:func:`endpoint`).

    A VM whose guest cannot be asked gets an ``error`` instead of its listeners.

    Raises:
        NotFound: a named VM does not exist.
        NotRunning: a named VM is not running.
    """
    if refs:
        targets = []
        for ref in dict.fromkeys(refs):
            targets.append(resolve_running(d, ref))
    else:
        targets = [vm for vm in d.db.list_vms() if vm.state == VMState.RUNNING]
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(targets)),
                            thread_name_prefix="ports") as pool:
        return list(pool.map(lambda vm: _one(d, vm), targets))


def _one(d: Daemon, vm: VMRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"name": vm.name, "ip": vm.ip, "listeners": [], "error": None}
    try:
        res = run_script(d.dial(vm.id, vm.ip), SCRIPT, step=f"list {vm.name}'s listening sockets",
                         timeout=TIMEOUT_S, stdout_cap=MAX_OUTPUT)
    except OutputTooLarge:
        out["error"] = f"the guest printed more than {MAX_OUTPUT >> 10} KiB"
        return out
    except BangerError as exc:
        out["error"] = exc.message
        return out
    out["listeners"] = [{**asdict(x), "endpoint": endpoint(vm.name, x)}
                        for x in parse_ss(res.stdout.decode(errors="replace"))]
    return out


def endpoint(vm_name: str, listener: Listener) -> str | None:
    """Where the host reaches ``listener``: ``<name>.vm:PORT``, or None for a socket
    bound to the guest's loopback only."""
    if listener.address.startswith("127.") or listener.address == "::1":
        return None
    return f"{vm_name}.vm:{listener.port}"
