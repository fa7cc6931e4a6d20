"""The git directory prepare writes on the host: git itself must read it as its own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from banger.daemon.workspace import gitdir
from banger.daemon.workspace.model import MARKER, PREPARED_REF, STATE_DIR
from tests.gitenv import isolate_git


@pytest.fixture(autouse=True)
def clean_git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_git(tmp_path / "gitconfig", monkeypatch)


def git(cwd: Path, *args: str, input: bytes | None = None,
        env: dict[str, str] | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          input=input, env={**os.environ, **(env or {})}).stdout


def oid(n: int, fmt: str) -> str:
    return f"{n:0{64 if fmt == 'sha256' else 40}x}"


def listing(fmt: str) -> bytes:
    """Every kind of entry: modes, conflict stages, non-ASCII and very long names."""
    long = "/".join(["d" * 200] * 25) + "/f"  # over the 12-bit name length in the flags
    rows = [("100644", 1, 0, "a.txt"), ("100755", 2, 0, "bin/run"), ("120000", 3, 0, "link"),
            ("160000", 4, 0, "sub"), ("100644", 5, 1, "c"), ("100644", 6, 2, "c"),
            ("100644", 7, 3, "c"), ("100644", 8, 0, "é ü/ñ"), ("100644", 9, 0, long)]
    rows.sort(key=lambda r: (r[3].encode(), r[2]))
    return b"".join(f"{m} {oid(n, fmt)} {st}\t{p}\0".encode() for m, n, st, p in rows)


@pytest.mark.parametrize("fmt", ["sha1", "sha256"])
def test_index_is_byte_for_byte_what_git_writes(tmp_path: Path, fmt: str) -> None:
    repo = tmp_path / "r"
    git(tmp_path, "init", "-q", f"--object-format={fmt}", str(repo))
    ours = gitdir.index_file(listing(fmt), fmt)
    theirs = tmp_path / "index"
    git(repo, "-c", "index.version=2", "update-index", "-z", "--index-info",
        input=listing(fmt), env={"GIT_INDEX_FILE": str(theirs)})
    assert ours == theirs.read_bytes()
    (repo / ".git" / "index").write_bytes(ours)
    assert git(repo, "ls-files", "--stage", "-z") == listing(fmt)


def test_an_empty_index_is_valid(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "r")
    (tmp_path / "r" / ".git" / "index").write_bytes(gitdir.index_file(b"", "sha1"))
    assert git(tmp_path / "r", "ls-files", "--stage") == b""


def materialise(root: Path, members: list[gitdir.Member]) -> None:
    for m in members:
        path = root / m.name
        if m.kind is gitdir.Kind.DIR:
            path.mkdir(parents=True, exist_ok=True)
        elif m.kind is gitdir.Kind.SYMLINK:
            os.symlink(m.data, path)
        else:
            path.write_bytes(m.data)


@pytest.mark.parametrize("fmt", ["sha1", "sha256"])
def test_git_reads_the_repository_as_its_own(tmp_path: Path, fmt: str) -> None:
    """A host repository's state, written as members, is what git in that directory
    reports: HEAD, refs (loose names packed), shallow list, identity, index, excludes."""
    host = tmp_path / "host"
    git(tmp_path, "init", "-q", "-b", "main", f"--object-format={fmt}", str(host))
    git(host, "config", "user.name", "Ada")
    git(host, "config", "user.email", "a@x")
    (host / "f").write_text("1\n")
    git(host, "add", "f")
    git(host, "commit", "-qm", "one")
    git(host, "tag", "-a", "-m", "annotated", "v1")
    head = git(host, "rev-parse", "HEAD").decode().strip()
    tag = git(host, "rev-parse", "v1").decode().strip()
    files = gitdir.RepoFiles(
        object_format=fmt, index=git(host, "ls-files", "--stage", "-z"),
        head_symbolic="refs/heads/main", head_commit=None,
        refs=(("refs/tags/v1", tag), ("refs/heads/main", head)), shallow=(head,),
        user_name='Ada "Host"', user_email="a@x", excludes=b"*.log\n",
        marker=b"host_path=/h\n", checkout=b"f\0", prepared=head)
    guest = tmp_path / "guest"
    materialise(guest, gitdir.members("", files, submodules=b"sub\n", reapply=b"patch"))
    # the history, as the pack would bring it
    git(host, "repack", "-q", "-a", "-d")
    for p in (host / ".git" / "objects" / "pack").iterdir():
        (guest / ".git" / "objects" / "pack" / p.name).write_bytes(p.read_bytes())
    (guest / "f").write_text("1\n")
    (guest / "x.log").write_text("ignored\n")
    assert git(guest, "rev-parse", "--show-object-format").decode().strip() == fmt
    assert git(guest, "symbolic-ref", "HEAD").decode().strip() == "refs/heads/main"
    refs = git(guest, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)")
    assert refs.decode().splitlines() == [f"refs/banger/prepared {head} ",
                                          f"refs/heads/main {head} ",
                                          f"refs/tags/v1 {tag} {head}"]
    assert git(guest, "rev-parse", PREPARED_REF).decode().strip() == head
    assert git(guest, "rev-parse", "--is-shallow-repository").decode().strip() == "true"
    assert git(guest, "config", "user.name").decode() == 'Ada "Host"\n'
    assert git(guest, "status", "--porcelain") == b""  # f matches, x.log excluded
    git(guest, "fsck", "--no-dangling", "--no-progress")  # exits non-zero on any fault
    private = guest / STATE_DIR
    assert (private / "info" / "exclude").read_bytes() == b"*.log\n"  # via the symlink
    assert git(guest, "--git-dir", str(private), "--work-tree", str(guest), "rev-parse",
               "--show-object-format").decode().strip() == fmt
    assert (guest / MARKER).read_bytes() == b"host_path=/h\n"
    assert (private / "submodules").read_bytes() == b"sub\n"
    assert (guest / gitdir.IMPORT_DIR / "checkout").read_bytes() == b"f\0"
    assert (guest / gitdir.IMPORT_DIR / "reapply.patch").read_bytes() == b"patch"


def test_detached_head_is_a_commit_id() -> None:
    files = gitdir.RepoFiles(
        object_format="sha1", index=b"", head_symbolic=None, head_commit="ab" * 20, refs=(),
        shallow=(), user_name=None, user_email=None, excludes=b"", marker=b"", checkout=b"")
    by_name = {m.name: m.data for m in gitdir.members("sub/", files)}
    assert by_name["sub/.git/HEAD"] == b"ab" * 20 + b"\n"
    assert "sub/.git/shallow" not in by_name and "sub/.git/banger/submodules" not in by_name
    assert b"[user]" not in by_name["sub/.git/config"]
