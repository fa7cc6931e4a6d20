"""Streams into the guest (GuestSink, tar, pack), history selection and export parsing.

The guest here is a local ``sh -c``; the full prepare/export flow is in
tests/integration/test_workspace_local.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from banger.daemon.workspace import EntryKind, PlanEntry, build_plan, inspect_repo
from banger.daemon.workspace.exporter import parse_name_status, parse_sections
from banger.daemon.workspace.gitdir import Kind, Member
from banger.daemon.workspace.hostpack import build_pack
from banger.daemon.workspace.importer import _shallow_set, plan_history
from banger.daemon.workspace.model import Change, WorkspaceMode
from banger.daemon.workspace.transfer import GuestSink, run_script, send_tree
from banger.errors import BadRequest, Cancelled, GuestError, HostError
from banger.runner import CancelToken, Result, SubprocessRunner
from tests.gitenv import git, isolate_git

RUNNER = SubprocessRunner()


class ShGuest:
    ip = "local"

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "") -> Result:
        p = subprocess.run(["sh", "-c", script], input=input, capture_output=True,
                           timeout=timeout)
        return Result(["sh"], p.returncode, p.stdout, p.stderr)

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sh", "-c", script], **kwargs)


GUEST = ShGuest()


@pytest.fixture(autouse=True)
def clean_git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_git(tmp_path / "gitconfig", monkeypatch, identity=True)


# --------------------------------------------------------------------------- GuestSink


def test_sink_feeds_stdin_and_returns_output() -> None:
    seen: list[int] = []
    with GuestSink(GUEST, "wc -c", step="count", on_bytes=seen.append) as sink:
        sink.write(b"x" * 3_000_000)
        res = sink.finish(10)
    assert res.out.strip() == "3000000"
    assert sum(seen) == 3_000_000 and sink.sent == 3_000_000
    assert len(seen) == 3  # written in 1 MiB chunks


def test_sink_reports_a_failing_script_with_its_stderr() -> None:
    with pytest.raises(GuestError, match=r"'unpack' failed \(exit 3\)\nno space") as exc, \
            GuestSink(GUEST, "cat >/dev/null; echo 'no space' >&2; exit 3", step="unpack") as sink:
        sink.write(b"data")
        sink.finish(10)
    assert exc.value.details["returncode"] == 3


def test_sink_write_into_a_script_that_died_reports_its_exit() -> None:
    with pytest.raises(GuestError, match="exit 7"), \
            GuestSink(GUEST, "echo early >&2; exit 7", step="early") as sink:
        time.sleep(0.2)
        for _ in range(50):
            sink.write(b"y" * 100_000)
        sink.finish(10)


def test_sink_stall_budget() -> None:
    start = time.monotonic()
    with pytest.raises(GuestError, match=r"stopped reading for 0\.5s"), \
            GuestSink(GUEST, "exec sleep 30", step="stuck", stall_timeout=0.5) as sink:
        sink.write(b"z" * (8 << 20))  # far more than a pipe holds
    assert time.monotonic() - start < 10


def test_sink_cancel_unblocks_a_blocked_write() -> None:
    token = CancelToken()
    threading.Timer(0.3, token.cancel, args=("stop now",)).start()
    start = time.monotonic()
    with pytest.raises(Cancelled, match="stop now"), \
            GuestSink(GUEST, "exec sleep 30", step="stuck", cancel=token) as sink:
        sink.write(b"z" * (8 << 20))
    assert time.monotonic() - start < 10


def test_sink_cancelled_before_writing() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled), GuestSink(GUEST, "cat", step="x", cancel=token) as sink:
        sink.write(b"never")


def test_sink_timeout_after_input() -> None:
    start = time.monotonic()
    with pytest.raises(GuestError, match="timed out"):
        run_script(GUEST, "exec sleep 30", step="slow", timeout=0.5)
    assert time.monotonic() - start < 10


def test_run_script_passes_input() -> None:
    assert run_script(GUEST, "tr a-z A-Z", step="up", input=b"abc", timeout=10).out == "ABC"


# --------------------------------------------------------------------------- tar


def tar_of(root: Path, entries: list[PlanEntry], extra: list[Member] | None = None,
           ) -> Path:
    out = root.parent / "out.tar"
    with GuestSink(GUEST, f"cat > '{out}'", step="tar") as sink:
        send_tree(sink, str(root), entries, extra or [])
        sink.finish(10)
    return out


def test_send_tree_writes_what_the_host_has(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"content\0bytes")
    (root / "x.sh").write_text("#!/bin/sh\n")
    (root / "x.sh").chmod(0o700)
    os.symlink("/etc/passwd", root / "abs-link")
    (root / "sub").mkdir()
    entries = [PlanEntry("abs-link", EntryKind.SYMLINK), PlanEntry("d/f.txt", EntryKind.FILE),
               PlanEntry("sub", EntryKind.GITLINK), PlanEntry("x.sh", EntryKind.FILE)]
    ours = [Member(".git", kind=Kind.DIR), Member(".git/meta", b"m"), Member(".git/empty"),
            Member(".git/link", b"../x", Kind.SYMLINK)]
    with tarfile.open(tar_of(root, entries, ours)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        fh = tar.extractfile("d/f.txt")
        assert fh is not None and fh.read() == b"content\0bytes"
    assert list(members) == [".git", ".git/meta", ".git/empty", ".git/link", "abs-link",
                             "d/f.txt", "sub", "x.sh"]
    assert members[".git"].isdir() and members[".git"].mode == 0o755
    assert members[".git/meta"].mode == 0o644 and members[".git/empty"].size == 0
    assert members[".git/link"].issym() and members[".git/link"].linkname == "../x"
    assert members["abs-link"].issym() and members["abs-link"].linkname == "/etc/passwd"
    assert members["d/f.txt"].mode == 0o644 and members["x.sh"].mode == 0o755
    assert members["sub"].isdir()
    assert members["x.sh"].uid == 0 and members["x.sh"].uname == "root"


def test_send_tree_refuses_a_file_that_changed_type(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    os.symlink("/etc/passwd", root / "f")  # planned as a file, now a symlink
    with pytest.raises(BadRequest, match="'f' changed while"):
        tar_of(root, [PlanEntry("f", EntryKind.FILE)])


def test_send_tree_refuses_a_file_that_grew_while_read(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(b"a" * 1000)
    real_addfile = tarfile.TarFile.addfile

    def addfile_then_append(self: tarfile.TarFile, info: tarfile.TarInfo,
                            fileobj: Any = None) -> None:
        real_addfile(self, info, fileobj)
        if info.name == "f":
            with open(root / "f", "ab") as fh:
                fh.write(b"more")

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_then_append)
    with pytest.raises(BadRequest, match="'f' changed while"):
        tar_of(root, [PlanEntry("f", EntryKind.FILE)])


def test_send_tree_huge_sparse_file_streams(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    with open(root / "big", "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(40 << 20)
        fh.write(b"marker")
    with GuestSink(GUEST, "tar -xO -f - big | tail -c 25165824 | head -c 6 ; echo",
                   step="tar") as sink:
        send_tree(sink, str(root), [PlanEntry("big", EntryKind.FILE)])
        res = sink.finish(60)
    assert res.stdout == b"marker\n"
    assert sink.sent > 64 << 20


# --------------------------------------------------------------------------- pack


def test_build_pack_writes_a_pack_and_its_index_that_git_reads_as_is(tmp_path: Path) -> None:
    """The pack and index built on the host, copied into an empty repository's
    objects/pack with no index-pack there, give it HEAD's commit and blobs."""
    src = tmp_path / "src"
    src.mkdir()
    git(src, "init", "-q")
    (src / "f").write_text("1\n")
    git(src, "add", "f")
    git(src, "commit", "-q", "-m", "one")
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    argv = ["git", "-C", str(src), "pack-objects", "--revs", "--stdout", "-q"]
    built = build_pack(argv, b"HEAD\n", scratch / "0.pack", object_format="sha1", timeout=30)
    assert built.name.startswith("pack-") and built.idx.exists()
    assert (built.pack.stat().st_mode & 0o777) == 0o600
    dst = tmp_path / "dst"
    git(tmp_path, "init", "-q", str(dst))
    for path in (built.pack, built.idx):
        shutil.copy(path, dst / ".git" / "objects" / "pack" / f"{built.name}{path.suffix}")
    head = git(src, "rev-parse", "HEAD").strip()
    assert git(dst, "cat-file", "-t", head).strip() == "commit"
    assert git(dst, "cat-file", "-p", f"{head}:f") == "1\n"
    git(dst, "fsck", "--no-dangling")


