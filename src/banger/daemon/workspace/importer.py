"""Prepare: copy a host work tree and its git state into a guest workspace.

One guest script does it all, in one round trip (:func:`.scripts.prepare`):

1. preflight: tools present, target acceptable, stale staging removed, a hidden
   staging directory created. With ``save_changes``, a banger workspace at the
   target stops the script here, before it reads anything; the guest's changes in
   it are saved and the script runs again;
2. files: one tar stream. First each repository's git directory, written on the
   host (:mod:`.gitdir`: HEAD, config and identity, refs, shallow list, excludes,
   the index from ``ls-files --stage``, conflict stages included, and the list of
   files to check out), then the work-tree entries that differ from their index
   blobs (modified and untracked files, symlinks, conflicted paths; :mod:`.checkout`
   decides), read from the host tree on the fly, and last each repository's history
   as a pack and its index, built on the host beforehand (:mod:`.hostpack`): the
   commits to ship (HEAD's last ``depth`` generations, or every branch, tag and
   remote-tracking ref in ``full_copy`` mode) and every blob the host index names.
   Each byte of a file crosses once;
3. set-up, per repository: the unchanged files written out of the pack
   (``checkout-index``, conversions off) and the prepared snapshot under
   ``refs/banger/prepared`` (HEAD's own commit when the tree is exactly HEAD's,
   else a commit the guest makes); then the guest's saved changes re-applied;
4. swap: the staging directory replaces the target.

Until step 4 nothing exists at the target path; any failure or cancellation
removes the staging directory (best effort; the next prepare removes leftovers).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.session import format_step_error
from banger.errors import BadRequest, BangerError, GuestError
from banger.runner import CancelToken, Result, Runner

from . import gitdir, scripts
from .checkout import checkout_paths, listing
from .hostpack import build_pack, pack_argv
from .hosttree import read_owned
from .model import (
    DEFAULT_DEPTH,
    GUEST_HOME,
    MISE_LOG,
    CopyPlan,
    EntryKind,
    GuestChannel,
    Prepared,
    Progress,
    RepoInfo,
    WorkspaceConflict,
    WorkspaceMode,
)
from .paths import check_guest_path, default_guest_path
from .repo import host_git
from .transfer import GuestSink, send_tree

log = logging.getLogger("banger.workspace")

TRANSPORTS = ("auto", "ssh")
"""How the files' tar reaches the guest (see :func:`prepare`)."""

TCP_MIN_BYTES = 8 << 20
"""Below this much to send, ``auto`` stays on ssh: under TCG, starting the guest's
receiver (perl and its socket modules) costs about 0.9 s, what ssh's 6-10 MB/s into a
guest takes for 5-9 MB."""

TOOL_FILES = (".mise.toml", "mise.toml", ".tool-versions")
"""Top-level files that make prepare start ``mise install`` in the guest."""


@dataclass(frozen=True)
class History:
    """The git state to recreate: objects to pack, refs, HEAD, shallow boundary."""

    revs: bytes  # stdin for `git pack-objects --revs`; empty when there is nothing to send
    shallow: tuple[str, ...]
    refs: tuple[tuple[str, str], ...]  # (refname, object id)
    head_symbolic: str | None
    head_commit: str | None


def _check_branch(runner: Runner, info: RepoInfo, branch: str) -> None:
    if branch.startswith("-") or branch == "HEAD":
        raise BadRequest(f"invalid branch name {branch!r}")
    res = host_git(runner, info.host_path, "check-ref-format", f"refs/heads/{branch}",
                   desc="check the branch name", check=False)
    if res.returncode != 0:
        raise BadRequest(f"invalid branch name {branch!r}",
                         hint="see `git help check-ref-format` for the rules")
    res = host_git(runner, info.host_path, "show-ref", "--verify", "-q", f"refs/heads/{branch}",
                   desc="look for the branch", check=False)
    if res.returncode == 0:
        raise BadRequest(f"branch {branch!r} already exists in {info.host_path}",
                         hint="--branch creates a new branch; pick a name not used yet")


def _resolve(runner: Runner, info: RepoInfo, ref: str) -> str:
    if not ref or ref.startswith("-") or any(c.isspace() for c in ref):
        raise BadRequest(f"invalid revision {ref!r}")
    res = host_git(runner, info.host_path, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}",
                   desc="resolve --from", check=False)
    if res.returncode != 0:
        raise BadRequest(f"{ref!r} is not a commit in {info.host_path}",
                         hint="pass a branch, tag or commit id that exists on the host")
    return res.out.strip()


