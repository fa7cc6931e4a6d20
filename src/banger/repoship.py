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

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
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
from banger.fsutil import atomic_write
from banger.remote import OutputTooLarge, SSHLink, run_bounded
from banger.sdk.base import DaemonPath

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


# What of a linked worktree's git directory is not its own state: where git finds the
# common directory and the work tree, and the worktree's lock.
NOT_WORKTREE_STATE = frozenset({"commondir", "gitdir", "locked"})
# What of a common git directory every worktree shares (git's own list, ``common_list``
# in its path.c): anything else at its top level (HEAD, index, MERGE_HEAD,
# NOTES_MERGE_*, rebase-merge, ...) is the main work tree's state, never sent for a
# linked worktree, whose own state goes instead.
SHARED_GIT_STATE = frozenset({
    "branches", "common", "hooks", "info", "logs", "lost-found", "objects", "refs",
    "remotes", "rr-cache", "svn", "packed-refs", "shallow"})
# ... except these below them, each worktree's own.
PER_WORKTREE_BELOW_SHARED = frozenset({
    "info/sparse-checkout", "logs/HEAD", "logs/refs/bisect", "logs/refs/rewritten",
    "logs/refs/worktree", "refs/bisect", "refs/rewritten", "refs/worktree"})
# Never sent from any git directory: other worktrees' state, the configs (sent
# rewritten, see _plain_config), and submodules' git data (each submodule's goes as its
# own .git).
NOT_SENT = frozenset({"worktrees", "config", "config.worktree", "modules"})
GIT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Member:
    """One path sent in the tar: ``source`` on this machine as ``arcname``, with what is
    below it when ``recursive``, except the arcnames in ``skip`` (and lock files)."""

    source: Path
    arcname: str
    recursive: bool = False
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Repo:
    """One repository of a shipment (the work tree's, or a submodule's below it):
    ``prefix`` in the tar (``""`` or ``"sub/dir/"``), its own git directory (HEAD and
    index) and its common one."""

    top: Path
    prefix: str
    git_dir: Path
    common: Path
    submodules: tuple[str, ...]  # populated ones, relative to ``top``


@dataclass(frozen=True)
class Shipment:
    """What is sent of one work tree: its files and its populated submodules', each
    repository's git data as a plain ``.git`` directory, and those directories'
    configs (rewritten: ``configs``, by arcname)."""

    top: Path
    repos: tuple[Repo, ...]
    members: tuple[Member, ...]
    configs: tuple[tuple[str, bytes], ...] = ()

    @property
    def files(self) -> int:
        """How many work-tree paths are sent (the git data aside)."""
        return sum(1 for m in self.members if not _is_git(m.arcname))


