"""``vm session``: long-running guest commands that outlive the client and the daemon.

A session lives in its guest (files, a supervisor: :mod:`banger.daemon.session.scripts`)
and in the store (a ``sessions`` row: what was started, and what is known once the VM
stops). While the VM runs the guest is the truth: every ``list``/``show`` reads the
guests' status (one ssh per VM) and brings the rows up to date; so does a VM start and
a daemon's start-up, which re-adopts running VMs (:class:`SessionCap`). A VM that stops
ends its running sessions ("the VM stopped"); a deleted VM takes its rows along (the
foreign key cascades) and its controllers (:mod:`banger.daemon.sessionctl`).

No lock is held while a guest answers: rows are read, the guest is asked, the rows are
written. A start or removal bumps the VM's session generation, and a status read taken
before such a change is not applied (it could describe the session's predecessor).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from banger.api import VMState
from banger.api.params import ATTACH_MAX_WRITE, SESSION_MAX_ARGV, SESSION_MAX_ENV, SESSION_MAX_TEXT
from banger.daemon.guest import Guest
from banger.daemon.session import quote, scripts, step_error
from banger.daemon.session.status import GuestSession, parse_logs, parse_status
from banger.daemon.sessionctl import Writer
from banger.daemon.store import SessionRecord, VMRecord, now
from banger.daemon.vms import not_running, resolve, resolve_running, user_vms
from banger.daemon.workspace.transfer import OutputTooLarge, run_script
from banger.errors import (
    AlreadyExists,
    BadRequest,
    BangerError,
    Busy,
    GuestError,
    InvalidState,
    NotFound,
)
from banger.names import check_name, is_dns_label

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.sessions")

STATUS_CAP = 256 << 10  # bytes of status output read from one guest
LOG_CHUNK = 256 << 10  # bytes of each log per read (base64 in the reply stays < 1 MiB)
# One guest step (start, status, send): a TCG guest on a loaded two-core host can take
# tens of seconds to accept an ssh connection.
GUEST_TIMEOUT_S = 90.0
READY_S = 30.0  # how long `start` waits for the guest to say the command runs
MAX_ARG = 16 << 10  # bytes per argument (the argument count: api.params)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

STARTING, RUNNING, ENDED = "starting", "running", "ended"
VM_STOPPED = "the VM stopped"
LOST = "its supervisor in the guest is gone"
GONE = "its files in the guest are gone"


@dataclass(frozen=True)
class StartRequest:
    """What ``session start`` asks for, checked by :func:`check_request`."""

    vm: str
    argv: tuple[str, ...]
    name: str | None = None
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    tty: bool = False
    rows: int = 24
    cols: int = 80


def check_request(req: StartRequest) -> None:
    """Refuse a start request that cannot work, before anything happens.

    Raises:
        BadRequest: no command, too many or too long arguments, a bad env key, a
            relative cwd, a NUL byte anywhere, or a terminal size out of range.
    """
    if not req.argv:
        raise BadRequest("no command given", hint="banger vm session start VM -- CMD [ARG...]")
    if len(req.argv) > SESSION_MAX_ARGV or any(len(a) > MAX_ARG for a in req.argv):
        raise BadRequest(f"the command is too long (at most {SESSION_MAX_ARGV} arguments of "
                         f"{MAX_ARG >> 10} KiB)")
    if req.name is not None:
        check_name(req.name, "session")
    if req.cwd is not None and (not req.cwd.startswith("/") or len(req.cwd) > 4096):
        raise BadRequest(f"--cwd {req.cwd!r} must be an absolute guest path")
    if len(req.env) > SESSION_MAX_ENV:
        raise BadRequest(f"at most {SESSION_MAX_ENV} --env values")
    for key, value in req.env:
        if not _ENV_KEY.fullmatch(key):
            raise BadRequest(f"--env {key!r}: not a variable name",
                             hint="use NAME=VALUE with NAME made of letters, digits and _")
        if len(value) > MAX_ARG:
            raise BadRequest(f"--env {key}: the value is over {MAX_ARG >> 10} KiB")
    if not (1 <= req.rows <= 1000 and 1 <= req.cols <= 1000):
        raise BadRequest("terminal size out of range (1-1000 rows and columns)")
    for text in (*req.argv, req.cwd or "", *(v for kv in req.env for v in kv)):
        quote(text)  # a NUL byte: BadRequest


# ------------------------------------------------------------------ views


def signal_of(exit_code: int | None) -> int | None:
    """The signal that killed a command, from its shell-style status (128+N)."""
    if exit_code is not None and 128 < exit_code <= 128 + 64:
        return exit_code - 128
    return None


def reason_for(exit_code: int) -> str:
    """Why a session with this status ended, in words."""
    sig = signal_of(exit_code)
    return f"killed by signal {sig}" if sig is not None else f"exited with status {exit_code}"


def view(d: Daemon, vm: VMRecord, rec: SessionRecord,
         guest: GuestSession | None = None) -> dict[str, Any]:
    """A session as ``session list/show`` report it."""
    ctl = d.sessions.peek(rec.vm_id, rec.name)
    readers, writer = ctl.counts() if ctl is not None else (0, False)
    out: dict[str, Any] = {
        "vm": vm.name, "name": rec.name, "ref": f"{vm.name}/{rec.name}",
        "argv": list(rec.argv), "cwd": rec.cwd, "tty": rec.tty, "env_keys": list(rec.env_keys),
        "state": rec.state, "pid": rec.pid, "exit_code": rec.exit_code,
        "signal": signal_of(rec.exit_code), "end_reason": rec.end_reason,
        "started_at": rec.started_at, "ended_at": rec.ended_at,
        "attached": {"readers": readers, "writer": writer},
    }
    if guest is not None:
        out["stdout_bytes"], out["stderr_bytes"] = guest.out_bytes, guest.err_bytes
    return out


# ------------------------------------------------------------------ guest status


def read_status(d: Daemon, vm: VMRecord, names: tuple[str, ...] = ()) -> dict[str, GuestSession]:
    """What ``vm``'s guest says about its sessions (all, or ``names``)."""
    try:
        res = run_script(d.dial(vm.id, vm.ip), scripts.status(names), step="read session status",
                         timeout=GUEST_TIMEOUT_S, stdout_cap=STATUS_CAP, check=False)
    except OutputTooLarge as exc:
        raise GuestError(f"VM {vm.name!r} printed more than {STATUS_CAP >> 10} KiB of "
                         "session status") from exc
    if res.returncode != 0:
        raise step_error(f"read the sessions of VM {vm.name}", res)
    return parse_status(res.stdout.decode(errors="replace"))


