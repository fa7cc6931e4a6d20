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
from banger.api.methods import check_params, check_result
from banger.config import Config
from banger.errors import BangerError, DaemonUnavailable, from_code
from banger.fsutil import tail
from banger.layout import Layout
from banger.proc import identify, wait_gone
from banger.protocol import MAX_FRAME, PROTOCOL_VERSION

DAEMON_START_S = 30.0  # opening the store, the bridge and reconciling VMs; usually < 1 s
DAEMON_STOP_S = 30.0  # finishing requests and undoing the host network; usually < 1 s
CONNECT_TIMEOUT_S = 5.0

_ids = itertools.count(1)


class Client:
    """A JSON-RPC client on bangerd's Unix socket; one connection per call."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        # The daemon's status from the last successful ping (``alive``), or None.
        self.daemon_status: dict[str, Any] | None = None

    def call(self, method: str, timeout: float | None = None, **params: Any) -> Any:
        """Send one JSON-RPC request on a fresh connection and return its result.

        None-valued params are left out; the rest are checked against the method's
        model before they are sent, and the result against its type
        (:mod:`banger.api.methods`). ``timeout`` bounds the wait for the answer (None:
        wait forever); connecting has its own short timeout.

        Raises:
            BadRequest: ``params`` do not fit the method.
            BadVersion: the reply does not have the shape the method's result has.
            DaemonUnavailable: the socket is missing, refused, not permitted or timed out,
                or the daemon closed the connection without answering.
            BangerError: the daemon's error, rebuilt as its most specific class.
        """
        sent = {k: v for k, v in params.items() if v is not None}
        check_params(method, sent)
        req = {"jsonrpc": "2.0", "id": next(_ids), "method": method, "params": sent,
               "protocol": PROTOCOL_VERSION}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(CONNECT_TIMEOUT_S)
                s.connect(str(self.socket_path))
                s.settimeout(timeout)
                s.sendall(api.encode(req))
                line = s.makefile("rb").readline(MAX_FRAME + 1)
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
        if len(line) > MAX_FRAME:
            raise DaemonUnavailable(f"bangerd's reply to {method} is longer than the "
                                    f"{MAX_FRAME}-byte frame a reply may take",
                                    hint="see the daemon log (`banger daemon status`)")
        if not line.endswith(b"\n"):
            raise DaemonUnavailable(f"bangerd closed the connection in the middle of its "
                                    f"reply to {method}",
                                    hint="see the daemon log (`banger daemon status`)")
        try:
            resp = json.loads(line)
            if not isinstance(resp, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            raise DaemonUnavailable(f"bangerd sent a malformed reply to {method}: {exc}"[:300],
                                    hint="see the daemon log (`banger daemon status`)") from exc
        if "error" in resp:
            err = resp["error"]
            data = err.get("data") or {}
            raise from_code(data.get("code", "error"), err.get("message", "error"),
                            data.get("hint", ""), **(data.get("details") or {}))
        return check_result(method, resp.get("result"))

    def send(self, method: str, params: api.Model, timeout: float | None = None) -> Any:
        """:meth:`call` with ``params`` given as the method's model (unset fields: the
        model's defaults)."""
        return self.call(method, timeout, **params.model_dump(mode="json"))

    def config_drift(self, cfg: Config) -> str | None:
        """The warning for a daemon running with other config values than ``cfg``.

        Compares against :attr:`daemon_status` (the last ping); None when they agree,
        or when there is nothing to compare (no ping yet, or a daemon too old to
        report its config).
        """
        return None if self.daemon_status is None else config_drift(cfg, self.daemon_status)

    def alive(self) -> bool:
        """True when bangerd answers ``daemon.ping`` within 5 s (its status is kept in
        :attr:`daemon_status`)."""
        try:
            status = self.call("daemon.ping", timeout=5)
        except BangerError:
            return False
        self.daemon_status = status if isinstance(status, dict) else None
        return True


def connect(cfg: Config, *, autostart: bool = True) -> Client:
    """A client for the configured daemon, starting bangerd first when it is not running."""
    layout = Layout.from_config(cfg)
    client = Client(layout.socket)
    if not autostart or client.alive():
        return client
    if cfg.helper_socket is not None:
        # A daemon with a root helper is a service (`banger system install`): never
        # start one here, least of all a root one.
        raise DaemonUnavailable(
            f"bangerd is not answering on {layout.socket}",
            hint="it runs as a system service here: `banger system status` shows it, "
                 "`banger system restart` restarts it")
    start_daemon(cfg)
    return client


def config_drift(cfg: Config, status: dict[str, Any]) -> str | None:
    """A warning when the daemon runs with other config values than ``cfg``, else None.

    ``status`` is the daemon's ``daemon.status``; a daemon too old to report its
    config gives None (nothing to compare).
    """
    theirs = status.get("config")
    if not isinstance(theirs, dict) or not isinstance(theirs.get("values"), dict):
        return None
    mine = api.config_values(cfg)
    if theirs.get("hash") == api.config_hash(mine):
        return None
    keys = api.changed_keys(mine, theirs["values"]) or ["(unknown keys)"]
    return (f"bangerd runs with the config it started with ({theirs.get('path') or 'defaults'}); "
            f"this command's config differs in: {', '.join(keys)}. "
            "`banger daemon restart` applies it (running VMs keep running)")


def stop_daemon(client: Client) -> dict[str, Any] | None:
    """Ask bangerd to stop and wait (bounded) until its process is gone.

    Returns:
        Its status just before the stop (``idle`` says whether it undid the host network
        changes), or None when it was not running.

    Raises:
        DaemonUnavailable: it was still running :data:`DAEMON_STOP_S` seconds later.
    """
    try:
        status: dict[str, Any] = client.call("daemon.status")
        client.call("daemon.stop")
    except DaemonUnavailable:
        return None
    ident = identify(int(status["pid"]), "bangerd")
    # It finishes the requests in flight, closes DNS and the TAP pool and, with no VM
    # left, removes the bridge and NAT rules: each step is a bounded netlink or nft call.
    if ident is not None and not wait_gone(ident, DAEMON_STOP_S):
        raise DaemonUnavailable(f"bangerd (pid {ident.pid}) is still running "
                                f"{DAEMON_STOP_S:g}s after it was asked to stop",
                                hint=f"see {status.get('log', 'the daemon log')}")
    return status


def start_daemon(cfg: Config) -> int:
    """Spawn bangerd detached and wait (bounded) until it answers; returns its pid."""
    layout = Layout.from_config(cfg)
    if cfg.helper_socket is not None:
        raise DaemonUnavailable("this config's bangerd runs as a system service "
                                "(it has a helper_socket)",
                                hint="`banger system restart` starts it")
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


def fetch_patch(client: Client, name: str, base_commit: str | None = None
                ) -> tuple[dict[str, Any], bytes]:
    """The VM's workspace export: the RPC's result (changed files) and the patch bytes.

    The daemon writes the patch to a file only root can read; it is read and removed here.
    """
    res: dict[str, Any] = client.call("vm.workspace.export", name=name, base_commit=base_commit)
    patch_path = Path(res.pop("patch_path"))
    try:
        data = patch_path.read_bytes()
    finally:
        patch_path.unlink(missing_ok=True)
    return res, data
