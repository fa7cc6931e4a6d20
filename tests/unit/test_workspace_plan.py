"""Host-side inspection, copy plan and resync detection, on real git repositories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from banger.daemon.workspace import (
    EntryKind,
    RepoInfo,
    WorkspaceMode,
    build_plan,
    inspect_repo,
    needs_resync,
)
from banger.daemon.workspace.hosttree import HostTree, read_owned
from banger.errors import BadRequest, HostError
from banger.runner import SubprocessRunner
from tests.gitenv import git, isolate_git

RUNNER = SubprocessRunner()


@pytest.fixture(autouse=True)
def clean_git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_git(tmp_path / "gitconfig", monkeypatch)


def new_repo(path: Path, *, identity: bool = True) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    if identity:
        git(path, "config", "user.name", "Ada")
        git(path, "config", "user.email", "ada@example.org")
    return path


def commit(repo: Path, msg: str = "c") -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = new_repo(tmp_path / "repo")
    (r / "a.txt").write_text("a\n")
    (r / "sub").mkdir()
    (r / "sub" / "b.txt").write_text("b\n")
    commit(r)
    return r


# --------------------------------------------------------------------------- inspection


def test_inspect_clean_repo(repo: Path) -> None:
    info = inspect_repo(RUNNER, str(repo))
    assert info.host_path == str(repo)
    assert info.head == git(repo, "rev-parse", "HEAD").strip()
    assert info.branch == "main"
    assert info.mode is WorkspaceMode.SHALLOW
    assert info.object_format == "sha1"
    assert info.identity.name == "Ada" and info.identity.email == "ada@example.org"
    assert info.dirty is False
    assert info.submodules == () and info.host_shallow == ()
    assert info.name == "repo"


@pytest.mark.parametrize("change", ["modify", "untracked", "stage"])
def test_inspect_dirty(repo: Path, change: str) -> None:
    if change == "modify":
        (repo / "a.txt").write_text("changed\n")
    elif change == "untracked":
        (repo / "new.txt").write_text("new\n")
    else:
        (repo / "a.txt").write_text("staged\n")
        git(repo, "add", "a.txt")
    assert inspect_repo(RUNNER, str(repo)).dirty is True


def test_inspect_ignored_file_is_not_dirty(repo: Path) -> None:
    (repo / ".gitignore").write_text("*.log\n")
    commit(repo)
    (repo / "x.log").write_text("ignored\n")
    assert inspect_repo(RUNNER, str(repo)).dirty is False


def test_inspect_from_a_subdirectory_uses_the_top_level(repo: Path) -> None:
    assert inspect_repo(RUNNER, str(repo / "sub")).host_path == str(repo)


def test_inspect_unborn_and_detached(tmp_path: Path, repo: Path) -> None:
    fresh = new_repo(tmp_path / "fresh")
    info = inspect_repo(RUNNER, str(fresh))
    assert info.head is None and info.branch == "main"
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "a.txt").write_text("second\n")
    commit(repo)
    git(repo, "checkout", "-q", "--detach", first)
    info = inspect_repo(RUNNER, str(repo))
    assert info.head == first and info.branch is None


def test_inspect_identity_unset(tmp_path: Path) -> None:
    info = inspect_repo(RUNNER, str(new_repo(tmp_path / "anon", identity=False)))
    assert info.identity.name is None and info.identity.email is None


def test_inspect_shallow_host_repo(tmp_path: Path, repo: Path) -> None:
    for i in range(3):
        (repo / "a.txt").write_text(f"{i}\n")
        commit(repo)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(clone))
    info = inspect_repo(RUNNER, str(clone))
    assert info.host_shallow == (git(repo, "rev-parse", "HEAD").strip(),)


def test_inspect_refusals(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(BadRequest, match="not absolute"):
        inspect_repo(RUNNER, "relative/path")
    with pytest.raises(BadRequest, match="does not exist"):
        inspect_repo(RUNNER, str(tmp_path / "missing"))
    with pytest.raises(BadRequest, match="not a directory"):
        inspect_repo(RUNNER, str(repo / "a.txt"))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(BadRequest, match="not in a git repository") as exc:
        inspect_repo(RUNNER, str(plain))
    assert "git init" in exc.value.hint
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    with pytest.raises(BadRequest, match="bare git repository") as exc:
        inspect_repo(RUNNER, str(bare))
    assert "clone" in exc.value.hint
    with pytest.raises(BadRequest, match="not inside a git work tree"):
        inspect_repo(RUNNER, str(repo / ".git"))
    with pytest.raises(BadRequest, match="unknown workspace mode"):
        inspect_repo(RUNNER, str(repo), "deep")


def test_inspect_reports_a_repository_owned_by_someone_else(tmp_path: Path, repo: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    os.chown(repo, 65534, 65534)
    try:
        with pytest.raises(HostError, match="owned by another user") as exc:
            inspect_repo(RUNNER, str(repo))
        assert "owner" in exc.value.hint
    finally:
        os.chown(repo, 0, 0)


def test_repo_info_round_trips_through_a_dict(repo: Path) -> None:
    info = inspect_repo(RUNNER, str(repo), "full_copy")
    again = RepoInfo.from_dict(info.to_dict())
    assert again == info
    assert again.mode is WorkspaceMode.FULL_COPY


# --------------------------------------------------------------------------- the plan


def plan_of(repo: Path) -> dict[str, tuple[EntryKind, int, bool]]:
    plan = build_plan(RUNNER, inspect_repo(RUNNER, str(repo)))
    return {e.path: (e.kind, e.size, e.executable) for e in plan.entries}


def test_plan_lists_what_git_status_sees(tmp_path: Path, repo: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the tree\n")
    (repo / ".gitignore").write_text("*.log\nbuild/\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    os.symlink(str(outside), repo / "link_dir")
    os.symlink("a.txt", repo / "link_file")
    (repo / "gone.txt").write_text("soon deleted\n")
    commit(repo)
    (repo / "gone.txt").unlink()                        # tracked, deleted: left out
    (repo / "untracked.txt").write_text("u\n")         # untracked: in
    (repo / "x.log").write_text("ignored\n")           # ignored: out
    (repo / "build").mkdir()
    (repo / "build" / "o").write_text("ignored\n")
    (repo / "big.bin").write_bytes(b"\0" * 70000)
    plan = plan_of(repo)
    assert plan == {
        ".gitignore": (EntryKind.FILE, 13, False),
        "a.txt": (EntryKind.FILE, 2, False),
        "big.bin": (EntryKind.FILE, 70000, False),
        "link_dir": (EntryKind.SYMLINK, len(str(outside)), False),
        "link_file": (EntryKind.SYMLINK, 5, False),
        "run.sh": (EntryKind.FILE, 10, True),
        "sub/b.txt": (EntryKind.FILE, 2, False),
        "untracked.txt": (EntryKind.FILE, 2, False),
    }


def test_plan_never_goes_through_a_symlinked_directory(tmp_path: Path, repo: Path) -> None:
    """A tracked directory replaced by a symlink: its tracked files are deleted as far
    as git is concerned, and must not be read through the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.txt").write_text("NOT the repository's\n")
    os.rename(repo / "sub", tmp_path / "moved")
    os.symlink(str(outside), repo / "sub")
    plan = plan_of(repo)
    assert "sub/b.txt" not in plan
    assert plan["sub"][0] is EntryKind.SYMLINK