def refresh(d: Daemon, vm: VMRecord, names: tuple[str, ...] = (), *, adopting: bool = False
            ) -> tuple[list[SessionRecord], dict[str, GuestSession]]:
    """Bring ``vm``'s session rows (all, or ``names``) in line with its guest; returns
    (rows, guest view).

    ``adopting`` (a daemon re-adopting the VM, or the VM just started): rows left
    ``starting`` by a start that never finished are settled too.
    """
    def rows() -> list[SessionRecord]:
        return [r for r in d.db.list_sessions(vm.id) if not names or r.name in names]

    gen = d.sessions.generation(vm.id)
    guest = read_status(d, vm, names)
    if d.sessions.generation(vm.id) != gen:
        # A start or removal landed while we read: the read may predate it.
        return rows(), guest
    for rec in rows():
        changes = _changes(rec, guest.get(rec.name), adopting=adopting)
        if changes:
            with contextlib.suppress(NotFound):  # removed meanwhile
                d.db.update_session(rec, **changes)
            if changes.get("state") == ENDED:
                log.info("session %s/%s ended: %s", vm.name, rec.name,
                         changes.get("end_reason"))
    return rows(), guest


def _changes(rec: SessionRecord, gs: GuestSession | None, *, adopting: bool
             ) -> dict[str, Any]:
    """The row changes that what the guest says about ``rec`` calls for."""
    if rec.state == STARTING and not adopting:
        return {}  # its start is still in progress, and settles it
    if rec.state == ENDED:
        # It exited on its own before its VM stopped: the guest kept the status.
        if (rec.exit_code is None and rec.end_reason == VM_STOPPED and gs is not None
                and gs.exit_code is not None):
            return {"exit_code": gs.exit_code, "end_reason": reason_for(gs.exit_code),
                    "ended_at": gs.ended or rec.ended_at}
        return {}
    if gs is None:
        return {"state": ENDED, "end_reason": GONE, "ended_at": now()}
    if gs.exit_code is not None:
        return {"state": ENDED, "exit_code": gs.exit_code, "pid": gs.pid or rec.pid,
                "end_reason": reason_for(gs.exit_code), "ended_at": gs.ended or now()}
    if gs.alive:
        return {"state": RUNNING, "pid": gs.pid} if (rec.state, rec.pid) != (RUNNING,
                                                                             gs.pid) else {}
    if not gs.same_boot:
        return {"state": ENDED, "end_reason": VM_STOPPED, "ended_at": now()}
    if not gs.started_ok and rec.state == STARTING:
        return {}  # the supervisor is still starting it
    return {"state": ENDED, "end_reason": LOST, "ended_at": now()}


