"""Shared by the integration tests that run real ``ip`` in a network namespace of their
own: the namespace, and a script run inside it that reports one JSON line per step."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of the test's own (deleted after), by name."""
    name = f"bgt-it-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# Run before every script: banger's source on the path, say() to report a step, and
# refused() for the message of a HostError (None when the call went through).
PRELUDE = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from banger.errors import HostError
def say(**kw):
    print(json.dumps(kw), flush=True)
def refused(fn, *args):
    try:
        fn(*args)
    except HostError as exc:
        return exc.message
    return None
"""


def steps_in(netns: str, script: str, *args: str, timeout: float = 120
             ) -> dict[str, dict[str, Any]]:
    """Run Python ``script`` in ``netns`` after :data:`PRELUDE` (``sys.argv[1]`` is
    banger's source, then ``args``); its JSON lines, by their ``step``."""
    res = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "--",
                          sys.executable, "-c", PRELUDE + script, str(SRC), *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr
    return {s["step"]: s for s in map(json.loads, res.stdout.splitlines())}
