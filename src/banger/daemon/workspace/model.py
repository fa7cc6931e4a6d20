"""Values shared by the workspace modules, and the guest channel they need."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from banger.errors import BadRequest, BangerError
from banger.runner import Result


class WorkspaceConflict(BangerError):
    """The guest's changes to a workspace do not apply to the new copy of the host tree.

    Raised before the workspace is replaced: the old one is still in place.
    """

    code = "workspace_conflict"


GUEST_HOME = "/root"
"""Where workspaces live in the guest (we are root there)."""

DEFAULT_DEPTH = 3
"""Commits of history a shallow workspace gets (HEAD and its two ancestors)."""

PREPARED_REF = "refs/banger/prepared"
"""Guest ref holding a commit of the whole tree as prepare left it (HEAD is not moved)."""

STATE_DIR = ".git/banger"
"""Banger's private state inside a guest workspace (never part of the work tree)."""

MARKER = f"{STATE_DIR}/workspace"
"""File whose presence marks a directory as a banger workspace that prepare may replace."""

MISE_LOG = f"{STATE_DIR}/mise-install.log"
"""Where the background ``mise install`` logs, relative to the workspace."""

Progress = Callable[[int, int], None]
"""``progress(bytes_sent, files_sent)``: cumulative payload bytes sent to the guest
(work-tree files, then git objects) and work-tree entries sent so far."""


class GuestChannel(Protocol):
    """What the workspace code needs from a guest (the shape of ``banger.daemon.guest.Guest``).

    ``run`` and ``popen`` take one shell string that the guest's ``/bin/sh`` runs as root.
    """

    ip: str

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "guest command") -> Result:
        """Run the shell string ``script`` in the guest and wait for it.

        Raises:
            GuestError: it failed (non-zero exit only with ``check``), or ``timeout`` passed.
        """
        ...

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``script`` in the guest without waiting; the caller owns the process."""
        ...


class WorkspaceMode(StrEnum):
    """How much of the repository goes into the guest."""

    SHALLOW = "shallow"
    """Work tree, index and the last few commits of HEAD's history; no submodules."""
    FULL_COPY = "full_copy"
    """Work tree, index, complete history of every branch, tag and remote-tracking ref."""

    @classmethod
    def parse(cls, value: str | WorkspaceMode) -> WorkspaceMode:
        """The mode named ``value``; a clear :class:`BadRequest` for anything else."""
        try:
            return cls(value)
        except ValueError:
            legal = ", ".join(m.value for m in cls)
            raise BadRequest(f"unknown workspace mode {value!r}",
                             hint=f"use one of: {legal}") from None


