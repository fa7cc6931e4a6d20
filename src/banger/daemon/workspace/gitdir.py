"""The staging repository's git directory, written on the host and shipped in the tar.

A TCG guest pays 0.1-0.3 s for every program it starts. Most of what a fresh
repository needs is plain data the host can write itself, so the guest runs no
``git init``, ``git update-ref`` or ``git update-index --index-info``: the copy's
tar carries, for the workspace and for each submodule (paths below its prefix):

* ``.git/HEAD``, ``.git/config`` (format, and the host's ``[user]`` identity),
  ``.git/packed-refs``, ``.git/shallow``, ``.git/info/exclude`` (the host's
  patterns) and the empty ``objects`` and ``refs`` directories git looks for;
* ``.git/index``: the host index, entry for entry (conflict stages included),
  without stat data (the guest's ``checkout-index -u`` records it for the files it
  writes; git compares the others by content);
* banger's private git directory (:data:`.model.STATE_DIR`, see :mod:`.scripts`)
  and the marker that makes the directory a banger workspace;
* the set-up step's inputs under :data:`IMPORT_DIR`: the files to check out of the
  pack and the guest changes to re-apply.

Every name and value comes from the host repository or banger itself; nothing here
reads the guest.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .model import MARKER, PREPARED_REF, STATE_DIR
from .repo import parse_index

IMPORT_DIR = f"{STATE_DIR}/import"
"""The set-up step's inputs (``checkout``, ``reapply.patch``), emptied once used."""

SNAPSHOT_ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding\n"
"""The private git directory's ``info/attributes``: every content conversion off."""


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


@dataclass(frozen=True)
class Member:
    """One tar member of banger's own: a file (``data``), directory or symlink
    (``data`` is the target)."""

    name: str
    data: bytes = b""
    kind: Kind = Kind.FILE


@dataclass(frozen=True)
class RepoFiles:
    """What one repository's git directory holds (see the module docstring)."""

    object_format: str
    index: bytes  # `git ls-files --stage -z` of the host index
    head_symbolic: str | None  # HEAD is this ref (e.g. refs/heads/main), or else
    head_commit: str | None  # ... detached at this commit (None: unborn)
    refs: tuple[tuple[str, str], ...]  # (refname, object id)
    shallow: tuple[str, ...]
    user_name: str | None
    user_email: str | None
    excludes: bytes
    marker: bytes
    checkout: bytes  # NUL-terminated paths to write from the pack
    prepared: str | None = None  # refs/banger/prepared, when the host knows it already


def members(prefix: str, repo: RepoFiles, *, submodules: bytes = b"",
            reapply: bytes = b"") -> list[Member]:
    """The tar members of the repository at ``prefix`` (``""`` or ``sub/path/``)."""
    git, st, imp = f"{prefix}.git", f"{prefix}{STATE_DIR}", f"{prefix}{IMPORT_DIR}"
    refs = list(repo.refs)
    if repo.prepared is not None:
        refs.append((PREPARED_REF, repo.prepared))
    head = (f"ref: {repo.head_symbolic}\n" if repo.head_symbolic is not None
            else f"{repo.head_commit}\n" if repo.head_commit else "ref: refs/heads/main\n")
    out = [Member(f"{git}/{d}", kind=Kind.DIR) for d in (
        "", "objects", "objects/pack", "objects/info", "refs", "refs/heads", "refs/tags",
        "refs/banger", "info")]
    out += [
        Member(f"{git}/HEAD", head.encode()),
        Member(f"{git}/config", config(repo.object_format, bare=False)
               + user_config(repo.user_name, repo.user_email).encode()),
        Member(f"{git}/packed-refs", packed_refs(refs)),
        Member(f"{git}/info/exclude", repo.excludes),
        Member(f"{git}/index", index_file(repo.index, repo.object_format)),
    ]
    if repo.shallow:
        out.append(Member(f"{git}/shallow", "".join(f"{c}\n" for c in repo.shallow).encode()))
    out += [Member(f"{st}/{d}", kind=Kind.DIR) for d in ("", "objects", "refs", "info")]
    out += [
        Member(f"{st}/HEAD", b"ref: refs/heads/banger\n"),
        Member(f"{st}/config", config(repo.object_format, bare=False, plain=True)),
        Member(f"{st}/info/attributes", SNAPSHOT_ATTRIBUTES.encode()),
        Member(f"{st}/info/exclude", b"../../info/exclude", Kind.SYMLINK),
        Member(f"{prefix}{MARKER}", repo.marker),
        Member(f"{imp}", kind=Kind.DIR),
        Member(f"{imp}/checkout", repo.checkout),
    ]
    if submodules:
        out.append(Member(f"{st}/submodules", submodules))
    if reapply:
        out.append(Member(f"{imp}/reapply.patch", reapply))
    return out


def config(object_format: str, *, bare: bool, plain: bool = False) -> bytes:
    """A repository's ``config``, as ``git init`` writes it (``plain``: the format lines
    only, for banger's private git directory)."""
    sha256 = object_format == "sha256"
    lines = ["[core]", f"\trepositoryformatversion = {1 if sha256 else 0}"]
    if not plain:
        lines += ["\tfilemode = true", f"\tbare = {str(bare).lower()}",
                  "\tlogallrefupdates = true"]
    else:
        lines.append("\tbare = false")
    if sha256:
        lines += ["[extensions]", "\tobjectformat = sha256"]
    return ("\n".join(lines) + "\n").encode()


def user_config(name: str | None, email: str | None) -> str:
    """A git config ``[user]`` section for ``name`` and ``email`` (either may be None),
    values quoted as git's config parser reads them back; empty when both are None."""
    def value(v: str) -> str:
        escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                   .replace("\t", "\\t").replace("\b", "\\b"))
        return f'"{escaped}"'

    body = "".join(f"\t{key} = {value(v)}\n" for key, v in (("name", name), ("email", email))
                   if v is not None)
    return f"[user]\n{body}" if body else ""


def packed_refs(refs: Iterable[tuple[str, str]]) -> bytes:
    """A ``packed-refs`` file. No header: git then peels annotated tags itself rather
    than trusting lines this file would have to carry."""
    return b"".join(f"{oid} {name}\n".encode()
                    for name, oid in sorted(refs, key=lambda r: r[0].encode()))




def index_file(listing: bytes, object_format: str) -> bytes:
    """A version 2 index file holding the entries of ``listing`` (``git ls-files
    --stage -z``), as ``git update-index --index-info`` would write them into an empty
    index: no stat data, no extensions.

    The format: git's ``Documentation/gitformat-index.txt``. Each entry is ten 32-bit
    fields (ctime, mtime, dev, ino, mode, uid, gid, size), the object id, 16 bits of
    flags (stage, name length) and the path, NUL-padded to a multiple of 8 bytes; the
    file ends with the hash of everything before it.
    """
    digest = hashlib.sha256 if object_format == "sha256" else hashlib.sha1
    entries = sorted(parse_index(listing), key=lambda e: (e.path.encode(), e.stage))
    out = bytearray(b"DIRC" + struct.pack(">II", 2, len(entries)))
    for e in entries:
        path = e.path.encode()
        start = len(out)
        out += struct.pack(">10I", 0, 0, 0, 0, 0, 0, int(e.mode, 8), 0, 0, 0)
        out += bytes.fromhex(e.oid)
        out += struct.pack(">H", (e.stage << 12) | min(len(path), 0xFFF)) + path
        size = len(out) - start
        out += b"\0" * (8 - size % 8)  # at least one NUL ends the path
    out += digest(out).digest()
    return bytes(out)
