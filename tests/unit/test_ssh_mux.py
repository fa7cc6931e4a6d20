"""One shared OpenSSH master per VM boot: argv, paths, ownership checks, teardown, sweep,
and the CLI's fast path for ``vm exec``."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.api.params import CreateParams
from banger.cli import quick
from banger.config import Config, parse_config
from banger.daemon import reconcile, vmcreate, vmpower
from banger.daemon.core import Daemon
from banger.daemon.guest import SSHGuest, boot_key, find_masters
from banger.errors import NotRunning
from banger.layout import UNIX_PATH_MAX, VMPaths
from banger.proc import ProcessIdentity
from banger.protocol import __version__
from banger.sshopts import CONTROL_PERSIST_S, private_control_path, ssh_argv
from tests.conftest import FakeWorld
from tests.fakes import FakeRunner, RPCSocket


def _opts(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv[:-1]) if a == "-o")


def test_ssh_argv_shares_the_master_at_the_control_path() -> None:
    argv = ssh_argv("ssh", Path("/k"), Path("/kh"), "10.0.0.2",
                    control_path=Path("/run/b%x/vms/abc/ssh/0123abcd"))
    opts = _opts(argv)
    assert opts["ControlMaster"] == "auto"
    assert opts["ControlPath"] == "/run/b%%x/vms/abc/ssh/0123abcd"  # ssh expands % tokens
    assert opts["ControlPersist"] == str(CONTROL_PERSIST_S)
    assert opts["ServerAliveInterval"] == "15"
    assert argv[-2:] == ["-T", "root@10.0.0.2"]
    plain = _opts(ssh_argv("ssh", Path("/k"), Path("/kh"), "10.0.0.2"))
    assert plain["ControlMaster"] == "no" and plain["ControlPath"] == "none"


def test_guest_connections_offer_x25519_first_and_only_names_ssh_knows() -> None:
    """X25519 before OpenSSH's post-quantum default (a TCG guest's sshd takes ~0.17 s
    longer per connection with that), from a list this host's ssh accepts."""
    kex = _opts(ssh_argv("ssh", Path("/k"), Path("/kh"), "10.0.0.2"))["KexAlgorithms"]
    names = kex.split(",")
    assert names[0] == "curve25519-sha256"
    assert not any(n.startswith("sntrup") for n in names)
    if shutil.which("ssh") is None:
        pytest.skip("no ssh on this host to ask which key exchanges it knows")
    known = subprocess.run(["ssh", "-Q", "kex"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert set(names) <= set(known)
    # ssh parses the whole option line as it would for a connection (-G: print, no connect)
    res = subprocess.run(["ssh", "-G", "-o", f"KexAlgorithms={kex}", "root@10.0.0.2"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert f"kexalgorithms {kex}" in res.stdout


def test_forwards_get_a_connection_of_their_own() -> None:
    guest = SSHGuest(FakeRunner(), Path("/k"), Path("/kh"), "10.0.0.2",  # type: ignore[arg-type]
                     control_path=Path("/run/x/ssh/0123abcd"))
    assert _opts(guest.argv("true"))["ControlPath"] == "/run/x/ssh/0123abcd"
    fwd = guest.argv("apt-get update", forwards=["3142:10.0.0.1:80"])
    assert _opts(fwd)["ControlPath"] == "none"
    assert _opts(fwd)["ExitOnForwardFailure"] == "yes"
    assert fwd[fwd.index("-R") + 1] == "3142:10.0.0.1:80"
    assert fwd[-1] == "apt-get update"


def test_boot_key_changes_with_every_vmm_launch() -> None:
    a = boot_key(ProcessIdentity(100, 5000, "banger-x"))
    assert a == boot_key(ProcessIdentity(100, 5000, "banger-y"))
    assert a != boot_key(ProcessIdentity(100, 5001, "banger-x"))  # pid reused later
    assert a != boot_key(ProcessIdentity(101, 5000, "banger-x"))
    assert len(a) == 8


def test_control_path_is_left_out_when_it_would_not_fit_a_socket() -> None:
    short = VMPaths(Path("/s/vms/abc"), Path("/run/banger/vms/0123456789ab"))
    assert short.ssh_control("0123abcd") == Path("/run/banger/vms/0123456789ab/ssh/0123abcd")
    # OpenSSH binds "<path>.<16 characters>" first: that name must fit too.
    room = UNIX_PATH_MAX - 1 - 17 - len("/vms/0123456789ab/ssh/0123abcd")
    fits = VMPaths(Path("/s"), Path("/" + "r" * (room - 1) + "/vms/0123456789ab"))
    assert fits.ssh_control("0123abcd") is not None
    too_long = VMPaths(Path("/s"), Path("/" + "r" * room + "/vms/0123456789ab"))
    assert too_long.ssh_control("0123abcd") is None


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[Config]:
    """conftest's config with a short runtime dir: pytest's tmp_path leaves no room
    for a socket path under it."""
    run = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))
    yield parse_config({
        "state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache"),
        "runtime_dir": str(run), "dns_enabled": False, "nat": False, "tap_pool_size": 1,
        "log_level": "debug",
        "vm_defaults": {"disk_size": "64M", "work_disk_size": "64M"},
    })
    shutil.rmtree(run, ignore_errors=True)


def _create(d: Daemon, name: str) -> dict[str, Any]:
    return vmcreate.create_sync(d, CreateParams(name=name))


def test_dial_uses_the_master_of_the_current_boot(daemon: Daemon) -> None:
    vm = _create(daemon, "m")
    fake_dial = daemon.seams.dial
    daemon.seams.dial = None  # the real dialer: argv only, nothing runs here
    h = daemon.handles.get(vm["id"])
    assert h is not None and h.process is not None
    guest = daemon.dial(vm["id"], vm["ip"])
    assert isinstance(guest, SSHGuest)
    paths = daemon.layout.vm(vm["id"])
    assert guest.control_path == paths.ssh_dir / boot_key(h.process)
    assert stat.S_IMODE(paths.ssh_dir.stat().st_mode) == 0o700
    info = daemon.ssh_control(vm["id"])
    assert info == guest.control_path

    daemon.seams.dial = fake_dial  # its poweroff ends the fake VMM
    vmpower.stop(daemon, "m")
    assert daemon.ssh_control(vm["id"]) is None
    assert not paths.run.exists()  # no ssh/ made again for a VM without a VMM
    vmpower.start(daemon, "m")
    daemon.seams.dial = None
    h2 = daemon.handles.get(vm["id"])
    assert h2 is not None and h2.process is not None
    restarted = daemon.dial(vm["id"], vm["ip"])
    assert isinstance(restarted, SSHGuest)
    assert restarted.control_path == paths.ssh_dir / boot_key(h2.process)
    assert restarted.control_path != guest.control_path


def test_ssh_info_names_the_control_path(daemon: Daemon) -> None:
    from banger.daemon import vms

    vm = _create(daemon, "i")
    info = vms.ssh_info(daemon, "i")
    assert info["control_path"] == str(daemon.ssh_control(vm["id"]))


def _fake_master(title: str) -> subprocess.Popen[bytes]:
    """A process that names itself as an OpenSSH master does (``ssh: <path> [mux]``)."""
    return subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 60'])


@pytest.fixture
def masters() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def _wait_named(proc: subprocess.Popen[bytes], under: Path) -> None:
    for _ in range(200):
        if any(i.pid == proc.pid for i, _ in find_masters(under)):
            return
        threading.Event().wait(0.01)
    raise AssertionError("the fake master never showed up")


def test_teardown_ends_the_vms_master_first(daemon: Daemon, world: FakeWorld,
                                            masters: list[subprocess.Popen[bytes]]) -> None:
    vm = _create(daemon, "t")
    control = daemon.ssh_control(vm["id"])
    assert control is not None
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(control))
        master = _fake_master(f"ssh: {control} [mux]")
        masters.append(master)
        # A client of the master names the path too, but is not a master.
        client = _fake_master(f"ssh -o ControlPath={control} root@x")
        masters.append(client)
        _wait_named(master, control.parent)
        vmpower.stop(daemon, "t")
    exits = world.runner.ran("ssh", "-F", "/dev/null", "-o", f"ControlPath={control}", "-O")
    assert exits and exits[0][-2:] == ["exit", "banger-guest"]
    assert master.wait(5) is not None  # SIGTERMed (its socket, the test's, then -O exit)
    assert client.poll() is None
    assert not control.parent.exists()


