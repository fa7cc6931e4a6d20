"""Prepare: copy a host work tree and its git state into a guest workspace.

Steps (see :mod:`.scripts` for the guest side):

1. files: first a preflight (tools present, target acceptable, stale staging
   removed, an empty git repository created in a hidden staging directory), then,
   in the same guest script, one tar stream: banger's metadata (the index listing,
   refs, shallow list, excludes, the files to check out), the work-tree entries
   that differ from their index blobs (modified and untracked files, symlinks,
   conflicted paths; :mod:`.checkout` decides), read from the host tree on the fly,
   and last each repository's history as a pack and its index, built on the host
   beforehand (:mod:`.hostpack`): the commits to ship (HEAD's last ``depth``
   generations, or every branch, tag and remote-tracking ref in ``full_copy``
   mode) and every blob the host index names. Each byte of a file crosses once;
2. setup: refs, HEAD, ``.git/shallow``, the index (``git update-index
   --index-info`` from ``ls-files --stage``, conflict stages included), the
   unchanged files written out of the pack (``checkout-index``, conversions off),
   the git identity, and the prepared snapshot commit under ``refs/banger/prepared``;
3. swap, in the same script as the workspace's own setup (unless the guest's
   changes are re-applied in between): the staging directory replaces the target.

Until step 3 nothing exists at the target path; any failure or cancellation
removes the staging directory (best effort; the next prepare removes leftovers).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.session import check_step, format_step_error
from banger.errors import BadRequest, BangerError, GuestError
from banger.runner import CancelToken, Result, Runner

from . import scripts
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
from .transfer import GuestSink, run_script, send_tree

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


def _metadata(runner: Runner, prefix: str, info: RepoInfo, plan: CopyPlan, *,
              history: History, mode: WorkspaceMode,
              checkout: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The files the setup step of one repository reads (see ``scripts.IMPORT_DIR``)."""
    base = f"{prefix}{scripts.IMPORT_DIR}"
    return [
        (f"{base}/index", plan.index),
        (f"{base}/checkout", listing(checkout)),
        (f"{base}/refs", _refs_file(history.refs)),
        (f"{base}/shallow", "".join(f"{c}\n" for c in history.shallow).encode()),
        (f"{base}/exclude", _host_excludes(runner, info)),
        (f"{base}/workspace", f"host_path={info.host_path}\nbase_commit={info.head or ''}\n"
                              f"mode={mode.value}\n".encode()),
    ]


def _refs_file(refs: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"create {name}\0{oid}\0".encode() for name, oid in refs)


REFUSED_HINT = "choose another --guest-path, or remove that path in the guest"


