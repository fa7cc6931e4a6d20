"""Workspace prepare/export end to end against a local stand-in for the guest.

``LocalGuest`` implements the guest channel by running each guest script with the
local ``/bin/sh`` (``run`` = ``sh -c``, ``popen`` likewise), and a temp directory
stands in for the guest's ``/root``: the real scripts, tar and git streams run,
only ssh is missing. Host repositories are real git repositories in tmp dirs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from banger.daemon import workspace as ws
from banger.daemon.workspace import importer, scripts
from banger.errors import BadRequest, Cancelled, GuestError, NotFound
from banger.runner import CancelToken, Result, SubprocessRunner
from tests.gitenv import isolate_git

RUNNER = SubprocessRunner()
IGNORED = ("build/", ".log", ".tmp")  # what the test repositories ignore (see make_repo)


# --------------------------------------------------------------------------- helpers


class LocalGuest:
    """The guest channel, run locally: scripts go to ``sh -c`` with a clean environment."""

    ip = "127.0.0.1"

    def __init__(self, home: Path, extra_path: Path | None = None) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        self.env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C")
        if extra_path is not None:
            self.env["PATH"] = f"{extra_path}:{self.env['PATH']}"
        self.scripts: list[str] = []

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        self.scripts.append(script)
        proc = subprocess.run(["sh", "-c", script], input=input, capture_output=True,
                              timeout=timeout, env=self.env,
                              stdin=None if input is not None else subprocess.DEVNULL)
        res = Result(["sh", "-c", desc], proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise GuestError(f"{desc} failed: {res.err}")
        return res

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        self.scripts.append(script)
        return subprocess.Popen(["sh", "-c", script], env=self.env, **kwargs)


def _replace_extraction(script: str, replacement: str) -> str:
    """``script`` with its tar extraction replaced by ``sh -c replacement``, reading the
    same input (the ssh channel's stdin or the TCP connection): the preflight before it,
    and the choice of channel, still run."""
    tar = " ".join(scripts._TAR_X)
    assert tar in script, "the files step extracts with tar"
    return script.replace(tar, f"sh -c {shlex.quote(replacement)}")


class StuckGuest(LocalGuest):
    """A guest whose file extraction never reads its input (a hung or full guest)."""

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        if "tar -x" in script:
            script = _replace_extraction(script, "exec sleep 60")
        return super().popen(script, **kwargs)


class FailingGuest(LocalGuest):
    """A guest whose file extraction dies halfway (think: disk full)."""

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        if "tar -x" in script:
            script = _replace_extraction(
                script, "head -c 100000 >/dev/null; echo 'tar: write error: No space left on "
                        "device' >&2; exit 2")
        return super().popen(script, **kwargs)


def git(cwd: Path | str, *args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          input=input).stdout


@pytest.fixture(autouse=True)
def clean_git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host git sees no user or system config, and no GIT_* from the test runner."""
    isolate_git(tmp_path / "host-gitconfig", monkeypatch)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = (tmp_path / "guest-root").resolve()
    h.mkdir()
    return h


@pytest.fixture
def guest(home: Path) -> LocalGuest:
    return LocalGuest(home)


def commit_all(repo: Path, msg: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", msg)


def new_repo(repo: Path, *init_args: str) -> Path:
    """An empty repository at ``repo`` with a committer identity."""
    repo.mkdir()
    git(repo, "init", "-q", *init_args)
    git(repo, "config", "user.name", "x")
    git(repo, "config", "user.email", "x@x")
    return repo


def make_repo(root: Path) -> Path:
    """A repository with history whose work tree has every kind of change."""
    repo = root / "proj"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Ada Host")
    git(repo, "config", "user.email", "ada@host.example")
    (repo / ".gitignore").write_text("build/\n*.log\n")
    (repo / "README.md").write_text("# proj\n")
    (repo / "src").mkdir()
    (repo / "src" / "lib.py").write_text("def f():\n    return 1\n")
    for i in range(4):  # history deeper than the shallow depth
        (repo / "history.txt").write_text(f"generation {i}\n")
        commit_all(repo, f"generation {i}")
    run = repo / "run.sh"
    run.write_text("#!/bin/sh\necho run\n")
    run.chmod(0o755)
    tool = repo / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool\n")
    tool.chmod(0o755)
    (repo / "data.bin").write_bytes(bytes(range(256)) * 8 + b"\0\xff\0")
    os.symlink("src/lib.py", repo / "link_in")
    os.symlink("/etc/hostname", repo / "link_out")
    for name in ("with space.txt", "ünïcödé.txt", "-leading-dash.txt", "quote'single.txt",
                 'quote"double.txt', "glob*?[x].txt", "$dollar.txt"):
        (repo / name).write_text(f"odd name {name}\n")
    (repo / "gone_staged.txt").write_text("to be git rm'd\n")
    (repo / "gone_unstaged.txt").write_text("to be rm'd\n")
    (repo / "old_name.txt").write_text("to be git mv'd\n")
    commit_all(repo, "content")

    # Uncommitted state of every kind.
    (repo / "src" / "lib.py").write_text("def f():\n    return 2\n")            # unstaged
    (repo / "README.md").write_text("# proj\nstaged line\n")
    git(repo, "add", "README.md")
    (repo / "README.md").write_text("# proj\nstaged line\nunstaged line\n")  # MM
    (repo / "staged.txt").write_text("new and staged\n")
    git(repo, "add", "staged.txt")                                              # A
    git(repo, "rm", "-q", "gone_staged.txt")                                    # D
    (repo / "gone_unstaged.txt").unlink()                                       # " D"
    git(repo, "mv", "old_name.txt", "new_name.txt")                             # R
    (repo / "data.bin").write_bytes(b"\0binary\xfe" * 300)                     # binary M
    (repo / "notes").mkdir()
    (repo / "notes" / "untracked.txt").write_text("untracked\n")               # ??
    os.symlink("../../outside/target", repo / "link_up")                       # ?? symlink
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_bytes(b"ignored")                      # ignored
    (repo / "debug.log").write_text("ignored\n")                              # ignored
    exclude = repo / ".git" / "info" / "exclude"
    exclude.write_text(exclude.read_text() + "*.tmp\n")
    (repo / "scratch.tmp").write_text("ignored by info/exclude\n")           # ignored
    return repo


def is_ignored(rel: str) -> bool:
    return rel.startswith("build/") or rel.endswith((".log", ".tmp"))


def tree_of(root: Path) -> dict[str, tuple[str, object]]:
    """Every non-ignored path below ``root`` (``.git`` excluded): kind, mode, content/target."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        links = [d for d in dirnames if os.path.islink(Path(dirpath, d))]
        for name in [f for f in [*filenames, *links] if f != ".git"]:  # .git: a gitfile
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if is_ignored(rel):
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            else:
                out[rel] = ("file", (bool(st.st_mode & stat.S_IXUSR), path.read_bytes()))
    return out


def replicate_work_tree(src: Path, dst: Path) -> None:
    """Make ``dst``'s files (not its .git) exactly ``src``'s, ignored files included."""
    for entry in dst.iterdir():
        if entry.name == ".git":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in src.iterdir():
        if entry.name == ".git":
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)


def clone_at(repo: Path, commit: str, dst: Path) -> Path:
    git(repo.parent, "clone", "-q", "--no-checkout", str(repo), str(dst))
    git(dst, "checkout", "-q", "--detach", commit)
    return dst


def apply(patch: bytes, where: Path) -> None:
    proc = subprocess.run(["git", "apply", "--binary", "-"], cwd=where, input=patch,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def do_prepare(repo: Path, guest: LocalGuest, **kw: Any) -> ws.Prepared:
    mode = kw.pop("mode", ws.WorkspaceMode.SHALLOW)
    kw.setdefault("tcp_min_bytes", 0)  # so tests take the TCP path unless they say
    info = ws.inspect_repo(RUNNER, str(repo), mode)
    plan = ws.build_plan(RUNNER, info)
    return ws.prepare(guest, RUNNER, info, plan, home=str(guest.home), **kw)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if ".banger-" in p.name)


# --------------------------------------------------------------------------- the scenario


@pytest.fixture
def prepared(tmp_path: Path, guest: LocalGuest) -> Iterator[tuple[Path, ws.Prepared]]:
    repo = make_repo(tmp_path / "host")
    yield repo, do_prepare(repo, guest)


def test_prepare_reproduces_host_state(prepared: tuple[Path, ws.Prepared], home: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    assert gp == home / "proj"
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    assert prep.base_commit == head == prep.head_commit
    assert git(gp, "rev-parse", "HEAD").decode().strip() == head
    assert git(gp, "symbolic-ref", "HEAD").decode().strip() == "refs/heads/main"
    assert prep.branch == "main"
    # git status, staged and unstaged, is the host's (v2 also compares modes and blob ids)
    for fmt in ("--porcelain", "--porcelain=v2"):
        host_status = git(repo, "status", fmt, "-z")
        assert git(gp, "status", fmt, "-z") == host_status
    assert b"MM README.md" in git(gp, "status", "--porcelain")
    # the work tree, byte for byte, modes and symlinks included; ignored files not copied
    assert tree_of(gp) == tree_of(repo)
    assert not (gp / "build").exists() and not (gp / "debug.log").exists()
    assert not (gp / "scratch.tmp").exists()
    assert os.readlink(gp / "link_out") == "/etc/hostname"
    assert os.readlink(gp / "link_up") == "../../outside/target"
    # shallow history: depth 3, with a correct shallow file
    assert len(git(gp, "rev-list", "HEAD").split()) == 3
    shallow = (gp / ".git" / "shallow").read_text().split()
    assert shallow == [git(repo, "rev-parse", "HEAD~2").decode().strip()]
    git(gp, "fsck", "--no-progress", "--strict")
    # identity, prepared snapshot, copied excludes
    assert git(gp, "config", "user.name").decode().strip() == "Ada Host"
    assert git(gp, "config", "user.email").decode().strip() == "ada@host.example"
    snap = git(gp, "rev-parse", ws.PREPARED_REF).decode().strip()
    assert snap == prep.prepared_commit
    assert git(gp, "rev-parse", f"{snap}^").decode().strip() == head
    assert "*.tmp" in (gp / ".git" / "info" / "exclude").read_text()
    assert prep.files == len([p for p in tree_of(repo) if not is_ignored(p)])
    assert prep.bytes > 0
    assert leftovers(home) == []


def test_export_round_trip(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                           tmp_path: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    # Work in the guest: edit, add, delete, rename, chmod, retarget a symlink,
    # change a binary, turn a file into a symlink, commit part of it.
    (gp / "src" / "lib.py").write_text("def f():\n    return 3\n")
    (gp / "new" / "dir").mkdir(parents=True)
    (gp / "new" / "dir" / "file.txt").write_text("brand new\n")
    (gp / "README.md").unlink()
    (gp / "bin").mkdir()
    os.rename(gp / "run.sh", gp / "bin" / "run.sh")
    (gp / "with space.txt").chmod(0o755)
    (gp / "tool.sh").chmod(0o644)
    (gp / "link_in").unlink()
    os.symlink("staged.txt", gp / "link_in")
    (gp / "data.bin").write_bytes(b"\x00\x01changed binary\xff" * 100)
    (gp / "ünïcödé.txt").unlink()
    os.symlink("with space.txt", gp / "ünïcödé.txt")
    (gp / "-leading-dash.txt").write_text("edited\n")
    (gp / "build").mkdir()
    (gp / "build" / "artifact").write_text("ignored output\n")
    (gp / "guest.tmp").write_text("ignored by the copied exclude\n")
    git(gp, "add", "src/lib.py")
    git(gp, "-c", "user.name=g", "-c", "user.email=g@g", "commit", "-q", "-m", "guest commit")
    index_before = file_hash(gp / ".git" / "index")
    head_before = git(gp, "rev-parse", "HEAD")
    status_before = git(gp, "status", "--porcelain", "-z")

    out = ws.export(guest, prep.guest_path, home=str(guest.home))

    # the guest repository is untouched by the export
    assert file_hash(gp / ".git" / "index") == index_before
    assert git(gp, "rev-parse", "HEAD") == head_before
    assert git(gp, "status", "--porcelain", "-z") == status_before
    assert out.base == prep.prepared_commit
    changes = {c.path: c for c in out.changes}
    assert changes["README.md"].status == "D"
    assert changes["new/dir/file.txt"].status == "A"
    assert changes["bin/run.sh"].status == "R" and changes["bin/run.sh"].old_path == "run.sh"
    assert changes["with space.txt"].status == "M"
    assert changes["src/lib.py"].status == "M"  # committed in the guest, still exported
    assert changes["ünïcödé.txt"].status == "T"
    assert "build/artifact" not in changes and "guest.tmp" not in changes
    assert b"GIT binary patch" in out.patch

    # Apply onto the host state as copied: base commit + the host's uncommitted changes.
    target = clone_at(repo, prep.base_commit or "", tmp_path / "apply")
    replicate_work_tree(repo, target)
    assert tree_of(target) == tree_of(repo)
    apply(out.patch, target)
    assert tree_of(target) == tree_of(gp)


def test_export_against_base_commit(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                                    tmp_path: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "src" / "lib.py").write_text("guest\n")
    (gp / "added.txt").write_text("added in guest\n")
    assert prep.base_commit is not None
    out = ws.export(guest, prep.guest_path, base_commit=prep.base_commit, home=str(guest.home))
    assert out.base == prep.base_commit
    changes = {c.path: c.status for c in out.changes}
    # the host's uncommitted changes travel too
    assert changes["staged.txt"] == "A"
    assert changes["gone_staged.txt"] == "D" and changes["gone_unstaged.txt"] == "D"
    assert changes["notes/untracked.txt"] == "A"
    assert changes["added.txt"] == "A"
    target = clone_at(repo, prep.base_commit, tmp_path / "apply")
    apply(out.patch, target)
    assert tree_of(target) == tree_of(gp)


def test_export_with_no_changes_is_empty(prepared: tuple[Path, ws.Prepared],
                                         guest: LocalGuest) -> None:
    _, prep = prepared
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert out.patch == b"" and out.changes == ()


def test_export_sees_a_racy_same_size_edit(tmp_path: Path, guest: LocalGuest) -> None:
    """Host write, copy and guest edit within one second, same size, export a second
    later: stat data cannot tell the edit apart, git's racy-entry check must."""
    repo = new_repo(tmp_path / "racy")
    (repo / "f").write_text("aaaa\n")
    commit_all(repo, "c")
    time.sleep(1.02 - time.time() % 1)  # start of a second
    (repo / "f").write_text("bbbb\n")
    prep = do_prepare(repo, guest)
    (Path(prep.guest_path) / "f").write_text("cccc\n")
    if time.time() % 1 >= 0.9:
        pytest.skip("too slow to keep the copy and the edit within one second")
    time.sleep(1.0)
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert [(c.status, c.path) for c in out.changes] == [("M", "f")]


def test_export_large_binary_is_not_truncated(prepared: tuple[Path, ws.Prepared],
                                              guest: LocalGuest, tmp_path: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "blob.bin").write_bytes(os.urandom(3 << 20))  # patch well over a pipe's worth
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert len(out.patch) > 3 << 20
    target = clone_at(repo, prep.base_commit or "", tmp_path / "apply")
    replicate_work_tree(repo, target)
    apply(out.patch, target)
    assert (target / "blob.bin").read_bytes() == (gp / "blob.bin").read_bytes()


def test_export_can_be_cancelled(prepared: tuple[Path, ws.Prepared], guest: LocalGuest) -> None:
    _, prep = prepared
    token = CancelToken()
    token.cancel("enough")
    with pytest.raises(Cancelled, match="enough"):
        ws.export(guest, prep.guest_path, cancel=token, home=str(guest.home))
    assert not list((Path(prep.guest_path) / ".git" / "banger").glob("export.*"))


def test_export_refusals(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                         home: Path) -> None:
    _, prep = prepared
    with pytest.raises(NotFound):
        ws.export(guest, str(home / "nothing-here"), home=str(home))
    with pytest.raises(BadRequest, match="unknown base commit"):
        ws.export(guest, prep.guest_path, base_commit="0" * 40, home=str(home))
    with pytest.raises(BadRequest, match="invalid base commit"):
        ws.export(guest, prep.guest_path, base_commit="--output=/etc/x", home=str(home))
    with pytest.raises(BadRequest):
        ws.export(guest, "/etc", home=str(home))


# --------------------------------------------------------------------------- re-prepare,
# cancellation and failures


def test_reprepare_replaces_the_old_workspace(prepared: tuple[Path, ws.Prepared],
                                              guest: LocalGuest, home: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "guest-only.txt").write_text("left from the first workspace\n")
    (repo / "second.txt").write_text("second prepare\n")
    prep2 = do_prepare(repo, guest)
    assert prep2.guest_path == prep.guest_path
    assert (gp / "second.txt").read_text() == "second prepare\n"
    assert not (gp / "guest-only.txt").exists()
    assert tree_of(gp) == tree_of(repo)
    assert leftovers(home) == []


def test_reprepare_reapplies_guest_changes_on_the_new_copy(
        prepared: tuple[Path, ws.Prepared], guest: LocalGuest, home: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "src" / "lib.py").write_text("def f():\n    return 'guest'\n")
    (gp / "guest-new.txt").write_text("made in the guest\n")
    (gp / "data.bin").write_bytes(b"\xffguest binary\x00")
    saved = ws.export(guest, prep.guest_path, home=str(home))
    (repo / "host-new.txt").write_text("made on the host\n")
    (repo / "history.txt").write_text("host edit\n")
    prep2 = do_prepare(repo, guest, guest_changes=saved.patch)
    assert prep2.reapplied == "applied"
    assert (gp / "host-new.txt").read_text() == "made on the host\n"
    assert (gp / "history.txt").read_text() == "host edit\n"
    assert (gp / "guest-new.txt").read_text() == "made in the guest\n"
    assert (gp / "src" / "lib.py").read_text() == "def f():\n    return 'guest'\n"
    assert (gp / "data.bin").read_bytes() == b"\xffguest binary\x00"
    # the re-applied edits are the guest's own changes against the new snapshot
    again = ws.export(guest, prep.guest_path, home=str(home))
    assert sorted(c.path for c in again.changes) == ["data.bin", "guest-new.txt",
                                                     "src/lib.py"]
    assert leftovers(home) == []


def test_reprepare_with_guest_changes_already_on_the_host(
        prepared: tuple[Path, ws.Prepared], guest: LocalGuest, home: Path) -> None:
    """The usual loop: export, apply on the host, prepare again."""
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "src" / "lib.py").write_text("def f():\n    return 'guest'\n")
    saved = ws.export(guest, prep.guest_path, home=str(home))
    apply(saved.patch, repo)
    prep2 = do_prepare(repo, guest, guest_changes=saved.patch)
    assert prep2.reapplied == "present"
    assert ws.export(guest, prep.guest_path, home=str(home)).changes == ()


def test_reprepare_refuses_conflicting_guest_changes_before_replacing(
        prepared: tuple[Path, ws.Prepared], guest: LocalGuest, home: Path) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "history.txt").write_text("guest edit\n")
    saved = ws.export(guest, prep.guest_path, home=str(home))
    (repo / "history.txt").write_text("conflicting host edit\n")
    (repo / "host-new.txt").write_text("made on the host\n")
    with pytest.raises(ws.WorkspaceConflict, match=r"history\.txt"):
        do_prepare(repo, guest, guest_changes=saved.patch)
    # the old workspace, guest edit included, is exactly as it was
    assert (gp / "history.txt").read_text() == "guest edit\n"
    assert not (gp / "host-new.txt").exists()
    assert git(gp, "rev-parse", ws.PREPARED_REF).decode().strip() == prep.prepared_commit
    assert leftovers(home) == []


