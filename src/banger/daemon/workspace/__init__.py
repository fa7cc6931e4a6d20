"""Workspaces: a host git work tree copied into a guest, and its changes brought back.

Public API (everything else in the package is internal)::

    info = inspect_repo(runner, "/home/me/repo", "shallow")     # host only, quick
    plan = build_plan(runner, info)                             # host only, quick
    prep = prepare(guest, runner, info, plan, progress=..., cancel=...)   # guest I/O
    ...                                                         # work in the guest
    out = export(guest, prep.guest_path)                        # out.patch, out.changes
    if needs_resync(runner, info):                              # `vm exec --auto-prepare`
        ...

What the guest gets (:func:`prepare`): a git repository whose HEAD is the host's
HEAD commit (same id, same branch), whose index is the host's index (staged and
unstaged changes stay apart, conflicts included) and whose work tree is the host's
work tree (tracked files plus untracked files git does not ignore), so ``git
status`` in the guest prints what it prints on the host. History is the last
``DEFAULT_DEPTH`` commits (``.git/shallow`` marks the cut) or, in ``full_copy``
mode, every branch, tag and remote-tracking ref with complete history, and
populated submodules as nested repositories. The host's git identity, and its
``info/exclude`` and ``core.excludesFile`` patterns, are copied too. The tree as
prepared is recorded as a commit under ``refs/banger/prepared`` (HEAD does not move).

What comes back (:func:`export`): a ``git diff --binary``-style patch of the work
tree against that commit (or another base) and the changed paths, computed with a
private git directory and a temporary index and object store, so the guest's
index, HEAD and objects are never touched. ``git apply`` of the patch onto the
host work tree as it was copied reproduces the guest tree byte for byte.

Where the untrusted-input rules live: :mod:`.plan` (which files, symlinks,
special files), :mod:`.paths` (names, guest paths), :mod:`.hosttree` (never
following symlinks when reading the host tree).

Running as root: host git runs through the runner it is given, and bangerd should
give one that runs as the repository's owner. git's ``safe.directory`` check is
kept, so a root runner fails on a user's repository with a clear HostError; and
``git status`` may run the repository's own configured filters. File contents are
read by this process through :mod:`.hosttree`, which never follows a symlink.

Only ``banger.daemon.session`` and top-level ``banger`` modules are imported.
"""

from __future__ import annotations

from .exporter import export
from .importer import prepare
from .model import (
    DEFAULT_DEPTH,
    GUEST_HOME,
    PREPARED_REF,
    Change,
    CopyPlan,
    EntryKind,
    Exported,
    GuestChannel,
    Identity,
    PlanEntry,
    Prepared,
    Progress,
    RepoInfo,
    WorkspaceConflict,
    WorkspaceMode,
)
from .paths import check_guest_path, default_guest_path
from .plan import build_plan
from .repo import inspect_repo, needs_resync

__all__ = [
    "DEFAULT_DEPTH",
    "GUEST_HOME",
    "PREPARED_REF",
    "Change",
    "CopyPlan",
    "EntryKind",
    "Exported",
    "GuestChannel",
    "Identity",
    "PlanEntry",
    "Prepared",
    "Progress",
    "RepoInfo",
    "WorkspaceConflict",
    "WorkspaceMode",
    "build_plan",
    "check_guest_path",
    "default_guest_path",
    "export",
    "inspect_repo",
    "needs_resync",
    "prepare",
]
