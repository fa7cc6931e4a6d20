"""``bangerd``: run the banger daemon in the foreground (the CLI starts it detached)."""

from __future__ import annotations

from pathlib import Path

import click

from banger.cli.exits import run_service
from banger.config import config_path, read_config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Config file (default: $BANGER_CONFIG or ~/.config/banger/config.toml).")
@click.option("--log-stderr", is_flag=True, help="Log to stderr instead of the log file.")
def run(config_file: Path | None, log_stderr: bool) -> None:
    """Serve banger's JSON-RPC API on a Unix socket (root only)."""
    from banger.daemon import Bangerd

    path = config_file or config_path()
    cfg, digest = read_config(path)
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