def test_reprepare_saves_the_changes_of_a_workspace_it_finds_first(
        prepared: tuple[Path, ws.Prepared], guest: LocalGuest, home: Path) -> None:
    """With ``save_changes``, the copy learns from the guest whether a workspace is in
    the way: only then are its changes saved (and re-applied); a new target costs the
    one script the copy needs."""
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "guest-new.txt").write_text("made in the guest\n")
    calls: list[bytes] = []

    def save() -> bytes:
        calls.append(ws.export(guest, prep.guest_path, home=str(home)).patch)
        return calls[-1]

    (repo / "host-new.txt").write_text("made on the host\n")
    prep2 = do_prepare(repo, guest, save_changes=save)
    assert len(calls) == 1 and b"guest-new.txt" in calls[0]
    assert prep2.reapplied == "applied"
    assert (gp / "guest-new.txt").read_text() == "made in the guest\n"
    assert (gp / "host-new.txt").read_text() == "made on the host\n"
    assert leftovers(home) == []

    guest.scripts.clear()
    fresh = do_prepare(repo, guest, save_changes=save, guest_path=str(home / "other"))
    assert len(calls) == 1 and fresh.reapplied is None
    assert len(guest.scripts) == 1  # preflight, files, set-up and swap in one go


def test_clean_tree_takes_head_as_its_snapshot(tmp_path: Path, guest: LocalGuest) -> None:
    """A clean host tree whose files are their blobs is exactly HEAD's tree: HEAD's commit
    is the prepared snapshot, and the guest makes none. Anything else gets one."""
    repo = new_repo(tmp_path / "clean")
    (repo / "a.txt").write_text("a\n")
    os.symlink("a.txt", repo / "link")
    commit_all(repo, "clean")
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert prep.prepared_commit == head
    assert git(gp, "rev-parse", ws.PREPARED_REF).decode().strip() == head
    (gp / "a.txt").write_text("edited in the guest\n")
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert [c.path for c in out.changes] == ["a.txt"]

    (repo / "untracked.txt").write_text("new\n")
    dirty = do_prepare(repo, guest, guest_path=str(guest.home / "dirty"))
    assert dirty.prepared_commit != head
    gd = Path(dirty.guest_path)
    assert git(gd, "rev-parse", f"{ws.PREPARED_REF}^").decode().strip() == head
    assert b"untracked.txt" in git(gd, "ls-tree", "--name-only", ws.PREPARED_REF)
    assert ws.export(guest, dirty.guest_path, home=str(guest.home)).changes == ()


