"""What ``banger --host`` sends of a repository (:mod:`banger.repoship`), with real git:
a plain repository, a linked worktree (of a normal and of a bare repository), a
submodule as the repository, and populated submodules inside one. Each is written as
the tar ``receive`` unpacks, unpacked, and compared with the original by git itself."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from banger import repoship
from banger.cli.workspace import resync_source
from banger.errors import BadRequest
from tests.gitenv import git, isolate_git


@pytest.fixture(autouse=True)
def _git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_git(tmp_path / "gitconfig", monkeypatch, identity=True)
    # `submodule add` of a local path is refused by default since git 2.38.1.
    with open(tmp_path / "gitconfig", "a") as fh:
        fh.write("[protocol \"file\"]\n\tallow = always\n")


def make_repo(path: Path, files: dict[str, str], *, bare_origin: bool = False) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "first")
    return path


def shipped(top: Path, root: Path) -> Path:
    """``top`` sent and received (into ``root``): the received work tree."""
    buf = io.BytesIO()
    repoship.write_tar(repoship.shipment(top), buf)
    buf.seek(0)
    return repoship.unpack(top.name, buf, root)


def state(top: Path) -> dict[str, str]:
    """What a workspace copies, as git sees it."""
    return {
        "head": git(top, "rev-parse", "HEAD").strip(),
        "branch": git(top, "rev-parse", "--abbrev-ref", "HEAD").strip(),
        "status": git(top, "status", "--porcelain", "--untracked-files=all"),
        "bare": git(top, "rev-parse", "--is-bare-repository").strip(),
        "toplevel_name": Path(git(top, "rev-parse", "--show-toplevel").strip()).name,
        "files": git(top, "ls-files", "-z", "--cached", "--others", "--exclude-standard"),
    }


def test_a_plain_repository_goes_as_it_is(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {".gitignore": "*.o\n", "a.c": "a", "sub/c.txt": "c"})
    (repo / "b.o").write_text("ignored")
    (repo / "new.txt").write_text("untracked")
    ship = repoship.shipment(repo)
    assert [m.arcname for m in ship.members] == [".git", ".gitignore", "a.c", "new.txt",
                                                "sub/c.txt"]
    assert ship.git_config is None and ship.files == 4
    got = shipped(repo, tmp_path / "received")
    assert state(got) == state(repo)
    assert not (got / "b.o").exists()


def test_a_linked_worktree_arrives_as_a_plain_repository_of_its_own(tmp_path: Path) -> None:
    main = make_repo(tmp_path / "main", {"a.txt": "main\n"})
    wt = tmp_path / "wt"
    git(main, "worktree", "add", "-q", "-b", "feature", str(wt))
    (wt / "a.txt").write_text("changed in the worktree\n")
    (wt / "b.txt").write_text("new\n")
    git(wt, "add", "b.txt")
    git(main, "commit", "-q", "--allow-empty", "-m", "main moves on")  # main's HEAD differs
    got = shipped(wt, tmp_path / "received")
    assert (got / ".git").is_dir()
    assert state(got) == state(wt)
    assert state(got)["branch"] == "feature"
    assert state(got)["status"] == " M a.txt\nA  b.txt\n"  # the worktree's own index
    assert not (got / ".git" / "worktrees").exists()  # other worktrees' state stays home
    assert "main moves on" in git(got, "log", "--all", "--format=%s")  # history came along


def test_a_worktree_of_a_bare_repository_is_not_called_bare(tmp_path: Path) -> None:
    src = make_repo(tmp_path / "src", {"a.txt": "a\n"})
    bare = tmp_path / "repo.git"
    git(tmp_path, "clone", "-q", "--bare", str(src), str(bare))
    wt = tmp_path / "wt"
    git(bare, "worktree", "add", "-q", str(wt))
    (wt / "a.txt").write_text("edited\n")
    got = shipped(wt, tmp_path / "received")
    assert state(got) == state(wt)
    assert state(got)["bare"] == "false"
    assert "core.bare=" not in git(got, "config", "--list", "--local")


def test_a_submodule_as_the_repository_and_submodules_inside_one(tmp_path: Path) -> None:
    lib = make_repo(tmp_path / "lib", {"lib.c": "lib\n"})
    app = make_repo(tmp_path / "app", {"main.c": "main\n"})
    git(app, "submodule", "add", "-q", str(lib), "vendor/lib")
    git(app, "commit", "-qm", "add lib")
    inside = app / "vendor" / "lib"
    assert (inside / ".git").is_file()
    (inside / "lib.c").write_text("patched\n")

    # The submodule on its own: its git data lives in app/.git/modules.
    got = shipped(inside, tmp_path / "received")
    assert state(got) == state(inside)
    assert "core.worktree=" not in git(got, "config", "--list", "--local")

    # The superproject: the submodule's files and its .git file come along.
    names = repoship.files_of(app)
    assert {"vendor/lib/.git", "vendor/lib/lib.c", "main.c", ".gitmodules"} <= set(names)
    got = shipped(app, tmp_path / "received2")
    assert state(got) == state(app)
    assert state(got / "vendor" / "lib") == state(inside)


def test_a_directory_outside_any_repository_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    with pytest.raises(BadRequest, match="not a git work tree"):
        repoship.shipment(plain)


# ----------------------------------------------------------- vm exec --auto-prepare


def test_the_fingerprint_moves_with_what_a_workspace_copies(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {".gitignore": "*.o\n", "a.c": "a"})

    def fp() -> str:
        return repoship.fingerprint(repoship.shipment(repo))

    first = fp()
    assert fp() == first  # nothing changed: the same
    (repo / "b.o").write_text("ignored")
    assert fp() == first  # an ignored file is not copied
    for change in (lambda: (repo / "a.c").write_text("edited"),
                   lambda: (repo / "new.txt").write_text("untracked"),
                   lambda: git(repo, "add", "new.txt"),
                   lambda: git(repo, "commit", "-qm", "second"),
                   lambda: git(repo, "checkout", "-qb", "other")):
        before = fp()
        change()
        assert fp() != before


class _App:
    """What :func:`resync_source` reads of the CLI's app: whether the daemon is remote."""

    def __init__(self, remote: object) -> None:
        self.remote = remote


