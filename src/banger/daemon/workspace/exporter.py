"""Export: what changed in a guest workspace, as a patch the host can ``git apply``."""

from __future__ import annotations

from banger.daemon.session import check_step, format_step_error
from banger.errors import BadRequest, GuestError, NotFound
from banger.runner import CancelToken

from . import scripts
from .model import GUEST_HOME, PREPARED_REF, Change, Exported, GuestChannel
from .paths import check_guest_path
from .transfer import run_script


def _check_rev(rev: str) -> None:
    if (not rev or len(rev) > 256 or rev.startswith("-")
            or any(c.isspace() or not c.isprintable() for c in rev)):
        raise BadRequest(f"invalid base commit {rev!r}",
                         hint="pass a commit id, branch or tag of the guest repository")


def parse_name_status(raw: bytes) -> tuple[Change, ...]:
    """Parse ``git diff-index --name-status -z -M`` output."""
    fields = raw.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    changes = []
    i = 0
    while i < len(fields):
        status = fields[i].decode("ascii")
        letter = status[:1]
        if letter in ("R", "C"):
            old, new = fields[i + 1].decode(), fields[i + 2].decode()
            changes.append(Change(letter, new, old))
            i += 3
        else:
            changes.append(Change(letter, fields[i + 1].decode()))
            i += 2
    return tuple(changes)


def export(guest: GuestChannel, guest_path: str, *, base_commit: str | None = None,
           cancel: CancelToken | None = None, timeout: float = 600.0,
           home: str = GUEST_HOME) -> Exported:
    """The guest workspace's changes as a binary-safe patch, without touching the workspace.

    By default the patch is relative to the prepared snapshot (``refs/banger/prepared``):
    applied with ``git apply`` to the host work tree as it was when copied in
    (uncommitted changes included) it reproduces the guest's work tree exactly
    (contents, modes, symlinks; ignored files excepted). Edits the guest committed
    are included, since the work tree is compared, not HEAD.

    Args:
        guest: the guest channel.
        guest_path: the workspace (``Prepared.guest_path``).
        base_commit: diff against this guest revision instead (e.g. ``Prepared.base_commit``:
            then the patch also carries the host's uncommitted changes copied in).
        cancel: cancels the export (the guest command is killed).
        timeout: bound on the guest command (it hashes changed files).
        home: the guest's home directory, as for :func:`prepare`.

    Raises:
        BadRequest: invalid path or revision, or ``base_commit`` unknown in the guest.
        NotFound: no prepared workspace at ``guest_path``.
        Cancelled: ``cancel`` fired.
        GuestError: the guest command failed.
    """
    check_guest_path(guest_path, home)
    ref = PREPARED_REF if base_commit is None else base_commit
    _check_rev(ref)
    step = f"export {guest_path}"
    res = run_script(guest, scripts.export(guest_path, ref), step=step, timeout=timeout,
                     cancel=cancel, check=False, stdout_limit=None)
    if res.returncode == scripts.EXIT_REFUSED:
        raise NotFound(format_step_error(step, res),
                       hint="prepare the workspace first (`banger vm workspace prepare`)")
    if res.returncode == scripts.EXIT_BAD_BASE:
        raise BadRequest(format_step_error(step, res),
                         hint="the base commit must exist in the guest repository")
    check_step(step, res)
    sections = parse_sections(res.stdout, step)
    if not sections:
        raise GuestError(f"{step}: the guest printed nothing")
    changes: list[Change] = []
    for _, prefix, names, _ in sections:
        for change in parse_name_status(names):
            changes.append(Change(change.status, prefix + change.path,
                                  None if change.old_path is None else prefix + change.old_path))
    for change in changes:
        # git never reports such paths from a real tree; refuse a tampered answer.
        for path in (change.path, change.old_path):
            if path is not None:
                _check_exported(step, path)
    return Exported(patch=b"".join(s[3] for s in sections), changes=tuple(changes),
                    base=sections[0][0])


def parse_sections(out: bytes, step: str) -> list[tuple[str, str, bytes, bytes]]:
    """Split the export script's output into (base, prefix, name-status, patch) sections."""
    sections = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\n", pos)
        try:
            if end < 0:
                raise ValueError("no header")
            base, n_names, n_patch, n_prefix = out[pos:end].decode("ascii").split(" ")
            sizes = int(n_prefix), int(n_names), int(n_patch)
        except ValueError:
            raise GuestError(f"{step}: unexpected output from the guest: "
                             f"{out[pos:pos + 200]!r}") from None
        pos = end + 1
        parts = []
        for size in sizes:
            if pos + size > len(out):
                raise GuestError(f"{step}: the guest's output was cut short")
            parts.append(out[pos:pos + size])
            pos += size
        prefix, names, patch = parts
        sections.append((base, prefix.decode(), names, patch))
    return sections


def _check_exported(step: str, path: str) -> None:
    if path.startswith("/") or any(c in ("", ".", "..") or c.lower() == ".git"
                                   for c in path.split("/")):
        raise GuestError(f"{step}: the guest reported an unsafe path {path!r}")