# ------------------------------------------------------------------ commands


def _running_vm(d: Daemon, ref: str) -> VMRecord:
    return resolve_running(d, ref, "sessions run in running VMs")


def _session(d: Daemon, vm: VMRecord, name: str) -> SessionRecord:
    rec = d.db.find_session(vm.id, name) if is_dns_label(name) else None
    if rec is None:
        raise NotFound(f"VM {vm.name!r} has no session {name!r}",
                       hint=f"see `banger vm session list {vm.name}`")
    return rec


def default_name(d: Daemon, vm: VMRecord, argv: tuple[str, ...]) -> str:
    """A free session name from the command: ``python3``, then ``python3-2``, ..."""
    base = re.sub(r"[^a-z0-9-]+", "-", argv[0].rsplit("/", 1)[-1].lower()).strip("-")[:40]
    base = base if is_dns_label(base) else "session"
    taken = {s.name for s in d.db.list_sessions(vm.id)}
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        if name not in taken:
            return name
    raise AlreadyExists(f"VM {vm.name!r} has too many sessions named {base}-N",
                        hint="remove ended ones with `banger vm session rm`")


def default_cwd(vm: VMRecord) -> str:
    """The VM's prepared workspace, else ``/root``."""
    ws = vm.workspace or {}
    path = ws.get("guest_path") if ws.get("prepared") else None
    return path if isinstance(path, str) and path.startswith("/") else "/root"


def start(d: Daemon, req: StartRequest) -> dict[str, Any]:
    """``session start``: run ``req.argv`` detached in the guest; returns once the guest
    says it runs (or has already ended: then its status says how).

    Raises:
        BadRequest: see :func:`check_request`; the cwd is not a guest directory; the
            image lacks ``setsid`` or (``--tty``) ``script``.
        NotFound: no such VM.
        NotRunning: the VM is not running.
        AlreadyExists: the VM has a session of that name.
        GuestError: the guest did not start it (nothing is left behind).
    """
    check_request(req)
    vm = _running_vm(d, req.vm)
    name = req.name or default_name(d, vm, req.argv)
    cwd = req.cwd or default_cwd(vm)
    env = dict(req.env)
    rec = SessionRecord(vm_id=vm.id, name=name, argv=req.argv, cwd=cwd, tty=req.tty,
                        state=STARTING, env_keys=tuple(sorted(env)))
    d.db.add_session(rec)  # the name is ours from here: a second start gets AlreadyExists
    d.sessions.bump(vm.id)
    guest = d.dial(vm.id, vm.ip)
    try:
        _launch(guest, vm, rec, env, req)
        gs = (d.seams.wait_session_ready or wait_ready)(guest, name, READY_S)
    except BaseException:
        d.db.delete_session(vm.id, name)
        d.sessions.bump(vm.id)
        raise
    changes = _changes(rec, gs, adopting=True)
    rec = d.db.update_session(rec, **(changes or {"state": RUNNING, "pid": gs.pid}))
    log.info("session %s/%s started: %s", vm.name, name, rec.state)
    return view(d, vm, rec, gs)


