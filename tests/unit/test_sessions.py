"""Guest sessions through the daemon's real code, with the guest-side scripts run by
the host's ``sh`` in a temporary directory (real processes, FIFOs, signals, a real
pseudo-terminal from util-linux ``script``). The VMs themselves are fakes; the e2e
suite runs the same scripts in real guests."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import pytest

from banger.api.params import CreateParams
from banger.cli import attach as attach_cli
from banger.cli.attach import KeyFilter
from banger.cli.session import split_ref
from banger.daemon import sessionctl, sessions, vmcreate, vmdelete, vmpower
from banger.daemon.core import Daemon
from banger.daemon.session import scripts
from banger.daemon.session.status import parse_logs, parse_status
from banger.daemon.sessionctl import LEASE_S
from banger.daemon.store import SessionRecord
from banger.errors import (
    AlreadyExists,
    BadRequest,
    Busy,
    GuestError,
    InvalidState,
    NotFound,
    NotRunning,
)
from banger.runner import Result
from banger.sdk import Client
from tests.conftest import FakeWorld
from tests.fakes import FakeGuest


class HostShellGuest(FakeGuest):
    """Session scripts (and only those: never a poweroff) run with the host's sh."""

    def _ours(self, script: str) -> bool:
        return scripts.ROOT in script

    def argv(self, script: str, *, forwards: Sequence[str] = ()) -> list[str]:
        if not self._ours(script):
            return super().argv(script, forwards=forwards)
        return ["sh", "-c", script]

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        if not self._ours(script):
            return super().run(script, timeout=timeout, input=input, check=check, desc=desc)
        proc = subprocess.run(["sh", "-c", script], input=input or b"", capture_output=True,
                              timeout=timeout, check=False)
        return Result(["sh"], proc.returncode, proc.stdout, proc.stderr)

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        assert self._ours(script), script
        return subprocess.Popen(["sh", "-c", script], **kwargs)


