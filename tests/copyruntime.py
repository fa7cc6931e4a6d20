"""A copy of banger and the packages it needs at run time, for a process of another
user: the test venv may sit where only root can reach it (a home directory, a CI
clone under a 0700 directory), so that user runs the copy under Debian's own python3
(the same minor version)."""

from __future__ import annotations

import importlib.metadata as md
import shutil
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _requirements(name: str) -> list[str]:
    """What ``name`` needs on this platform, without extras."""
    out = []
    for line in md.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def copy_runtime(site: Path) -> None:
    """banger's package and the distributions it needs at run time, into ``site``."""
    shutil.copytree(REPO / "src" / "banger", site / "banger",
                    ignore=shutil.ignore_patterns("__pycache__"))
    seen: set[str] = set()
    todo = _requirements("banger")
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        for f in dist.files or []:
            if f.parts and f.parts[0] == "..":
                continue  # scripts in the venv's bin/
            src = Path(str(dist.locate_file(f)))
            if src.is_file():
                dest = site / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
        todo += _requirements(name)