def test_build_pack_reports_host_failure(tmp_path: Path) -> None:
    argv = ["git", "-C", str(tmp_path), "pack-objects", "--revs", "--stdout"]
    with pytest.raises(HostError, match="packing history failed"):
        build_pack(argv, b"HEAD\n", tmp_path / "0.pack", object_format="sha1", timeout=30)


def test_build_pack_is_cancellable(tmp_path: Path) -> None:
    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(Cancelled):
        build_pack(["sleep", "30"], b"", tmp_path / "0.pack", object_format="sha1",
                   timeout=30, cancel=token)


# --------------------------------------------------------------------------- history


def make_history(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """main: A - B - C - M(C, D) - E, side branch from B: D."""
    repo = tmp_path / "h"
    repo.mkdir()
    git(repo, "init", "-q")
    ids = {}

    def commit(name: str) -> None:
        (repo / "f").write_text(name)
        git(repo, "add", "f")
        git(repo, "commit", "-q", "-m", name)
        ids[name] = git(repo, "rev-parse", "HEAD").strip()

    commit("A")
    commit("B")
    git(repo, "checkout", "-q", "-b", "side")
    commit("D")
    git(repo, "checkout", "-q", "main")
    commit("C")
    git(repo, "merge", "-q", "--no-ff", "-s", "ours", "-m", "M", "side")
    ids["M"] = git(repo, "rev-parse", "HEAD").strip()
    commit("E")
    return repo, ids


def test_shallow_boundary_matches_gits_depth(tmp_path: Path) -> None:
    repo, ids = make_history(tmp_path)
    root = str(repo)
    assert _shallow_set(RUNNER, root, [ids["E"]], 1, ()) == (ids["E"],)
    assert _shallow_set(RUNNER, root, [ids["E"]], 2, ()) == (ids["M"],)
    assert set(_shallow_set(RUNNER, root, [ids["E"]], 3, ())) == {ids["C"], ids["D"]}
    # deeper than the history: nothing is cut
    assert _shallow_set(RUNNER, root, [ids["E"]], 10, ()) == ()
    # what git's own shallow clone cuts at depth 3
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "3", f"file://{repo}", str(clone))
    assert set((clone / ".git" / "shallow").read_text().split()) == {ids["C"], ids["D"]}