def test_cancel_mid_copy_leaves_nothing_that_looks_complete(
        tmp_path: Path, guest: LocalGuest, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "host")
    (repo / "big.bin").write_bytes(os.urandom(8 << 20))
    monkeypatch.setattr(importer._Counter, "REPORT_EVERY_S", 0.0)
    seen: list[int] = []

    def cancel_after_2mib(token: CancelToken) -> ws.Progress:
        def progress(sent: int, files: int) -> None:
            seen.append(sent)
            if sent >= 2 << 20:
                token.cancel("user pressed ^C")
        return progress

    token = CancelToken()
    with pytest.raises(Cancelled, match="user pressed"):
        do_prepare(repo, guest, progress=cancel_after_2mib(token), cancel=token)
    assert max(seen) < 8 << 20  # it really stopped mid-copy
    assert not (home / "proj").exists()
    assert leftovers(home) == []

    # With an earlier workspace in place, a cancelled prepare leaves it as it was.
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    (gp / "sentinel").write_text("old workspace\n")
    (repo / "big.bin").write_bytes(os.urandom(8 << 20))
    token = CancelToken()
    with pytest.raises(Cancelled):
        do_prepare(repo, guest, progress=cancel_after_2mib(token), cancel=token)
    assert (gp / "sentinel").read_text() == "old workspace\n"
    assert git(gp, "rev-parse", ws.PREPARED_REF).decode().strip() == prep.prepared_commit
    assert leftovers(home) == []