def _shallow_set(runner: Runner, root: str, tips: list[str], depth: int,
                 host_shallow: tuple[str, ...]) -> tuple[str, ...]:
    """Commits the guest's ``.git/shallow`` must list for ``depth`` generations of ``tips``.

    Walks one generation per ``git rev-list --no-walk --parents`` call. The last
    generation's commits that have parents become shallow (git's own ``--depth``
    boundary); host-shallow commits inside the walked set stay shallow.
    """
    level = list(dict.fromkeys(tips))
    seen = set(level)
    boundary: set[str] = set()
    for generation in range(1, depth + 1):
        res = host_git(runner, root, "rev-list", "--no-walk=unsorted", "--parents", "--stdin",
                       input="".join(f"{c}\n" for c in level).encode(),
                       desc="walk recent history")
        parents = {}
        for line in res.out.splitlines():
            commit, *ps = line.split()
            parents[commit] = ps
        if generation == depth:
            boundary = {c for c in level if parents.get(c)}
            break
        nxt = [p for c in level for p in parents.get(c, []) if p not in seen]
        level = list(dict.fromkeys(nxt))
        seen.update(level)
        if not level:
            break
    boundary |= seen & set(host_shallow)
    return tuple(sorted(boundary))


def plan_history(runner: Runner, info: RepoInfo, plan: CopyPlan, *, mode: WorkspaceMode,
                 depth: int, branch: str | None, from_commit: str | None) -> History:
    """Decide which objects, refs and shallow boundary the guest repository gets."""
    root = info.host_path
    refs: dict[str, str] = {}
    tips = [c for c in (info.head, from_commit) if c]
    if mode is WorkspaceMode.FULL_COPY:
        out = host_git(runner, root, "for-each-ref",
                       "--format=%(objectname) %(refname) %(symref)",
                       "refs/heads", "refs/tags", "refs/remotes", desc="list refs").out
        for line in out.splitlines():
            oid, name, *symref = line.split(" ")
            if symref and symref[0]:
                continue  # e.g. refs/remotes/origin/HEAD; its target is listed itself
            refs[name] = oid
            tips.append(oid)
        shallow = tuple(sorted(info.host_shallow))
        revs = [*dict.fromkeys(tips)]
    else:
        shallow = _shallow_set(runner, root, tips, depth, info.host_shallow) if tips else ()
        revs = [*(f"--shallow {c}" for c in shallow), *dict.fromkeys(tips)]
    if info.branch and info.head:
        refs[f"refs/heads/{info.branch}"] = info.head
    head_symbolic: str | None = None
    head_commit: str | None = None
    if branch:
        head_symbolic = f"refs/heads/{branch}"
        start = from_commit or info.head
        if start:
            refs[head_symbolic] = start
    elif info.branch:
        head_symbolic = f"refs/heads/{info.branch}"
    else:
        head_commit = info.head
    revs += plan.index_blobs
    return History(revs="".join(f"{r}\n" for r in revs).encode() if tips or plan.index_blobs
                   else b"",
                   shallow=shallow, refs=tuple(refs.items()), head_symbolic=head_symbolic,
                   head_commit=head_commit if head_symbolic is None else None)


def _host_excludes(runner: Runner, info: RepoInfo) -> bytes:
    """The host's ``info/exclude`` and ``core.excludesFile`` contents, so files the host
    ignores stay out of the guest's ``git status`` and exports."""
    root = info.host_path
    owner = os.stat(root).st_uid
    paths = [str(Path(root, host_git(runner, root, "rev-parse", "--git-path", "info/exclude",
                                     desc="find info/exclude").out.strip()))]
    res = host_git(runner, root, "config", "--path", "--get", "core.excludesFile",
                   desc="read core.excludesFile", check=False)
    if res.returncode == 0 and res.out.strip():
        paths.append(res.out.strip())
    chunks = [b"# copied from the host by banger\n"]
    for p in paths:
        data = read_owned(p, owner)
        if data:
            chunks.append(data if data.endswith(b"\n") else data + b"\n")
    return b"".join(chunks)


