"""What ``banger --host`` sends of a repository (:mod:`banger.repoship`), with real git:
a plain repository, a linked worktree (of a normal and of a bare repository), a
submodule as the repository, and populated submodules inside one. Each is written as
the tar ``receive`` unpacks, unpacked, and compared with the original by git itself."""

from __future__ import annotations

import io
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from banger import remote, remotecopy, repoship
from banger.cli.workspace import resync_source
from banger.errors import BadRequest
from banger.remote import SSHLink, SSHTarget
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
    return remotecopy.unpack(top.name, buf, root)


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
    assert ship.files == 4
    assert [name for name, _ in ship.configs] == [".git/config"]  # with this identity
    assert b"name = t" in ship.configs[0][1] and b"email = t@t" in ship.configs[0][1]
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
    assert git(got, "branch", "--format=%(refname:short)").split() == ["feature", "main"]


def test_only_a_linked_worktrees_own_state_goes_never_the_main_trees(
        tmp_path: Path) -> None:
    """git shares a few paths of the common directory between worktrees; the rest of it
    is the main work tree's (a bisect, a notes merge), and stays home."""
    main = make_repo(tmp_path / "main", {"a.txt": "1\n"})
    for n in (2, 3):
        (main / "a.txt").write_text(f"{n}\n")
        git(main, "commit", "-qam", f"c{n}")
    wt = tmp_path / "wt"
    git(main, "worktree", "add", "-q", "-b", "feature", str(wt), "HEAD~1")
    git(main, "bisect", "start", "HEAD", "HEAD~2")  # the main tree's bisect
    (main / ".git" / "logs" / "refs" / "bisect").mkdir()  # a per-worktree reflog
    (main / ".git" / "logs" / "refs" / "bisect" / "bad").write_text("")
    (main / ".git" / "NOTES_MERGE_REF").write_text("ref: refs/notes/commits\n")
    git(wt, "bisect", "start", "HEAD", "HEAD~1")  # and the worktree's own
    main_only = ("COMMIT_EDITMSG", "NOTES_MERGE_REF", "logs/refs/bisect/bad")
    assert all((main / ".git" / name).exists() for name in main_only)
    got = shipped(wt, tmp_path / "received")
    dot = got / ".git"
    assert [name for name in main_only if (dot / name).exists()] == []
    assert (dot / "BISECT_LOG").read_text() == \
        (main / ".git" / "worktrees" / "wt" / "BISECT_LOG").read_text()
    assert git(got, "rev-parse", "refs/bisect/bad") == git(wt, "rev-parse", "refs/bisect/bad")
    assert state(got) == state(wt)