def _launch(guest: Guest, vm: VMRecord, rec: SessionRecord, env: dict[str, str],
            req: StartRequest) -> None:
    cmd = scripts.launcher(rec.name, rec.argv, rec.cwd, env, tty=rec.tty, rows=req.rows,
                           cols=req.cols)
    res = run_script(guest, scripts.start(rec.name, rec.cwd, tty=rec.tty),
                     step=f"start session {rec.name}", input=cmd.encode(),
                     timeout=GUEST_TIMEOUT_S, check=False)
    refusals = {
        scripts.NO_CWD: BadRequest(f"--cwd {rec.cwd!r} is not a directory in VM {vm.name!r}",
                                   hint="create it first, or pick another --cwd"),
        scripts.NO_SETSID: BadRequest(f"VM {vm.name!r} has no `setsid` (util-linux)",
                                      hint="sessions need util-linux in the image"),
        scripts.NO_SCRIPT: BadRequest(f"VM {vm.name!r} has no `script` (util-linux)",
                                      hint="--tty sessions need it; start without --tty"),
        scripts.NOT_EMPTY: AlreadyExists(
            f"VM {vm.name!r} still runs a session called {rec.name!r} that banger does "
            "not know", hint="pick another --name"),
    }
    if res.returncode in refusals:
        raise refusals[res.returncode]
    if res.returncode != 0:
        raise step_error(f"start session {rec.name}", res)