def _git_files(runner: Runner, repo: Repo, mode: WorkspaceMode) -> gitdir.RepoFiles:
    """What the guest's git directory of ``repo`` holds, written here (see :mod:`.gitdir`)."""
    info, history = repo.info, repo.history
    return gitdir.RepoFiles(
        object_format=info.object_format, index=repo.plan.index,
        head_symbolic=history.head_symbolic, head_commit=history.head_commit,
        refs=history.refs, shallow=history.shallow, user_name=info.identity.name,
        user_email=info.identity.email, excludes=_host_excludes(runner, info),
        marker=(f"host_path={info.host_path}\nbase_commit={info.head or ''}\n"
                f"mode={mode.value}\n").encode(),
        checkout=listing(repo.checkout), prepared=None if repo.commit else repo.parent)


REFUSED_HINT = "choose another --guest-path, or remove that path in the guest"


class _Counter:
    """Cumulative progress, reported at most every ``REPORT_EVERY_S`` (and at the end)."""

    REPORT_EVERY_S = 0.2  # progress lines are for humans; more often is noise

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.bytes = 0
        self.files = 0
        self._last = 0.0

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        self._maybe_report()

    def add_file(self) -> None:
        self.files += 1
        self._maybe_report()

    def _maybe_report(self) -> None:
        if time.monotonic() - self._last >= self.REPORT_EVERY_S:
            self.report()

    def report(self) -> None:
        self._last = time.monotonic()
        if self._progress is None:
            return
        try:
            self._progress(self.bytes, self.files)
        except Exception:  # a progress callback must never break the copy
            log.exception("workspace progress callback failed")