def test_shallow_boundary_keeps_host_shallow_commits(tmp_path: Path) -> None:
    repo, ids = make_history(tmp_path)
    assert ids["M"] in _shallow_set(RUNNER, str(repo), [ids["E"]], 5, (ids["M"], "f" * 40))
    assert "f" * 40 not in _shallow_set(RUNNER, str(repo), [ids["E"]], 5, (ids["M"], "f" * 40))


def test_plan_history_modes(tmp_path: Path) -> None:
    repo, ids = make_history(tmp_path)
    git(repo, "tag", "-a", "v1", "-m", "t", ids["B"])
    (repo / "staged").write_text("staged\n")
    git(repo, "add", "staged")
    info = inspect_repo(RUNNER, str(repo))
    plan = build_plan(RUNNER, info)
    shallow = plan_history(RUNNER, info, plan, mode=WorkspaceMode.SHALLOW, depth=2,
                           branch=None, from_commit=None)
    lines = shallow.revs.decode().splitlines()
    assert lines[0] == f"--shallow {ids['M']}" and ids["E"] in lines
    assert git(repo, "rev-parse", ":staged").strip() in lines
    assert shallow.refs == (("refs/heads/main", ids["E"]),)
    assert shallow.head_symbolic == "refs/heads/main" and shallow.head_commit is None
    full = plan_history(RUNNER, info, plan, mode=WorkspaceMode.FULL_COPY, depth=2,
                        branch="topic", from_commit=ids["C"])
    refs = dict(full.refs)
    assert refs["refs/heads/side"] == ids["D"] and refs["refs/heads/topic"] == ids["C"]
    assert refs["refs/tags/v1"] == git(repo, "rev-parse", "v1").strip()  # the tag object
    assert full.shallow == () and not any(r.startswith("--") for r in
                                           full.revs.decode().splitlines())
    assert full.head_symbolic == "refs/heads/topic"


# --------------------------------------------------------------------------- export parsing


def test_parse_name_status() -> None:
    raw = b"M\0a b.txt\0R087\0old\0new\0D\0gone\0T\0link\0A\0\xc3\xbc\0"
    assert parse_name_status(raw) == (
        Change("M", "a b.txt"), Change("R", "new", "old"), Change("D", "gone"),
        Change("T", "link"), Change("A", "ü"))
    assert parse_name_status(b"") == ()


def test_parse_sections() -> None:
    abc, def_ = "abc".ljust(40, "0"), "def".ljust(64, "0")  # sha1 and sha256 ids
    out = (f"{abc} 8 5 0\n".encode() + b"M\0x.txt\0" b"PATCH"
           + f"{def_} 6 3 4\n".encode() + b"lib/" b"A\0y.c\0" b"P2\n")
    assert parse_sections(out, "s") == [(abc, "", b"M\0x.txt\0", b"PATCH"),
                                        (def_, "lib/", b"A\0y.c\0", b"P2\n")]
    with pytest.raises(GuestError, match="cut short"):
        parse_sections(f"{abc} 70 5 0\nM\0".encode(), "s")
    with pytest.raises(GuestError, match="unexpected output"):
        parse_sections(b"garbage\n", "s")