def wait_ready(guest: Guest, name: str, timeout: float) -> GuestSession:
    """The ready seam: poll the guest until session ``name``'s command runs or has ended.

    Raises:
        GuestError: not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        res = run_script(guest, scripts.status((name,)), step="session readiness",
                         timeout=GUEST_TIMEOUT_S, stdout_cap=STATUS_CAP, check=False)
        gs = parse_status(res.stdout.decode(errors="replace")).get(name)
        if gs is not None and gs.started_ok:
            return gs
        if time.monotonic() > deadline:
            raise GuestError(f"session {name!r} did not start within {timeout:g}s",
                             hint="the guest may be overloaded; see `banger vm logs`")
        time.sleep(0.1)


def list_sessions(d: Daemon, vm_ref: str | None, *, fresh: bool = True
                  ) -> list[dict[str, Any]]:
    """``session list [VM]``: sessions of one VM or all, running VMs' read fresh (with
    ``fresh`` off, none: the rows as last known, for shell completion).

    A guest that cannot be read keeps its rows as last known, with ``stale`` set.
    """
    vms = [resolve(d, vm_ref)] if vm_ref else user_vms(d)
    running = [vm for vm in vms if fresh and vm.state == VMState.RUNNING
               and d.db.list_sessions(vm.id)]

    def one(vm: VMRecord) -> tuple[str, dict[str, GuestSession] | None]:
        try:
            return vm.id, refresh(d, vm)[1]
        except BangerError as exc:
            log.warning("sessions of %s: %s", vm.name, exc.message)
            return vm.id, None

    read: dict[str, dict[str, GuestSession] | None] = {}
    if running:
        with ThreadPoolExecutor(max_workers=min(8, len(running)),
                                thread_name_prefix="sessions") as pool:
            read = dict(pool.map(one, running))
    out = []
    for vm in vms:
        guest = read.get(vm.id)
        for rec in d.db.list_sessions(vm.id):
            item = view(d, vm, rec, guest.get(rec.name) if guest else None)
            item["stale"] = not fresh or (vm.id in read and guest is None)
            out.append(item)
    return out


def show(d: Daemon, vm_ref: str, name: str) -> dict[str, Any]:
    """``session show VM/NAME``."""
    vm = resolve(d, vm_ref)
    rec = _session(d, vm, name)
    guest: dict[str, GuestSession] = {}
    if vm.state == VMState.RUNNING:
        _rows, guest = refresh(d, vm, (name,))
        rec = _session(d, vm, name)
    return view(d, vm, rec, guest.get(name))


def logs(d: Daemon, vm_ref: str, name: str, *, cursor: str = "0:0", wait_s: float = 0.0,
         attachment: str | None = None) -> dict[str, Any]:
    """``session logs``: the session's output after ``cursor`` (``"OUT:ERR"`` byte
    offsets; ``next`` in the reply continues), waiting up to ``wait_s`` for some.

    Bytes travel base64-encoded (``stdout``/``stderr``): a terminal's output need
    not be text, and a chunk may end inside a character.

    Raises:
        NotRunning: the VM is not running (the logs are on its work disk).
    """
    if attachment is None:
        return _logs(d, vm_ref, name, cursor, wait_s)
    with d.sessions.by_attachment(attachment).held(attachment):
        return _logs(d, vm_ref, name, cursor, wait_s)


def _logs(d: Daemon, vm_ref: str, name: str, cursor: str, wait_s: float) -> dict[str, Any]:
    out_off, err_off = parse_cursor(cursor)
    vm = resolve(d, vm_ref)
    rec = _session(d, vm, name)
    if vm.state != VMState.RUNNING:
        raise not_running(vm, "a session's logs are read from its guest")
    try:
        res = run_script(d.dial(vm.id, vm.ip), scripts.logs(name, out_off, err_off, cap=LOG_CHUNK,
                                                     wait_s=wait_s),
                         step=f"read session {name}'s logs", timeout=GUEST_TIMEOUT_S + wait_s,
                         stdout_cap=2 * LOG_CHUNK + 64, check=False)
    except OutputTooLarge as exc:
        raise GuestError("the guest sent more log bytes than asked for") from exc
    if res.returncode == 3:
        raise NotFound(f"session {name!r} has no files in VM {vm.name!r}",
                       hint="they were removed in the guest")
    if res.returncode != 0:
        raise step_error(f"read session {name}'s logs", res)
    out, err, exited = parse_logs(res.stdout, LOG_CHUNK)
    if exited and rec.state != ENDED:
        refresh(d, vm, (name,))  # record how it ended
        rec = _session(d, vm, name)
    ended = rec.state == ENDED
    return {
        "stdout": base64.b64encode(out).decode(), "stderr": base64.b64encode(err).decode(),
        "next": f"{out_off + len(out)}:{err_off + len(err)}",
        "ended": ended, "more": len(out) == LOG_CHUNK or len(err) == LOG_CHUNK,
        "exit_code": rec.exit_code, "end_reason": rec.end_reason,
    }


def parse_cursor(cursor: str) -> tuple[int, int]:
    """``"OUT:ERR"`` -> byte offsets.

    Raises:
        BadRequest: not two non-negative decimal numbers.
    """
    m = re.fullmatch(r"([0-9]{1,15}):([0-9]{1,15})", cursor)
    if m is None:
        raise BadRequest(f"bad log position {cursor!r}",
                         hint="use the `next` value a previous `logs --json` printed, "
                              "e.g. 0:0")
    return int(m.group(1)), int(m.group(2))


def _live(d: Daemon, vm_ref: str, name: str
          ) -> tuple[VMRecord, SessionRecord, GuestSession | None]:
    """A running VM's session that has not ended (read fresh), and what its guest says."""
    vm = _running_vm(d, vm_ref)
    _session(d, vm, name)
    _rows, guest = refresh(d, vm, (name,))
    rec = _session(d, vm, name)
    if rec.state == ENDED:
        raise InvalidState(f"session {name!r} has ended ({rec.end_reason})",
                           hint=f"its output: `banger vm session logs {vm.name}/{name}`")
    return vm, rec, guest.get(name)


