"""Test doubles for the daemon's seams. Each has a real counterpart exercised in tests/e2e."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger.errors import (
    BadRequest,
    BangerError,
    CommandFailed,
    GuestError,
    HostError,
    VMMError,
)
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.nft import FirewallSettings
from banger.hostops.policy import Policy
from banger.layout import VMPaths
from banger.proc import ProcessIdentity, identify
from banger.protocol import PROTOCOL_VERSION
from banger.runner import CancelToken, Result, shell_line
from banger.vmm import LaunchPlan
from tests.childsignals import with_default_signals


@dataclass
class FakeRunner:
    """Records argv; answers from ``handlers`` (first matching argv prefix) or succeeds."""

    handlers: list[tuple[tuple[str, ...], Callable[[list[str]], Result]]] = field(
        default_factory=list)
    calls: list[list[str]] = field(default_factory=list)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return [str(a) for a in argv]

    def on(self, prefix: Sequence[str], fn: Callable[[list[str]], Result]) -> None:
        self.handlers.append((tuple(prefix), fn))

    def _answer(self, argv: list[str]) -> Result:
        self.calls.append(argv)
        for prefix, fn in self.handlers:
            if tuple(argv[: len(prefix)]) == prefix:
                return fn(argv)
        return Result(argv, 0, b"", b"")

    def run(self, argv: Sequence[str], *, desc: str, timeout: float = 60.0,
            input: bytes | None = None, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: Path | None = None,
            pass_fds: Sequence[int] = ()) -> Result:
        res = self._answer([str(a) for a in argv])
        if check and res.returncode != 0:
            tail = f"\n{res.err.strip()}" if res.err.strip() else ""
            raise CommandFailed(f"{desc} failed (exit {res.returncode}): {shell_line(argv)}"
                                + tail, stderr=res.err)
        return res

    def stream(self, argv: Sequence[str], *, desc: str, on_line: Callable[[str], None],
               timeout: float = 3600.0, env: Mapping[str, str] | None = None,
               cancel: CancelToken | None = None) -> Result:
        res = self._answer([str(a) for a in argv])
        for line in res.out.splitlines():
            on_line(line)
        if res.returncode != 0:
            raise CommandFailed(f"{desc} failed", stderr=res.err)
        return res

    def ran(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if tuple(c[: len(prefix)]) == prefix]


def real(argv: list[str]) -> Result:
    """A FakeRunner handler that runs the command for real (a tool the host has)."""
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def ok(out: str = "", rc: int = 0, err: str = "") -> Callable[[list[str]], Result]:
    return lambda argv: Result(argv, rc, out.encode(), err.encode())


class FakeNet:
    """Links in a dict instead of the kernel."""

    def __init__(self) -> None:
        self._links: dict[str, str | None] = {}  # name -> master bridge
        self.bridges: dict[str, str] = {}
        self.namespaces: dict[str, tuple[str, tuple[int, int]]] = {}  # name -> port, owner
        self.unnamed: list[str] = []  # names dropped while a VMM held the namespace
        self.made: list[tuple[str, str, tuple[int, int]]] = []  # netns, port, TAP owner
        self._mu = threading.Lock()
        self.fail_tap = False

    def ensure_bridge(self, name: str, cidr: str) -> None:
        with self._mu:
            self.bridges[name] = cidr
            self._links.setdefault(name, None)

    def create_tap(self, name: str, bridge: str) -> None:
        if self.fail_tap:
            raise HostError(f"cannot create tap {name}: injected failure")
        with self._mu:
            if bridge not in self.bridges:
                raise HostError(f"bridge {bridge} is missing")
            if name in self._links:
                raise HostError(f"{name} exists")
            self._links[name] = bridge

    def delete_link(self, name: str) -> None:
        with self._mu:
            self._links.pop(name, None)

    def links(self) -> list[str]:
        with self._mu:
            return list(self._links)

    def taps(self) -> list[str]:
        return [n for n in self.links() if n.startswith("bgt")]

    def create_vm_netns(self, netns: str, port: str, bridge: str,
                        tap_owner: tuple[int, int]) -> None:
        with self._mu:
            if bridge not in self.bridges:
                raise HostError(f"bridge {bridge} is missing")
            if port in self._links or netns in self.namespaces:
                raise HostError(f"{port} or {netns} exists")
            self._links[port] = bridge
            self.namespaces[netns] = (port, tap_owner)
            self.made.append((netns, port, tap_owner))

    def delete_netns(self, netns: str) -> None:
        with self._mu:
            port, _ = self.namespaces.pop(netns, (None, None))
            if port is not None:
                self._links.pop(port, None)

    def unname_netns(self, netns: str) -> None:
        with self._mu:
            self.namespaces.pop(netns, None)  # the port stays: a VMM holds the namespace
            self.unnamed.append(netns)

    def netns_names(self) -> list[str]:
        with self._mu:
            return list(self.namespaces)


def local_hostops(runner: Any, settings: FirewallSettings, net: Any = None,
                  ip_forward: Path | None = None) -> HostOps:
    """In-process host operations under ``settings``' policy, over ``runner`` (nft) and
    ``net`` (links; a fresh :class:`FakeNet` when None)."""
    return HostOps.local(Executor(Policy(settings), runner, net if net is not None else FakeNet(),
                                  ip_forward or Path("/nonexistent/ip_forward")))


class FakeDM:
    """dm targets in a dict, answering a :class:`FakeRunner`'s ``dmsetup``: the
    dm-snapshot path on a kernel without device-mapper (its loop devices are real:
    ``tests/unit/test_blockdev.py``)."""

    def __init__(self, runner: FakeRunner) -> None:
        self.dm: dict[str, str] = {}  # name -> table
        self.fail_create = ""
        runner.on(["dmsetup", "create"], self._create)
        runner.on(["dmsetup", "remove"], self._remove)
        runner.on(["dmsetup", "ls"], self._list)

    def _create(self, argv: list[str]) -> Result:
        if self.fail_create:
            return Result(argv, 1, b"", self.fail_create.encode())
        self.dm[argv[2]] = argv[-1]
        return Result(argv, 0, b"", b"")

    def _remove(self, argv: list[str]) -> Result:
        if self.dm.pop(argv[-1], None) is None:
            return Result(argv, 1, b"", b"device-mapper: remove ioctl failed: No such device")
        return Result(argv, 0, b"", b"")

    def _list(self, argv: list[str]) -> Result:
        out = "".join(f"{name}\t(253:{i})\n" for i, name in enumerate(self.dm))
        return Result(argv, 0, (out or "No devices found\n").encode(), b"")


class FakeVMM:
    """A real sleeping process whose argv carries the VM marker, instead of a VMM."""

    name = "qemu"
    own_port = False
    agent_port = False

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.launched: list[LaunchPlan] = []
        self.shutdown_requests: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.calls: list[tuple[str, str]] = []  # (pause|resume|save|restore, vm id)
        self.fail_pause = False
        self.fail_save = False
        self.fail_reidentify = False
        self.unclonable = False
        self.vmm_version = "fake VMM 1.0"
        self.identities: dict[str, bytes] = {}

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        if self.fail:
            raise VMMError(f"QEMU failed to start {plan.name}: injected failure")
        plan.paths.run.mkdir(parents=True, exist_ok=True)
        # `vm kill` sends it TERM, INT or QUIT: none may arrive ignored.
        proc = subprocess.Popen(
            with_default_signals([sys.executable, "-c", "import time; time.sleep(100000)",
                                  plan.marker, str(plan.paths.state)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.launched.append(plan)
        self.procs.append(proc)
        if plan.restore is not None:
            assert (plan.restore / "memory").is_file(), "restored from an incomplete save"
            self.calls.append(("restore", plan.vm_id))
        for _ in range(200):
            ident = identify(proc.pid, plan.marker)
            if ident is not None:
                return ident
            time.sleep(0.01)
        raise AssertionError("fake VMM did not start")

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        self.shutdown_requests.append(str(plan_paths.state))
        return False

    def pause(self, plan_paths: VMPaths) -> None:
        if self.fail_pause:
            raise VMMError("injected pause failure")
        self.calls.append(("pause", plan_paths.vm_id))

    def resume(self, plan_paths: VMPaths) -> None:
        # Running a guest while its saved state survives would let that state be
        # restored over disks that moved on (banger.daemon.savedstate).
        self.calls.append(("resume-over-saved-state" if plan_paths.saved_state.exists()
                           else "resume", plan_paths.vm_id))

    def save(self, plan_paths: VMPaths, into: Path,
             progress: Callable[[int], None] | None = None) -> int:
        """Writes a stand-in for the guest's memory (``fail_save``: half of it, then fails)."""
        data = f"memory of {plan_paths.vm_id}\n".encode() * 100
        if self.fail_save:
            (into / "memory").write_bytes(data[: len(data) // 2])
            raise VMMError("saving the guest failed: injected")
        (into / "memory").write_bytes(data)
        if progress is not None:
            progress(len(data))
        self.calls.append(("save", plan_paths.vm_id))
        return len(data)

    def version(self) -> str:
        return self.vmm_version

    def check_clonable(self) -> None:
        """Refuses like an unjailed Firecracker with ``unclonable``."""
        if self.unclonable:
            raise BadRequest("injected: this VMM cannot clone", hint="use another")

    def reidentify(self, plan_paths: VMPaths, message: bytes) -> None:
        """Records the identity a clone was handed (``identities``, by VM id)."""
        if self.fail_reidentify:
            raise VMMError("injected identity channel failure")
        self.identities[plan_paths.vm_id] = message
        self.calls.append(("reidentify", plan_paths.vm_id))

    def cleanup(self, plan_paths: VMPaths) -> None:
        return None

    def reap_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


    def poweroff(self, ip: str) -> None:
        """What a guest's own poweroff does to its VMM: the process exits."""
        for plan, proc in zip(self.launched, self.procs, strict=True):
            if f"banger.ip={ip}/" in plan.cmdline and proc.poll() is None:
                proc.kill()
                proc.wait()


@dataclass
class FakeGuest:
    ip: str
    scripts: list[str] = field(default_factory=list)
    on_poweroff: Callable[[str], None] | None = None
    failing: set[str] = field(default_factory=set)  # scripts holding one of these exit 1

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        self.scripts.append(script)
        if any(f in script for f in self.failing):
            if check:
                raise GuestError(f"{desc} failed (exit 1)")
            return Result(["ssh", script], 1, b"", b"")
        if "poweroff" in script and self.on_poweroff is not None:
            self.on_poweroff(self.ip)
        return Result(["ssh", script], 0, b"", b"")

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def argv(self, script: str, *, forwards: Sequence[str] = ()) -> list[str]:
        return ["fake-ssh", *(f"-R{f}" for f in forwards), self.ip, script]


def instant_ssh(guest: Any, **kwargs: Any) -> float:
    """wait_for_ssh seam: the guest is ready at once (if its VMM is alive) when its
    readiness probe passes, on the first try."""
    alive = kwargs["alive"]
    if not alive():
        raise VMMError("the VMM exited while the guest was booting")
    guest.run(kwargs.get("probe", "true"), desc="ssh readiness probe")
    return 0.0


def ssh_until_cancelled(started: threading.Event) -> Callable[..., float]:
    """wait_for_ssh seam: the guest never answers; ``started`` is set once the wait
    began, and the wait ends only when its operation is cancelled (raising Cancelled)."""

    def wait(guest: Any, **kwargs: Any) -> float:
        started.set()
        token = kwargs["cancel"]
        while not token.cancelled:
            time.sleep(0.01)
        token.check()
        return 0.0

    return wait


class RPCSocket:
    """A Unix socket that answers one JSON-RPC request per connection as bangerd frames
    them: ``answer(method, params)`` gives the reply's ``result``, or raises
    :class:`BangerError` for an ``error`` reply. ``asked``: (method, params), in order."""

    def __init__(self, path: Path,
                 answer: Callable[[str, dict[str, Any]], Any]) -> None:
        self.answer = answer
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile("rb").readline())
                assert req["protocol"] == PROTOCOL_VERSION
                self.asked.append((req["method"], req["params"]))
                try:
                    reply: dict[str, Any] = {"id": req["id"],
                                             "result": self.answer(req["method"], req["params"])}
                except BangerError as exc:
                    reply = {"id": req["id"], "error": {
                        "code": -32000, "message": exc.message, "data": {"code": exc.code}}}
                conn.sendall(json.dumps(reply).encode() + b"\n")