def test_a_worktree_config_goes_without_this_machines_paths(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.txt": "a\n"})
    git(repo, "config", "extensions.worktreeConfig", "true")
    git(repo, "config", "--worktree", "core.worktree", str(repo))
    git(repo, "config", "--worktree", "banger.test", "kept")
    got = shipped(repo, tmp_path / "received")
    worktree_config = git(got, "config", "--list", "--worktree")
    assert "banger.test=kept" in worktree_config
    assert "core.worktree" not in worktree_config
    assert state(got) == state(repo)
    assert Path(git(got, "rev-parse", "--show-toplevel").strip()) == got


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

    # The superproject: the submodule's files and its git data (a .git of its own).
    names = {m.arcname for m in repoship.shipment(app).members}
    assert {"vendor/lib/.git", "vendor/lib/lib.c", "main.c", ".gitmodules"} <= names
    got = shipped(app, tmp_path / "received2")
    assert state(got) == state(app)
    assert state(got / "vendor" / "lib") == state(inside)
    assert (got / "vendor" / "lib" / ".git").is_dir()


def test_submodules_in_a_worktree_and_of_the_old_layout_arrive_whole(tmp_path: Path) -> None:
    """A submodule's git data lives in the worktree's own git dir ("modules" is per
    worktree); an old-style submodule has a .git directory of its own. Each arrives as
    a repository with a .git directory of its own."""
    lib = make_repo(tmp_path / "lib", {"lib.c": "lib\n"})
    app = make_repo(tmp_path / "app", {"main.c": "main\n"})
    git(app, "submodule", "add", "-q", str(lib), "vendor/lib")
    git(app, "commit", "-qm", "add lib")
    wt = tmp_path / "wt"
    git(app, "worktree", "add", "-q", "-b", "w", str(wt))
    git(wt, "submodule", "update", "-q", "--init")
    (wt / "vendor" / "lib" / "lib.c").write_text("patched in the worktree\n")
    got = shipped(wt, tmp_path / "received")
    assert state(got) == state(wt)
    assert state(got / "vendor" / "lib") == state(wt / "vendor" / "lib")

    old = make_repo(tmp_path / "old", {"top.c": "top\n"})
    git(tmp_path, "clone", "-q", str(lib), str(old / "embedded"))  # .git is a directory
    git(old, "add", "embedded")  # a gitlink with its own .git directory
    git(old, "commit", "-qm", "embed")
    (old / "embedded" / "lib.c").write_text("edited\n")
    got = shipped(old, tmp_path / "received2")
    assert (got / "embedded" / "lib.c").read_text() == "edited\n"
    assert state(got / "embedded") == state(old / "embedded")


def test_a_repository_inside_that_is_not_a_submodule_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.c": "a"})
    make_repo(repo / "nested", {"n.c": "n"})  # untracked, not a submodule
    with pytest.raises(BadRequest, match=r"repository that is not a submodule \(nested\)"):
        repoship.shipment(repo)


def test_a_stream_cut_short_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.c": "a" * 3000, "b.c": "b"})
    buf = io.BytesIO()
    repoship.write_tar(repoship.shipment(repo), buf)
    data = buf.getvalue()
    root = tmp_path / "received"
    marker = data.rindex(remotecopy.COMPLETE.encode()) // 512 * 512  # the last header
    for cut in (512, 1024, marker // 2, marker):  # at member boundaries, and inside one
        with pytest.raises(BadRequest, match=r"cut short|could not be unpacked"):
            remotecopy.unpack("r", io.BytesIO(data[:cut]), root)
        assert list(root.iterdir()) == []
    whole = remotecopy.unpack("r", io.BytesIO(data), root)
    assert not (whole / remotecopy.COMPLETE).exists()  # the marker is not the repository's


def _receiving_here(monkeypatch: pytest.MonkeyPatch, root: Path,
                    before_each: Callable[[int], None]) -> list[str]:
    """The ssh run of ``receive`` (:meth:`SSHLink.capture`), played here:
    ``before_each(n)`` runs, then the stream is written into ``unpack`` (the remote's
    ``receive``) under ``root``. The results, one per send: the path, or the writer's
    error."""
    sends: list[str] = []

    def run_bounded(argv: list[str], *, timeout: float, input: Any, limit: int) -> Any:
        before_each(len(sends))
        buf = io.BytesIO()
        try:
            input(buf)
        except OSError as exc:
            sends.append(f"failed: {exc}")
            with pytest.raises(BadRequest, match=r"cut short|could not be unpacked"):
                remotecopy.unpack("r", io.BytesIO(buf.getvalue()), root)  # what it got
            raise
        got = remotecopy.unpack("r", io.BytesIO(buf.getvalue()), root)
        sends.append(str(got))
        return subprocess.CompletedProcess(argv, 0, json.dumps({"path": str(got)}).encode(), b"")

    monkeypatch.setattr(remote, "run_bounded", run_bounded)
    return sends


def test_a_file_that_goes_away_mid_send_sends_the_tree_again_as_it_is_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "r", {"keep.c": "k", "gone.c": "g"})
    ship = repoship.shipment(repo)
    link = SSHLink(SSHTarget("box"))
    sends = _receiving_here(monkeypatch, tmp_path / "received",
                            lambda n: (repo / "gone.c").unlink(missing_ok=True))
    there = Path(repoship.send(link, ship))
    assert len(sends) == 2 and sends[0].startswith("failed:") and "gone.c" in sends[0]
    assert sorted(p.name for p in there.iterdir()) == [".git", "keep.c"]
    git(there, "fsck", "--no-progress")
    # A file gone in the second send too: a clear error, and nothing left received.
    for n in (0, 1):
        (repo / f"{n}.c").write_text(str(n))
    sends = _receiving_here(monkeypatch, tmp_path / "received2",
                            lambda n: (repo / f"{n}.c").unlink())
    with pytest.raises(BadRequest, match=r"cannot send .*1\.c") as err:
        repoship.send(link, repoship.shipment(repo))
    assert err.value.hint and "try again" in err.value.hint
    assert len(sends) == 2 and list((tmp_path / "received2").iterdir()) == []


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


def test_the_fingerprint_moves_with_a_submodules_commit(tmp_path: Path) -> None:
    lib = make_repo(tmp_path / "lib", {"lib.c": "lib\n"})
    app = make_repo(tmp_path / "app", {"main.c": "main\n"})
    git(app, "submodule", "add", "-q", str(lib), "vendor/lib")
    git(app, "commit", "-qm", "add lib")
    before = repoship.fingerprint(repoship.shipment(app))
    git(app / "vendor" / "lib", "commit", "-q", "--allow-empty", "-m", "inside")
    assert repoship.fingerprint(repoship.shipment(app)) != before


def test_prepares_at_once_each_keep_their_record(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.c": "a"})
    origin = repoship.origin(repoship.shipment(repo))
    path = tmp_path / "state" / "sent.json"
    start = threading.Barrier(6)

    def prepare(n: int) -> None:
        start.wait()
        for i in range(15):
            repoship.SentWorkspaces(path).remember("ssh://box", f"vm{n}-{i}", origin)

    threads = [threading.Thread(target=prepare, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = repoship.SentWorkspaces(path)
    lost = [f"vm{n}-{i}" for n in range(6) for i in range(15)
            if sent.recall("ssh://box", f"vm{n}-{i}") is None]
    assert lost == []


class _App:
    """What :func:`resync_source` reads of the CLI's app: whether the daemon is remote."""

    def __init__(self, remote: object) -> None:
        self.remote = remote


def test_auto_prepare_over_a_remote_host_trusts_only_this_machines_record(
        tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"a.c": "a"})
    sent = repoship.SentWorkspaces(tmp_path / "state" / "sent.json")
    origin = repoship.origin(repoship.shipment(repo))
    sent.remember("ssh://box", "0123456789ab", origin)
    assert oct(sent.path.stat().st_mode & 0o777) == "0o600"
    st = {"vm": "web", "vm_id": "0123456789ab", "host_path": "/remote/received/r",
          "needs_resync": True, "prepared": True, "origin": origin.model_dump()}
    remote = _App("ssh://box")

    def source(status: dict[str, Any]) -> Path | None:
        return resync_source(remote, status, sent)  # type: ignore[arg-type]

    assert source(st) is None
    (repo / "a.c").write_text("edited")
    assert source(st) == repo
    # Here (no remote host) the daemon's own answer counts.
    assert resync_source(_App(None), st) == Path("/remote/received/r")  # type: ignore[arg-type]
    # A copy that did not finish is made again, changed or not.
    git(repo, "checkout", "--", "a.c")
    again = repoship.origin(repoship.shipment(repo))
    sent.remember("ssh://box", "0123456789ab", again)
    fresh = {**st, "origin": again.model_dump()}
    assert source(fresh) is None
    assert source({**fresh, "prepared": False}) == repo
    assert source({**fresh, "error": "cancelled"}) == repo
    # The remote's origin never names the path: a path it makes up is not sent.
    planted = {**fresh, "origin": {**again.model_dump(), "path": "/home/me/.ssh"}}
    assert source(planted) is None
    for other, why in (({**fresh, "vm_id": "ffffffffffff"}, "not sent from this machine"),
                       ({**fresh, "origin": None}, "prepared again since"),
                       ({**fresh, "origin": {**again.model_dump(), "nonce": "0" * 32}},
                        "prepared again since")):
        with pytest.raises(BadRequest, match=why) as exc:
            source(other)
        assert "vm workspace prepare web PATH" in exc.value.hint
    gone = repoship.origin(repoship.shipment(repo)).model_copy(
        update={"path": str(tmp_path / "gone")})
    sent.remember("ssh://box", "0123456789ab", gone)
    assert source({**fresh, "origin": gone.model_dump()}) == tmp_path / "gone"


def test_a_lock_file_is_data_in_the_work_tree_and_scratch_in_git(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"Cargo.lock": "deps\n", "sub/yarn.lock": "deps\n"})
    (repo / ".git" / "index.lock").write_text("a git running here")
    got = shipped(repo, tmp_path / "received")
    assert (got / "Cargo.lock").read_text() == "deps\n"
    assert (got / "sub" / "yarn.lock").read_text() == "deps\n"
    assert not (got / ".git" / "index.lock").exists()
    (repo / remotecopy.COMPLETE).write_text("mine")
    with pytest.raises(BadRequest, match="the name banger's stream ends with"):
        repoship.shipment(repo)
