"""Export: what changed in a guest workspace, as a patch the host can ``git apply``."""

from __future__ import annotations

import re

from banger.daemon.session import check_step, format_step_error
from banger.errors import BadRequest, GuestError, NotFound
from banger.runner import CancelToken

from . import scripts
from .model import GUEST_HOME, PREPARED_REF, Change, Exported, GuestChannel
from .paths import check_guest_path
from .transfer import OutputTooLarge, run_script


def _check_rev(rev: str) -> None:
    if (not rev or len(rev) > 256 or rev.startswith("-")
            or any(c.isspace() or not c.isprintable() for c in rev)):
        raise BadRequest(f"invalid base commit {rev!r}",
                         hint="pass a commit id, branch or tag of the guest repository")


_STATUS_LETTERS = frozenset("ACDMRTUX")
_HEADER = re.compile(rb"([0-9a-f]{40}|[0-9a-f]{64}) ([0-9]{1,12}) ([0-9]{1,12}) ([0-9]{1,5})")


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GuestError(f"the guest reported {what} that is not UTF-8: {raw[:200]!r}") \
            from None


def parse_name_status(raw: bytes) -> tuple[Change, ...]:
    """Parse ``git diff-index --name-status -z -M`` output.

    The guest is untrusted: anything git would not print is a :class:`GuestError`.
    """
    fields = raw.split(b"\0")
    if fields and fields[-1] == b"":
        fields.pop()
    changes = []
    i = 0
    while i < len(fields):
        status = fields[i]
        letter = status[:1].decode("ascii", errors="replace")
        score = status[1:]
        if letter not in _STATUS_LETTERS or (score and not (score.isdigit() and len(score) <= 3)):
            raise GuestError(f"the guest reported an unknown change status {status[:20]!r}")
        paths = 2 if letter in ("R", "C") else 1
        if i + paths >= len(fields):
            raise GuestError("the guest's list of changed files was cut short")
        names = [_decode(f, "a file name") for f in fields[i + 1:i + 1 + paths]]
        if any(not n for n in names):
            raise GuestError("the guest reported an empty file name")
        if paths == 2:
            changes.append(Change(letter, names[1], names[0]))
        else:
            changes.append(Change(letter, names[0]))
        i += 1 + paths
    return tuple(changes)


DEFAULT_MAX_BYTES = 256 << 20
"""Default bound on an export's guest output (the config's ``workspace_export_max_mib``)."""


def export(guest: GuestChannel, guest_path: str, *, base_commit: str | None = None,
           cancel: CancelToken | None = None, timeout: float = 600.0,
           home: str = GUEST_HOME, max_bytes: int = DEFAULT_MAX_BYTES) -> Exported:
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
        max_bytes: bound on the guest's output (patch and file list), which is held
            in memory; a larger answer is refused, never truncated.

    Raises:
        BadRequest: invalid path or revision, or ``base_commit`` unknown in the guest.
        NotFound: no prepared workspace at ``guest_path``.
        Cancelled: ``cancel`` fired.
        GuestError: the guest command failed, printed more than ``max_bytes``, or
            printed something the export script never prints.
    """
    check_guest_path(guest_path, home)
    ref = PREPARED_REF if base_commit is None else base_commit
    _check_rev(ref)
    step = f"export {guest_path}"
    try:
        res = run_script(guest, scripts.export(guest_path, ref), step=step, timeout=timeout,
                         cancel=cancel, check=False, stdout_cap=max_bytes)
    except OutputTooLarge as exc:
        raise GuestError(
            f"{step}: the guest's changes are larger than {max_bytes / (1 << 20):g} MiB",
            hint="remove or .gitignore large generated files in the guest workspace, or "
                 "raise workspace_export_max_mib in config.toml") from exc
    if res.returncode == scripts.EXIT_REFUSED:
        raise NotFound(format_step_error(step, res),
                       hint="prepare the workspace first (`banger vm workspace prepare`)")
    if res.returncode == scripts.EXIT_BAD_BASE:
        raise BadRequest(format_step_error(step, res),
                         hint="the base commit must exist in the guest repository")
    check_step(step, res)
    try:
        sections = parse_sections(res.stdout, step)
        changes: list[Change] = []
        for _, prefix, names, _ in sections:
            for change in parse_name_status(names):
                changes.append(Change(change.status, prefix + change.path,
                                      None if change.old_path is None
                                      else prefix + change.old_path))
    except GuestError as exc:
        if exc.message.startswith(step):
            raise
        raise GuestError(f"{step}: {exc.message}") from exc
    if not sections:
        raise GuestError(f"{step}: the guest printed nothing")
    for change in changes:
        # git never reports such paths from a real tree; refuse a tampered answer.
        for path in (change.path, change.old_path):
            if path is not None:
                _check_exported(step, path)
    return Exported(patch=b"".join(s[3] for s in sections), changes=tuple(changes),
                    base=sections[0][0])


def parse_sections(out: bytes, step: str) -> list[tuple[str, str, bytes, bytes]]:
    """Split the export script's output into (base, prefix, name-status, patch) sections.

    The guest is untrusted: a header that is not ``<object id> <n> <m> <k>``, a
    section longer than the output, or a prefix that is not a relative directory
    path ending in ``/`` is a :class:`GuestError`.
    """
    sections: list[tuple[str, str, bytes, bytes]] = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\n", pos, pos + 200)
        header = _HEADER.fullmatch(out[pos:end]) if end >= 0 else None
        if header is None:
            raise GuestError(f"{step}: unexpected output from the guest: "
                             f"{out[pos:pos + 200]!r}")
        base = header.group(1).decode("ascii")
        sizes = int(header.group(4)), int(header.group(2)), int(header.group(3))
        pos = end + 1
        parts = []
        for size in sizes:
            if pos + size > len(out):
                raise GuestError(f"{step}: the guest's output was cut short")
            parts.append(out[pos:pos + size])
            pos += size
        raw_prefix, names, patch = parts
        prefix = _decode(raw_prefix, "a submodule path")
        if prefix and (not prefix.endswith("/") or not sections):
            raise GuestError(f"{step}: the guest reported a bad submodule path {prefix!r}")
        if prefix:
            _check_exported(step, prefix[:-1])
        elif sections:
            raise GuestError(f"{step}: the guest reported the workspace twice")
        sections.append((base, prefix, names, patch))
    return sections


def _check_exported(step: str, path: str) -> None:
    if path.startswith("/") or any(c in ("", ".", "..") or c.lower() == ".git"
                                   for c in path.split("/")):
        raise GuestError(f"{step}: the guest reported an unsafe path {path!r}")