@pytest.mark.parametrize("transport", ["auto", "ssh"])
def test_cancel_unblocks_a_guest_that_stopped_reading(tmp_path: Path, home: Path,
                                                      transport: str) -> None:
    repo = make_repo(tmp_path / "host")
    # more than a pipe buffer and a socket's buffers
    (repo / "big.bin").write_bytes(os.urandom(16 << 20))
    token = CancelToken()
    start = time.monotonic()
    timer = threading.Timer(1.0, token.cancel, args=("stop",))
    timer.start()
    try:
        with pytest.raises(Cancelled, match="stop"):
            do_prepare(repo, StuckGuest(home), cancel=token, transport=transport)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 15
    assert not (home / "proj").exists()
    assert leftovers(home) == []


@pytest.mark.parametrize("transport", ["auto", "ssh"])
def test_stalled_guest_times_out(tmp_path: Path, home: Path, transport: str) -> None:
    repo = make_repo(tmp_path / "host")
    (repo / "big.bin").write_bytes(os.urandom(16 << 20))
    start = time.monotonic()
    with pytest.raises(GuestError, match="stopped reading"):
        do_prepare(repo, StuckGuest(home), stall_timeout=1.0, transport=transport)
    assert time.monotonic() - start < 15
    assert not (home / "proj").exists()


