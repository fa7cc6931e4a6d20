"""The copy plan: exactly which host paths a workspace gets, decided before copying.

The plan is the host work tree as ``git status`` sees it: every tracked path that
still exists plus every untracked path git does not ignore (``git ls-files --cached
--others --exclude-standard``), each recreated as it is on disk right now:

* regular files: content and git's executable bit (owner ``x``); no size cap,
  files are streamed in chunks and the guest's disk is the only limit;
* symlinks: recreated as symlinks with their target verbatim. A target that is
  absolute or climbs out of the tree is copied as is (git does the same): it is
  never followed on the host (every read walks the tree with ``O_NOFOLLOW``, see
  :mod:`.hosttree`) nor in the guest (nothing is written through it: no planned
  path lies below a symlink, and extraction starts from an empty directory). In
  the guest it names guest files, never host files;
* tracked paths missing from the work tree, or below a symlinked directory, are
  left out: git reports them deleted, and so will the guest;
* gitlinks (submodules, ``full_copy`` mode only) become directories; a populated
  submodule is planned recursively as a repository of its own (its files, index
  and complete history), an unpopulated one stays an empty directory;
* sockets, FIFOs and devices, untracked nested git repositories, and the names
  :func:`.paths.check_repo_path` refuses make the whole plan fail naming the path.
"""

from __future__ import annotations

import os
import stat

from banger.errors import BadRequest
from banger.runner import Runner

from .hosttree import HostTree
from .model import CopyPlan, EntryKind, PlanEntry, RepoInfo, SubmodulePlan, WorkspaceMode
from .paths import check_repo_path, decode_path
from .repo import (
    GITLINK_MODE,
    host_git,
    inspect_repo,
    list_index,
    list_untracked,
    parse_index,
    populated_submodule,
)


def _refuse(path: str, reason: str, hint: str) -> BadRequest:
    return BadRequest(f"refusing to copy {path!r}: {reason}", hint=hint, path=path)


def build_plan(runner: Runner, info: RepoInfo) -> CopyPlan:
    """List what prepare will copy from ``info.host_path`` and check every name.

    Raises:
        BadRequest: a path breaks the untrusted-input policy (module docstring), or a
            submodule appeared in a shallow-mode repository.
    """
    root = info.host_path
    index_raw = list_index(runner, root)
    index = parse_index(index_raw)
    for entry in index:
        check_repo_path(entry.path)
    gitlinks = {e.path for e in index if e.mode == GITLINK_MODE}
    if gitlinks and info.mode is WorkspaceMode.SHALLOW:
        raise BadRequest(f"{root} has submodules, which a shallow workspace cannot carry",
                         hint="use --mode full_copy")
    untracked: set[str] = set()
    for raw in list_untracked(runner, root):
        if raw.endswith(b"/"):
            name = decode_path(raw)
            raise _refuse(name, "it is an untracked nested git repository",
                          "make it a submodule, or list it in .git/info/exclude")
        path = decode_path(raw)
        check_repo_path(path)
        untracked.add(path)

    entries: list[PlanEntry] = []
    with HostTree(root) as tree:
        for path in sorted({e.path for e in index} | untracked, key=lambda p: p.encode()):
            st = tree.lstat(path)
            if st is None:
                continue  # deleted, or below a symlink: git reports it deleted
            if stat.S_ISREG(st.st_mode):
                entries.append(PlanEntry(path, EntryKind.FILE, st.st_size,
                                         bool(st.st_mode & stat.S_IXUSR)))
            elif stat.S_ISLNK(st.st_mode):
                entries.append(PlanEntry(path, EntryKind.SYMLINK, st.st_size))
            elif stat.S_ISDIR(st.st_mode):
                if path in gitlinks:
                    entries.append(PlanEntry(path, EntryKind.GITLINK))
                # else: a tracked file replaced by a directory; git reports the file
                # deleted and lists the directory's files as untracked paths of their own.
            else:
                raise _refuse(path, "it is not a regular file, symlink or directory "
                                    "(a socket, FIFO or device)",
                              "remove it, or add it to .gitignore if it is untracked")
    submodules = []
    for planned in entries:
        if planned.kind is EntryKind.GITLINK:
            sub_root = os.path.join(root, planned.path)
            if populated_submodule(runner, sub_root):
                sub_info = inspect_repo(runner, sub_root, WorkspaceMode.FULL_COPY)
                submodules.append(SubmodulePlan(planned.path, sub_info,
                                                build_plan(runner, sub_info)))
    return CopyPlan(root=root, entries=tuple(entries), index=index_raw,
                    index_blobs=_existing_blobs(runner, root,
                                                {e.oid for e in index
                                                 if e.mode != GITLINK_MODE}),
                    submodules=tuple(submodules))


def _existing_blobs(runner: Runner, root: str, oids: set[str]) -> tuple[str, ...]:
    """The subset of ``oids`` the object database has (``git add -N`` entries name the
    empty blob without writing it)."""
    if not oids:
        return ()
    res = host_git(runner, root, "cat-file", "--batch-check=%(objectname) %(objecttype)",
                   input="".join(f"{o}\n" for o in sorted(oids)).encode(),
                   desc="check the index's objects", timeout=300)
    found = []
    for line in res.out.splitlines():
        oid, _, kind = line.partition(" ")
        if kind == "blob":
            found.append(oid)
    return tuple(found)
