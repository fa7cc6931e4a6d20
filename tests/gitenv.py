"""Host git for tests: a throwaway global config and nothing from the runner's environment."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def isolate_git(config: Path, monkeypatch: pytest.MonkeyPatch, *, identity: bool = False) -> None:
    """Point host git at a fresh global config file and drop every ``GIT_*`` variable.

    Args:
        config: Where to write the global config (inside the test's tmp dir).
        monkeypatch: The test's monkeypatch, which undoes all of this afterwards.
        identity: Also set ``user.name``/``user.email`` (so commits work without ``-c``).
    """
    for key in list(os.environ):
        if key.startswith("GIT_"):
            monkeypatch.delenv(key)
    text = "[init]\n\tdefaultBranch = main\n"
    if identity:
        text += "[user]\n\tname = t\n\temail = t@t\n"
    config.write_text(text)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(cwd: Path | str, *args: str) -> str:
    """Run git in ``cwd``; its stdout as text (raises on a non-zero exit)."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout
