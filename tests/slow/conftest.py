"""Slow tests run only when asked for: ``pytest -m slow`` or ``BANGER_RUN_SLOW=1``.

The first run builds a kernel (most of an hour on two cores); a plain ``pytest``
of the whole suite must not start that by accident.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _asked_for(config: pytest.Config) -> bool:
    expr = str(config.getoption("markexpr", "") or "")
    return os.environ.get("BANGER_RUN_SLOW") == "1" or (
        "slow" in expr and "not slow" not in expr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _asked_for(config):
        return
    skip = pytest.mark.skip(reason="slow test: run with `pytest -m slow` or BANGER_RUN_SLOW=1")
    for item in items:
        # This hook sees the whole session's items: touch only the ones in this directory.
        if item.path.is_relative_to(HERE) and item.get_closest_marker("slow"):
            item.add_marker(skip)