def _checked(step: str, result: Result) -> Result:
    if result.returncode == scripts.EXIT_REFUSED:
        raise BadRequest(format_step_error(step, result), hint=REFUSED_HINT)
    return check_step(step, result)


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
            guest_changes: bytes = b"", scratch_dir: Path | None = None,
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
        rinfo = sub_info or info
        if sub_info is None:
            history = plan_history(runner, info, plan, mode=mode, depth=depth, branch=branch,
                                   from_commit=from_commit)
            parent = head_commit
        else:
            history = plan_history(runner, sub_info, sub_plan, mode=WorkspaceMode.FULL_COPY,
                                   depth=depth, branch=None, from_commit=None)
            parent = sub_info.head
        setup = scripts.Setup(head_symbolic=history.head_symbolic,
                              head_commit=history.head_commit, parent=parent,
                              user_name=rinfo.identity.name, user_email=rinfo.identity.email,
                              object_format=rinfo.object_format)
        repos.append((prefix, rinfo, sub_plan, history, setup))
    cancel.check()
    clock = _StepClock()
    # Files whose bytes are their index blob come out of the history pack in the
    # guest: their bytes cross the link once (in the pack), not twice.
    from_pack = {prefix: checkout_paths(sub_plan, rinfo.object_format)
                 for prefix, rinfo, sub_plan, _, _ in repos}
    clock.lap("hash")
    skip = {prefix + p for prefix, paths in from_pack.items() for p in paths}
    sent = [e for e in plan.all_entries() if e.path not in skip]
    metadata = [m for prefix, rinfo, sub_plan, history, _ in repos
                for m in _metadata(runner, prefix, rinfo, sub_plan, history=history, mode=mode,
                                   checkout=from_pack[prefix])]
    if plan.submodules:
        listing = "".join(f"{prefix.rstrip('/')}\n" for prefix, *_ in repos[1:])
        metadata.append((f"{scripts.IMPORT_DIR}/submodules", listing.encode()))
    names = scripts.Names(target, secrets.token_hex(4))
    counter = _Counter(progress)
    cancel.check()
    scratch = Path(tempfile.mkdtemp(prefix="workspace-", dir=scratch_dir))
    try:
        # The work tree's size decides (its bytes go out, from the tar or the pack).
        over_tcp = transport == "auto" and plan.bytes >= tcp_min_bytes
        packs = _build_packs(runner, repos, scratch, cancel=cancel, timeout=step_timeout,
                             compression=0 if over_tcp else 1)
        clock.lap("pack")
        try:
            token = secrets.token_hex(16) if over_tcp else None
            with GuestSink(guest, scripts.extract(names, info.object_format, token),
                           step=f"copy files into {target}", cancel=cancel,
                           stall_timeout=stall_timeout, on_bytes=counter.add_bytes,
                           data_token=token) as sink:
                channel = sink.channel
                send_tree(sink, info.host_path, sent, metadata,
                          trailer=packs, cancel=cancel, on_file=counter.add_file)
                sink.finish(step_timeout)
        except GuestError as exc:
            if exc.details.get("returncode") == scripts.EXIT_REFUSED:
                raise BadRequest(exc.message, hint=REFUSED_HINT) from exc
            raise
        clock.lap("files")
        prepared_commit = ""
        # Submodules first (deepest first): a parent's snapshot records their HEADs.
        # The last setup (the workspace's own) also swaps, unless changes are re-applied.
        ordered = sorted(repos, key=lambda r: -r[0].count("/"))
        for n, (prefix, _, _, _, setup) in enumerate(ordered):
            where = f" ({prefix.rstrip('/')})" if prefix else ""
            swap = n == len(ordered) - 1 and not guest_changes
            counter.report()
            step = f"set up the git repository{where}"
            res = _checked(step, run_script(guest, scripts.setup(names, setup, prefix,
                                                                 then_swap=swap),
                                            step=step, timeout=step_timeout, cancel=cancel,
                                            check=False))
            prepared_commit = res.out.split()[-1]
            clock.lap(f"setup{where}" + (" and swap" if swap else ""))
        reapplied = None
        if guest_changes:
            reapplied = _reapply(guest, names, guest_changes, target, cancel=cancel,
                                 timeout=step_timeout)
            clock.lap("reapply")
            cancel.check()
            _checked("move the workspace into place",
                     guest.run(scripts.swap(names), timeout=120, check=False,
                               desc="workspace swap"))
            clock.lap("swap")
        log.info("workspace %s: %s", target, clock.summary())
    except BaseException:
        _cleanup(guest, names)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tool_log = None
    if any(e.path in TOOL_FILES and e.kind is not EntryKind.GITLINK for e in plan.entries):
        tool_log = _start_tools(guest, target)
    return Prepared(guest_path=target, host_path=info.host_path, base_commit=info.head,
                    head_commit=head_commit, branch=branch or info.branch,
                    prepared_commit=prepared_commit, mode=mode,
                    files=counter.files + len(skip),
                    transport="tcp" if channel == "tcp" else "ssh",
                    bytes=counter.bytes, tool_log=tool_log, reapplied=reapplied)


Repo = tuple[str, RepoInfo, CopyPlan, History, scripts.Setup]
"""(path prefix, info, plan, history, setup) of the workspace or one of its submodules."""


def _build_packs(runner: Runner, repos: list[Repo], scratch: Path, *, cancel: CancelToken,
                 timeout: float, compression: int) -> list[tuple[str, Path]]:
    """Each repository's history packed and indexed on the host: (tar name, file)
    pairs that land in its ``.git/objects/pack``."""
    files: list[tuple[str, Path]] = []
    for n, (prefix, rinfo, _, history, _) in enumerate(repos):
        if not history.revs:
            continue
        built = build_pack(pack_argv(runner, rinfo.host_path, compression), history.revs,
                           scratch / f"{n}.pack", object_format=rinfo.object_format,
                           timeout=timeout, cancel=cancel)
        base = f"{prefix}.git/objects/pack/{built.name}"
        files += [(f"{base}.pack", built.pack), (f"{base}.idx", built.idx)]
    return files


def _reapply(guest: GuestChannel, names: scripts.Names, patch: bytes, target: str, *,
             cancel: CancelToken, timeout: float) -> str:
    """Apply ``patch`` to the staging tree; ``applied`` or ``present`` (see
    :func:`scripts.reapply`)."""
    step = f"re-apply the guest's changes to the new copy of {target}"
    res = run_script(guest, scripts.reapply(names), step=step, input=patch, timeout=timeout,
                     cancel=cancel, check=False)
    if res.returncode == scripts.EXIT_CONFLICT:
        raise WorkspaceConflict(format_step_error(step, res))
    check_step(step, res)
    outcome = res.out.strip()
    if outcome not in ("applied", "present"):
        raise GuestError(f"{step}: unexpected answer from the guest: {outcome[:200]!r}")
    return outcome


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
