"""Running the system ``ssh`` into a VM, and the fast path of ``banger vm exec``.

A guest command over the VM's shared ssh master takes tens of milliseconds, while
importing the whole CLI (click, pydantic, every command module) takes several
times that. :func:`exec_fast` runs the plain form ``banger vm exec NAME -- CMD...``
with the standard library and :mod:`banger.sshopts` only, and one RPC
(``vm.ssh_info``): the config file is read for ``runtime_dir`` alone, and its
digest stands in for validating it (bangerd's reply carries its version and the
digest of the config file it started with, so a daemon whose config differs gets
the full CLI's warning). Anything else, and anything that
does not go as expected (no daemon, another version, another config, any error),
returns None, and the full CLI does the command from the start and reports errors
its usual way. Nothing here has side effects before the guest command runs, so
starting over is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from banger.agent import wire
from banger.protocol import MAX_FRAME, PROTOCOL_VERSION, __version__
from banger.sshopts import private_control_path, remote_command, ssh_argv

# What a VM name is (banger.names.check_name, without importing its error tree).
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Budget for the RPC: bangerd answers it from memory and SQLite, in milliseconds;
# past this the full CLI takes over with its own handling.
RPC_TIMEOUT_S = 5.0
SYSTEM_CONFIG = "/etc/banger/config.toml"  # banger.config.SYSTEM_CONFIG
# Config.runtime_dir's default (banger.config).
DEFAULT_RUNTIME_DIR = "/run/banger"


def ssh_command(info: dict[str, Any], command: list[str], *, interactive: bool,
                shell_string: bool = False, debug: bool = False) -> list[str]:
    """The system ssh's argv into a VM (``info``: ``vm.ssh_info``), running ``command``.

    The command is a session over the VM's shared ssh master (bangerd's, started by
    the first command of the boot) when this process runs as the user who owns it
    (:func:`banger.sshopts.private_control_path`); otherwise it gets a connection of
    its own, and ``debug`` prints why.
    A guest command killed by signal N gives 128+N (see :func:`remote_command`).
    """
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    control, why = private_control_path(info.get("control_path"))
    if control is None and debug:
        print(f"debug: not sharing the VM's ssh connection: {why}", file=sys.stderr)
    argv = ssh_argv("ssh", Path(info["key_path"]), Path(info["known_hosts"]), info["ip"],
                    tty=tty and (interactive or bool(command)), batch=False,
                    control_path=control)
    remote = remote_command(command, workdir=info.get("workdir"), shell_string=shell_string)
    if remote:
        argv.append(remote)
    return argv


def run_ssh(info: dict[str, Any], command: list[str], *, interactive: bool,
            shell_string: bool = False, debug: bool = False) -> int:
    """Run :func:`ssh_command`; returns its exit status (the remote command's), 130
    after Ctrl-C.

    Raises:
        OSError: ssh could not be started.
    """
    argv = ssh_command(info, command, interactive=interactive, shell_string=shell_string,
                       debug=debug)
    # Default SIGPIPE and SIGXFSZ, which Python ignores, as subprocess gives a child.
    pid = os.posix_spawnp(argv[0], argv, os.environ,
                          setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    try:
        _pid, status = os.waitpid(pid, 0)
    except KeyboardInterrupt:
        # ssh, in this foreground process group, had the SIGINT too; make sure it ends.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return 130
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by signal N: 128+N, as a shell says


def run_in_guest(info: dict[str, Any], command: list[str], *, shell_string: bool = False,
                 debug: bool = False) -> int:
    """Run ``command`` in a VM (``info``: ``vm.ssh_info``); its exit status.

    ``vm exec``'s and ``vm run``'s commands (argv, not ``shell_string``) go through the
    guest's agent (:mod:`banger.agent`: no SSH login) when the VM has one, the command
    needs no terminal (not both stdin and stdout are one) and this process may use it
    (the same rule as for the shared master); otherwise, or when the agent is busy with
    another command or cannot be reached, over ssh (:func:`run_ssh`). Either way the
    guest's login shell runs the same command line
    (:func:`banger.sshopts.remote_command`). ``vm ssh`` (``shell_string``, or no
    command: a login shell) is always ssh.

    Raises:
        OSError: ssh could not be started.
    """
    if command and not shell_string and not (sys.stdin.isatty() and sys.stdout.isatty()):
        status = _run_by_agent(info, command, debug=debug)
        if status is not None:
            return status
    return run_ssh(info, command, interactive=not command, shell_string=shell_string,
                   debug=debug)


def _run_by_agent(info: dict[str, Any], command: list[str], *, debug: bool) -> int | None:
    """The command's status through the agent, or None to use ssh instead (said with
    ``debug``); None only before the command was sent, so it never runs twice.

    SIGINT, SIGTERM and SIGHUP (those not ignored here) reach the command; a second one
    hangs up, which ends it (130 after Ctrl-C, else 128+N). The agent failing once the
    command was sent gives 255, as ssh does when its connection fails.
    """
    agent_dir = info.get("agent_dir")
    usable, why = (None, "the VM's guest agent did not answer at boot") if not agent_dir \
        else private_control_path(os.path.join(agent_dir, wire.SOCKET_NAME))
    conn = None
    if usable is not None:
        try:
            conn = wire.connect(str(usable.parent))
            why = "its guest agent runs another command"
        except wire.AgentError as exc:
            why = str(exc)
    if conn is None:
        if debug:
            print(f"debug: not using the guest agent: {why}", file=sys.stderr)
        return None
    caught: list[int] = []

    class HangUp(Exception):
        def __init__(self, signum: int) -> None:
            self.signum = signum

    def on_signal(signum: int, _frame: object) -> None:
        if caught:
            raise HangUp(signum)
        caught.append(signum)

    sent = 0

    def interrupted() -> int | None:
        nonlocal sent
        if sent < len(caught):
            sent += 1
            return caught[sent - 1]
        return None

    previous = {sig: handler for sig in wire.FORWARDED
                if (handler := signal.getsignal(sig)) not in (signal.SIG_IGN, None)}
    for sig in previous:  # an ignored one (nohup's choice) stays ignored
        signal.signal(sig, on_signal)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with conn:
            return conn.run(remote_command(command, workdir=info.get("workdir"),
                                           shell_string=False),
                            stdin=_stdin_fd(), stdout=1, stderr=2, interrupted=interrupted)
    except HangUp as exc:
        return 130 if exc.signum == signal.SIGINT else 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    except wire.AgentError as exc:
        print(f"banger: {exc}", file=sys.stderr)
        return 255  # as ssh says when its connection fails
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdin_fd() -> int | None:
    """Descriptor 0 when it is open (a closed stdin: the command gets none)."""
    try:
        os.fstat(0)
    except OSError:
        return None
    return 0


def exec_fast(args: list[str], env: dict[str, str] | None = None) -> int | None:
    """``banger vm exec NAME -- CMD...`` (``args`` after the program name): the command's
    exit status, or None when the full CLI must handle ``args``."""
    if len(args) < 5 or args[:2] != ["vm", "exec"] or args[3] != "--":
        return None
    name, command = args[2], args[4:]
    if _NAME.fullmatch(name) is None:
        return None
    env = dict(os.environ) if env is None else env
    if remote_chosen(env):
        return None  # the full CLI talks to the remote host's banger
    found = config_of(env)
    if found is None:
        return None
    runtime_dir, digest = found
    info = call_quietly(daemon_socket(runtime_dir), "vm.ssh_info", {"name": name})
    if not isinstance(info, dict) or info.get("daemon_version") != __version__ \
            or info.get("config_sha256") != digest:
        return None
    try:
        return run_in_guest(info, command)
    except OSError:
        return None  # no ssh to run: the full CLI says so its own way


def remote_chosen(env: dict[str, str]) -> bool:
    """``$BANGER_HOST`` or a current context names a remote host (see
    :mod:`banger.contexts`; anything unreadable counts as one: the full CLI decides)."""
    if "BANGER_HOST" in env:
        return env["BANGER_HOST"] != ""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "/root"), ".config")
    try:
        with open(os.path.join(base, "banger", "contexts.json"), "rb") as fh:
            return json.loads(fh.read(1 << 20)).get("current") is not None
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True


def config_of(env: dict[str, str]) -> tuple[str, str] | None:
    """``runtime_dir`` and the digest of the config file's bytes, as
    :func:`banger.config.read_config` makes it; None for anything unusual."""
    explicit = env.get("BANGER_CONFIG")
    own = os.path.join(env.get("HOME", "/root"), ".config", "banger", "config.toml")
    # banger.config.config_path's order: the user's file, else a system install's
    path = explicit or (SYSTEM_CONFIG if not os.path.exists(own)
                        and os.path.exists(SYSTEM_CONFIG) else own)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if explicit:
            return None
        raw = b""
    except OSError:
        return None
    try:
        runtime_dir = tomllib.loads(raw.decode()).get("runtime_dir", DEFAULT_RUNTIME_DIR)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not isinstance(runtime_dir, str):
        return None
    return runtime_dir, hashlib.sha256(raw).hexdigest()


def daemon_socket(runtime_dir: str) -> str:
    """Where bangerd listens under ``runtime_dir`` (``banger.layout``'s name for it)."""
    return os.path.join(runtime_dir, "bangerd.sock")


def call_quietly(sock: str, method: str, params: dict[str, Any]) -> Any:
    """One JSON-RPC call (the framing of ``banger.client.Client.call``); None on any error."""
    req = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params,
           "protocol": PROTOCOL_VERSION}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(RPC_TIMEOUT_S)
            s.connect(sock)
            s.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
            line = s.makefile("rb").readline(MAX_FRAME + 1)
        resp = json.loads(line)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(resp, dict) or "error" in resp:
        return None
    return resp.get("result")
