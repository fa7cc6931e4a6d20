"""Which files prepare leaves out of the tar for the guest to check out of the pack."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from banger.daemon.workspace import WorkspaceMode, build_plan, inspect_repo
from banger.daemon.workspace.checkout import blob_id, checkout_paths, listing
from banger.runner import SubprocessRunner
from tests.gitenv import git, isolate_git

RUNNER = SubprocessRunner()


@pytest.fixture(autouse=True)
def clean_git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_git(tmp_path / "gitconfig", monkeypatch, identity=True)


def paths_for(repo: Path) -> set[str]:
    info = inspect_repo(RUNNER, str(repo), WorkspaceMode.SHALLOW)
    return set(checkout_paths(build_plan(RUNNER, info), info.object_format))


def test_only_files_whose_bytes_are_their_index_blob(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in ("clean", "edited", "staged", "chmodded", "removed"):
        (repo / name).write_text(f"{name}\n")
    (repo / "tool").write_text("#!/bin/sh\n")
    (repo / "tool").chmod(0o755)
    (repo / "dir").mkdir()
    (repo / "dir" / "deep").write_text("deep\n")
    os.symlink("clean", repo / "link")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "c")
    (repo / "edited").write_text("edited in the work tree\n")
    (repo / "staged").write_text("staged, then unchanged\n")
    git(repo, "add", "staged")
    (repo / "chmodded").chmod(0o755)
    (repo / "removed").unlink()
    (repo / "untracked").write_text("new\n")
    (repo / "intent").write_text("intent to add\n")
    git(repo, "add", "-N", "intent")
    assert paths_for(repo) == {"clean", "tool", "dir/deep", "staged"}


def test_a_file_git_converts_on_check_in_is_sent(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitattributes").write_text("*.txt text eol=crlf\n")
    (repo / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")  # the blob holds LF endings
    (repo / "lf.txt").write_bytes(b"one\ntwo\n")  # the blob is these bytes exactly
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "c")
    assert paths_for(repo) == {".gitattributes", "lf.txt"}


def test_conflicted_paths_are_sent(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "f").write_text("base\n")
    (repo / "other").write_text("other\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "checkout", "-q", "-b", "side")
    (repo / "f").write_text("side\n")
    git(repo, "commit", "-q", "-am", "side")
    git(repo, "checkout", "-q", "main")
    (repo / "f").write_text("main\n")
    git(repo, "commit", "-q", "-am", "main")
    res = subprocess.run(["git", "merge", "-q", "side"], cwd=repo, capture_output=True)
    assert res.returncode != 0
    assert paths_for(repo) == {"other"}


def test_blob_id_is_gits(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(os.urandom(3 * (1 << 20) + 7))  # more than one read
    want = git(tmp_path, "hash-object", "--no-filters", str(f)).strip()
    fd = os.open(f, os.O_RDONLY)
    try:
        assert blob_id(fd, f.stat().st_size, "sha1") == want
        os.lseek(fd, 0, os.SEEK_SET)
        assert blob_id(fd, f.stat().st_size + 1, "sha1") is None  # it shrank
    finally:
        os.close(fd)
    data = f.read_bytes()
    fd = os.open(f, os.O_RDONLY)
    try:
        want256 = hashlib.sha256(b"blob %d\0" % len(data) + data).hexdigest()
        assert blob_id(fd, len(data), "sha256") == want256
    finally:
        os.close(fd)


def test_listing_is_nul_terminated() -> None:
    assert listing(["a b", "d/é"]) == b"a b\0d/\xc3\xa9\0"
    assert listing([]) == b""
