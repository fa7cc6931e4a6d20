"""Host-side repository inspection through the runner.

Every host git command goes through :func:`host_git`: an argv list via the
runner, ``core.fsmonitor`` off (no repository-configured daemon is started),
optional locks off (inspection never rewrites the host's index), C locale (the
few error messages we recognise are English). The repository's own safety
checks stay on: git's ``safe.directory`` refusal of a repository owned by another
user is reported, not overridden; bangerd should run host git as the user who
owns the repository (see the package docstring).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest, CommandFailed, HostError
from banger.runner import Result, Runner

from .hosttree import HostTree, read_owned
from .model import Identity, RepoInfo, WorkspaceMode
from .paths import decode_path

GITLINK_MODE = "160000"
GIT_CONFIG = ("-c", "core.fsmonitor=false", "-c", "core.quotepath=off")
GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def host_git(runner: Runner, repo: str, *args: str, desc: str, input: bytes | None = None,
             check: bool = True, timeout: float = 120.0) -> Result:
    """Run ``git -C repo ARGS`` on the host (see the module docstring)."""
    argv = ["git", "-C", repo, *GIT_CONFIG, *args]
    try:
        res = runner.run(argv, desc=desc, timeout=timeout, input=input, check=check,
                         env=GIT_ENV)
    except CommandFailed as exc:
        if _DUBIOUS in exc.message:
            raise _foreign(repo) from exc
        raise
    if res.returncode != 0 and _DUBIOUS in res.err:
        raise _foreign(repo)
    return res


_DUBIOUS = "dubious ownership"  # git's safe.directory refusal


def _foreign(repo: str) -> HostError:
    return HostError(f"git refuses to read {repo}: it is owned by another user",
                     hint="bangerd must run host git as the repository's owner "
                          "(git's safe.directory check is deliberately kept)")


@dataclass(frozen=True)
class IndexEntry:
    """One line of ``git ls-files --stage -z``."""

    mode: str
    oid: str
    stage: int
    path: str


def parse_index(raw: bytes) -> list[IndexEntry]:
    """Parse ``git ls-files --stage -z`` output (``MODE OID STAGE<TAB>PATH<NUL>``)."""
    entries = []
    for rec in raw.split(b"\0"):
        if not rec:
            continue
        meta, _, path = rec.partition(b"\t")
        mode, oid, stage = meta.decode("ascii").split(" ")
        entries.append(IndexEntry(mode, oid, int(stage), decode_path(path)))
    return entries


def list_index(runner: Runner, root: str) -> bytes:
    """The index as ``git ls-files --stage -z`` prints it."""
    return host_git(runner, root, "ls-files", "--stage", "-z", desc="list the git index",
                    timeout=300).stdout


def list_untracked(runner: Runner, root: str) -> list[bytes]:
    """Untracked paths git does not ignore (``dir/`` for an untracked nested repository)."""
    out = host_git(runner, root, "ls-files", "-z", "--others", "--exclude-standard",
                   desc="list untracked files", timeout=300).stdout
    return [p for p in out.split(b"\0") if p]


def _head(runner: Runner, root: str) -> tuple[str | None, str | None]:
    res = host_git(runner, root, "rev-parse", "--verify", "-q", "HEAD^{commit}",
                   desc="resolve HEAD", check=False)
    head = res.out.strip() if res.returncode == 0 else None
    ref = host_git(runner, root, "symbolic-ref", "-q", "HEAD", desc="read HEAD's branch",
                   check=False)
    name = ref.out.strip()
    branch = name.removeprefix("refs/heads/") if (
        ref.returncode == 0 and name.startswith("refs/heads/")) else None
    return head, branch


def _identity(runner: Runner, root: str) -> Identity:
    res = host_git(runner, root, "config", "-z", "--get-regexp", r"^user\.(name|email)$",
                   desc="read the git identity", check=False)
    values: dict[str, str] = {}
    for rec in res.stdout.split(b"\0"):
        key, _, value = rec.decode(errors="replace").partition("\n")
        if key:
            values[key] = value  # the last value wins, as for git itself
    return Identity(values.get("user.name"), values.get("user.email"))


def fingerprint(runner: Runner, root: str, head: str | None, branch: str | None) -> str:
    """A hash that changes when HEAD, the index, or any file to copy changes.

    Covers HEAD and its branch, the index (modes, object ids, stages), the set of
    untracked non-ignored paths, and ``lstat`` data (type, mode, size, mtime,
    ctime, inode) of every listed path. No file content is read: a file touched
    without a content change counts as changed (a spare resync, never a missed one).
    """
    h = hashlib.sha256()
    h.update(f"head={head}\nbranch={branch}\n".encode())
    index = list_index(runner, root)
    untracked = list_untracked(runner, root)
    h.update(index)
    h.update(b"\0untracked\0")
    # Paths that are not UTF-8 are refused later by the plan; hash them as bytes here.
    paths = {rec.partition(b"\t")[2] for rec in index.split(b"\0") if rec}
    for raw in untracked:
        h.update(raw + b"\0")
        paths.add(raw.rstrip(b"/"))
    gitlinks = {rec.partition(b"\t")[2] for rec in index.split(b"\0")
                if rec.startswith(GITLINK_MODE.encode() + b" ")}
    submodule_dirs = []
    with HostTree(root) as tree:
        for raw in sorted(paths):
            st = tree.lstat(os.fsdecode(raw))
            h.update(raw + b"\0")
            if st is None:
                h.update(b"missing\0")
            else:
                if raw in gitlinks and stat.S_ISDIR(st.st_mode):
                    submodule_dirs.append(os.fsdecode(raw))
                h.update(f"{stat.S_IFMT(st.st_mode)} {st.st_mode} {st.st_size} {st.st_mtime_ns}"
                         f" {st.st_ctime_ns} {st.st_ino}\0".encode())
    for sub in submodule_dirs:  # a populated submodule's files are copied too
        sub_root = os.path.join(root, sub)
        if populated_submodule(runner, sub_root):
            sub_head, sub_branch = _head(runner, sub_root)
            h.update(f"submodule {sub} ".encode())
            h.update(fingerprint(runner, sub_root, sub_head, sub_branch).encode())
    return h.hexdigest()


def populated_submodule(runner: Runner, path: str) -> bool:
    """Whether ``path`` (a gitlink's directory) is the top of a work tree of its own."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    res = host_git(runner, path, "rev-parse", "--show-toplevel", desc="check a submodule",
                   check=False)
    return res.returncode == 0 and os.path.realpath(res.out.strip()) == os.path.realpath(path)