def test_plan_order_and_counts(repo: Path) -> None:
    for name in ("a-b", "a/b", "a0", "Z"):
        p = repo / name
        p.parent.mkdir(exist_ok=True)
        p.write_text("x\n")
    plan = build_plan(RUNNER, inspect_repo(RUNNER, str(repo)))
    paths = [e.path for e in plan.entries]
    assert paths == sorted(paths, key=lambda p: p.encode())  # git's (byte) order
    assert plan.files == len(paths) and plan.bytes == sum(e.size for e in plan.entries)


def test_plan_index_and_blobs(repo: Path) -> None:
    (repo / "staged.txt").write_text("staged only\n")
    git(repo, "add", "staged.txt")
    (repo / "staged.txt").write_text("then changed\n")
    ghost = "1234567890abcdef1234567890abcdef12345678"  # an index entry with no object
    git(repo, "update-index", "--add", "--info-only", "--cacheinfo", f"100644,{ghost},ghost")
    plan = build_plan(RUNNER, inspect_repo(RUNNER, str(repo)))
    assert plan.index == subprocess.run(["git", "ls-files", "--stage", "-z"], cwd=repo,
                                        capture_output=True, check=True).stdout
    staged_blob = git(repo, "rev-parse", ":staged.txt").strip()
    assert staged_blob in plan.index_blobs
    assert git(repo, "rev-parse", "HEAD:a.txt").strip() in plan.index_blobs
    assert ghost not in plan.index_blobs
    assert ghost in plan.index.decode()


