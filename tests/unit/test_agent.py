"""The guest agent's script, run here on a socket standing in for its port, and the
host's end of its frames (banger.agent)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.agent import wire
from banger.agent.guest import agent_script

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="needs perl")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[wire.Connection, subprocess.Popen[bytes]]]:
    script = tmp_path / "banger-agent"
    script.write_text(agent_script())
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(["perl", str(script), f"fd:{theirs.fileno()}"],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    conn = wire.Connection(ours, os.open("/dev/null", os.O_RDONLY))
    try:
        yield conn, proc
    finally:
        conn.close()
        proc.kill()
        proc.wait()


def run(conn: wire.Connection, command: str, tmp_path: Path, stdin: bytes | None = None,
        interrupted=lambda: None) -> tuple[int, bytes, bytes]:
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("wb") as o, err.open("wb") as e:
        if stdin is None:
            status = conn.run(command, stdin=None, stdout=o.fileno(), stderr=e.fileno(),
                              interrupted=interrupted)
        else:
            r, w = os.pipe()
            feeder = threading.Thread(target=_feed, args=(w, stdin))
            feeder.start()
            try:
                status = conn.run(command, stdin=r, stdout=o.fileno(), stderr=e.fileno(),
                                  interrupted=interrupted)
            finally:
                os.close(r)
                feeder.join()
    return status, out.read_bytes(), err.read_bytes()


def _feed(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:65536]):]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def term_after(seconds: float) -> Callable[[], int | None]:
    """An ``interrupted`` for :meth:`wire.Connection.run`: SIGTERM once, ``seconds``
    after it was made."""
    start = time.monotonic()
    sent: list[int] = []

    def interrupted() -> int | None:
        if not sent and time.monotonic() - start > seconds:
            sent.append(1)
            return int(signal.SIGTERM)
        return None

    return interrupted


def test_runs_a_command_with_its_output_and_status(agent, tmp_path: Path) -> None:
    conn, _ = agent
    conn.hello(5)
    status, out, err = run(conn, "echo hi; echo oops >&2; exit 3", tmp_path)
    assert (status, out, err) == (3, b"hi\n", b"oops\n")


def test_environment_is_a_login_shells(agent, tmp_path: Path) -> None:
    conn, _ = agent
    conn.hello(5)
    _, out, _ = run(conn, 'echo "$HOME|$USER|$PATH|${SSH_CONNECTION:-none}"; pwd', tmp_path)
    home = os.path.expanduser("~root")
    assert out.decode().splitlines() == [
        f"{home}|root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|none",
        os.path.realpath(home)]


def test_stdin_arrives_whole(agent, tmp_path: Path) -> None:
    conn, _ = agent
    conn.hello(5)
    data = os.urandom(700_000)
    status, out, _ = run(conn, "cat", tmp_path, stdin=data)
    assert status == 0 and out == data


def test_output_flows_while_unread_input_waits(agent, tmp_path: Path) -> None:
    """A command that writes much and never reads its endless input still ends."""
    conn, _ = agent
    conn.hello(5)
    status, out, _ = run(conn, "head -c 3000000 /dev/zero", tmp_path, stdin=b"y\n" * 2_000_000)
    assert status == 0 and len(out) == 3_000_000


def test_a_signal_gets_past_input_the_command_leaves_unread(agent, tmp_path: Path) -> None:
    """The host sends at most a window of input ahead of what the command took, so the
    port stays readable for the signal."""
    conn, _ = agent
    conn.hello(5)
    start = time.monotonic()
    status, _, _ = run(conn, "exec sleep 30", tmp_path, stdin=b"z" * 4_000_000,
                       interrupted=term_after(1.0))
    assert status == 128 + signal.SIGTERM and time.monotonic() - start < 20


def test_a_closed_output_pipe_hangs_up_like_sigpipe(agent) -> None:
    conn, _ = agent
    conn.hello(5)
    r, w = os.pipe()
    os.close(r)
    try:
        status = conn.run("head -c 2000000 /dev/zero", stdin=None, stdout=w, stderr=w)
    finally:
        os.close(w)
    assert status == 128 + signal.SIGPIPE


def test_the_hello_answer_is_found_after_leftovers() -> None:
    dec = wire.Decoder(synced=False)
    half = wire.encode(b"O", 9, b"x" * 100)[:50]
    assert dec.feed(half + wire.SYNC[:5]) == []
    assert dec.feed(wire.SYNC[5:] + wire.encode(b"H", 0, b"n")) == [wire.Frame(b"H", 0, b"n")]


def test_a_signal_reaches_the_command(agent, tmp_path: Path) -> None:
    conn, _ = agent
    conn.hello(5)
    start = time.monotonic()
    status, _, _ = run(conn, "sleep 30", tmp_path, interrupted=term_after(0.5))
    assert status == 128 + signal.SIGTERM and time.monotonic() - start < 20


def test_hanging_up_ends_the_command(agent) -> None:
    conn, _ = agent
    conn.hello(5)
    conn.send(b"E", 7, b"echo $$; exec sleep 60")
    frame = conn.receive(time.monotonic() + 10)
    assert frame is not None and frame.kind == b"O"
    pid = int(frame.data)
    conn.sock.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the command outlived its connection"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_nothing_runs_before_a_hello(agent, tmp_path: Path) -> None:
    conn, _ = agent
    marker = tmp_path / "ran"
    conn.send(b"E", 3, f"touch {marker}".encode())
    conn.hello(5)
    status, _, _ = run(conn, "true", tmp_path)
    assert status == 0 and not marker.exists()


def test_an_oversized_frame_ends_what_the_connection_started(agent, tmp_path: Path) -> None:
    """No frame boundary can be trusted after it: the agent ends the connection's
    command and takes nothing more from it (a new connection starts afresh), and lives."""
    conn, proc = agent
    conn.hello(5)
    conn.send(b"E", 7, b"echo $$; exec sleep 60")
    frame = conn.receive(time.monotonic() + 10)
    assert frame is not None and frame.kind == b"O"
    pid = int(frame.data)
    conn.sock.sendall(wire.HEADER.pack(b"E", 1, wire.MAX_PAYLOAD + 1) + b"x" * 100)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the command outlived the bad frame"
        time.sleep(0.05)
    conn.decoder = wire.Decoder()
    with pytest.raises(wire.AgentError, match="did not answer"):
        conn.hello(1)
    assert proc.poll() is None


def test_readiness_times_out_without_the_identity(agent) -> None:
    conn, _ = agent
    conn.hello(5)
    with pytest.raises(wire.AgentError, match="not ready"):
        conn.ready("0123456789abcdef", 0.5)


def test_decoder_bounds_frames() -> None:
    dec = wire.Decoder()
    assert dec.feed(wire.encode(b"O", 1, b"ab")[:5]) == []
    assert dec.feed(wire.encode(b"O", 1, b"ab")[5:]) == [wire.Frame(b"O", 1, b"ab")]
    with pytest.raises(wire.AgentError, match="frame of"):
        dec.feed(wire.HEADER.pack(b"O", 1, wire.MAX_PAYLOAD + 1))


@pytest.mark.parametrize(("text", "status"), [
    (b"exit 0", 0), (b"exit 255", 255), (b"signal 9", 137)])
def test_exit_status(text: bytes, status: int) -> None:
    assert wire.exit_status(text) == status


@pytest.mark.parametrize("text", [b"exit 256", b"signal 0", b"exit -1", b"exit 1000",
                                  b"done", b"error no fork"])
def test_exit_status_refuses(text: bytes) -> None:
    with pytest.raises(wire.AgentError):
        wire.exit_status(text)


def test_connect_gives_way_when_the_lock_is_held(tmp_path: Path) -> None:
    import fcntl
    fd = os.open(tmp_path / wire.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert wire.connect(str(tmp_path)) is None
    finally:
        os.close(fd)
    with pytest.raises(wire.AgentError, match="cannot reach"):
        wire.connect(str(tmp_path))


# ------------------------------------------------------------------ the daemon's probe


def test_a_booting_guest_is_asked_only_once_its_console_says_the_agent_listens(
        tmp_path: Path) -> None:
    from banger.daemon.agentready import AgentProbe
    from banger.layout import VMPaths

    paths = VMPaths(tmp_path / "state", tmp_path / "run")
    paths.state.mkdir()
    paths.run.mkdir()
    paths.serial_log.write_bytes(b"[  OK  ] Started ssh.service\n")
    probe = AgentProbe(paths, "", booting=True)
    assert not probe() and not probe.failed  # an image without the agent: SSH decides
    assert not (paths.run / wire.LOCK_NAME).exists()  # nothing was tried
    with paths.serial_log.open("ab") as f:
        f.write(wire.CONSOLE_LISTENING + b"\n")
    assert not probe() and probe.failed  # said so, but nothing answers: asked no more
    (paths.run / wire.LOCK_NAME).unlink()
    assert not probe() and not (paths.run / wire.LOCK_NAME).exists()
    assert not probe.answered
