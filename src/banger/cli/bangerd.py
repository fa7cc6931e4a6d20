"""``bangerd``: run the banger daemon in the foreground (the CLI starts it detached)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import click

from banger.cli.exits import run_service
from banger.config import config_path, read_config

M_ARENA_MAX = -8  # malloc.h


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Config file (default: $BANGER_CONFIG or ~/.config/banger/config.toml).")
@click.option("--log-stderr", is_flag=True, help="Log to stderr instead of the log file.")
def run(config_file: Path | None, log_stderr: bool) -> None:
    """Serve banger's JSON-RPC API on a Unix socket: as root, or as its owner user with
    banger-helper (config helper_socket) doing what needs root."""
    from banger.daemon import Bangerd

    path = (config_file or config_path()).absolute()
    cfg, digest = read_config(path)
    # A daemon holds no working directory: the one it was started in may be one its
    # user cannot even stat (git, which it runs, refuses to start there). Directories
    # the config gives relative to it are made absolute first.
    cfg = cfg.model_copy(update={k: getattr(cfg, k).absolute() for k in
                                 ("state_dir", "cache_dir", "runtime_dir", "ssh_key_path")
                                 if getattr(cfg, k) is not None})
    os.chdir("/")
    fewer_malloc_arenas()
    d = Bangerd.open(cfg, log_to_stderr=log_stderr, config_file=path, config_sha256=digest)
    try:
        d.serve()
    finally:
        d.close()


def fewer_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before the daemon starts its threads.

    glibc gives a thread that allocates an arena of its own (up to eight per core), and
    the daemon's many short-lived threads (one per RPC connection, boot and console
    watchers) leave each part-used: its memory then stays well above what it holds. A
    C library without ``mallopt`` (musl) is left as it is.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def main() -> None:
    """The ``bangerd`` entry point (:func:`banger.cli.exits.run_service`)."""
    run_service(run, "bangerd")


if __name__ == "__main__":
    main()
