"""``banger-helper``: the root helper of an installed banger (``banger-helper.service``).

It does, for the daemon running as its owner user, the few things that need root
(:mod:`banger.hostops`), after checking each against the install's policy, and
answers on a socket only that user can reach.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from banger.cli.exits import run_service
from banger.config import config_path, read_config
from banger.errors import BadRequest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="The daemon's config file (default: $BANGER_CONFIG or "
                   "~/.config/banger/config.toml).")
@click.option("--owner", required=True,
              help="The user the daemon runs as: the only one whose processes may connect.")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Where to listen (default: the config's helper_socket).")
def run(config_file: Path | None, owner: str, socket_path: Path | None) -> None:
    """Do what needs root for banger's daemon, within its install's policy (root only)."""
    from banger.hostops.executor import Executor
    from banger.hostops.policy import Policy
    from banger.hostops.server import HelperServer, check_root
    from banger.runner import SubprocessRunner

    check_root()
    cfg, _digest = read_config(config_file or config_path())
    os.chdir("/")  # what it starts (nft, the QEMU launcher) never inherits a cwd
    path = socket_path or cfg.helper_socket
    if path is None:
        raise BadRequest("no socket to listen on",
                         hint="set helper_socket in the config, or pass --socket")
    try:
        user = pwd.getpwnam(owner) if not owner.isdigit() else pwd.getpwuid(int(owner))
    except KeyError as exc:
        raise BadRequest(f"no user {owner!r}", hint="name the daemon's user") from exc
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    policy = Policy.from_config(cfg, daemon_uid=user.pw_uid, daemon_gid=user.pw_gid,
                                daemon_user=user.pw_name)
    server = HelperServer(Executor(policy, SubprocessRunner()), path, user.pw_uid, user.pw_gid)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.getLogger("banger.helper").info("serving %s for uid %d", path, user.pw_uid)
    try:
        server.serve_until(stop)
    finally:
        server.close()


def main() -> None:
    """The ``banger-helper`` entry point (:func:`banger.cli.exits.run_service`)."""
    run_service(run, "banger-helper")


if __name__ == "__main__":
    main()