@dataclass(frozen=True)
class Identity:
    """The committer identity configured for the host repository (either may be unset)."""

    name: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class RepoInfo:
    """What :func:`inspect_repo` learned about a host repository.

    Attributes:
        host_path: absolute path of the work tree's top level.
        mode: the workspace mode the repository was checked for.
        head: HEAD's commit id, or None when HEAD is unborn (no commits yet).
        branch: HEAD's branch (short name) or None when HEAD is detached. Set for an
            unborn HEAD too (the branch the first commit will create).
        object_format: ``sha1`` or ``sha256``.
        host_shallow: commits listed in the host repository's own ``shallow`` file.
        submodules: paths of gitlinks (submodules) in the index.
        identity: ``user.name`` / ``user.email`` as git resolves them for this repository.
        dirty: the work tree or index differs from HEAD, or there are untracked files.
        fingerprint: hash of HEAD, the index and the stat data of every file to copy;
            :func:`needs_resync` compares it.
    """

    host_path: str
    mode: WorkspaceMode
    head: str | None
    branch: str | None
    object_format: str
    host_shallow: tuple[str, ...]
    submodules: tuple[str, ...]
    identity: Identity
    dirty: bool
    fingerprint: str

    @property
    def name(self) -> str:
        """The repository directory's name."""
        return self.host_path.rstrip("/").rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form for the daemon's store (see :meth:`from_dict`)."""
        return {
            "host_path": self.host_path, "mode": self.mode.value, "head": self.head,
            "branch": self.branch, "object_format": self.object_format,
            "host_shallow": list(self.host_shallow), "submodules": list(self.submodules),
            "identity": {"name": self.identity.name, "email": self.identity.email},
            "dirty": self.dirty, "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepoInfo:
        """Rebuild a :class:`RepoInfo` stored with :meth:`to_dict`."""
        ident = data.get("identity") or {}
        return cls(
            host_path=str(data["host_path"]), mode=WorkspaceMode.parse(data["mode"]),
            head=data.get("head"), branch=data.get("branch"),
            object_format=str(data.get("object_format", "sha1")),
            host_shallow=tuple(data.get("host_shallow", ())),
            submodules=tuple(data.get("submodules", ())),
            identity=Identity(ident.get("name"), ident.get("email")),
            dirty=bool(data.get("dirty", False)), fingerprint=str(data["fingerprint"]),
        )


class EntryKind(StrEnum):
    FILE = "file"
    SYMLINK = "symlink"
    GITLINK = "gitlink"
    """A submodule's directory; its contents are not part of this repository's plan."""


@dataclass(frozen=True)
class PlanEntry:
    """One path to recreate in the guest, as the host work tree has it right now.

    ``size`` is the file's length (a symlink's: its target's length); ``executable``
    is git's notion (owner execute bit) and only meaningful for files.
    """

    path: str
    kind: EntryKind
    size: int = 0
    executable: bool = False


@dataclass(frozen=True)
class CopyPlan:
    """Everything prepare ships from the host, decided before any byte moves.

    Attributes:
        root: the host work tree (``RepoInfo.host_path``).
        entries: files, symlinks and gitlinks present in the work tree, in git's
            path order: tracked entries that still exist plus untracked files git does
            not ignore.
        index: the host index as ``git ls-files --stage -z`` prints it (modes, object
            ids, conflict stages, paths), replayed into the guest index verbatim.
        index_blobs: object ids of index blobs the object database has (staged
            content may be in no commit, so it travels with the history).
        submodules: populated submodules (``full_copy`` mode), each planned as a
            repository of its own.
    """

    root: str
    entries: tuple[PlanEntry, ...]
    index: bytes
    index_blobs: tuple[str, ...]
    submodules: tuple[SubmodulePlan, ...] = ()

    def walk(self, prefix: str = "") -> Iterator[tuple[str, RepoInfo | None, CopyPlan]]:
        """(path prefix, info, plan) for this plan (info None) and every populated
        submodule below it, parents before children."""
        yield prefix, None, self
        for sub in self.submodules:
            yield from sub.walk(prefix)

    def all_entries(self) -> list[PlanEntry]:
        """Entries of this plan and of its submodules, paths relative to ``root``,
        in git's path order."""
        out = [PlanEntry(prefix + e.path, e.kind, e.size, e.executable)
               for prefix, _, plan in self.walk() for e in plan.entries]
        return sorted(out, key=lambda e: e.path.encode())

    @property
    def files(self) -> int:
        """Files and symlinks to copy (submodules included)."""
        return sum(1 for _, _, plan in self.walk() for e in plan.entries
                   if e.kind is not EntryKind.GITLINK)

    @property
    def bytes(self) -> int:
        """Total size of the files to copy (submodules included)."""
        return sum(e.size for _, _, plan in self.walk() for e in plan.entries
                   if e.kind is EntryKind.FILE)


@dataclass(frozen=True)
class SubmodulePlan:
    """A populated submodule (``full_copy`` only): copied with its own repository."""

    path: str  # relative to the parent repository's work tree
    info: RepoInfo
    plan: CopyPlan

    def walk(self, prefix: str) -> Iterator[tuple[str, RepoInfo | None, CopyPlan]]:
        """(path prefix, info, plan) for this submodule, then its own submodules.

        ``prefix`` is the parent repository's prefix; the yielded prefix ends in ``/``.
        """
        here = f"{prefix}{self.path}/"
        yield here, self.info, self.plan
        for sub in self.plan.submodules:
            yield from sub.walk(here)


@dataclass(frozen=True)
class Prepared:
    """A workspace prepare left in the guest.

    Attributes:
        guest_path: the workspace directory in the guest.
        host_path: the host work tree it was copied from.
        base_commit: the host's HEAD at copy time (None for an unborn HEAD). Applying
            :func:`export`'s patch to this commit plus the host's uncommitted changes at
            copy time reproduces the guest tree.
        head_commit: the guest HEAD's commit (``from_ref`` when a branch was made).
        branch: the guest HEAD's branch (None when detached).
        prepared_commit: the commit stored under ``refs/banger/prepared``.
        mode: the workspace mode used.
        files: work-tree entries copied.
        bytes: payload bytes sent (files, then git objects).
        tool_log: guest path of the background ``mise install`` log, if one was started.
        reapplied: what became of ``guest_changes`` given to :func:`prepare`:
            ``"applied"`` on top of the new copy, ``"present"`` (the new copy already
            had them), or None when there were none.
        transport: how the files reached the guest: ``tcp`` (a connection to the
            guest) or ``ssh`` (the guest channel's stdin).
    """

    guest_path: str
    host_path: str
    base_commit: str | None
    head_commit: str | None
    branch: str | None
    prepared_commit: str
    mode: WorkspaceMode
    files: int
    bytes: int
    tool_log: str | None = None
    reapplied: str | None = None
    transport: str = "ssh"


@dataclass(frozen=True)
class Change:
    """One changed path in an export.

    ``status`` is git's letter: ``A`` added, ``M`` modified (content or mode), ``D``
    deleted, ``T`` type changed (file <-> symlink), ``R`` renamed (``old_path`` set).
    """

    status: str
    path: str
    old_path: str | None = None


@dataclass(frozen=True)
class Exported:
    """What :func:`export` returns.

    Attributes:
        patch: a ``git apply``-able binary-safe patch (empty when nothing changed).
        changes: the changed paths, in the patch's order.
        base: the commit the patch is relative to (the prepared snapshot or ``base_commit``).
    """

    patch: bytes
    changes: tuple[Change, ...]
    base: str