def test_auto_prepare_over_a_remote_host_compares_the_origin_here(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.c": "a"})
    origin = repoship.origin(repoship.shipment(repo)).model_dump()
    st = {"vm": "web", "host_path": "/remote/received/r", "needs_resync": True,
          "origin": origin}
    remote = _App("ssh://box")
    assert resync_source(remote, st) is None  # type: ignore[arg-type]
    (repo / "a.c").write_text("edited")
    assert resync_source(remote, st) == repo  # type: ignore[arg-type]
    # Here (no remote host) the daemon's own answer counts.
    assert resync_source(_App(None), st) == Path("/remote/received/r")  # type: ignore[arg-type]
    for other in (None, {**origin, "host": "another-machine"}):
        with pytest.raises(BadRequest, match="not sent from this machine") as exc:
            resync_source(remote, {**st, "origin": other})  # type: ignore[arg-type]
        assert "vm workspace prepare web PATH" in exc.value.hint
    gone = {**st, "origin": {**origin, "path": str(tmp_path / "gone")}}
    assert resync_source(remote, gone) == tmp_path / "gone"  # type: ignore[arg-type]


# ----------------------------------------------------------- image and kernel files


def test_files_go_as_key_and_name_and_arrive_whole(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * 5000)
    other = tmp_path / "other"
    other.mkdir()
    (other / "vmlinuz").write_bytes(b"second file of the same name")
    buf = io.BytesIO()
    counted: list[int] = []
    repoship.write_files({"kernel0": kernel, "kernel1": other / "vmlinuz"}, buf, counted.append)
    assert sum(counted) == 5000 + len(b"second file of the same name")
    buf.seek(0)
    got = repoship.unpack(repoship.FILES, buf, tmp_path / "received")
    assert (got / "kernel0" / "vmlinuz").read_bytes() == b"K" * 5000
    assert (got / "kernel1" / "vmlinuz").read_bytes() == b"second file of the same name"
    with pytest.raises(BadRequest, match="not a regular file"):
        repoship.write_files({"dir": other}, io.BytesIO())


def test_a_file_that_cannot_be_sent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"cannot send .*nope: No such file"):
        repoship.send_files(None, {"kernel0": tmp_path / "nope"})  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="not a file key"):
        repoship.send_files(None, {"../x": tmp_path})  # type: ignore[arg-type]