def test_sweep_ends_masters_of_vms_the_store_does_not_have(
        daemon: Daemon, masters: list[subprocess.Popen[bytes]]) -> None:
    vm = _create(daemon, "keep")
    ours = daemon.layout.vms_run_dir / vm["id"] / "ssh" / "0123abcd"
    stray = daemon.layout.vms_run_dir / "ba5eba11dead" / "ssh" / "0123abcd"
    elsewhere = Path("/run/not-this-install/vms/ba5eba11dead/ssh/0123abcd")
    procs = [_fake_master(f"ssh: {p} [mux]") for p in (ours, stray, elsewhere)]
    masters.extend(procs)
    _wait_named(procs[0], daemon.layout.vms_run_dir)
    _wait_named(procs[1], daemon.layout.vms_run_dir)
    removed = reconcile.sweep(daemon)
    assert str(procs[1].pid) in removed["processes"]
    assert procs[1].wait(5) is not None
    assert procs[0].poll() is None and procs[2].poll() is None


def test_private_control_path_wants_a_0700_directory_of_this_user(tmp_path: Path) -> None:
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir(mode=0o700)
    control = ssh_dir / "0123abcd"
    assert private_control_path(str(control)) == (control, "")
    assert private_control_path(None)[0] is None
    ssh_dir.chmod(0o755)
    path, why = private_control_path(control)
    assert path is None and "open to other users" in why
    ssh_dir.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(ssh_dir)
    path, why = private_control_path(link / "0123abcd")
    assert path is None and "not a directory" in why
    assert private_control_path(tmp_path / "missing" / "x")[0] is None
    if os.geteuid() == 0:
        os.chown(ssh_dir, 65534, 65534)
        path, why = private_control_path(control)
        assert path is None and "uid 65534" in why


