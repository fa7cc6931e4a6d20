"""Stand-ins for the ``firecracker`` and ``jailer`` binaries, for contract tests.

The test writes tiny executables (see ``conftest.write_fakes``) that call
:func:`firecracker_main` or :func:`jailer_main`, so banger's real driver
starts them exactly as it would start the real ones: through the runner and
the detaching helper, with the real command line.

The fake Firecracker parses ``--api-sock``/``--id`` (and ``--version``),
serves HTTP on the API socket and checks **every** request against the
published API spec (:mod:`tests.contract.fcspec`) and against the parts of
Firecracker's behaviour banger relies on: pre-boot-only resources, files that
must exist (and be usable by the jailed uid), InstanceStart needing a kernel,
snapshots needing a paused VM, snapshot loads needing a fresh process. It
answers as the spec says (204, JSON for ``GET /``, 400 with
``fault_message``), writes a line to the serial console (its stdout) at
boot, to the logger file, and to the metrics file on FlushMetrics, creates
the vsock socket, and exits after SendCtrlAltDel like a guest booted with
``reboot=k``. Each request goes to a JSON-lines journal the test reads.

A snapshot's state file records the drives' and the vsock socket's paths, as the real
one does: a load reopens those drives (they must exist, as this process sees them)
and binds that socket again. On the vsock socket the fake plays a guest that listens
on every port: a host connection's ``CONNECT <port>`` is answered ``OK`` once the vCPUs
run (never while paused), and what the host then sends is journalled (``vsock``).

The fake jailer validates its arguments like the real one (including
``--cgroup-version``, each ``--cgroup <controller>.<file>=<value>`` and
``--parent-cgroup``) plus banger's own rules (never uid or gid 0, never
``--daemonize``), builds the ``<base>/<exec>/<id>/root`` directory, and execs
the fake Firecracker with ``--id=<id>`` and the arguments after ``--``. It
cannot pivot_root into the jail without a Python inside it, so it tells the
fake Firecracker where the jail is (``FAKE_FC_CHROOT``) and the fake resolves
every path it is given inside that directory, as a jailed process would. It
never touches the host's cgroups: given a fake hierarchy (controller -> root
directory) it makes ``<root>/<parent cgroup>/<id>`` there for each controller a
``--cgroup`` names, as the real jailer does, and journals the values. Given
``--netns`` it joins that network namespace before the exec, and the fake
Firecracker then opens its ``host_dev_name`` TAP there as the jail's uid and gid,
as the real one does (a missing TAP, or one that user may not open, is a fault).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from banger.netns import join_network
from tests.contract.fcspec import FirecrackerSpec, Route

FAKE_VERSION = "1.7.0"
PRE_BOOT_ONLY = {"/machine-config", "/boot-source", "/drives/{drive_id}",
                 "/network-interfaces/{iface_id}", "/vsock", "/logger", "/metrics"}
# Resources that may precede a snapshot load (the spec's /snapshot/load description).
ALLOWED_BEFORE_LOAD = {"/logger", "/metrics"}
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
IFNAMSIZ = 16


class Fault(Exception):
    """A request Firecracker would refuse: becomes 400 + fault_message."""


class Journal:
    """Append-only JSON lines, one file per instance id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mu = threading.Lock()

    def write(self, **entry: Any) -> None:
        entry.setdefault("pid", os.getpid())
        with self._mu, self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")


