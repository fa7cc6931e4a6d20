"""``bangerd``: run the banger daemon in the foreground (the CLI starts it detached)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from banger.cli.exits import run_service
from banger.config import config_path, read_config


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
    d = Bangerd.open(cfg, log_to_stderr=log_stderr, config_file=path, config_sha256=digest)
    try:
        d.serve()
    finally:
        d.close()


def main() -> None:
    """The ``bangerd`` entry point (:func:`banger.cli.exits.run_service`)."""
    run_service(run, "bangerd")


if __name__ == "__main__":
    main()
