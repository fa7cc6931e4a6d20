"""A repository on this machine, for a daemon on another (``--host ssh://...``).

A remote daemon copies a repository into a guest from a path on its own machine, so
the client sends it there first, through the command's SSH connection: the git
directory and the work tree's files (tracked and untracked, not ignored: what a
workspace copies) as one tar stream, carried and unpacked there by
:mod:`banger.remotecopy`. The workspace is then prepared from that directory as from
any local repository, and the directory is dropped once the copy is in the guest. A
linked worktree or a submodule (whose ``.git`` is a file naming git data elsewhere)
arrives as a plain repository with that data in its own ``.git``; populated
submodules come with their files.

This module decides what of a repository goes (:func:`shipment`), writes it
(:func:`write_tar`), and keeps what was sent for ``--auto-prepare``
(:func:`fingerprint`, :func:`origin`, :class:`SentWorkspaces`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from banger.api.params import WorkspaceOrigin
from banger.errors import BadRequest
from banger.fsutil import atomic_write
from banger.remote import SSHLink
from banger.remotecopy import COMPLETE, add_bytes, stream
from banger.sdk.base import DaemonPath

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
            add_bytes(tar, arcname, data)
        add_bytes(tar, COMPLETE, b"")


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

    A file that went away while it was sent (deleted meanwhile, or git packing its
    objects) ends that send, which the remote end refuses as cut short; the work tree
    is then listed and sent once more, as it is now.

    Raises:
        BadRequest: a file could not be read (or went away in both sends).
        HostError: the remote end failed to take it.
    """
    try:
        return _send_once(link, ship)
    except BadRequest as exc:
        gone = exc.__cause__
        if not isinstance(gone, FileNotFoundError):
            raise
        print(f"{gone.filename or 'a file'} went away while it was sent", file=sys.stderr)
    return _send_once(link, shipment(ship.top), again=True)


def _send_once(link: SSHLink, ship: Shipment, *, again: bool = False) -> str:
    top = ship.top
    files = f"{ship.files} file" + ("" if ship.files == 1 else "s")
    print(f"sending {top} ({files} and its git data) to {link.target}"
          + (" again" if again else ""), file=sys.stderr)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", top.name).strip(".") or "repo"
    return DaemonPath(stream(link, name[:100], lambda out: write_tar(ship, out),
                             what=str(top)))