class FakeVM:
    """The state machine behind the API."""

    def __init__(self, spec: FirecrackerSpec, instance_id: str, root: Path, *,
                 journal: Journal, fail_on: tuple[str, str, str] | None,
                 owner: tuple[int, int] | None) -> None:
        self.spec = spec
        self.id = instance_id
        self.root = root
        self.journal = journal
        self.fail_on = fail_on
        self.owner = owner
        self.state = "Not started"
        self.configured: list[str] = []
        self.root_drive: str | None = None
        self.log_path: Path | None = None
        self.metrics_path: Path | None = None
        self.vsock: socket.socket | None = None
        self.vsock_path: str | None = None
        self.drives: dict[str, str] = {}
        self.exit_reason: str | None = None
        self.mu = threading.Lock()

    # -------------------------------------------------------------- paths

    def host(self, path: str, what: str) -> Path:
        """Where ``path`` (as Firecracker was told it) is on the host."""
        if not path.startswith("/"):
            raise Fault(f"{what}: {path!r} is not an absolute path")
        return self.root / path.lstrip("/")

    def existing(self, path: str, what: str, *, write: bool) -> Path:
        host = self.host(path, what)
        try:
            st = host.stat()
        except OSError as exc:
            raise Fault(f"{what}: cannot open {path}: {exc.strerror}") from exc
        if self.owner is not None and not _allowed(st, *self.owner, write=write):
            raise Fault(f"{what}: {path}: Permission denied (uid {self.owner[0]}, file "
                        f"{st.st_uid}:{st.st_gid} {stat.filemode(st.st_mode)})")
        return host

    # ------------------------------------------------------------ requests

    def handle(self, method: str, path: str, raw: bytes,
               content_type: str | None) -> tuple[int, Any]:
        body: Any = None
        errors: list[str] = []
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                errors.append(f"{method} {path}: body is not JSON: {exc}")
        route, spec_errors = self.spec.validate_request(method, path, body, content_type)
        errors += spec_errors
        status, answer = 204, None
        fault = None
        if errors:
            status, answer = 400, {"fault_message": "request rejected by the API spec: "
                                                    + "; ".join(errors)}
        elif self.fail_on and (method, path) == self.fail_on[:2]:
            status, answer = 400, {"fault_message": self.fail_on[2]}
            fault = "injected"
        else:
            assert route is not None
            try:
                with self.mu:
                    answer = self._apply(route, body)
                status = 200 if answer is not None else 204
            except Fault as exc:
                status, answer = 400, {"fault_message": str(exc)}
                fault = str(exc)
        if route is not None:
            errors += self.spec.validate_response(route, status, answer)
        self.journal.write(method=method, path=path, body=body, status=status,
                           errors=errors, fault=fault)
        return status, answer

    def _apply(self, route: Route, body: Any) -> Any:
        t = route.template
        if t == "/" and route.method == "GET":
            return {"app_name": "Firecracker", "id": self.id, "state": self.state,
                    "vmm_version": FAKE_VERSION}
        if route.method == "PUT" and t in PRE_BOOT_ONLY:
            if self.state != "Not started":
                raise Fault(f"The requested operation is not supported after starting the "
                            f"microVM ({t}).")
            self._configure(t, body)
            self.configured.append(t)
            return None
        if t == "/actions":
            return self._action(body["action_type"])
        if t == "/vm" and route.method == "PATCH":
            if self.state == "Not started":
                raise Fault("The requested operation is not supported before starting the "
                            "microVM.")
            self.state = "Paused" if body["state"] == "Paused" else "Running"
            return None
        if t == "/snapshot/create":
            if self.state != "Paused":
                raise Fault("Cannot create a snapshot of a microVM that is not paused.")
            for key in ("snapshot_path", "mem_file_path"):
                target = self.host(body[key], key)
                if not target.parent.is_dir():
                    raise Fault(f"{key}: {target.parent} does not exist")
                target.write_text(f"fake {key} of {self.id}\n")
            recorded = {"drives": self.drives, "vsock": self.vsock_path}
            with self.host(body["snapshot_path"], "snapshot_path").open("a") as fh:
                fh.write(json.dumps(recorded) + "\n")
            return None
        if t == "/snapshot/load":
            if self.state != "Not started" or set(self.configured) - ALLOWED_BEFORE_LOAD:
                raise Fault("Loading a microVM snapshot not allowed after configuring boot-"
                            "specific resources.")
            state = self.existing(body["snapshot_path"], "snapshot_path", write=False)
            mem = body.get("mem_file_path") or body["mem_backend"]["backend_path"]
            self.existing(mem, "mem_backend", write=False)
            lines = state.read_text().splitlines()
            recorded = json.loads(lines[1]) if len(lines) > 1 else {}
            for drive_id, path in recorded.get("drives", {}).items():
                self.existing(path, f"drive {drive_id}", write=True)
                self.drives[drive_id] = path
            vsock = (body.get("vsock_override") or {}).get("uds_path") or recorded.get("vsock")
            if vsock:
                self._bind_vsock(vsock)
            self.state = "Running" if body.get("resume_vm") else "Paused"
            return None
        raise Fault(f"fake firecracker does not implement {route.method} {t}")

    def _configure(self, template: str, body: dict[str, Any]) -> None:
        if template == "/logger":
            if self.log_path is not None:
                raise Fault("Logger already initialized.")
            self.log_path = self.existing(body["log_path"], "log_path", write=True)
            with self.log_path.open("a") as fh:
                fh.write(f"fake-firecracker {self.id}: logger ready\n")
        elif template == "/metrics":
            if self.metrics_path is not None:
                raise Fault("Reinitialization of metrics not allowed.")
            self.metrics_path = self.existing(body["metrics_path"], "metrics_path", write=True)
        elif template == "/boot-source":
            self.existing(body["kernel_image_path"], "kernel_image_path", write=False)
            if "initrd_path" in body:
                self.existing(body["initrd_path"], "initrd_path", write=False)
        elif template == "/drives/{drive_id}":
            self.existing(body["path_on_host"], "path_on_host",
                          write=not body.get("is_read_only", False))
            self.drives[body["drive_id"]] = body["path_on_host"]
            if body["is_root_device"]:
                if self.root_drive not in (None, body["drive_id"]):
                    raise Fault("A root block device already exists!")
                self.root_drive = body["drive_id"]
        elif template == "/network-interfaces/{iface_id}":
            if len(body["host_dev_name"]) >= IFNAMSIZ:
                raise Fault(f"Open tap device failed: name {body['host_dev_name']!r} too long")
            if "FAKE_FC_NETNS" in os.environ:  # the jailer joined a namespace: open it there
                _attach_tap(body["host_dev_name"])
            if "guest_mac" in body and not _MAC.match(body["guest_mac"]):
                raise Fault(f"Invalid MAC address {body['guest_mac']!r}")
        elif template == "/vsock":
            self._bind_vsock(body["uds_path"])

    def _bind_vsock(self, uds_path: str) -> None:
        target = self.host(uds_path, "uds_path")
        if target.exists() or target.is_symlink():
            raise Fault(f"Cannot create backend for vsock device: {uds_path}: "
                        "Address in use")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind relative to the jail root (our cwd), as a chrooted process would.
        sock.bind(str(target.relative_to(self.root)))
        if self.owner is not None:  # the real one runs as the jail's uid: its sockets are its
            os.chown(target.relative_to(self.root), *self.owner)
        sock.listen(8)
        self.vsock, self.vsock_path = sock, uds_path
        threading.Thread(target=self._serve_vsock, args=(sock,), daemon=True).start()

    def _serve_vsock(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._vsock_connection, args=(conn,), daemon=True).start()

    def _vsock_connection(self, conn: socket.socket) -> None:
        """A host-initiated connection: ``CONNECT <port>``, ``OK`` once the guest runs."""
        with conn:
            conn.settimeout(60)
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                b = conn.recv(1)
                if not b:
                    return
                line += b
            m = re.fullmatch(rb"CONNECT (\d+)\n", line)
            if m is None:
                self.journal.write(event="vsock", error=f"bad request {line!r}")
                return
            deadline = time.monotonic() + 30
            while self.state != "Running":  # a paused guest accepts nothing
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            conn.sendall(b"OK 1073741824\n")
            data = b""
            while len(data) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.journal.write(event="vsock", port=int(m.group(1)),
                               data=data.decode(errors="replace"))

    def _action(self, action: str) -> None:
        if action == "InstanceStart":
            if self.state != "Not started":
                raise Fault("The microVM is already running.")
            if "/boot-source" not in self.configured:
                raise Fault("Cannot start microvm without kernel configuration.")
            self.state = "Running"
            print(f"fake-firecracker {self.id}: guest console: booting", flush=True)
        elif action == "SendCtrlAltDel":
            if self.state != "Running":
                raise Fault("The requested operation is not supported before starting the "
                            "microVM.")
            self.exit_reason = "SendCtrlAltDel"
        elif action == "FlushMetrics":
            if self.metrics_path is None:
                raise Fault("Metrics system not initialized.")
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps({"utc_timestamp_ms": int(time.time() * 1000),
                                     "api_server": {"process_startup_time_us": 1}}) + "\n")


