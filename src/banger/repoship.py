"""A repository on this machine, for a daemon on another (``--host ssh://...``).

A remote daemon copies a repository into a guest from a path on its own machine, so
the client sends it there first, through the command's SSH connection: the git
directory and the work tree's files (tracked and untracked, not ignored: what a
workspace copies) as one tar stream into ``banger vm workspace receive`` on the remote
host, which unpacks it below the remote user's cache dir and names the directory.
The workspace is then prepared from that directory as from any local repository, and
the directory is dropped (``receive --drop``) once the copy is in the guest. A linked
worktree or a submodule (whose ``.git`` is a file naming git data elsewhere) arrives
as a plain repository with that data in its own ``.git``; populated submodules come
with their files.

The stream is the user's own repository, but it is still unpacked as untrusted data
(``tarfile``'s ``data`` filter: no absolute paths, no ``..``, no links out, no device
nodes), into a fresh directory of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from banger.api.params import WorkspaceOrigin
from banger.errors import BadRequest, BangerError, HostError
from banger.remote import SSHLink

RECEIVE_TIMEOUT_S = 3600.0
DROP_TIMEOUT_S = 120.0
MAX_ANSWER = 4096
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
PREFIX = "repo-"


def receive_root(env: dict[str, str] | None = None) -> Path:
    """Where received repositories are unpacked: ``$XDG_CACHE_HOME/banger/received``
    (default ``~/.cache``), which a daemon of this user can read."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "/root")) / ".cache")
    return Path(base) / "banger" / "received"


# What a linked worktree keeps in its own git directory (the rest is the repository's
# common one): sent in place of the main work tree's, so the copy is the worktree's.
PER_WORKTREE = ("HEAD", "index", "ORIG_HEAD", "MERGE_HEAD", "CHERRY_PICK_HEAD", "logs/HEAD",
                "config.worktree", "refs/bisect", "refs/worktree", "refs/rewritten")
# What of a common git directory is never sent: other worktrees' state, and the config
# (sent rewritten: see _plain_config).
NOT_SENT = ("worktrees", "config")
GIT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Member:
    """One path sent in the tar: ``source`` on this machine as ``arcname``, with what is
    below it when ``recursive``, except the arcnames in ``skip``."""

    source: Path
    arcname: str
    recursive: bool = False
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Shipment:
    """What is sent of one work tree: its files, and its git data as a plain ``.git``
    directory (``git_config``: that directory's ``config``, when it is rewritten)."""

    top: Path
    git_dir: Path  # the work tree's own git directory (its HEAD and index)
    members: tuple[Member, ...]
    git_config: bytes | None = None

    @property
    def files(self) -> int:
        """How many work-tree paths are sent (the git data aside)."""
        return sum(1 for m in self.members if not (
            m.arcname == ".git" or m.arcname.startswith(".git/") or m.arcname.endswith("/.git")))


