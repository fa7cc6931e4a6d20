"""The guest scripts run with the local ``sh``: what a crashed daemon leaves behind."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from banger.daemon.workspace import gitdir, scripts


def run(script: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script], capture_output=True, timeout=60)


def test_preflight_kills_a_stale_writer_that_would_recreate_its_staging_dir(
        tmp_path: Path) -> None:
    """A daemon killed mid-prepare leaves its guest step running in the staging dir, and
    git recreates missing parent directories of the objects it writes (absolute paths):
    removing the directory alone is not enough."""
    home = tmp_path.resolve()
    stale = home / ".proj.banger-partial-deadbeef"
    (stale / ".git" / "objects").mkdir(parents=True)
    objects = stale / ".git" / "objects" / "ab"
    writer = subprocess.Popen(
        ["sh", "-c", f"while :; do mkdir -p '{objects}'; sleep 0.05; done"], cwd=stale,
        start_new_session=True)
    try:
        names = scripts.Names(str(home / "proj"), "cafe0001")
        res = run(scripts.preflight(names))
        assert res.returncode == 0, res.stderr
        writer.wait(timeout=10)  # it was killed (a leftover writer would run forever)
        time.sleep(0.3)  # several of its loop periods: it would have recreated the dir
        assert sorted(p.name for p in home.iterdir()) == [".proj.banger-partial-cafe0001"]
    finally:
        writer.kill()
        writer.wait()


def test_preflight_leaves_other_processes_alone(tmp_path: Path) -> None:
    home = tmp_path.resolve()
    other = home / "proj-other"
    other.mkdir()
    bystander = subprocess.Popen(["sleep", "60"], cwd=other)
    try:
        res = run(scripts.preflight(scripts.Names(str(home / "proj"), "cafe0002")))
        assert res.returncode == 0, res.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()



@pytest.mark.parametrize("name,email", [
    ("Ada Host", "ada@example.org"),
    ('Ada "the" \\Host\\', "a\tb@x"),
    ("semi; colon # hash", None),
    (None, "only@mail"),
    ("new\nline", "b\bs"),
])
def test_user_config_reads_back_as_written(tmp_path: Path, name: str | None,
                                           email: str | None) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(gitdir.user_config(name, email))
    for key, want in (("user.name", name), ("user.email", email)):
        res = subprocess.run(["git", "config", "--file", str(cfg), "--get", key],
                             capture_output=True, text=True)
        if want is None:
            assert res.returncode == 1
        else:
            assert res.stdout == want + "\n"
    assert gitdir.user_config(None, None) == ""