def prepare(guest: GuestChannel, runner: Runner, info: RepoInfo, plan: CopyPlan, *,
            guest_path: str | None = None, branch: str | None = None, from_ref: str | None = None,
            progress: Progress | None = None, cancel: CancelToken | None = None,
            depth: int = DEFAULT_DEPTH, home: str = GUEST_HOME,
            step_timeout: float = 1800.0, stall_timeout: float = 120.0,
            guest_changes: bytes = b"",
            save_changes: Callable[[], bytes] | None = None, scratch_dir: Path | None = None,
            transport: str = "auto", tcp_min_bytes: int = TCP_MIN_BYTES) -> Prepared:
    """Copy the host work tree and its git state into a guest workspace.

    Args:
        guest: the guest channel.
        runner: host runner (host git, as the repository's owner).
        info: from :func:`inspect_repo`.
        plan: from :func:`build_plan` for the same ``info``.
        guest_path: workspace directory; default ``<home>/<repo dir name>``. Must be a
            normalised path below ``home``; an existing directory there must be an
            earlier banger workspace (or empty) and is replaced.
        branch: create this new branch in the guest and check it out (files and index
            stay as copied; HEAD moves, like ``git checkout -b`` / ``git reset --soft``).
        from_ref: the branch's start (a host revision); default HEAD. Needs ``branch``.
        progress: ``progress(bytes_sent, files_sent)``; exceptions it raises are logged.
        cancel: cancels the copy at the next chunk; a blocked transfer is killed.
        depth: commits of history in shallow mode.
        home: the guest's home directory (``/root``); tests point it elsewhere.
        step_timeout: bound on each guest step once its input is sent.
        stall_timeout: bound on one blocked write into the guest.
        guest_changes: a patch (an :func:`export` of the workspace being replaced)
            to apply on top of the new copy before it replaces the old one.
        save_changes: when given, a banger workspace found at the target is not
            replaced at once: ``save_changes()`` is called to save the guest's changes
            in it and returns them as a patch (``b""``: none), which replaces
            ``guest_changes``; then the copy starts again. The guest says whether
            there is one in the same round trip that copies, so a new target costs
            no extra round trip.
        scratch_dir: where the history's pack is built on the host (default: the
            system's temporary directory); a directory only root can enter.
        transport: ``auto``: the files' tar goes over a TCP connection to the guest
            when the work tree holds at least ``tcp_min_bytes`` and the guest has perl
            (``scripts.RECEIVER``), else over ssh; ``ssh``: always over ssh.
            ``Prepared.transport`` says which was used.
        tcp_min_bytes: see ``transport``.

    Returns:
        The workspace's description.

    Raises:
        BadRequest: bad arguments, untrusted-input refusals, target path not replaceable.
        Cancelled: ``cancel`` fired before the swap; the target is untouched.
        GuestError: a guest step failed; the target is untouched.
        HostError: host git failed.
        WorkspaceConflict: ``guest_changes`` do not apply to the new copy; the
            target is untouched.
    """
    mode = info.mode  # inspect_repo already refused submodules in shallow mode
    if transport not in TRANSPORTS:
        raise BadRequest(f"unknown workspace transport {transport!r}",
                         hint=f"use one of: {', '.join(TRANSPORTS)}")
    if plan.root != info.host_path:
        raise BadRequest("the copy plan belongs to another repository")
    if depth < 1:
        raise BadRequest(f"history depth must be at least 1, not {depth}")
    if from_ref is not None and not branch:
        raise BadRequest("--from needs --branch", hint="name the branch to create from it")
    target = check_guest_path(guest_path or default_guest_path(info.name, home), home)
    cancel = cancel or CancelToken()
    if branch:
        _check_branch(runner, info, branch)
    from_commit = _resolve(runner, info, from_ref) if from_ref else None
    head_commit = (from_commit or info.head) if branch else info.head
    repos: list[Repo] = []  # the workspace, then its submodules
    for prefix, sub_info, sub_plan in plan.walk():
        if sub_info is None:
            history = plan_history(runner, info, plan, mode=mode, depth=depth, branch=branch,
                                   from_commit=from_commit)
            repos.append(Repo(prefix, info, sub_plan, history, head_commit))
        else:
            history = plan_history(runner, sub_info, sub_plan, mode=WorkspaceMode.FULL_COPY,
                                   depth=depth, branch=None, from_commit=None)
            repos.append(Repo(prefix, sub_info, sub_plan, history, sub_info.head))
    cancel.check()
    clock = _StepClock()
    # Files whose bytes are their index blob come out of the history pack in the
    # guest: their bytes cross the link once (in the pack), not twice.
    repos = [r.with_checkout(checkout_paths(r.plan, r.info.object_format)) for r in repos]
    clock.lap("hash")
    skip = {r.prefix + p for r in repos for p in r.checkout}
    sent = [e for e in plan.all_entries() if e.path not in skip]
    files = [(r.prefix, _git_files(runner, r, mode)) for r in repos]
    submodules = "".join(f"{r.prefix.rstrip('/')}\n" for r in repos[1:]).encode()
    # Submodules first (deepest first): a parent's snapshot records their HEADs.
    setups = [scripts.RepoSetup(r.prefix, checkout=bool(r.checkout), commit=r.commit,
                                parent=r.parent)
              for r in sorted(repos, key=lambda r: -r.prefix.count("/"))]
    names = scripts.Names(target, secrets.token_hex(4))
    step = f"prepare {target}"
    cancel.check()
    scratch = Path(tempfile.mkdtemp(prefix="workspace-", dir=scratch_dir))
    try:
        # The work tree's size decides (its bytes go out, from the tar or the pack).
        over_tcp = transport == "auto" and plan.bytes >= tcp_min_bytes
        packs = _build_packs(runner, repos, scratch, cancel=cancel, timeout=step_timeout,
                             compression=0 if over_tcp else 1)
        clock.lap("pack")
        replacing = save_changes is None
        while True:
            counter = _Counter(progress)
            token = secrets.token_hex(16) if over_tcp else None
            metadata = [m for prefix, f in files for m in gitdir.members(
                prefix, f, submodules=submodules if not prefix else b"",
                reapply=guest_changes if not prefix else b"")]
            try:
                with GuestSink(guest, scripts.prepare(names, setups, token=token,
                                                      replace=replacing,
                                                      reapply=bool(guest_changes)),
                               step=step, cancel=cancel, stall_timeout=stall_timeout,
                               on_bytes=counter.add_bytes, data_token=token) as sink:
                    send_tree(sink, info.host_path, sent, metadata,
                              trailer=packs, cancel=cancel, on_file=counter.add_file)
                    counter.report()
                    res = sink.finish(step_timeout)
                    channel = sink.channel
            except GuestError as exc:
                code = exc.details.get("returncode")
                if code == scripts.EXIT_EXISTS and save_changes is not None and not replacing:
                    # A banger workspace is in the way: save what the guest changed in
                    # it, then copy again, re-applying those changes on the new copy.
                    clock.lap("found a workspace")
                    guest_changes = save_changes()
                    clock.lap("save")
                    replacing = True
                    continue
                if code == scripts.EXIT_REFUSED:
                    raise BadRequest(exc.message, hint=REFUSED_HINT) from exc
                if code == scripts.EXIT_CONFLICT:
                    raise WorkspaceConflict(exc.message) from exc
                raise
            break
        clock.lap("files, set-up and swap")
        log.info("workspace %s: %s", target, clock.summary())
    except BaseException:
        _cleanup(guest, names)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    prepared_commit, reapplied = _outcome(res, repos[0], step, bool(guest_changes))
    tool_log = None
    if any(e.path in TOOL_FILES and e.kind is not EntryKind.GITLINK for e in plan.entries):
        tool_log = _start_tools(guest, target)
    return Prepared(guest_path=target, host_path=info.host_path, base_commit=info.head,
                    head_commit=head_commit, branch=branch or info.branch,
                    prepared_commit=prepared_commit, mode=mode,
                    files=counter.files + len(skip),
                    transport="tcp" if channel == "tcp" else "ssh",
                    bytes=counter.bytes, tool_log=tool_log, reapplied=reapplied)


