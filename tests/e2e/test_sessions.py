"""``vm session`` end to end in a real guest: a session outlives its client and a
daemon kill -9, keeps its output in order, takes input from ``send`` and from one
attached writer at a time while others watch, records how it ended, and goes with
its VM."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from typing import Any

from tests.childsignals import with_default_signals
from tests.e2e.conftest import BIN, Host

# A line a second; whatever arrives on stdin is echoed back.
# Input is read by a loop of its own (no `read -t`: a timeout that fires as a line's
# newline is read reports the whole line as partial, and it is lost), on a copy of
# stdin (an asynchronous list's own stdin is /dev/null); the other loop ticks.
TICKER = ('exec 4<&0; i=0; { while read -r x; do echo "got $x"; done; } <&4 & '
          'while :; do i=$((i+1)); echo "line $i"; sleep 1; done')


def logs(host: Host, ref: str) -> str:
    return host.ok("vm", "session", "logs", ref)


def wait_for(host: Host, ref: str, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := logs(host, ref)):
        assert time.monotonic() < deadline, f"{text!r} never appeared in:\n{out[-2000:]}"
        time.sleep(1)
    return out


def show(host: Host, ref: str) -> dict[str, Any]:
    res: dict[str, Any] = host.json("vm", "session", "show", ref)
    return res


def attach_on_a_terminal(host: Host, ref: str, *, rows: int, cols: int, keys: list[bytes],
                         until: list[bytes]) -> tuple[bytes, int]:
    """Run `session attach` on a pseudo-terminal of ``rows`` x ``cols``: type each of
    ``keys`` once the previous ``until`` showed up, then Ctrl-P Ctrl-Q."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        host.netns(*with_default_signals([str(BIN / "banger"), "vm", "session", "attach",
                                           ref])),
        env=host.env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(want: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 180
        while want not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the client closed the terminal
                    return

    try:
        read_until(b"attached to")
        time.sleep(2)  # the first poll and the resize are on their way
        for key, want in zip(keys, until, strict=True):
            os.write(master, key)
            read_until(want)
        os.write(master, b"\x10\x11")
        code = proc.wait(120)
        read_until(b"[detached from")
        return seen, code
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def lines_once_in_order(out: str) -> None:
    numbers = [int(m) for m in re.findall(r"^line (\d+)$", out, re.M)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_a_session_outlives_the_daemon_takes_input_and_goes_with_its_vm(
        host: Host, running_vm: str) -> None:
    vm = running_vm
    ref = f"{vm}/ticker"
    started = json.loads(host.ok("vm", "session", "start", vm, "--name", "ticker", "--env",
                                 "X=1", "--json", "--", "bash", "-c", TICKER))
    assert (started["state"], started["cwd"], started["env_keys"]) == ("running", "/root", ["X"])
    wait_for(host, ref, "line 3")

    # Bad input: clear errors with hints, nothing started.
    dup = host.cli("vm", "session", "start", vm, "--name", "ticker", "--", "true")
    assert dup.returncode == 125 and "already exists" in dup.stderr and "hint:" in dup.stderr
    ghost = host.cli("vm", "session", "show", f"{vm}/ghost")
    assert ghost.returncode == 125 and "no session 'ghost'" in ghost.stderr
    nodir = host.cli("vm", "session", "start", vm, "--cwd", "/nope", "--", "true")
    assert nodir.returncode == 125 and "not a directory" in nodir.stderr
    bad_ref = host.cli("vm", "session", "logs", "no-slash")
    assert bad_ref.returncode == 2 and "VM/NAME" in bad_ref.stderr
    assert [s["name"] for s in host.json("vm", "session", "list", vm)] == ["ticker"]

    # The daemon dies and comes back: the session ran on and is found again.
    host.kill_daemon(9)
    time.sleep(2)
    host.start_daemon()
    listed = host.json("vm", "session", "list")
    assert [(s["ref"], s["state"]) for s in listed] == [(ref, "running")]
    out = wait_for(host, ref, "line 6")
    lines_once_in_order(out)

    # Input: `send`, then one attached writer while two readers watch.
    host.ok("vm", "session", "send", ref, "via send")
    wait_for(host, ref, "got via send")
    readers = [host.popen("vm", "session", "attach", "--read-only", ref) for _ in range(2)]
    writer = host.popen("vm", "session", "attach", ref, stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not show(host, ref)["attached"]["writer"]:
            assert time.monotonic() < deadline and writer.poll() is None, writer.communicate()
            time.sleep(0.5)
        second = host.cli("vm", "session", "attach", ref, input="")
        assert second.returncode == 125 and "already has a writer" in second.stderr
        assert "--read-only" in second.stderr
        busy = host.cli("vm", "session", "send", ref, "not now")
        assert busy.returncode == 125 and "for writing" in busy.stderr
        assert writer.stdin is not None
        writer.stdin.write("from the writer\n")
        writer.stdin.flush()
        wait_for(host, ref, "got from the writer")
        writer.send_signal(signal.SIGINT)  # Ctrl-C detaches a client without a terminal
        _out, err = writer.communicate(timeout=60)
        assert "[detached from" in err, err
        host.ok("vm", "session", "send", ref, "after detach")  # the write side is free again
        wait_for(host, ref, "got after detach")

        # stop: SIGTERM to the session's processes; the readers see it end.
        stopped = host.json("vm", "session", "stop", ref, "--timeout", "10")
        assert (stopped["state"], stopped["signal"], stopped["exit_code"]) == ("ended", 15, 143)
        for reader in readers:
            out, err = reader.communicate(timeout=120)
            assert reader.returncode == 143, err
            assert "got from the writer" in out and "got after detach" in out
            assert "ended: killed by signal 15" in err
    finally:  # a failure above must not leave CLI processes and their pipes behind
        for proc in (*readers, writer):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    out = logs(host, ref)
    lines_once_in_order(out)
    for text in ("got via send", "got from the writer", "got after detach"):
        assert out.count(text) == 1, text
    since = json.loads(host.ok("vm", "session", "logs", ref, "--json"))
    assert since["ended"] and since["stdout"] == out
    assert json.loads(host.ok("vm", "session", "logs", ref, "--json", "--since",
                              since["next"]))["stdout"] == ""

    # A terminal session: a pty in the guest, its size as asked for.
    tty = json.loads(host.ok("vm", "session", "start", vm, "--tty", "--name", "term",
                             "--json", "--", "sh", "-c", "tty; stty size; sleep 300"))
    assert tty["tty"] and tty["state"] == "running"
    term = wait_for(host, f"{vm}/term", "24 80")
    assert "/dev/pts/" in term
    killed = host.json("vm", "session", "kill", f"{vm}/term", "--signal", "KILL")
    assert killed["state"] == "ended" and killed["signal"] == 9

    # Attach from a terminal: keys go through raw, the window size follows ours, and
    # Ctrl-P Ctrl-Q detaches while the session runs on.
    host.ok("vm", "session", "start", vm, "--tty", "--name", "shell", "--", "sh")
    out, code = attach_on_a_terminal(host, f"{vm}/shell", rows=50, cols=132,
                                     keys=[b"stty size\r", b"echo $((6*7))\r"],
                                     until=[b"50 132", b"42"])
    assert code == 0 and b"[detached from" in out, out
    assert show(host, f"{vm}/shell")["state"] == "running"
    host.ok("vm", "session", "stop", f"{vm}/shell")

    # rm forgets an ended session; a deleted VM takes the rest along.
    host.ok("vm", "session", "rm", f"{vm}/term")
    assert [s["name"] for s in host.json("vm", "session", "list", vm)] == ["ticker", "shell"]
    host.ok("vm", "delete", vm)
    assert host.json("vm", "session", "list") == []


def test_a_stopped_vm_shows_its_sessions_ended(host: Host, running_vm: str) -> None:
    vm = running_vm
    host.ok("vm", "session", "start", vm, "--name", "sleeper", "--", "sleep", "600")
    host.ok("vm", "session", "start", vm, "--name", "quick", "--", "sh", "-c", "exit 3")
    host.ok("vm", "stop", vm)
    listed = {s["name"]: s for s in host.json("vm", "session", "list", vm)}
    assert listed["sleeper"]["state"] == "ended"
    assert listed["sleeper"]["end_reason"] == "the VM stopped"
    assert listed["quick"]["exit_code"] == 3
    res = host.cli("vm", "session", "logs", f"{vm}/sleeper")
    assert res.returncode == 125 and "vm start" in res.stderr
    res = host.cli("vm", "session", "start", vm, "--", "true")
    assert res.returncode == 125 and "stopped; sessions run in running VMs" in res.stderr