@pytest.fixture
def box(daemon: Daemon, world: FakeWorld, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    root = tmp_path / "guest" / ".banger" / "sessions"
    monkeypatch.setattr(scripts, "ROOT", str(root))
    vm = vmcreate.create_sync(daemon, CreateParams(name="box"))
    world.guests[str(vm["ip"])] = HostShellGuest(str(vm["ip"]), on_poweroff=world.vmm.poweroff)
    yield "box"
    for pid_file in root.glob("*/pid"):  # whatever a failed test left running
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def start(d: Daemon, *argv: str, **kw: Any) -> dict[str, Any]:
    return sessions.start(d, sessions.StartRequest(vm="box", argv=argv, **kw))


def read_all(d: Daemon, name: str, until: str, timeout: float = 20) -> tuple[str, str, str]:
    """Follow the logs as `logs -f` does until ``until`` shows up in stdout."""
    out, err, cursor = b"", b"", "0:0"
    deadline = time.monotonic() + timeout
    while until.encode() not in out:
        assert time.monotonic() < deadline, (out, err)
        r = sessions.logs(d, "box", name, cursor=cursor, wait_s=1)
        out += base64.b64decode(r["stdout"])
        err += base64.b64decode(r["stderr"])
        cursor = r["next"]
    return out.decode(), err.decode(), cursor


def wait_ended(d: Daemon, name: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (s := sessions.show(d, "box", name))["state"] != "ended":
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    return s


def test_a_session_runs_detached_takes_input_and_records_its_exit(daemon: Daemon,
                                                                   box: str) -> None:
    s = start(daemon, "sh", "-c", 'echo "in $PWD as $GREETING"; echo oops >&2; read x; '
              'echo "read $x"; exit 7', name="talk", cwd="/tmp", env=(("GREETING", "hi"),))
    assert (s["name"], s["state"], s["ref"]) == ("talk", "running", "box/talk")
    assert s["pid"] > 0 and s["env_keys"] == ["GREETING"]
    out, _err, cursor = read_all(daemon, "talk", "as hi")
    assert out == "in /tmp as hi\n"
    assert sessions.send(daemon, "box", "talk", "hello")["sent"] == 6
    out, err, _ = read_all(daemon, "talk", "read hello")
    assert out == "in /tmp as hi\nread hello\n" and err == "oops\n"
    ended = wait_ended(daemon, "talk")
    assert (ended["exit_code"], ended["signal"]) == (7, None)
    assert ended["end_reason"] == "exited with status 7"
    # --since: only what came after the cursor
    r = sessions.logs(daemon, "box", "talk", cursor=cursor)
    assert base64.b64decode(r["stdout"]) == b"read hello\n" and r["ended"]
    with pytest.raises(InvalidState, match="has ended"):
        sessions.send(daemon, "box", "talk", "too late")


def test_stop_terminates_the_whole_group_and_kill_sends_a_signal(daemon: Daemon,
                                                                 box: str) -> None:
    start(daemon, "sh", "-c", "sleep 300 & wait", name="sleepy")
    s = sessions.stop(daemon, "box", "sleepy", timeout_s=5)
    assert s["state"] == "ended" and s["signal"] == 15, s
    start(daemon, "sh", "-c", "trap '' TERM; while :; do sleep 0.1; done", name="stubborn")
    s = sessions.stop(daemon, "box", "stubborn", timeout_s=0.5)
    assert s["state"] == "ended" and s["signal"] == 9, s  # SIGKILL after the timeout
    start(daemon, "sleep", "300", name="hup")
    s = sessions.kill(daemon, "box", "hup", "hup")
    assert s["signal"] == 1, s
    with pytest.raises(BadRequest, match="unknown signal"):
        sessions.kill(daemon, "box", "hup", "NOPE")


def test_a_tty_session_runs_on_a_terminal_that_follows_resizes(daemon: Daemon,
                                                               box: str) -> None:
    s = start(daemon, "sh", "-c", "tty; stty size; read x; stty size; echo got:$x",
              name="term", tty=True, rows=30, cols=100)
    out, _, _ = read_all(daemon, "term", "30 100")
    assert "/dev/pts/" in out
    att = sessions.attach(daemon, "box", "term", write=True)
    assert att["tty"] and att["writer"]
    assert sessions.resize(daemon, att["attachment"], 40, 120)["resized"]
    sessions.write(daemon, att["attachment"], base64.b64encode(b"abc\r").decode())
    out, _, _ = read_all(daemon, "term", "got:abc")
    assert "40 120" in out
    assert wait_ended(daemon, "term")["exit_code"] == 0
    assert s["tty"]


def test_one_writer_at_a_time_and_readers_alongside(daemon: Daemon, box: str) -> None:
    start(daemon, "sh", "-c", "while read x; do echo \"echo $x\"; done", name="cat")
    w1 = sessions.attach(daemon, "box", "cat", write=True)
    with pytest.raises(Busy, match="already has a writer"):
        sessions.attach(daemon, "box", "cat", write=True)
    r1 = sessions.attach(daemon, "box", "cat", write=False)
    r2 = sessions.attach(daemon, "box", "cat", write=False)
    shown = sessions.show(daemon, "box", "cat")["attached"]
    assert shown == {"readers": 2, "writer": True}
    with pytest.raises(Busy, match=r"attached .* for writing"):
        sessions.send(daemon, "box", "cat", "x")
    with pytest.raises(NotFound, match="read-only"):
        sessions.write(daemon, r1["attachment"], base64.b64encode(b"x\n").decode())
    sessions.write(daemon, w1["attachment"], base64.b64encode(b"one\n").decode())
    for reader in (r1, r2):  # every reader sees the writer's effect
        r = sessions.logs(daemon, "box", "cat", cursor=reader["next"], wait_s=5,
                          attachment=reader["attachment"])
        assert base64.b64decode(r["stdout"]) == b"echo one\n"
    sessions.detach(daemon, w1["attachment"])
    w2 = sessions.attach(daemon, "box", "cat", write=True)  # the write side is free again
    sessions.write(daemon, w2["attachment"], base64.b64encode(b"two\n").decode())
    read_all(daemon, "cat", "echo two")
    sessions.stop(daemon, "box", "cat", timeout_s=2)


def test_an_abandoned_writer_lease_lapses(daemon: Daemon, box: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    start(daemon, "cat", name="abandoned")
    sessions.attach(daemon, "box", "abandoned", write=True)
    monkeypatch.setattr(sessionctl, "LEASE_S", -1.0)  # every lease has run out
    w = sessions.attach(daemon, "box", "abandoned", write=True)
    assert w["writer"] and LEASE_S > 0
    sessions.stop(daemon, "box", "abandoned", timeout_s=1)


def test_bad_requests_are_refused_with_nothing_left_behind(daemon: Daemon, box: str) -> None:
    start(daemon, "sleep", "300", name="dup")
    with pytest.raises(AlreadyExists, match="already exists"):
        start(daemon, "true", name="dup")
    with pytest.raises(BadRequest, match="not a directory"):
        start(daemon, "true", name="nowhere", cwd="/does/not/exist")
    with pytest.raises(BadRequest, match=r"DNS label|session name"):
        start(daemon, "true", name="Bad_Name")
    with pytest.raises(BadRequest, match="not a variable name"):
        start(daemon, "true", env=(("1X", "y"),))
    with pytest.raises(BadRequest, match="no command"):
        start(daemon)
    with pytest.raises(BadRequest, match="absolute"):
        start(daemon, "true", cwd="relative")
    with pytest.raises(NotFound, match="no session 'ghost'"):
        sessions.show(daemon, "box", "ghost")
    with pytest.raises(NotFound):
        sessions.logs(daemon, "box", "../../etc")
    with pytest.raises(BadRequest, match="bad log position"):
        sessions.logs(daemon, "box", "dup", cursor="-1:0")
    with pytest.raises(InvalidState, match="is running"):
        sessions.remove(daemon, "box", "dup")
    names = [s["name"] for s in sessions.list_sessions(daemon, "box")]
    assert names == ["dup"]  # the refused starts left no row
    assert sorted(p.name for p in Path(scripts.ROOT).iterdir()) == ["dup"]  # nor files
    sessions.kill(daemon, "box", "dup")
    assert sessions.remove(daemon, "box", "dup") == {"vm": "box", "removed": "dup"}
    assert not (Path(scripts.ROOT) / "dup").exists()
    assert sessions.list_sessions(daemon, "box") == []


def test_default_names_come_from_the_command(daemon: Daemon, box: str) -> None:
    assert start(daemon, "/usr/bin/Python3.11", "-c", "pass")["name"] == "python3-11"
    assert start(daemon, "/usr/bin/Python3.11", "-c", "pass")["name"] == "python3-11-2"
    assert start(daemon, "___")["name"] == "session"


def test_sessions_end_with_their_vm_and_go_with_it(daemon: Daemon, box: str) -> None:
    start(daemon, "sleep", "300", name="long")
    start(daemon, "true", name="short")
    wait_ended(daemon, "short")
    vmpower.stop(daemon, "box")
    listed = {s["name"]: s for s in sessions.list_sessions(daemon, "box")}
    assert listed["long"]["state"] == "ended"
    assert listed["long"]["end_reason"] == sessions.VM_STOPPED
    assert listed["short"]["exit_code"] == 0
    with pytest.raises(NotRunning, match="read from its guest"):
        sessions.logs(daemon, "box", "short")
    vmdelete.delete(daemon, "box")
    assert sessions.list_sessions(daemon, None) == []


def test_a_restarted_vm_corrects_a_session_that_had_exited_before_the_stop(
        daemon: Daemon, box: str) -> None:
    start(daemon, "sh", "-c", "sleep 1; exit 3", name="early")
    vmpower.stop(daemon, "box")  # never asked the guest: recorded as ended by the stop
    assert sessions.show(daemon, "box", "early")["end_reason"] == sessions.VM_STOPPED
    vmpower.start(daemon, "box")  # SessionCap.started re-reads the guest's files
    deadline = time.monotonic() + 10
    while sessions.show(daemon, "box", "early")["exit_code"] != 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ------------------------------------------------------------------ parsing


def test_status_lines_from_a_hostile_guest_are_checked_field_by_field() -> None:
    good = "web pid=12 alive=1 exit= same_boot=1 started=1700000000 ended= out=5 err=0"
    parsed = parse_status("\n".join([
        good,
        "web pid=99 alive=0 exit=1 same_boot=1 started= ended= out=0 err=0",  # repeat
        "../etc pid=1 alive=1 exit= same_boot=1 started= ended= out=0 err=0",
        "x pid=1; alive=1 exit= same_boot=1 started= ended= out=0 err=0",
        "y pid=1 alive=1 exit=999 same_boot=1 started= ended= out=0 err=0",
        "z pid=1 alive=1 exit= same_boot=1 started= ended= out=0",
        "q alive=1 pid=1 exit= same_boot=1 started= ended= out=0 err=0",
        "\x00" * 100,
    ]))
    assert list(parsed) == ["web"]
    web = parsed["web"]
    assert (web.pid, web.alive, web.exit_code, web.out_bytes) == (12, True, None, 5)
    assert web.started is not None and web.started.year == 2023
    many = "\n".join(f"s{i} pid=1 alive=1 exit= same_boot=1 started= ended= out=0 err=0"
                     for i in range(1000))
    assert len(parse_status(many)) == 256


def test_a_logs_reply_must_match_its_header() -> None:
    assert parse_logs(b"3 2 0\nabcde", cap=10) == (b"abc", b"de", False)
    assert parse_logs(b"0 0 1\n", cap=10) == (b"", b"", True)
    for bad in (b"3 2 0\nabcd", b"3 2 0\nabcdef", b"x 2 0\nab", b"11 0 0\n" + b"a" * 11,
                b"nohead", b"3 2\nabcde", b"3 2 2\nabcde"):
        with pytest.raises(GuestError):
            parse_logs(bad, cap=10)


# ------------------------------------------------------------------ the CLI side


def test_ctrl_p_ctrl_q_detaches_and_a_lone_ctrl_p_is_passed_on() -> None:
    keys = KeyFilter()
    assert keys.feed(b"ls\r") == (b"ls\r", False)
    assert keys.feed(b"a\x10") == (b"a", False)  # held: it may start the sequence
    assert keys.feed(b"x") == (b"\x10x", False)  # it did not
    assert keys.feed(b"\x10\x10") == (b"\x10", False)
    assert keys.feed(b"\x11rest") == (b"", True)


class DetachRaceConnection:
    """The daemon side of one attachment: the reader's logs call is on its way when the
    user detaches, and reaches the daemon only after the attachment was ended."""

    def __init__(self) -> None:
        self.detached = threading.Event()

    def call(self, method: str, timeout: float | None = None, **params: Any) -> dict[str, Any]:
        if method == "vm.session.attach":
            return {"attachment": "att-1", "writer": True, "tty": False, "vm": "box",
                    "name": "shell", "next": "0:0"}
        if method == "vm.session.detach":
            self.detached.set()
            return {"detached": True}
        assert method == "vm.session.logs" and params["attachment"] == "att-1"
        assert self.detached.wait(10)
        raise NotFound("this attachment has ended", hint="attach again")


def test_detaching_while_a_read_is_on_its_way_is_a_clean_detach(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = Client(connection=DetachRaceConnection())  # type: ignore[arg-type]
    monkeypatch.setattr(attach_cli, "_pump_input", lambda *_a, **_k: None)  # Ctrl-P Ctrl-Q
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    assert attach_cli.attach(lambda: client, "box", "shell", read_only=False) == 0
    assert "[detached from box/shell]" in capsys.readouterr().err


def test_a_signal_never_reaches_a_process_that_took_an_ended_sessions_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's group is gone and its recorded pid now names another process (not
    a group leader): stop and kill send nothing to it."""
    monkeypatch.setattr(scripts, "ROOT", str(tmp_path))
    (tmp_path / "gone").mkdir()
    bystander = subprocess.Popen(["sleep", "60"])  # in this test's process group
    try:
        (tmp_path / "gone" / "pid").write_text(f"{bystander.pid}\n")
        for sig in ("TERM", "KILL"):
            subprocess.run(["sh", "-c", scripts.signal("gone", sig, then_kill_after_s=0.1)],
                           check=False, timeout=30)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_session_refs_are_vm_slash_name() -> None:
    assert split_ref("web/server") == ("web", "server")
    for bad in ("web", "web/", "/server", "a/b/c"):
        with pytest.raises(click.UsageError, match="VM/NAME"):
            split_ref(bad)


def test_a_lease_does_not_lapse_during_a_slow_call(monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = sessionctl.Controller("vm", "s")
    w = ctl.attach(writer=True)
    with ctl.held(w.id):
        monkeypatch.setattr(sessionctl, "LEASE_S", -1.0)  # every idle lease has run out
        with pytest.raises(Busy):  # but this one is in a call: still the writer
            ctl.attach(writer=True)
    assert ctl.attach(writer=True).writer  # after the call it lapses


def test_a_command_gone_before_its_exit_is_recorded_is_not_lost(tmp_path: Path) -> None:
    """Between the command's death and the supervisor writing its exit status, a status
    read must not call the session lost: it runs until the exit is recorded."""
    root = tmp_path / "sessions"
    d = root / "race"
    d.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    supervisor = subprocess.Popen(["sleep", "30"])
    try:
        (d / "pid").write_text(f"{dead.pid}\n")
        (d / "super").write_text(f"{supervisor.pid}\n")
        (d / "boot_id").write_text(Path("/proc/sys/kernel/random/boot_id").read_text())
        script = scripts.STATUS.replace("{root}", str(root)).replace("{names}", "race")

        def read() -> Any:
            out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
            return parse_status(out.decode())["race"]

        gs = read()
        assert gs.alive and gs.exit_code is None
        assert sessions._changes(_row("race", sessions.RUNNING, dead.pid), gs, adopting=False) == {}
        supervisor.kill()
        supervisor.wait()
        gone = read()
        assert not gone.alive  # supervisor and command both gone, no exit: lost
        assert sessions._changes(_row("race", sessions.RUNNING, dead.pid), gone,
                                 adopting=False)["end_reason"] == sessions.LOST
        (d / "exit").write_text("0\n")
        assert read().exit_code == 0
    finally:
        supervisor.kill()
        supervisor.wait()


def _row(name: str, state: str, pid: int) -> SessionRecord:
    return SessionRecord(vm_id="0123456789ab", name=name, argv=("true",), cwd="/root",
                         tty=False, state=state, pid=pid)