# ---------------------------------------------------------------- the CLI's fast path


class FakeBangerd(RPCSocket):
    """Answers ``vm.ssh_info`` as bangerd does (``info`` without an address: the VM is
    stopped, an error)."""

    def __init__(self, path: Path, config_sha256: str, info: dict[str, Any]) -> None:
        self.info = {**info, "daemon_version": __version__, "config_sha256": config_sha256}
        super().__init__(path, self._ssh_info)

    def _ssh_info(self, _method: str, _params: dict[str, Any]) -> dict[str, Any]:
        if not self.info.get("ip"):
            raise NotRunning("VM 'web' is stopped, not running")
        return self.info

    @property
    def methods(self) -> list[str]:
        return [method for method, _ in self.asked]


@pytest.fixture
def fast_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'runtime_dir = "{run}"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    # Records its argv and exits with the status the remote command asks for.
    fake_ssh.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/ssh-argv\nexit 7\n')
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return {"BANGER_CONFIG": str(config), "HOME": str(tmp_path)}


def _digest(env: dict[str, str]) -> str:
    return hashlib.sha256(Path(env["BANGER_CONFIG"]).read_bytes()).hexdigest()


def test_fast_exec_runs_ssh_over_the_shared_master(tmp_path: Path,
                                                   fast_env: dict[str, str]) -> None:
    ssh_dir = tmp_path / "run" / "vms" / "0123456789ab" / "ssh"
    ssh_dir.mkdir(parents=True, mode=0o700)
    info = {"name": "web", "ip": "10.0.0.2", "user": "root", "key_path": "/k",
            "known_hosts": "/kh", "workdir": "/root/repo",
            "control_path": str(ssh_dir / "0123abcd")}
    daemon = FakeBangerd(tmp_path / "run" / "bangerd.sock", _digest(fast_env), info)
    status = quick.exec_fast(["vm", "exec", "web", "--", "echo", "a b"], fast_env)
    assert status == 7
    assert daemon.methods == ["vm.ssh_info"]
    argv = (tmp_path / "ssh-argv").read_text().splitlines()
    assert f"ControlPath={ssh_dir / '0123abcd'}" in argv
    assert argv[-1] == "cd /root/repo && echo 'a b'; exit $?"