@dataclass(frozen=True)
class Repo:
    """The workspace's repository or one of its submodules', as prepare copies it."""

    prefix: str  # "" or "sub/path/": where it sits in the workspace
    info: RepoInfo
    plan: CopyPlan
    history: History
    parent: str | None  # the commit the prepared snapshot descends from
    checkout: tuple[str, ...] = ()  # files the guest writes out of the pack

    def with_checkout(self, paths: tuple[str, ...]) -> Repo:
        """This repository, with the files the guest checks out of the pack."""
        return dataclasses.replace(self, checkout=paths)

    @functools.cached_property
    def commit(self) -> bool:
        """Whether the guest must record a snapshot commit: unless the tree as copied is
        exactly the parent's, which then serves as the snapshot (the host tree is
        clean, the parent is its HEAD, and every file's bytes are its blob's). Computed
        once: it walks every entry of the plan."""
        checked_out = set(self.checkout)
        return not (self.parent is not None and self.parent == self.info.head
                    and not self.info.dirty
                    and all(e.path in checked_out for e in self.plan.entries
                            if e.kind is EntryKind.FILE))


def _build_packs(runner: Runner, repos: list[Repo], scratch: Path, *, cancel: CancelToken,
                 timeout: float, compression: int) -> list[tuple[str, Path]]:
    """Each repository's history packed and indexed on the host: (tar name, file)
    pairs that land in its ``.git/objects/pack``."""
    files: list[tuple[str, Path]] = []
    for n, repo in enumerate(repos):
        if not repo.history.revs:
            continue
        built = build_pack(pack_argv(runner, repo.info.host_path, compression),
                           repo.history.revs, scratch / f"{n}.pack",
                           object_format=repo.info.object_format, timeout=timeout,
                           cancel=cancel)
        base = f"{repo.prefix}.git/objects/pack/{built.name}"
        files += [(f"{base}.pack", built.pack), (f"{base}.idx", built.idx)]
    return files


def _outcome(res: Result, top: Repo, step: str, reapplied: bool) -> tuple[str, str | None]:
    """The prepared snapshot commit and the re-apply outcome, from the script's output."""
    commit = top.parent or ""
    outcome = None
    for line in res.out.splitlines():
        key, _, value = line.partition(" ")
        if key == scripts.PREPARED and top.commit:
            commit = value.strip()
        elif key == scripts.REAPPLIED:
            outcome = value.strip()
    if not commit or not all(c in "0123456789abcdef" for c in commit):
        raise GuestError(f"{step}: no snapshot commit in the guest's answer: "
                         f"{res.out[-200:]!r}")
    if reapplied and outcome not in ("applied", "present"):
        raise GuestError(f"{step}: unexpected re-apply answer from the guest: {outcome!r}")
    return commit, outcome


class _StepClock:
    """Seconds spent per prepare step, for the log (where does a slow prepare go?)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self._laps.append((step, now - self._last))
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{step} {secs:.1f}s" for step, secs in self._laps)


def _cleanup(guest: GuestChannel, names: scripts.Names) -> None:
    try:
        guest.run(scripts.cleanup(names), timeout=60, check=False, desc="workspace cleanup")
    except (BangerError, OSError):
        log.warning("could not remove %s in guest %s", names.staging, guest.ip, exc_info=True)


def _start_tools(guest: GuestChannel, target: str) -> str | None:
    """Best effort: start ``mise install`` in the background; None if not started."""
    try:
        res = guest.run(scripts.start_tools(target), timeout=30, check=False,
                        desc="start mise install")
    except (BangerError, OSError):
        log.warning("could not start mise install in %s", target, exc_info=True)
        return None
    if res.returncode == 0 and res.out.strip() == "started":
        return f"{target}/{MISE_LOG}"
    if res.returncode != 0:
        log.warning("%s", format_step_error("start mise install", res))
    return None