def send(d: Daemon, vm_ref: str, name: str, text: str, newline: bool = True) -> dict[str, Any]:
    """``session send``: write ``text`` (and a newline) to the session's stdin.

    Raises:
        Busy: a client attached for writing holds the session's input.
        InvalidState: the session has ended.
    """
    data = (text + ("\n" if newline else "")).encode()
    if len(data) > SESSION_MAX_TEXT:
        raise BadRequest(f"at most {SESSION_MAX_TEXT >> 10} KiB per send")
    vm, _rec, _gs = _live(d, vm_ref, name)
    ctl = d.sessions.peek(vm.id, name)
    if ctl is not None and ctl.counts()[1]:
        raise Busy(f"a client is attached to session {name!r} for writing",
                   hint="type into that attach, or detach it first (Ctrl-P Ctrl-Q)")
    res = run_script(d.dial(vm.id, vm.ip), scripts.send(name), step=f"send to session {name}",
                     input=data, timeout=GUEST_TIMEOUT_S, check=False)
    if res.returncode == 3:
        raise InvalidState(f"session {name!r} has ended")
    if res.returncode != 0:
        raise step_error(f"send to session {name}", res)
    return {"vm": vm.name, "name": name, "sent": len(data)}


SIGNALS = {"TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT", "WINCH"}