@pytest.mark.parametrize("transport", ["auto", "ssh"])
def test_failed_copy_keeps_old_workspace(prepared: tuple[Path, ws.Prepared], home: Path,
                                         transport: str) -> None:
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "sentinel").write_text("old\n")
    (repo / "big.bin").write_bytes(os.urandom(1 << 20))
    with pytest.raises(GuestError, match="No space left"):
        do_prepare(repo, FailingGuest(home), transport=transport)
    assert (gp / "sentinel").read_text() == "old\n"
    assert leftovers(home) == []


class NoPerlGuest(LocalGuest):
    """A guest without perl (a minimal image): its receiver cannot run."""

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return super().popen(script.replace("command -v perl", "command -v no-such-perl"),
                             **kwargs)


def test_files_go_over_tcp_where_the_guest_has_perl_else_over_the_channel(
        tmp_path: Path, home: Path) -> None:
    repo = make_repo(tmp_path / "host")
    want = tree_of(repo)
    tcp = do_prepare(repo, LocalGuest(home), guest_path=str(home / "a"))
    assert tcp.transport == "tcp"
    assert tree_of(home / "a") == want
    stdin = do_prepare(repo, NoPerlGuest(home), guest_path=str(home / "b"))
    assert stdin.transport == "ssh"
    assert tree_of(home / "b") == want
    forced = do_prepare(repo, LocalGuest(home), guest_path=str(home / "c"), transport="ssh")
    assert forced.transport == "ssh"
    assert tree_of(home / "c") == want
    with pytest.raises(BadRequest, match="transport"):
        do_prepare(repo, LocalGuest(home), guest_path=str(home / "d"), transport="udp")
    # Below the threshold (the default: a few MB), starting the receiver costs more
    # than ssh takes for the bytes.
    small = do_prepare(repo, LocalGuest(home), guest_path=str(home / "e"),
                       tcp_min_bytes=importer.TCP_MIN_BYTES)
    assert small.transport == "ssh"
    assert tree_of(home / "e") == want


class ClosedPortGuest(LocalGuest):
    """A guest that names a port nothing listens on (a firewall inside the guest)."""

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # free once closed
        receive = script.index("if command -v perl")
        script = (script[:receive] + f"echo {scripts.CHANNEL_PORT} {port}; exec sleep 30\n")
        return super().popen(script, **kwargs)


def test_an_unreachable_data_port_is_an_error_with_a_hint(tmp_path: Path, home: Path) -> None:
    repo = make_repo(tmp_path / "host")
    with pytest.raises(GuestError, match="cannot connect") as err:
        do_prepare(repo, ClosedPortGuest(home))
    assert "workspace_transport" in (err.value.hint or "")
    assert not (home / "proj").exists()


def test_the_receiver_drops_connections_without_the_token(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(["perl", "-e", scripts.RECEIVER, "s3cret", "sh", "-c",
                             f"cat > {out}"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        assert words[0] == scripts.CHANNEL_PORT.encode()
        port = int(words[1])
        with socket.create_connection(("127.0.0.1", port)) as bad:
            # The receiver reads the token's length, compares and closes: with bytes left
            # unread that close is a reset, which any of these calls may meet first
            # (ECONNRESET, or ENOTCONN from shutdown). Either way it was dropped: what
            # must not happen is an answer, or the payload landing (checked below).
            try:
                bad.sendall(b"wrong!data that must not land")
                bad.shutdown(socket.SHUT_WR)
                assert bad.recv(10) == b""  # dropped
            except (ConnectionResetError, BrokenPipeError):
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
        with socket.create_connection(("127.0.0.1", port)) as good:
            good.sendall(b"s3cret" + b"payload")
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert out.read_bytes() == b"payload"


def test_interrupted_swap_is_recovered(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                                       home: Path) -> None:
    """A guest crash between the swap's two renames leaves the old workspace hidden;
    the next prepare puts it back before replacing it."""
    repo, prep = prepared
    gp = Path(prep.guest_path)
    (gp / "sentinel").write_text("old\n")
    os.rename(gp, home / ".proj.banger-old-deadbeef")
    info = ws.inspect_repo(RUNNER, str(repo))
    with pytest.raises(GuestError):
        # a failing copy still runs the preflight, which restores the old workspace
        ws.prepare(FailingGuest(home), RUNNER, info, ws.build_plan(RUNNER, info),
                   home=str(home))
    assert (gp / "sentinel").read_text() == "old\n"
    assert leftovers(home) == []


# --------------------------------------------------------------------------- options


def test_branch_from_ref(prepared: tuple[Path, ws.Prepared], guest: LocalGuest) -> None:
    repo, _ = prepared
    prep = do_prepare(repo, guest, branch="feature/x", from_ref="HEAD~1")
    gp = Path(prep.guest_path)
    parent = git(repo, "rev-parse", "HEAD~1").decode().strip()
    assert prep.branch == "feature/x" and prep.head_commit == parent
    assert git(gp, "symbolic-ref", "HEAD").decode().strip() == "refs/heads/feature/x"
    assert git(gp, "rev-parse", "HEAD").decode().strip() == parent
    assert git(gp, "rev-parse", "main").decode().strip() == prep.base_commit
    assert tree_of(gp) == tree_of(repo)  # files untouched by the branch switch
    assert git(gp, "rev-parse", f"{ws.PREPARED_REF}^").decode().strip() == parent


def test_branch_refusals(prepared: tuple[Path, ws.Prepared], guest: LocalGuest) -> None:
    repo, _ = prepared
    with pytest.raises(BadRequest, match="already exists"):
        do_prepare(repo, guest, branch="main")
    with pytest.raises(BadRequest, match="invalid branch"):
        do_prepare(repo, guest, branch="bad..name")
    with pytest.raises(BadRequest, match="needs --branch"):
        do_prepare(repo, guest, from_ref="HEAD~1")
    with pytest.raises(BadRequest, match="not a commit"):
        do_prepare(repo, guest, branch="b", from_ref="no-such-ref")


def test_full_copy_carries_all_history(prepared: tuple[Path, ws.Prepared], guest: LocalGuest
                                       ) -> None:
    repo, _ = prepared
    git(repo, "branch", "side", "HEAD~2")
    git(repo, "tag", "-a", "v1", "-m", "release", "HEAD~1")
    git(repo, "tag", "light", "HEAD~3")
    prep = do_prepare(repo, guest, mode=ws.WorkspaceMode.FULL_COPY)
    gp = Path(prep.guest_path)
    assert not (gp / ".git" / "shallow").exists()
    every = ("rev-list", "--branches", "--tags", "--remotes", "HEAD")
    assert len(git(gp, *every).split()) == 5  # all of it (shallow would be 3)
    assert sorted(git(gp, *every).split()) == sorted(git(repo, *every).split())
    for ref in ("refs/heads/side", "refs/tags/v1", "refs/tags/light"):
        assert git(gp, "rev-parse", ref) == git(repo, "rev-parse", ref)
    assert git(gp, "cat-file", "-t", "v1").strip() == b"tag"
    assert git(gp, "status", "--porcelain", "-z") == git(repo, "status", "--porcelain", "-z")
    git(gp, "fsck", "--no-progress", "--strict")


def test_unborn_head(tmp_path: Path, guest: LocalGuest) -> None:
    repo = tmp_path / "fresh"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "trunk")
    (repo / "a.txt").write_text("staged\n")
    git(repo, "add", "a.txt")
    (repo / "b.txt").write_text("untracked\n")
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert prep.base_commit is None and prep.branch == "trunk"
    assert git(gp, "symbolic-ref", "HEAD").decode().strip() == "refs/heads/trunk"
    assert git(gp, "status", "--porcelain", "-z") == git(repo, "status", "--porcelain", "-z")
    (gp / "c.txt").write_text("guest\n")
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert [(c.status, c.path) for c in out.changes] == [("A", "c.txt")]


def test_detached_head(prepared: tuple[Path, ws.Prepared], guest: LocalGuest) -> None:
    repo, _ = prepared
    git(repo, "stash", "-q", "-u")
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert prep.branch is None
    assert git(gp, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    proc = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=gp, capture_output=True)
    assert proc.returncode == 1  # detached


def test_through_the_real_ssh_guest_class(prepared: tuple[Path, ws.Prepared], home: Path,
                                          tmp_path: Path) -> None:
    """banger.daemon.guest.SSHGuest with an `ssh` that runs the remote script locally:
    the daemon's real guest channel (argv building, runner, popen) drives the workspace."""
    from banger.daemon.guest import SSHGuest

    repo, _ = prepared
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/bin/sh\nfor a; do last=$a; done\nexec sh -c "$last"\n')
    fake_ssh.chmod(0o755)
    guest = SSHGuest(RUNNER, tmp_path / "key", tmp_path / "known_hosts", "127.0.0.1",
                     ssh_bin=str(fake_ssh))
    info = ws.inspect_repo(RUNNER, str(repo))
    prep = ws.prepare(guest, RUNNER, info, ws.build_plan(RUNNER, info), home=str(home),
                      guest_path=str(home / "via-ssh"))
    gp = Path(prep.guest_path)
    assert git(gp, "status", "--porcelain", "-z") == git(repo, "status", "--porcelain", "-z")
    (gp / "src" / "lib.py").write_text("via ssh\n")
    out = ws.export(guest, prep.guest_path, home=str(home))
    assert [(c.status, c.path) for c in out.changes] == [("M", "src/lib.py")]


def test_linked_worktree(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                         tmp_path: Path) -> None:
    repo, _ = prepared
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "wt-branch", str(wt), "HEAD~1")
    (wt / "history.txt").write_text("edited in the worktree\n")
    prep = do_prepare(wt, guest)
    gp = Path(prep.guest_path)
    assert gp.name == "wt" and prep.branch == "wt-branch"
    assert git(gp, "rev-parse", "HEAD") == git(wt, "rev-parse", "HEAD")
    assert git(gp, "status", "--porcelain", "-z") == git(wt, "status", "--porcelain", "-z")
    assert "*.tmp" in (gp / ".git" / "info" / "exclude").read_text()  # the common dir's
    assert tree_of(gp) == tree_of(wt)


def test_sha256_repository(tmp_path: Path, guest: LocalGuest) -> None:
    repo = new_repo(tmp_path / "s256", "--object-format=sha256")
    (repo / "f").write_text("1\n")
    commit_all(repo, "one")
    (repo / "f").write_text("2\n")
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert git(gp, "rev-parse", "--show-object-format").strip() == b"sha256"
    assert git(gp, "status", "--porcelain", "-z") == git(repo, "status", "--porcelain", "-z")
    (gp / "f").write_text("3\n")
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert [c.path for c in out.changes] == ["f"]


def test_crlf_attributes_round_trip_byte_for_byte(tmp_path: Path, guest: LocalGuest) -> None:
    """Export hashes raw bytes, so files the host converts (eol=crlf) still apply exactly."""
    repo = new_repo(tmp_path / "crlf")
    (repo / ".gitattributes").write_text("*.txt text eol=crlf\n")
    (repo / "w.txt").write_bytes(b"one\r\ntwo\r\n")
    commit_all(repo, "crlf")
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert git(gp, "status", "--porcelain") == b""
    # clean, but the CRLF bytes are not the blob's: the snapshot is a commit of its own
    assert prep.prepared_commit != prep.base_commit
    (gp / "w.txt").write_bytes(b"one\r\nTWO\r\nthree\r\n")
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    target = clone_at(repo, prep.base_commit or "", tmp_path / "apply")
    assert (target / "w.txt").read_bytes() == b"one\r\ntwo\r\n"
    apply(out.patch, target)
    assert (target / "w.txt").read_bytes() == b"one\r\nTWO\r\nthree\r\n"


def test_unchanged_files_come_out_of_the_pack_as_their_exact_bytes(
        tmp_path: Path, guest: LocalGuest) -> None:
    """A file whose bytes are its index blob is checked out of the history pack in the
    guest (it does not ride in the tar too), with conversions off and its stat data in
    the index; a modified file still travels in the tar, keeping its host mtime."""
    repo = new_repo(tmp_path / "conv")
    (repo / ".gitattributes").write_text("*.txt text eol=crlf\n")
    (repo / "lf.txt").write_bytes(b"one\ntwo\n")  # checkout would make it CRLF
    (repo / "big.bin").write_bytes(os.urandom(1 << 20))
    (repo / "edited").write_text("v1\n")
    commit_all(repo, "conv")
    (repo / "edited").write_text("v2\n")
    old = 1_000_000_000  # 2001: the tar keeps it, a checkout writes the current time
    for name in ("lf.txt", "big.bin", "edited"):
        os.utime(repo / name, (old, old))
    prep = do_prepare(repo, guest)
    gp = Path(prep.guest_path)
    assert tree_of(gp) == tree_of(repo)
    assert (gp / "lf.txt").read_bytes() == b"one\ntwo\n"
    assert (gp / "edited").stat().st_mtime == old
    assert (gp / "lf.txt").stat().st_mtime > old and (gp / "big.bin").stat().st_mtime > old
    assert prep.bytes < 1.5 * (1 << 20)  # big.bin once (in the pack), not twice
    assert prep.files == 4
    debug = git(gp, "ls-files", "--debug", "big.bin").decode()
    assert "mtime: 0:0" not in debug  # stat data recorded: the first status hashes nothing
    assert git(gp, "status", "--porcelain") == git(repo, "status", "--porcelain")
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert out.patch == b""


def test_mise_bootstrap_runs_in_background(tmp_path: Path, home: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "mise-calls"
    fake = bin_dir / "mise"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho mise says $1\n")
    fake.chmod(0o755)
    repo = make_repo(tmp_path / "host")
    (repo / ".tool-versions").write_text("python 3.11.9\n")
    prep = do_prepare(repo, LocalGuest(home, extra_path=bin_dir))
    assert prep.tool_log == f"{prep.guest_path}/.git/banger/mise-install.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "install" not in (
            calls.read_text() if calls.exists() else ""):
        time.sleep(0.05)
    assert calls.read_text().split("\n")[:2] == ["trust", "install"]
    log = Path(prep.tool_log)
    while time.monotonic() < deadline and "mise says install" not in log.read_text():
        time.sleep(0.05)
    assert "mise says install" in log.read_text()
    # the log lives in the git dir, so it is never exported
    out = ws.export(LocalGuest(home), prep.guest_path, home=str(home))
    assert out.changes == ()


def test_no_mise_is_fine(tmp_path: Path, guest: LocalGuest) -> None:
    repo = make_repo(tmp_path / "host")
    (repo / ".mise.toml").write_text("[tools]\n")
    env_path = guest.env["PATH"]
    guest.env["PATH"] = ":".join(p for p in env_path.split(":")
                                 if not Path(p, "mise").exists())
    prep = do_prepare(repo, guest)
    assert prep.tool_log is None


# --------------------------------------------------------------------------- refusals


def test_refuses_existing_non_workspace_target(prepared: tuple[Path, ws.Prepared],
                                               guest: LocalGuest, home: Path) -> None:
    repo, _ = prepared
    other = home / "precious"
    other.mkdir()
    (other / "data").write_text("not banger's\n")
    with pytest.raises(BadRequest, match="not a banger workspace"):
        do_prepare(repo, guest, guest_path=str(other))
    assert (other / "data").read_text() == "not banger's\n"
    assert sorted(p.name for p in other.iterdir()) == ["data"]
    assert leftovers(home) == []


@pytest.mark.parametrize("bad", ["relative/path", "/root/../etc", "/etc/x", "{home}",
                                 "{home}/.ssh", "{home}/a//b", "{home}/a/", "{home}/a\nb"])
def test_refuses_bad_guest_paths(prepared: tuple[Path, ws.Prepared], guest: LocalGuest,
                                 home: Path, bad: str) -> None:
    repo, _ = prepared
    before = sorted(p.name for p in home.iterdir())
    with pytest.raises(BadRequest, match="invalid guest path"):
        do_prepare(repo, guest, guest_path=bad.format(home=home))
    assert sorted(p.name for p in home.iterdir()) == before


def make_superproject(root: Path) -> Path:
    """A repository with a populated submodule (with a nested one) and an unpopulated one."""
    def repo(name: str) -> Path:
        r = root / name
        r.mkdir(parents=True)
        git(r, "init", "-q", "-b", "main")
        git(r, "config", "user.name", "x")
        git(r, "config", "user.email", "x@x")
        return r

    deep = repo("deep")
    (deep / "d.txt").write_text("deep\n")
    commit_all(deep, "deep")
    sub = repo("sub")
    (sub / "s.txt").write_text("sub v1\n")
    commit_all(sub, "sub v1")
    git(sub, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(deep), "deep")
    (sub / "s.txt").write_text("sub v2\n")
    commit_all(sub, "sub v2")
    other = repo("other")
    (other / "o.txt").write_text("other\n")
    commit_all(other, "other")
    sup = repo("super")
    (sup / "top.txt").write_text("top\n")
    git(sup, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "lib/sub")
    git(sup, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(other), "other")
    commit_all(sup, "with submodules")
    git(sup, "-c", "protocol.file.allow=always", "submodule", "update", "-q", "--init",
        "--recursive")
    git(sup, "submodule", "deinit", "-q", "other")  # unpopulated: an empty directory
    (sup / "lib" / "sub" / "s.txt").write_text("changed in the submodule on the host\n")
    (sup / "lib" / "sub" / "untracked.txt").write_text("untracked in the submodule\n")
    return sup


def test_refuses_submodules_in_shallow_mode(tmp_path: Path) -> None:
    sup = make_superproject(tmp_path)
    with pytest.raises(BadRequest, match="submodules") as exc:
        ws.inspect_repo(RUNNER, str(sup), "shallow")
    assert "full_copy" in exc.value.hint


def test_full_copy_with_submodules_round_trip(tmp_path: Path, guest: LocalGuest) -> None:
    sup = make_superproject(tmp_path)
    prep = do_prepare(sup, guest, mode=ws.WorkspaceMode.FULL_COPY)
    gp = Path(prep.guest_path)
    assert git(gp, "ls-files", "-s", "lib/sub").startswith(b"160000")
    for path in ("lib/sub", "lib/sub/deep"):
        assert git(gp / path, "rev-parse", "HEAD") == git(sup / path, "rev-parse", "HEAD")
        assert git(gp / path, "status", "--porcelain", "-z") == git(
            sup / path, "status", "--porcelain", "-z")
    assert len(git(gp / "lib/sub", "rev-list", "HEAD").split()) == 2  # complete history
    assert git(gp, "status", "--porcelain", "-z") == git(sup, "status", "--porcelain", "-z")
    assert (gp / "other").is_dir() and list((gp / "other").iterdir()) == []
    assert tree_of(gp) == tree_of(sup)

    (gp / "lib" / "sub" / "s.txt").write_text("edited in the guest\n")
    (gp / "lib" / "sub" / "deep" / "new.txt").write_text("new in the nested submodule\n")
    (gp / "top.txt").unlink()
    out = ws.export(guest, prep.guest_path, home=str(guest.home))
    assert sorted((c.status, c.path) for c in out.changes) == [
        ("A", "lib/sub/deep/new.txt"), ("D", "top.txt"), ("M", "lib/sub/s.txt")]
    target = tmp_path / "apply"
    shutil.copytree(sup, target, symlinks=True)  # the host as copied, submodules included
    apply(out.patch, target)
    assert tree_of(target) == tree_of(gp)