def inspect_repo(runner: Runner, path: str, mode: WorkspaceMode | str = WorkspaceMode.SHALLOW,
                 ) -> RepoInfo:
    """Check that ``path`` is in a non-bare git work tree and describe that work tree.

    ``path`` may be any directory inside the work tree; the work tree's top level is
    what gets copied (``RepoInfo.host_path``).

    Args:
        runner: runs host git (as the repository's owner; see the package docstring).
        path: absolute host path.
        mode: the workspace mode the caller intends; ``shallow`` refuses submodules.

    Raises:
        BadRequest: not absolute, missing, not a directory, not a git repository, a
            bare repository, inside a ``.git`` directory, or submodules in shallow mode.
        HostError: git is missing or refused to run.
    """
    mode = WorkspaceMode.parse(mode)
    if not os.path.isabs(path):
        raise BadRequest(f"workspace path {path!r} is not absolute",
                         hint="pass an absolute path (the CLI resolves relative ones)")
    p = Path(path)
    if not p.exists():
        raise BadRequest(f"{path} does not exist")
    if not p.is_dir():
        raise BadRequest(f"{path} is not a directory", hint="pass a git work tree directory")
    res = host_git(runner, path, "rev-parse", "--is-bare-repository", "--is-inside-work-tree",
                   desc="check for a git work tree", check=False)
    if res.returncode != 0:
        if "not a git repository" in res.err:
            raise BadRequest(f"{path} is not in a git repository",
                             hint="run `git init` there first, or pass a git work tree")
        raise HostError(f"git could not inspect {path}: {res.err.strip()}")
    bare, inside = [*res.out.split(), "", ""][:2]
    if bare == "true":
        raise BadRequest(f"{path} is a bare git repository (it has no work tree)",
                         hint="clone it (`git clone PATH DIR`) and pass the clone")
    if inside != "true":
        raise BadRequest(f"{path} is not inside a git work tree (is it a .git directory?)",
                         hint="pass the work tree's directory")
    top = host_git(runner, path, "rev-parse", "--show-toplevel",
                   desc="find the work tree's top level").out.strip()
    meta = host_git(runner, top, "rev-parse", "--show-object-format", "--is-shallow-repository",
                    "--git-path", "shallow", desc="read repository format").out.split("\n")
    object_format, is_shallow, shallow_path = meta[0], meta[1], meta[2]
    host_shallow: tuple[str, ...] = ()
    if is_shallow == "true":
        raw = read_owned(str(Path(top, shallow_path)), os.stat(top).st_uid)
        if raw is None:
            raise HostError(f"cannot read the shallow file of {top}",
                            hint="it must be a regular file owned by the repository's owner")
        host_shallow = tuple(raw.decode("ascii", errors="replace").split())
    head, branch = _head(runner, top)
    index = parse_index(list_index(runner, top))
    submodules = tuple(sorted({e.path for e in index if e.mode == GITLINK_MODE}))
    if submodules and mode is WorkspaceMode.SHALLOW:
        raise BadRequest(
            f"{top} has submodules ({', '.join(submodules[:5])}), which a shallow "
            "workspace cannot carry",
            hint="use --mode full_copy to copy the repository with its submodules")
    status = host_git(runner, top, "status", "--porcelain", "-z", "--untracked-files=normal",
                      "--ignore-submodules=none",
                      desc="check for uncommitted changes", timeout=300)
    return RepoInfo(
        host_path=top, mode=mode, head=head, branch=branch, object_format=object_format,
        host_shallow=host_shallow, submodules=submodules, identity=_identity(runner, top),
        dirty=bool(status.stdout), fingerprint=fingerprint(runner, top, head, branch))


def needs_resync(runner: Runner, info_then: RepoInfo, path: str | None = None) -> bool:
    """Whether the host repository changed since ``info_then`` was taken.

    True when HEAD moved, the branch changed, or the index, the set of untracked
    files or any file's stat data changed (see :func:`fingerprint`); also True
    when ``path`` stopped being a git work tree (a new prepare will say why).

    Args:
        runner: as for :func:`inspect_repo`.
        info_then: what :func:`inspect_repo` returned before the last prepare.
        path: the work tree; defaults to ``info_then.host_path``.
    """
    root = path or info_then.host_path
    try:
        res = host_git(runner, root, "rev-parse", "--show-toplevel", desc="find the work tree",
                       check=False)
        if res.returncode != 0 or res.out.strip() != info_then.host_path:
            return True
        head, branch = _head(runner, info_then.host_path)
        if (head, branch) != (info_then.head, info_then.branch):
            return True
        return fingerprint(runner, info_then.host_path, head, branch) != info_then.fingerprint
    except BadRequest:
        return True