def _is_git(arcname: str) -> bool:
    """Whether ``arcname`` is git data (in a ``.git`` directory) rather than a file."""
    return arcname == ".git" or arcname.startswith(".git/") or "/.git/" in arcname \
        or arcname.endswith("/.git")


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
    below ``top`` (not those of its submodules: see :func:`shipment`).

    Raises:
        BadRequest: not a git work tree, or it holds a repository that is not a
            submodule (git lists it as ``dir/``; it would go empty).
    """
    listed = _git(top, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    names = sorted({n for n in listed.decode(errors="surrogateescape").split("\0")
                    if n and os.path.lexists(top / n.rstrip("/"))})
    if COMPLETE in names:
        raise BadRequest(f"{top} has a file named {COMPLETE} at its top, the name banger's "
                         "stream ends with", hint="rename it to send this repository")
    nested = [n for n in names if n.endswith("/")]
    if nested:
        raise BadRequest(f"{top} holds a git repository that is not a submodule "
                         f"({nested[0].rstrip('/')}), which banger does not copy",
                         hint="make it a submodule, ignore it in .gitignore, or move it out")
    return names


def _populated_submodules(top: Path) -> list[str]:
    """The paths of the submodules (gitlinks in the index) checked out below ``top``."""
    staged = _git(top, "ls-files", "-z", "--stage").decode(errors="surrogateescape")
    subs = [rec.partition("\t")[2] for rec in staged.split("\0") if rec.startswith("160000 ")]
    return [sub for sub in subs if (top / sub / ".git").exists()]


def _repo(top: Path, prefix: str) -> Repo:
    """The work tree at ``top``'s repository: its git directory and common one.

    Raises:
        BadRequest: not a git work tree.
    """
    out = _git(top, "rev-parse", "--absolute-git-dir", "--git-common-dir")
    lines = out.decode(errors="surrogateescape").splitlines()
    if len(lines) != 2:
        raise BadRequest(f"git said something unexpected of {top}: {out[:200]!r}")
    git_dir = Path(lines[0])
    common = (top / lines[1]).resolve() if not os.path.isabs(lines[1]) else Path(lines[1])
    return Repo(top, prefix, git_dir, common, tuple(_populated_submodules(top)))


def _repos(top: Path, prefix: str = "") -> list[Repo]:
    """``top``'s repository, then each populated submodule's below it (depth first)."""
    found = [_repo(top, prefix)]
    for sub in found[0].submodules:
        found += _repos(top / sub, f"{prefix}{sub}/")
    return found


def _git_members(r: Repo) -> list[Member]:
    """``r``'s git data as a plain ``<prefix>.git`` directory: its common directory, and
    for a linked worktree the worktree's own state in place of the main one's."""
    dot = f"{r.prefix}.git"
    skip = {f"{dot}/{name}" for name in NOT_SENT}
    own: list[Member] = []
    if r.git_dir != r.common:  # a linked worktree: its files over the main tree's
        try:
            common_names = os.listdir(r.common)
        except OSError as exc:
            raise BadRequest(f"cannot list {r.common}: {exc.strerror or exc}") from exc
        skip.update(f"{dot}/{name}" for name in common_names if name not in SHARED_GIT_STATE)
        skip.update(f"{dot}/{path}" for path in PER_WORKTREE_BELOW_SHARED)
        for parent, dirs, names in os.walk(r.git_dir):
            rel = Path(parent).relative_to(r.git_dir)
            top_level = rel == Path(".")
            if top_level:
                dirs[:] = [d for d in dirs if d not in NOT_WORKTREE_STATE | NOT_SENT]
            for name in sorted(names):
                arcname = f"{dot}/{(rel / name).as_posix()}"
                if (top_level and name in NOT_WORKTREE_STATE | NOT_SENT) \
                        or _git_scratch(arcname):
                    continue
                skip.add(arcname)
                own.append(Member(Path(parent) / name, arcname))
    return [Member(r.common, dot, recursive=True, skip=frozenset(skip)), *own]


def shipment(top: Path) -> Shipment:
    """What is sent of the work tree at ``top``: each repository's git data as a plain
    ``.git`` directory (the work tree's, then each populated submodule's), then the
    files git lists in each.

    A repository whose ``.git`` is a directory of its own goes as it is. A linked
    worktree's git data is the repository's common directory with the worktree's own
    HEAD, index and state in place of the main work tree's; a submodule's (or a
    ``--separate-git-dir`` repository's) is the directory its ``.git`` file names. The
    configs (``config``, and the work tree's ``config.worktree`` where git keeps one) go
    without ``core.bare`` and ``core.worktree``, which would point a copy back at this
    machine (or call it bare); ``config`` gets this machine's git identity, which the
    guest's commits then carry as they would here.

    Raises:
        BadRequest: not a git work tree, or one that cannot be copied.
    """
    repos = _repos(top)
    members: list[Member] = []
    configs: list[tuple[str, bytes]] = []
    for r in repos:
        members += _git_members(r)
        configs.append((f"{r.prefix}.git/config",
                        _plain_config(r.common / "config", _identity(r.top))))
        if (r.git_dir / "config.worktree").is_file():  # extensions.worktreeConfig
            configs.append((f"{r.prefix}.git/config.worktree",
                            _plain_config(r.git_dir / "config.worktree", {})))
    for r in repos:
        members += [Member(r.top / name, f"{r.prefix}{name}") for name in files_of(r.top)
                    if name not in r.submodules]
    return Shipment(top, tuple(repos), tuple(members), tuple(configs))


def _identity(top: Path) -> dict[str, str]:
    """``user.name`` and ``user.email`` as git resolves them in ``top`` (those set)."""
    found = {}
    for key in ("user.name", "user.email"):
        res = subprocess.run(["git", "-C", str(top), "config", "--get", key],
                             capture_output=True, check=False, timeout=GIT_TIMEOUT_S)
        value = res.stdout.decode(errors="replace").strip()
        if res.returncode == 0 and value and "\n" not in value:
            found[key] = value[:256]
    return found


def fingerprint(ship: Shipment) -> str:
    """A hash that changes when the work tree ``ship`` was made of changes: each
    repository's HEAD and branch and its index file, and the set and ``lstat`` data
    (type, mode, size, mtime, ctime, inode) of the files sent. No content is read: a
    file touched without a change counts as changed (a spare resync, never a missed
    one)."""
    h = hashlib.sha256()
    stats: list[tuple[str, Path]] = []
    for r in ship.repos:
        head = subprocess.run(["git", "-C", str(r.top), "rev-parse", "-q", "--verify", "HEAD"],
                              capture_output=True, check=False, timeout=GIT_TIMEOUT_S).stdout
        branch = subprocess.run(["git", "-C", str(r.top), "symbolic-ref", "-q", "HEAD"],
                                capture_output=True, check=False, timeout=GIT_TIMEOUT_S).stdout
        h.update(f"repo {r.prefix}\0".encode(errors="surrogateescape") + b"head " + head
                 + b"branch " + branch)
        stats.append((f"{r.prefix}.git/index", r.git_dir / "index"))
    stats += [(m.arcname, m.source) for m in ship.members if not _is_git(m.arcname)]
    for arcname, source in stats:
        h.update(arcname.encode(errors="surrogateescape") + b"\0")
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            h.update(b"missing\0")
            continue
        h.update(f"{st.st_mode} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "
                 f"{st.st_ino}\0".encode())
    return h.hexdigest()


def origin(ship: Shipment) -> WorkspaceOrigin:
    """Where ``ship`` comes from, as the remote daemon keeps it with the workspace: this
    machine's name, the work tree, its :func:`fingerprint`, and a nonce naming this
    one prepare (see :class:`SentWorkspaces`)."""
    return WorkspaceOrigin(host=socket.gethostname(), path=str(ship.top),
                           fingerprint=fingerprint(ship), nonce=secrets.token_hex(16))


MAX_SENT = 512  # remembered prepares; the oldest are forgotten first


class SentWorkspaces:
    """This machine's own record of the workspaces it sent to remote daemons, by remote
    host and VM id: the origin of each (:func:`origin`). ``vm exec --auto-prepare``
    trusts only this record for the path it sends again; the remote daemon's copy of
    the origin must carry the same nonce, or the workspace was prepared by someone else
    since. Kept in ``$XDG_STATE_HOME/banger/sent-workspaces.json`` (default
    ``~/.local/state``), mode 0600.
    """

    def __init__(self, path: Path | None = None, env: dict[str, str] | None = None) -> None:
        if path is None:
            env = dict(os.environ) if env is None else env
            base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/root"))
                                                     / ".local" / "state")
            path = Path(base) / "banger" / "sent-workspaces.json"
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_bytes()[: 4 << 20])
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} \
            if isinstance(data, dict) else {}

    def remember(self, host: str, vm_id: str, sent: WorkspaceOrigin) -> None:
        """Record ``sent`` as VM ``vm_id``'s workspace on remote ``host``.

        Read, changed and written under a lock beside the record
        (``sent-workspaces.json.lock``), so two prepares at once both keep theirs.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._load()
            records.pop(f"{host}|{vm_id}", None)
            records[f"{host}|{vm_id}"] = sent.model_dump()
            while len(records) > MAX_SENT:
                records.pop(next(iter(records)))
            atomic_write(self.path, json.dumps(records, indent=1).encode(), 0o600)
        finally:
            os.close(lock)  # and with it the lock

    def recall(self, host: str, vm_id: str) -> WorkspaceOrigin | None:
        """What this machine sent as VM ``vm_id``'s workspace on ``host``, if it did."""
        record = self._load().get(f"{host}|{vm_id}")
        try:
            return WorkspaceOrigin.model_validate(record) if record is not None else None
        except ValueError:
            return None


def _plain_config(path: Path, identity: dict[str, str]) -> bytes:
    """The git config at ``path`` without ``core.bare`` and ``core.worktree``, with
    ``identity`` (``user.name``, ``user.email``) set."""
    with tempfile.TemporaryDirectory(prefix="banger-ship-") as tmp:
        copy = Path(tmp) / "config"
        try:
            shutil.copyfile(path, copy)
        except OSError as exc:
            raise BadRequest(f"cannot read {path}: {exc.strerror or exc}") from exc
        for key in ("core.bare", "core.worktree"):
            # Exit 5: the key was not set, which is what is wanted.
            subprocess.run(["git", "config", "--file", str(copy), "--unset-all", key],
                           capture_output=True, check=False, timeout=GIT_TIMEOUT_S)
        for key, value in identity.items():
            subprocess.run(["git", "config", "--file", str(copy), key, value],
                           capture_output=True, check=False, timeout=GIT_TIMEOUT_S)
        return copy.read_bytes()


COMPLETE = ".banger-complete"  # the last member of every stream: one without it was cut


def write_tar(ship: Shipment, out: IO[bytes]) -> None:
    """Write ``ship`` to ``out`` as one tar stream (what ``receive`` unpacks).

    Raises:
        OSError: a file could not be read (or ``out`` stopped taking the stream).
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m in ship.members:
            tar.add(m.source, arcname=m.arcname, recursive=m.recursive,
                    filter=_skipping(m.skip))
        for arcname, data in ship.configs:
            _add_bytes(tar, arcname, data)
        _add_bytes(tar, COMPLETE, b"")


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _skipping(skip: frozenset[str]) -> Callable[[tarfile.TarInfo], tarfile.TarInfo | None]:
    """A ``tarfile`` filter that leaves out the members named in ``skip`` (with, for a
    directory, everything below it)."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if info.name in skip or _git_scratch(info.name) else info
    return keep


def _git_scratch(arcname: str) -> bool:
    """A lock or a half-written pack in git data (of a git running here meanwhile): not
    data. A work tree's own ``Cargo.lock`` is data."""
    return _is_git(arcname) and (arcname.endswith(".lock") or "/objects/pack/tmp_" in arcname)


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
    return DaemonPath(_stream(link, name[:100], lambda out: write_tar(ship, out),
                              what=str(top)))


def _stream(link: SSHLink, name: str, write: Callable[[IO[bytes]], None], *, what: str) -> str:
    """Run ``receive NAME`` on the remote host with what ``write`` writes as its input
    (a tar); the directory it unpacked it in.

    Raises:
        BadRequest: ``write`` could not read what it sends.
        HostError: the remote end failed to take it.
    """
    argv = link.ssh("-T", link.target.destination, "--",
                    link.remote_command(["vm", "workspace", "receive", name]))
    try:
        res = run_bounded(argv, timeout=RECEIVE_TIMEOUT_S, input=write, limit=MAX_ANSWER)
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{link.target} did not take {what} within "
                        f"{RECEIVE_TIMEOUT_S:g}s") from exc
    except OutputTooLarge as exc:
        raise HostError(f"{link.target} did not take {what}: it answered more than "
                        f"{MAX_ANSWER} bytes") from exc
    except OSError as exc:  # a file went away or became unreadable meanwhile
        raise BadRequest(f"cannot send {what}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else ""),
                         hint="try again once nothing is changing it") from exc
    try:
        path = json.loads(res.stdout)["path"]
    except (ValueError, KeyError, TypeError):
        path = None
    if res.returncode != 0 or not isinstance(path, str):
        raise HostError(f"{link.target} did not take {what}: "
                        f"{res.stderr.decode(errors='replace').strip()[-300:] or res.returncode}")
    return path


FILES = "files"  # the directory ``receive`` makes for files sent with :func:`send_files`
_KEY = re.compile(r"[a-z0-9_]{1,32}")
PROGRESS_STEP = 256 << 20  # bytes between two progress lines (files sent, a bundle received)


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
    report = ByteProgress("sent", total)
    there = _stream(link, FILES, lambda out: write_files(files, out, report), what=names)
    return there, {key: DaemonPath(f"{there}/{key}/{path.name}") for key, path in files.items()}


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
            if path.is_dir():
                raise BadRequest(f"{path} is not a regular file")
            with path.open("rb") as fh:  # through a symlink, as the daemon would read it
                info = tar.gettarinfo(arcname=f"{key}/{path.name}", fileobj=fh)
                if not info.isreg():
                    raise BadRequest(f"{path} is not a regular file")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, _Counting(fh, report))
        _add_bytes(tar, COMPLETE, b"")