def _git(top: Path, *args: str) -> bytes:
    """``git -C top ARGS``'s output.

    Raises:
        BadRequest: git failed (``top`` is not a git work tree, say).
    """
    try:
        res = subprocess.run(["git", "-C", str(top), *args], capture_output=True, check=False,
                             timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BadRequest(f"cannot run git in {top}: {exc}") from exc
    if res.returncode != 0:
        raise BadRequest(f"{top} is not a git work tree: "
                         f"{res.stderr.decode(errors='replace').strip()[:200]}")
    return res.stdout


def files_of(top: Path) -> list[str]:
    """The work tree's files git lists (tracked and untracked, not ignored) that exist,
    and those of its populated submodules (with their ``.git`` files), below ``top``.

    Raises:
        BadRequest: not a git work tree.
    """
    listed = _git(top, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    names = {n for n in listed.decode(errors="surrogateescape").split("\0")
             if n and os.path.lexists(top / n)}
    for sub in _populated_submodules(top):
        names.add(f"{sub}/.git")
        names.update(f"{sub}/{n}" for n in files_of(top / sub))
    return sorted(names)


def _populated_submodules(top: Path) -> list[str]:
    """The paths of the submodules (gitlinks in the index) checked out below ``top``."""
    staged = _git(top, "ls-files", "-z", "--stage").decode(errors="surrogateescape")
    subs = [rec.partition("\t")[2] for rec in staged.split("\0") if rec.startswith("160000 ")]
    return [sub for sub in subs if (top / sub / ".git").is_file()]


def shipment(top: Path) -> Shipment:
    """What is sent of the work tree at ``top``: its git data as a plain ``.git``
    directory, then :func:`files_of`.

    A repository whose ``.git`` is a directory of its own goes as it is. A linked
    worktree's git data is the repository's common directory with the worktree's own
    HEAD, index and per-worktree refs in place of the main work tree's; a submodule's
    (or a ``--separate-git-dir`` repository's) is the directory its ``.git`` file names.
    Either way the config goes without ``core.bare`` and ``core.worktree``, which would
    point the copy back at this machine (or call it bare).

    Raises:
        BadRequest: not a git work tree.
    """
    dirs = _git(top, "rev-parse", "--path-format=absolute", "--git-dir",
                "--git-common-dir").decode(errors="surrogateescape").splitlines()
    git_dir, common = Path(dirs[0]), Path(dirs[1])
    files = tuple(Member(top / name, name) for name in files_of(top))
    own = top / ".git"
    if git_dir == own and common == own and own.is_dir() and not own.is_symlink():
        return Shipment(top, own, (Member(own, ".git", recursive=True), *files))
    skip = {f".git/{name}" for name in NOT_SENT}
    extra: list[Member] = []
    if git_dir != common:  # a linked worktree: its own state, not the main work tree's
        skip.update(f".git/{name}" for name in PER_WORKTREE)
        extra = [Member(git_dir / name, f".git/{name}", recursive=True)
                 for name in PER_WORKTREE if (git_dir / name).exists()]
    git = Member(common, ".git", recursive=True, skip=frozenset(skip))
    return Shipment(top, git_dir, (git, *extra, *files),
                    git_config=_plain_config(common / "config"))


def fingerprint(ship: Shipment) -> str:
    """A hash that changes when the work tree ``ship`` was made of changes: HEAD and its
    branch, the index file, and the set and ``lstat`` data (type, mode, size, mtime,
    ctime, inode) of the files sent. No content is read: a file touched without a
    change counts as changed (a spare resync, never a missed one)."""
    h = hashlib.sha256()
    head = subprocess.run(["git", "-C", str(ship.top), "rev-parse", "-q", "--verify", "HEAD"],
                          capture_output=True, check=False, timeout=GIT_TIMEOUT_S).stdout
    branch = subprocess.run(["git", "-C", str(ship.top), "symbolic-ref", "-q", "HEAD"],
                            capture_output=True, check=False, timeout=GIT_TIMEOUT_S).stdout
    h.update(b"head " + head + b"branch " + branch)
    for m in (Member(ship.git_dir / "index", ".git/index"), *ship.members):
        if m.recursive:
            continue  # the git data: HEAD and the index speak for it
        try:
            st = os.lstat(m.source)
        except FileNotFoundError:
            h.update(m.arcname.encode(errors="surrogateescape") + b"\0missing\0")
            continue
        h.update(m.arcname.encode(errors="surrogateescape") + b"\0")
        h.update(f"{st.st_mode} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "
                 f"{st.st_ino}\0".encode())
    return h.hexdigest()


def origin(ship: Shipment) -> WorkspaceOrigin:
    """Where ``ship`` comes from, as the remote daemon keeps it with the workspace: this
    machine's name, the work tree, its :func:`fingerprint`."""
    return WorkspaceOrigin(host=socket.gethostname(), path=str(ship.top),
                           fingerprint=fingerprint(ship))


def _plain_config(path: Path) -> bytes:
    """The git config at ``path`` without ``core.bare`` and ``core.worktree``."""
    with tempfile.TemporaryDirectory(prefix="banger-ship-") as tmp:
        copy = Path(tmp) / "config"
        shutil.copyfile(path, copy)
        for key in ("core.bare", "core.worktree"):
            # Exit 5: the key was not set, which is what is wanted.
            subprocess.run(["git", "config", "--file", str(copy), "--unset-all", key],
                           capture_output=True, check=False, timeout=GIT_TIMEOUT_S)
        return copy.read_bytes()


def write_tar(ship: Shipment, out: IO[bytes]) -> None:
    """Write ``ship`` to ``out`` as one tar stream (what ``receive`` unpacks).

    Raises:
        OSError: a file could not be read (or ``out`` stopped taking the stream).
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m in ship.members:
            tar.add(m.source, arcname=m.arcname, recursive=m.recursive,
                    filter=_skipping(m.skip))
        if ship.git_config is not None:
            info = tarfile.TarInfo(".git/config")
            info.size, info.mode, info.mtime = len(ship.git_config), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(ship.git_config))


def _skipping(skip: frozenset[str]) -> Callable[[tarfile.TarInfo], tarfile.TarInfo | None]:
    """A ``tarfile`` filter that leaves out the members named in ``skip`` (with, for a
    directory, everything below it)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if info.name in skip else info
    return keep


def top_of(repo: Path) -> Path:
    """The top of the work tree ``repo`` is in.

    Raises:
        BadRequest: ``repo`` is not in a git work tree.
    """
    return Path(_git(repo, "rev-parse", "--show-toplevel").decode(errors="surrogateescape")
                .strip() or repo)


def send(link: SSHLink, ship: Shipment) -> str:
    """Send ``ship`` (:func:`shipment`) to the remote host; the directory it is in there.

    Raises:
        BadRequest: a file could not be read.
        HostError: the remote end failed to take it.
    """
    top = ship.top
    print(f"sending {top} ({ship.files} files and its git data) to {link.target}",
          file=sys.stderr)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", top.name).strip(".") or "repo"
    return _stream(link, name[:100], lambda out: write_tar(ship, out), what=str(top))


def _stream(link: SSHLink, name: str, write: Callable[[IO[bytes]], None], *, what: str) -> str:
    """Run ``receive NAME`` on the remote host with what ``write`` writes as its input
    (a tar); the directory it unpacked it in.

    Raises:
        BadRequest: ``write`` could not read what it sends.
        HostError: the remote end failed to take it.
    """
    receive = link.remote_command(["vm", "workspace", "receive", name])
    proc = subprocess.Popen(link.ssh("-T", link.target.destination, "--", receive),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        write(proc.stdin)
    except BrokenPipeError:
        pass  # the remote end stopped reading: its error is below
    except (OSError, BadRequest) as exc:  # a file went away or became unreadable meanwhile
        proc.kill()
        proc.wait()
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"cannot send {what}: {exc.strerror or exc} ({exc.filename})",
                         hint="try again once nothing is changing it") from exc
    try:
        out, err = proc.communicate(timeout=RECEIVE_TIMEOUT_S)  # closes its stdin: the end
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.wait()
        raise HostError(f"{link.target} did not take {what} within "
                        f"{RECEIVE_TIMEOUT_S:g}s") from exc
    try:
        path = json.loads(out[:MAX_ANSWER])["path"]
    except (ValueError, KeyError, TypeError):
        path = None
    if proc.returncode != 0 or not isinstance(path, str):
        raise HostError(f"{link.target} did not take {what}: "
                        f"{err.decode(errors='replace').strip()[-300:] or proc.returncode}")
    return path


FILES = "files"  # the directory ``receive`` makes for files sent with :func:`send_files`
_KEY = re.compile(r"[a-z0-9_]{1,32}")
PROGRESS_STEP = 256 << 20  # bytes between two progress lines while files are sent


def send_files(link: SSHLink, files: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """Send ``files`` (a key, such as ``rootfs``, for each) to the remote host for its
    daemon to read; the directory they are in there (for :func:`drop`) and where each
    one is, by key. Each goes as ``<key>/<its name>``, so two files of one name never
    meet. Prints progress on standard error.

    Raises:
        BadRequest: a key is not a plain name, or a file could not be read.
        HostError: the remote end failed to take them.
    """
    for key in files:
        if not _KEY.fullmatch(key):
            raise BadRequest(f"{key!r} is not a file key")
    try:
        total = sum(path.stat().st_size for path in files.values())
    except OSError as exc:
        raise BadRequest(f"cannot send {exc.filename}: {exc.strerror or exc}") from exc
    names = ", ".join(path.name for path in files.values())
    print(f"sending {names} ({total / 1e6:.1f} MB) to {link.target}", file=sys.stderr)
    report = _Progress(total)
    there = _stream(link, FILES, lambda out: write_files(files, out, report), what=names)
    return there, {key: f"{there}/{key}/{path.name}" for key, path in files.items()}


def write_files(files: dict[str, Path], out: IO[bytes],
                report: Callable[[int], None] = lambda n: None) -> None:
    """Write ``files`` to ``out`` as one tar of ``<key>/<name>`` members (what ``receive``
    unpacks for :func:`send_files`), each byte counted to ``report``.

    Raises:
        BadRequest: one is not a regular file.
        OSError: one could not be read.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, path in files.items():
            info = tar.gettarinfo(path, arcname=f"{key}/{path.name}")
            if not info.isreg():
                raise BadRequest(f"{path} is not a regular file")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with path.open("rb") as fh:
                tar.addfile(info, _Counting(fh, report))


class _Progress:
    """Progress lines (every :data:`PROGRESS_STEP` bytes) for files being sent."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self._next = total, 0, PROGRESS_STEP

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done >= self._next:
            self._next += PROGRESS_STEP
            print(f"  {self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB sent", file=sys.stderr)


class _Counting(io.RawIOBase):
    """A file read through, its bytes counted to ``report``."""

    def __init__(self, fh: IO[bytes], report: Callable[[int], None]) -> None:
        self._fh, self._report = fh, report

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._report(len(data))
        return data


def drop(link: SSHLink, path: str) -> None:
    """Remove a received repository on the remote host (failures are only reported)."""
    try:
        res = link.capture(["vm", "workspace", "receive", "--drop", path], timeout=DROP_TIMEOUT_S)
        why = res.stderr.decode(errors="replace").strip()[-200:] if res.returncode else ""
    except BangerError as exc:
        why = exc.message
    if why:
        print(f"warning: could not remove the copy {path} on {link.target}: {why}",
              file=sys.stderr)


def unpack(name: str, stream: IO[bytes], root: Path | None = None) -> Path:
    """``banger vm workspace receive NAME``: unpack the tar on ``stream`` into a fresh
    directory ``<root>/repo-XXXX/NAME``; that path.

    Raises:
        BadRequest: ``name`` is not a plain directory name, or the stream is not a tar
            whose members stay inside.
    """
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise BadRequest(f"{name!r} is not a repository directory name")
    root = root or receive_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    holder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    dest = holder / name
    dest.mkdir()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter=_repo_filter)  # noqa: S202 (the filter checks each)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(holder, ignore_errors=True)
        raise BadRequest(f"the repository stream could not be unpacked: {exc}") from exc
    return dest


def _repo_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, except that a symlink may point anywhere (a repository
    may hold ``bin -> /usr/bin``): it is checked under a harmless target and keeps its
    own. Writing through one stays refused (the filter resolves what is already
    unpacked, and a member whose real path leaves ``dest`` is an error)."""
    if member.issym():
        checked = tarfile.data_filter(member.replace(linkname="x", deep=False), dest)
        return None if checked is None else checked.replace(linkname=member.linkname,
                                                            deep=False)
    return tarfile.data_filter(member, dest)


def remove(path: str, root: Path | None = None) -> None:
    """``receive --drop PATH``: remove a directory :func:`unpack` made, and nothing else.

    Raises:
        BadRequest: ``path`` is not one.
    """
    root = (root or receive_root()).resolve()
    p = Path(path)
    holder = p.parent
    if not (p.is_absolute() and holder.parent.resolve() == root
            and holder.name.startswith(PREFIX)
            and not holder.is_symlink() and holder.is_dir()):
        raise BadRequest(f"{path} is not a repository banger received")
    shutil.rmtree(holder)