def _allowed(st: os.stat_result, uid: int, gid: int, *, write: bool) -> bool:
    if uid == 0:
        return True
    bits = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH) if write else \
        (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid == gid:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # Firecracker's API listener is a Rust std UnixListener: backlog 128.
    # socketserver's default of 5 fills up on a loaded CI host.
    request_queue_size = 128
    vm: FakeVM


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, answer = self.server.vm.handle(self.command, self.path, raw,
                                               self.headers.get("Content-Type"))
        data = json.dumps(answer).encode() if answer is not None else b""
        try:
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:  # a 204's client may already have hung up: even b"" would EPIPE
                self.wfile.write(data)
            self.wfile.flush()
        finally:
            if self.server.vm.exit_reason is not None:
                # The guest "rebooted": Firecracker exits, as with reboot=k,
                # whether or not the client stayed to read the answer.
                threading.Thread(target=self.server.shutdown, daemon=True).start()

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _options(argv: list[str], name: str) -> list[str]:
    """Every value of a repeatable option (``--cgroup a=1 --cgroup b=2``)."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name and i + 1 < len(argv)]


# The jailer's --cgroup file names are <controller>.<property>, exactly one dot
# (its cgroup.rs, get_controller_from_filename); these are the controllers banger uses.
_CGROUP_FILE = re.compile(r"(memory|pids|cpu)\.[a-z_]+")
_CGROUP_FILES = {"1": {"memory.limit_in_bytes", "pids.max", "cpu.shares"},
                 "2": {"memory.max", "pids.max", "cpu.weight"}}


def _cgroup_problems(version: str, parent: str, values: list[str]) -> list[str]:
    problems = []
    if version not in _CGROUP_FILES:
        problems.append(f"invalid --cgroup-version {version!r}")
    if not parent or parent.startswith("/") or ".." in Path(parent).parts:
        problems.append(f"invalid --parent-cgroup {parent!r}")
    for value in values:
        name, eq, setting = value.partition("=")
        if not eq or not setting or not _CGROUP_FILE.fullmatch(name):
            problems.append(f"invalid --cgroup {value!r}")
        elif name not in _CGROUP_FILES.get(version, set()):
            problems.append(f"--cgroup {name} is not a cgroup v{version} file")
    return problems


def _option(argv: list[str], name: str, default: str | None = None) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def firecracker_main(argv: list[str], *, spec: str, journal_dir: str,
                     fail_on: tuple[str, str, str] | None = None,
                     crash: str | None = None) -> int:
    """The fake ``firecracker`` binary."""
    if "--version" in argv:
        print(f"Firecracker v{FAKE_VERSION}")
        return 0
    api_sock = _option(argv, "--api-sock", "/run/firecracker.socket")
    instance_id = _option(argv, "--id", "anonymous-instance")
    assert api_sock is not None and instance_id is not None
    journal = Journal(Path(journal_dir) / f"{instance_id}.jsonl")
    root = Path(os.environ.get("FAKE_FC_CHROOT") or "/")
    owner = None
    if "FAKE_FC_UID" in os.environ:
        owner = (int(os.environ["FAKE_FC_UID"]), int(os.environ["FAKE_FC_GID"]))
    journal.write(event="start", argv=sys.argv, root=str(root), ppid=os.getppid(),
                  stdin=os.readlink("/proc/self/fd/0"))
    if crash is not None:
        print(crash, file=sys.stderr, flush=True)
        return 1
    os.chdir(root)
    vm = FakeVM(FirecrackerSpec.load(Path(spec)), instance_id, root, journal=journal,
                fail_on=fail_on, owner=owner)
    sock_path = str((root / api_sock.lstrip("/")).relative_to(root))
    server = _Server(sock_path, _Handler)
    if owner is not None:
        os.chown(sock_path, *owner)
    server.vm = vm
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        if vm.vsock is not None:
            vm.vsock.close()
    journal.write(event="exit", reason=vm.exit_reason)
    return 0


# Attach to TAP argv[1] as the jailed Firecracker does: /dev/net/tun (the jail's own node
# is the VMM user's), then TUNSETIFF as uid argv[2]. Exit 0, or the error on stderr.
_ATTACH = r"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
uid, gid = int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
try:
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
except OSError as exc:
    sys.exit(f"{sys.argv[1]}: {exc.strerror}")
"""


def _attach_tap(name: str) -> None:
    """Open TAP ``name`` in this process's network namespace as the jail's uid and gid,
    as Firecracker does with ``host_dev_name`` (it must exist and let that user in)."""
    res = subprocess.run([sys.executable, "-I", "-S", "-c", _ATTACH, name,
                          os.environ["FAKE_FC_UID"], os.environ["FAKE_FC_GID"]],
                         capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise Fault(f"Open tap device failed: {res.stderr.strip()[-300:]}")


def jailer_main(argv: list[str], *, journal_dir: str,
                cgroup_roots: dict[str, str] | None = None) -> int:
    """The fake ``jailer`` binary (``cgroup_roots``: the fake hierarchy, controller -> dir)."""
    sep = argv.index("--") if "--" in argv else len(argv)
    own, extra = argv[:sep], argv[sep + 1:]
    jail_id = _option(own, "--id")
    exec_file = _option(own, "--exec-file")
    uid, gid = _option(own, "--uid"), _option(own, "--gid")
    base = Path(_option(own, "--chroot-base-dir", "/srv/jailer") or "/srv/jailer")
    version = _option(own, "--cgroup-version", "1") or "1"
    cgroups = _options(own, "--cgroup")
    parent = _option(own, "--parent-cgroup", Path(exec_file or "").name) or ""
    netns = _option(own, "--netns")
    problems = _cgroup_problems(version, parent, cgroups)
    if netns is not None and not Path(netns).exists():
        problems.append(f"--netns {netns!r} does not exist")
    if "0" in (uid, gid):
        problems.append(f"banger must not run Firecracker as uid/gid {uid}/{gid}")
    if not jail_id or len(jail_id) > 64 or not re.fullmatch(r"[A-Za-z0-9-]+", jail_id):
        problems.append(f"invalid --id {jail_id!r}")
    if not exec_file or not os.path.isabs(exec_file) or "firecracker" not in Path(exec_file).name:
        problems.append(f"invalid --exec-file {exec_file!r}")
    if uid is None or gid is None or not uid.isdigit() or not gid.isdigit():
        problems.append(f"invalid --uid/--gid {uid!r}/{gid!r}")
    for flag in ("--daemonize", "--new-pid-ns"):
        if flag in own:
            problems.append(f"banger must not pass {flag}")
    journal = Journal(Path(journal_dir) / f"{jail_id or 'unknown'}.jsonl")
    journal.write(event="jailer", argv=argv, problems=problems)
    if problems:
        print("jailer: " + "; ".join(problems), file=sys.stderr, flush=True)
        return 1
    assert jail_id and exec_file and uid and gid
    for value in cgroups:  # <hierarchy>/<parent>/<id>, one per controller named
        name, _, setting = value.partition("=")
        if cgroup_roots is not None:
            group = Path(cgroup_roots[name.split(".")[0]]) / parent / jail_id
            group.mkdir(parents=True, exist_ok=True)
            journal.write(event="cgroup", dir=str(group), file=name, value=setting)
    exec_name = Path(exec_file).name
    root = base / exec_name / jail_id / "root"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(exec_file, root / exec_name)
    os.chown(root, int(uid), int(gid))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FAKE_FC_CHROOT": str(root),
           "FAKE_FC_UID": uid, "FAKE_FC_GID": gid}
    if netns is not None:  # as the jailer does, before it execs Firecracker
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            join_network(fd)
        finally:
            os.close(fd)
        env["FAKE_FC_NETNS"] = netns
    with contextlib.suppress(OSError):
        os.execve(exec_file, [exec_name, f"--id={jail_id}", "--start-time-us=0",
                              "--start-time-cpu-us=0", *extra], env)
    return 127