class ByteProgress:
    """Progress lines on standard error, every :data:`PROGRESS_STEP` bytes, for bytes
    ``verb`` (sent, received) out of ``total`` (None: not known ahead)."""

    def __init__(self, verb: str, total: int | None = None) -> None:
        self.verb, self.total, self.done, self._next = verb, total, 0, PROGRESS_STEP

    def __call__(self, n: int) -> None:
        """Count ``n`` more bytes (a line when another step is passed)."""
        self.done += n
        if self.done >= self._next:
            self._next += PROGRESS_STEP
            of = f"/{self.total / 1e6:.0f}" if self.total is not None else ""
            print(f"  {self.done / 1e6:.0f}{of} MB {self.verb}", file=sys.stderr)


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
    sweep(root)
    holder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    dest = holder / name
    # Held while the stream comes in, however long it takes: sweep leaves it alone.
    busy = os.open(holder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(busy, fcntl.LOCK_EX)
        dest.mkdir()
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter=_repo_filter)  # noqa: S202 (the filter checks each)
        # A stream cut at a member's boundary reads as a whole (shorter) tar: the sender's
        # last member says it is all there.
        end = dest / COMPLETE
        if end.is_symlink() or not end.is_file():
            raise BadRequest("the stream was cut short (its sender stopped)")
        end.unlink()
        os.utime(holder)  # STALE_S counts from the end of the send, not its start
    except (tarfile.TarError, OSError, BadRequest) as exc:
        shutil.rmtree(holder, ignore_errors=True)
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"the repository stream could not be unpacked: {exc}") from exc
    finally:
        os.close(busy)
    return dest


STALE_S = 24 * 3600.0  # a received directory older than this was left by a crash


def sweep(root: Path) -> None:
    """Remove what a crashed or killed send left in ``root``: received directories
    whose send ended more than :data:`STALE_S` ago (a live one is dropped within the
    command that sent it). One still being received (:func:`unpack` holds its lock)
    stays, however old."""
    cutoff = time.time() - STALE_S
    with contextlib.suppress(OSError):
        for holder in root.iterdir():
            with contextlib.suppress(OSError):
                st = holder.lstat()
                if holder.name.startswith(PREFIX) and stat.S_ISDIR(st.st_mode) \
                        and st.st_mtime < cutoff:
                    _remove_unless_busy(holder)


def _remove_unless_busy(holder: Path) -> None:
    """Remove the received directory ``holder`` unless a receive holds its lock."""
    fd = os.open(holder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        shutil.rmtree(holder, ignore_errors=True)
    finally:
        os.close(fd)


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