@pytest.mark.parametrize("name", ["new\nline.txt", "esc\x1b.txt", "tab\t.txt"])
def test_plan_refuses_control_characters_naming_the_file(repo: Path, name: str) -> None:
    (repo / name).write_text("x\n")
    with pytest.raises(BadRequest, match="control character") as exc:
        plan_of(repo)
    assert repr(name) in exc.value.message


def test_plan_refuses_names_that_are_not_utf8(repo: Path) -> None:
    with open(os.path.join(os.fsencode(repo), b"bad\xff.txt"), "w") as fh:
        fh.write("x\n")
    with pytest.raises(BadRequest, match="not valid UTF-8"):
        plan_of(repo)


def test_plan_refuses_special_files(repo: Path) -> None:
    os.unlink(repo / "a.txt")
    os.mkfifo(repo / "a.txt")  # a tracked name, now a FIFO
    with pytest.raises(BadRequest, match="FIFO") as exc:
        plan_of(repo)
    assert "'a.txt'" in exc.value.message


def test_plan_refuses_an_untracked_nested_repository(tmp_path: Path, repo: Path) -> None:
    nested = new_repo(repo / "vendor" / "lib")
    (nested / "x").write_text("x\n")
    commit(nested)
    with pytest.raises(BadRequest, match="nested git repository") as exc:
        plan_of(repo)
    assert "vendor/lib" in exc.value.message


def test_plan_refuses_an_untracked_dot_git_name(repo: Path) -> None:
    (repo / "sub" / ".GIT").write_text("x\n")
    with pytest.raises(BadRequest, match=r"'\.git' component"):
        plan_of(repo)


# --------------------------------------------------------------------------- resync


def test_needs_resync(tmp_path: Path, repo: Path) -> None:
    (repo / ".gitignore").write_text("*.log\n")
    commit(repo)
    info = inspect_repo(RUNNER, str(repo))
    assert needs_resync(RUNNER, info) is False
    assert needs_resync(RUNNER, info, str(repo)) is False
    (repo / "x.log").write_text("ignored files do not count\n")
    assert needs_resync(RUNNER, info) is False

    def fresh() -> RepoInfo:
        return inspect_repo(RUNNER, str(repo))

    (repo / "a.txt").write_text("edited\n")
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    (repo / "a.txt").write_text("edited again, same status line\n")
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    (repo / "new.txt").write_text("untracked\n")
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    git(repo, "add", "new.txt")  # staging changes the index, not the file
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    commit(repo)
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    git(repo, "checkout", "-q", "-b", "other")  # same commit, another branch
    assert needs_resync(RUNNER, info) is True
    info = fresh()
    assert needs_resync(RUNNER, info) is False
    moved = tmp_path / "moved"
    os.rename(repo, moved)
    assert needs_resync(RUNNER, info) is True


# --------------------------------------------------------------------------- HostTree


def test_host_tree_never_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("inside\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("outside\n")
    os.symlink(str(outside), root / "link")
    os.symlink(str(outside / "f"), root / "flink")
    with HostTree(str(root)) as tree:
        assert tree.lstat("d/f") is not None
        assert tree.lstat("link/f") is None
        assert tree.lstat("d/missing") is None
        with pytest.raises(BadRequest, match="changed while"):
            tree.open_file("flink")
        with pytest.raises(BadRequest, match="changed while"):
            tree.open_file("link/f")
        assert tree.readlink("flink") == str(outside / "f")
        fd, st = tree.open_file("d/f")
        with os.fdopen(fd, "rb") as fh:
            assert fh.read() == b"inside\n"
        assert st.st_size == 7


def test_read_owned(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.write_text("data\n")
    uid = os.getuid()
    assert read_owned(str(mine), uid) == b"data\n"
    assert read_owned(str(mine), uid + 1) is None  # not the repository owner's
    os.symlink(str(mine), tmp_path / "link")
    assert read_owned(str(tmp_path / "link"), uid) is None
    assert read_owned(str(tmp_path / "missing"), uid) is None
    assert read_owned(str(mine), uid, limit=2) is None