def stop(d: Daemon, vm_ref: str, name: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """``session stop``: SIGTERM to its process group, SIGKILL after ``timeout_s``."""
    if not 0 <= timeout_s <= 300:
        raise BadRequest("--timeout must be between 0 and 300 seconds")
    return _signal(d, vm_ref, name, "TERM", then_kill_after_s=timeout_s)


def kill(d: Daemon, vm_ref: str, name: str, sig: str = "KILL") -> dict[str, Any]:
    """``session kill``: send ``sig`` (default KILL) to its process group."""
    sig = sig.upper().removeprefix("SIG")
    if sig not in SIGNALS:
        raise BadRequest(f"unknown signal {sig!r}", hint="one of " + ", ".join(sorted(SIGNALS)))
    return _signal(d, vm_ref, name, sig)


def _signal(d: Daemon, vm_ref: str, name: str, sig: str,
            then_kill_after_s: float | None = None) -> dict[str, Any]:
    vm, _rec, _gs = _live(d, vm_ref, name)
    script = scripts.signal(name, sig, then_kill_after_s=then_kill_after_s)
    res = run_script(d.dial(vm.id, vm.ip), script, step=f"signal session {name}",
                     timeout=GUEST_TIMEOUT_S + (then_kill_after_s or 0), check=False)
    if res.returncode not in (0, 3):
        raise step_error(f"signal session {name}", res)
    return show(d, vm.name, name)


def remove(d: Daemon, vm_ref: str, name: str) -> dict[str, Any]:
    """``session rm``: forget an ended session and delete its guest files.

    Raises:
        InvalidState: it still runs (stop it first).
    """
    vm = resolve(d, vm_ref)
    rec = _session(d, vm, name)
    if vm.state == VMState.RUNNING:
        refresh(d, vm, (name,))
        rec = _session(d, vm, name)
    if rec.state != ENDED:
        raise InvalidState(f"session {name!r} is {rec.state}",
                           hint=f"stop it first: `banger vm session stop {vm.name}/{name}`")
    if vm.state == VMState.RUNNING:
        res = run_script(d.dial(vm.id, vm.ip), scripts.remove(name), step=f"remove session {name}",
                         timeout=GUEST_TIMEOUT_S, check=False)
        if res.returncode != 0:
            raise step_error(f"remove session {name}'s files", res)
    # On a stopped VM the files stay on its work disk; a new session of this name
    # replaces them.
    d.db.delete_session(vm.id, name)
    d.sessions.bump(vm.id)
    d.sessions.drop(lambda v, n: (v, n) == (vm.id, name))
    return {"vm": vm.name, "removed": name}


# ------------------------------------------------------------------ attach


def attach(d: Daemon, vm_ref: str, name: str, write: bool) -> dict[str, Any]:
    """``session attach``: a new attachment; with ``write`` it holds the session's input.

    Reads go through :func:`logs` with the attachment's id (which renews it).

    Raises:
        Busy: ``write`` and another client holds the input.
        InvalidState: the session has ended.
    """
    vm, rec, gs = _live(d, vm_ref, name)
    ctl = d.sessions.controller(vm.id, name)
    att = ctl.attach(writer=write)
    d.sessions.remember(att)
    if write:
        guest = d.dial(vm.id, vm.ip)
        proc = guest.popen(scripts.writer(name), stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
        ctl.set_stream(att, Writer(proc))
    return {"attachment": att.id, "writer": write, "tty": rec.tty, "vm": vm.name, "name": name,
            "next": f"{gs.out_bytes}:{gs.err_bytes}" if gs else "0:0"}


def write(d: Daemon, attachment: str, data: str) -> dict[str, Any]:
    """Queue base64 ``data`` for the session's input (the writer attachment only)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise BadRequest("data is not base64") from exc
    if len(raw) > ATTACH_MAX_WRITE:
        raise BadRequest(f"at most {ATTACH_MAX_WRITE >> 10} KiB per write")
    d.sessions.by_attachment(attachment).stream_for(attachment).put(raw)
    return {"written": len(raw)}


def resize(d: Daemon, attachment: str, rows: int, cols: int) -> dict[str, Any]:
    """Set a ``--tty`` session's window size (the writer attachment only)."""
    if not (1 <= rows <= 1000 and 1 <= cols <= 1000):
        raise BadRequest("terminal size out of range (1-1000 rows and columns)")
    ctl = d.sessions.by_attachment(attachment)
    ctl.stream_for(attachment)  # only the writer steers the terminal
    vm = resolve(d, ctl.vm_id)
    res = run_script(d.dial(vm.id, vm.ip), scripts.resize(ctl.name, rows, cols),
                     step=f"resize session {ctl.name}", timeout=GUEST_TIMEOUT_S, check=False)
    return {"resized": res.returncode == 0}


def detach(d: Daemon, attachment: str) -> dict[str, Any]:
    """End an attachment (unknown ones are not an error: its lease may have run out)."""
    try:
        ctl = d.sessions.by_attachment(attachment)
    except NotFound:
        return {"detached": False}
    ctl.detach(attachment)
    d.sessions.forget_attachment(attachment)
    return {"detached": True}


# ------------------------------------------------------------------ lifecycle


class SessionCap:
    """Sessions follow their VM: re-read when it starts or is re-adopted, ended when
    it stops, gone when it is deleted."""

    name = "sessions"

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def started(self, vm: VMRecord) -> None:
        """Re-read the guest's sessions in the background (it may take an ssh round trip;
        a start or a daemon's start-up does not wait for it). A paused guest would not
        answer: its sessions are re-read when it runs again (``vm resume``)."""
        if vm.state == VMState.PAUSED or not self.d.db.list_sessions(vm.id):
            return

        def body() -> None:
            try:
                refresh(self.d, vm, adopting=True)
            except BangerError as exc:
                log.warning("sessions of %s not re-read: %s", vm.name, exc.message)

        self.d.in_background(f"sessions-{vm.name}", body)

    def stopped(self, vm: VMRecord) -> None:
        """Its running sessions ended with it; their attachments end too."""
        self.d.sessions.drop(lambda v, _n: v == vm.id)
        when = now()
        for rec in self.d.db.list_sessions(vm.id):
            if rec.state != ENDED:
                with contextlib.suppress(NotFound):
                    self.d.db.update_session(rec, state=ENDED, end_reason=VM_STOPPED,
                                             ended_at=when)

    def deleted(self, vm: VMRecord) -> None:
        """Its rows went with it (the foreign key); its controllers go now."""
        self.d.sessions.drop(lambda v, _n: v == vm.id)

    def suspended(self, vm: VMRecord) -> None:
        """Its sessions run on in the saved guest; their attachments end now."""
        self.d.sessions.drop(lambda v, _n: v == vm.id)