def test_fast_exec_leaves_everything_else_to_the_full_cli(tmp_path: Path,
                                                          fast_env: dict[str, str]) -> None:
    info = {"name": "web", "ip": "10.0.0.2", "user": "root", "key_path": "/k",
            "known_hosts": "/kh"}
    sock = tmp_path / "run" / "bangerd.sock"
    # Not the plain form: options, no "--", a bad name, another command.
    for args in (["vm", "exec", "--auto-prepare", "web", "--", "true"],
                 ["vm", "exec", "web", "true"], ["vm", "exec", "Web", "--", "true"],
                 ["--debug", "vm", "exec", "web", "--", "true"], ["vm", "exec", "web", "--"],
                 ["vm", "ssh", "web", "--", "true"]):
        assert quick.exec_fast(args, fast_env) is None, args
    args = ["vm", "exec", "web", "--", "true"]
    assert quick.exec_fast(args, fast_env) is None  # no daemon: the full CLI starts it
    other = FakeBangerd(sock, "another config", info)
    assert quick.exec_fast(args, fast_env) is None  # it warns about the config drift
    assert other.methods == ["vm.ssh_info"]
    other.sock.close()
    sock.unlink()
    FakeBangerd(sock, _digest(fast_env), {})  # an error: the full CLI reports it
    assert quick.exec_fast(args, fast_env) is None
    assert quick.exec_fast(args, {**fast_env, "BANGER_CONFIG": str(tmp_path / "nope")}) is None
    assert not (tmp_path / "ssh-argv").exists()


def test_ssh_exit_statuses_and_ctrl_c(tmp_path: Path) -> None:
    """run_ssh gives ssh's status, 128+N when ssh dies of signal N, and 130 after Ctrl-C
    (the SIGINT reaches ssh and banger, one foreground process group)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Runs the remote command (ssh's last argument) with the local shell.
    (bin_dir / "ssh").write_text('#!/bin/sh\nfor last; do :; done\neval "$last"\n')
    (bin_dir / "ssh").chmod(0o755)
    info = {"ip": "10.0.0.2", "key_path": "/k", "known_hosts": "/kh"}
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    code = ("import sys; from banger.cli.quick import run_ssh; "
            f"sys.exit(run_ssh({info!r}, sys.argv[1:], interactive=False))")

    def run(*words: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code, *words], env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    assert run("true").wait(30) == 0
    assert run("sh", "-c", "exit 3").wait(30) == 3
    assert run("sh", "-c", "kill -TERM $PPID; sleep 5").wait(30) == 128 + 15  # ssh killed
    started = tmp_path / "started"
    sleeper = run("sh", "-c", f"touch {started}; sleep 30")
    deadline = time.monotonic() + 30
    while not started.exists():  # python started and spawned ssh (a sleep raced a loaded host)
        assert time.monotonic() < deadline and sleeper.poll() is None
        time.sleep(0.05)
    os.killpg(sleeper.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert sleeper.wait(30) == 130
