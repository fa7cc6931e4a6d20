"""The CLI's side of the RPC: connect (starting bangerd if needed), call, map errors."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from banger import api
from banger.config import Config
from banger.errors import BangerError, DaemonUnavailable, from_code
from banger.fsutil import tail
from banger.layout import Layout

DAEMON_START_S = 30.0  # opening the store, the bridge and reconciling VMs; usually < 1 s
CONNECT_TIMEOUT_S = 5.0

_ids = itertools.count(1)


class Client:
    """A JSON-RPC client on bangerd's Unix socket; one connection per call."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """Send one JSON-RPC request on a fresh connection and return its result.

        None-valued params are left out. ``timeout`` bounds the wait for the answer
        (None: wait forever); connecting has its own short timeout.

        Raises:
            DaemonUnavailable: the socket is missing, refused, not permitted or timed out,
                or the daemon closed the connection without answering.
            BangerError: the daemon's error, rebuilt as its most specific class.
        """
        req = {"jsonrpc": "2.0", "id": next(_ids), "method": method,
               "params": {k: v for k, v in params.items() if v is not None},
               "protocol": api.PROTOCOL_VERSION}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(CONNECT_TIMEOUT_S)
                s.connect(str(self.socket_path))
                s.settimeout(timeout)
                s.sendall(api.encode(req))
                line = s.makefile("rb").readline(api.MAX_FRAME * 16)
        except FileNotFoundError as exc:
            raise DaemonUnavailable(f"bangerd is not running ({self.socket_path} is missing)",
                                    hint="any banger command starts it; or `banger daemon start`"
                                    ) from exc
        except ConnectionRefusedError as exc:
            raise DaemonUnavailable(f"bangerd is not answering on {self.socket_path}") from exc
        except PermissionError as exc:
            raise DaemonUnavailable(f"no permission to use {self.socket_path}",
                                    hint="bangerd runs as root: use sudo") from exc
        except TimeoutError as exc:
            raise DaemonUnavailable(f"bangerd did not answer {method} in time") from exc
        except OSError as exc:
            raise DaemonUnavailable(f"talking to bangerd failed: {exc}") from exc
        if not line:
            raise DaemonUnavailable(f"bangerd closed the connection during {method}",
                                    hint="see the daemon log (`banger daemon status`)")
        resp = json.loads(line)
        if "error" in resp:
            err = resp["error"]
            data = err.get("data") or {}
            raise from_code(data.get("code", "error"), err.get("message", "error"),
                            data.get("hint", ""), **(data.get("details") or {}))
        return resp.get("result")

    def alive(self) -> bool:
        """True when bangerd answers ``daemon.ping`` within 5 s."""
        try:
            self.call("daemon.ping", timeout=5)
        except BangerError:
            return False
        return True


def connect(cfg: Config, *, autostart: bool = True) -> Client:
    """A client for the configured daemon, starting bangerd first when it is not running."""
    layout = Layout.from_config(cfg)
    client = Client(layout.socket)
    if not autostart or client.alive():
        return client
    start_daemon(cfg)
    return client


def start_daemon(cfg: Config) -> int:
    """Spawn bangerd detached and wait (bounded) until it answers; returns its pid."""
    layout = Layout.from_config(cfg)
    if os.geteuid() != 0:
        raise DaemonUnavailable("bangerd is not running and only root can start it",
                                hint="run banger with sudo")
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    # The daemon finds the same file the CLI did: an explicit --config was exported as
    # BANGER_CONFIG (banger.cli.app.App.cfg), and otherwise both use the default path.
    env = dict(os.environ)
    boot_log = layout.state_dir / "bangerd.stderr"
    with open(os.devnull, "rb") as devnull, boot_log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "banger.cli.bangerd"],
            stdin=devnull, stdout=err, stderr=err, env=env, start_new_session=True,
            close_fds=True,
        )
    client = Client(layout.socket)
    deadline = time.monotonic() + DAEMON_START_S
    while time.monotonic() < deadline:
        if client.alive():
            return proc.pid
        if proc.poll() is not None:
            raise DaemonUnavailable(
                f"bangerd exited with status {proc.returncode} while starting",
                hint="its output:\n" + tail(boot_log, 1500).strip(),
            )
        time.sleep(0.05)
    raise DaemonUnavailable(f"bangerd did not start within {DAEMON_START_S:g}s",
                            hint=f"see {layout.daemon_log}")
