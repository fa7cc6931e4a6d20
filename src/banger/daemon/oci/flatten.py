"""Layer flattening: apply an image's layers, in order, to a staging tree; make the ext4.

Every layer is untrusted: it comes from a registry and bangerd may be root on the host.
:func:`flatten` streams each layer (plain, gzip or zstd tar, told apart by its magic
bytes; gzip is inflated by ISA-L (``isal``); a media type, when given, must name a tar
layer) and creates every entry itself, relative to descriptors of directories it
opened with ``O_NOFOLLOW``: no path is ever resolved through a symlink, and nothing
is written outside ``staging``.
:func:`make_ext4` then runs ``mkfs.ext4 -d`` on the tree (no loop mount).

The tar reader is banger's own (ustar, GNU long names, pax), linear in its input:
Python 3.11's ``tarfile`` before 3.11.10 parses pax headers in quadratic time
(CVE-2024-6232; a 16 KiB header takes a second), keeps every member in a list, and
ends an archive silently at a corrupt header.

Names (an entry's path and a hard link's target):

===========================  =====================================================
name                         policy
===========================  =====================================================
leading ``/``                stripped: the path is relative to the image root, as
                             Docker and containerd read it (some tools write it)
``.`` and empty components   dropped (``./etc//passwd`` is ``etc/passwd``); a name
                             that is only ``.``/``/`` is the root (a directory
                             entry gives the root its owner, mode and mtime)
a ``..`` component           refused, even where it would stay inside the tree
a component > 255 bytes,     refused: ext4 cannot carry it (``NAME_MAX``,
a path >= 4096 bytes,        ``PATH_MAX``); deeper than any real image, and keeps
> 256 components             every walk within a few hundred descriptors
a parent that is a symlink   refused, even one aimed inside the image: an entry is
                             never written through a symlink (Docker's and
                             BuildKit's layers never need it)
a parent that is no dir      refused
a missing parent             created, ``0755 root:root`` (as Docker does)
===========================  =====================================================

Entries: regular files, directories, symlinks (the target is stored verbatim and
never followed), hard links (the target must be a regular file already in the tree;
the link takes the target's inode, so its own header's owner and mode are not
applied), character and block devices and fifos (``mknod``; they are the guest's,
which is why ``staging`` must sit in a directory only its owner can enter; a daemon that
is not root notes devices, owners and privileged xattrs instead: :mod:`.fixups`). Sparse files,
tar volume headers and unknown types are refused. Owners (numeric ids; names are
ignored), modes with setuid/setgid/sticky, mtimes (clamped to ext4's range) and
xattrs (pax ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``; only the ``user``,
``trusted`` and ``security`` namespaces and POSIX ACLs) are kept. An entry replaces
what lower layers had at its path (a directory by a non-directory: the whole tree is
removed, never following a symlink); a directory over a directory merges and takes
the new metadata.

Whiteouts (OCI image spec, "Representing Changes"): ``.wh.NAME`` removes ``NAME``
as lower layers left it; ``.wh..wh..opq`` removes everything lower layers put in its
directory; other ``.wh..wh.*`` names (aufs bookkeeping) are ignored. Entries of the
same layer are kept, whatever the order of the tar.

Bounds: ``max_bytes`` of file data in all (checked against each file's declared size
before a byte of it is written, so a bomb stops with at most ``max_bytes`` on disk);
the decompressed streams may exceed it by :data:`METADATA_ALLOWANCE` for headers and
padding; :data:`MAX_ENTRIES` entries; each extended header (pax, GNU long name) at
most :data:`MAX_HEADER_BYTES`.

Failures: a refused or corrupt layer raises :class:`BadRequest` naming the layer
(position and digest) and the entry; the size cap raises it with a ``--size`` hint;
a host failure (disk full, ...) raises :class:`HostError` naming the same. Whatever
the outcome, ``staging`` is left as it is: the caller removes it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, cast
from urllib.parse import unquote

import zstandard
from isal import igzip, isal_zlib

from banger.daemon.oci.fixups import Fixups
from banger.daemon.oci.fixups import apply as apply_fixups
from banger.errors import BadRequest, HostError
from banger.runner import CancelToken, Runner, as_root_owner

MAX_ENTRIES = 2_000_000  # tar entries over all layers (inode bombs)
MAX_HEADER_BYTES = 1 << 20  # one pax header or GNU long name
METADATA_ALLOWANCE = 1 << 30  # decompressed bytes beyond max_bytes: headers, padding
NAME_MAX = 255  # ext4's longest name, in bytes
PATH_MAX = 4096  # Linux PATH_MAX, including the terminating NUL
MAX_DEPTH = 256  # path components
XATTR_SIZE_MAX = 65536  # Linux's largest xattr value
_MAX_META_HEADERS = 16  # extended headers before one entry
_MAX_GLOBAL_KEYS = 256  # distinct keys in pax global headers
_CHUNK = 1 << 20
_PROGRESS_STEP = 1 << 20  # compressed bytes between progress reports
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_EXT4_TIME_MIN_NS = -(2**31) * 10**9  # ext4 with extra timestamp bits: 1901..2446
_EXT4_TIME_MAX_NS = (2**34 - 1) * 10**9
_ID_MAX = 2**32 - 2  # uid/gid; 2**32 - 1 means "no change" to chown
_XATTR_PREFIXES = ("user.", "trusted.", "security.")
_XATTR_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
_WH = ".wh."
_OPAQUE = ".wh..wh..opq"

LAYER_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
"""Media types :func:`flatten` accepts (the compression is read from the bytes)."""

Progress = Callable[[int, int], None]
"""``progress(layer_index, compressed_bytes_read)``: index from 0; the second value
counts the layer blob's bytes consumed so far (the manifest gives its size)."""


@dataclass(frozen=True)
class LayerSource:
    """One layer blob on disk (digest-verified by whoever fetched it)."""

    path: Path
    digest: str = ""  # for messages
    media_type: str = ""  # empty: not checked


@dataclass(frozen=True)
class FlattenStats:
    """What :func:`flatten` did."""

    layers: int
    entries: int  # entries created, implicit parent dirs included: an inode upper bound
    data_bytes: int  # file data written
    whiteouts: int


def flatten(layers: Sequence[LayerSource], staging: Path, *, max_bytes: int,
            max_entries: int = MAX_ENTRIES, progress: Progress | None = None,
            cancel: CancelToken | None = None, fixups: Fixups | None = None) -> FlattenStats:
    """Apply ``layers`` (lowest first) to the empty directory ``staging``.

    ``staging`` must be an empty directory whose parent only its owner can enter (the
    tree holds the image's setuid files and device nodes). On any error it is left as it
    is, for the caller to remove; nothing is written elsewhere.

    With ``fixups`` (a daemon that is not root), every entry is written as this
    process's own and what the host cannot carry (other owners, devices, privileged
    xattrs, a directory's mode without owner write) is noted there for the ext4
    (:mod:`banger.daemon.oci.fixups`).

    Raises:
        BadRequest: a layer is refused (hostile or malformed entry, unsupported media
            type or compression, corrupt stream) or the image exceeds ``max_bytes``
            or ``max_entries``; the message names the layer and the entry.
        HostError: creating an entry failed on the host (e.g. disk full).
        Cancelled: ``cancel`` was cancelled.
        ValueError: ``staging`` is not an empty directory in a root-only parent.
    """
    root_fd = _open_staging(staging)
    try:
        ex = _Extractor(root_fd, max_bytes, max_entries, cancel, fixups)
        for index, layer in enumerate(layers):
            ex.apply(index, len(layers), layer, progress)
        ex.finish()
        return FlattenStats(layers=len(layers), entries=ex.entries,
                            data_bytes=ex.data_bytes, whiteouts=ex.whiteouts)
    finally:
        os.close(root_fd)


def make_ext4(runner: Runner, staging: Path, image: Path, size_bytes: int, *,
              label: str, inodes: int | None = None, timeout: float = 1800.0,
              fixups: Fixups | None = None) -> None:
    """Make ``image`` (created, or overwritten) an ext4 of ``size_bytes`` holding ``staging``.

    ``mkfs.ext4 -d`` copies owners, modes, mtimes, xattrs, hard links, symlinks, device
    nodes and fifos below the root; the root directory gets the staging root's owner
    (``-E root_owner``) but mke2fs's own mode (0755) and time. ``inodes`` (``-N``)
    overrides mke2fs's bytes-per-inode ratio: pass at least
    :attr:`FlattenStats.entries` when the image has many small files. The ext4 has a
    journal, left unwritten (it reads as zeros: mke2fs discards the file first).

    With ``fixups`` (the tree of a flatten that was not root's), mkfs runs where this
    process's files read as root's (:func:`~banger.runner.as_root_owner`), then the
    fixups give the image its other owners, devices and privileged xattrs.

    Raises:
        CommandFailed: mkfs.ext4 failed (too small, too few inodes: its stderr says).
        CommandTimeout: it ran past ``timeout`` seconds.
        HostError: the fixups could not be applied.
        ValueError: ``size_bytes`` is not a positive multiple of 4096, or ``label`` is
            not 1-16 printable ASCII characters.
    """
    if size_bytes <= 0 or size_bytes % 4096:
        raise ValueError(f"ext4 size {size_bytes} is not a positive multiple of 4096")
    if not re.fullmatch(r"[\x21-\x7e]{1,16}", label):
        raise ValueError(f"ext4 label {label!r} is not 1-16 printable ASCII characters")
    root = os.stat(staging, follow_symlinks=False)
    owner = "0:0" if fixups is not None else f"{root.st_uid}:{root.st_gid}"
    # lazy_journal_init: mke2fs first discards the file (punches it to zeros: it then
    # skips the inode tables' wipe too), so writing zeros over the journal is wasted.
    argv = [*(as_root_owner() if fixups is not None else []), "mkfs.ext4", "-q", "-F",
            "-L", label, "-E", f"root_owner={owner},lazy_journal_init=1"]
    if inodes is not None:
        argv += ["-N", str(inodes)]
    argv += ["-d", str(staging), str(image), f"{size_bytes // 1024}k"]
    runner.run(argv, desc="make the image root file system", timeout=timeout)
    if fixups is not None:
        with tempfile.TemporaryDirectory(dir=image.parent, prefix=".fixups-") as work:
            apply_fixups(runner, image, fixups, Path(work))


@dataclass(frozen=True)
class TarMember:
    """One entry of a tar stream read by :func:`tar_members`."""

    name: str  # as stored: not normalised, not checked
    kind: str  # "file", "hardlink", "symlink", "chardev", "blockdev", "dir" or "fifo"
    size: int  # data bytes (0 for all but regular files)
    read: Callable[[], bytes]  # the next chunk of its data, b"" at its end


_KIND_NAMES = {b"0": "file", b"1": "hardlink", b"2": "symlink", b"3": "chardev",
               b"4": "blockdev", b"5": "dir", b"6": "fifo"}


def tar_members(src: BinaryIO, *, max_bytes: int, what: str = "the archive"
                ) -> Iterator[TarMember]:
    """The entries of an untrusted, uncompressed tar stream, read with the same linear,
    bounded reader :func:`flatten` uses (never :mod:`tarfile`: see the module doc).

    Only reads: the caller decides what each entry may be. A member's data must be
    read (or dropped) before the next member is asked for.

    Raises:
        BadRequest: a malformed stream, an unsupported entry type, or more than
            ``max_bytes`` read in all (headers and padding included).
    """
    reader = _TarReader(src, _Budget(max_bytes))

    def refusal(exc: Exception) -> BadRequest:
        limit = f" ({_size(max_bytes)})" if isinstance(exc, _TooBig) else ""
        return BadRequest(f"{what}: {exc}{limit}",
                          hint="the file is malformed or hostile; banger will not unpack it")

    def reading(chunk: Callable[[], bytes]) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return _guard(chunk)
            except (_Refused, _TooBig) as exc:
                raise refusal(exc) from None
        return read

    while True:
        try:
            entry = _guard(reader.next)
        except (_Refused, _TooBig) as exc:
            raise refusal(exc) from None
        if entry is None:
            return
        yield TarMember(name=entry.name, kind=_KIND_NAMES[entry.type], size=entry.size,
                        read=reading(reader.data(entry)))


# --- errors inside one layer; flatten() adds the layer and entry ------------------


class _Refused(Exception):
    """The layer is refused: hostile, malformed or unsupported."""


class _TooBig(Exception):
    """A cap was crossed."""


# --- reading: decompression and tar ------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Budget:
    """Decompressed bytes a layer may still produce."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise _TooBig("its tar stream decompresses to more than the limit allows")


def _decompressor(raw: BinaryIO) -> _Readable:
    """The layer's tar stream, by its magic bytes."""
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        # ISA-L inflates gzip about twice as fast as zlib (gzip.GzipFile), same format.
        return igzip.IGzipFile(fileobj=raw, mode="rb")  # type: ignore[no-untyped-call]
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False)
    if magic == b"\xfd7zXZ\x00" or magic[:3] == b"BZh":
        raise _Refused("xz and bzip2 layers are not supported (OCI layers are plain, "
                       "gzip or zstd tars)")
    return raw


@dataclass
class _Entry:
    name: str
    type: bytes  # normalised: b"0" regular, b"1" hard link, b"2" symlink, b"3".."6"
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: list[tuple[str, bytes]] = field(default_factory=list)


_TYPES = {b"0": b"0", b"\0": b"0", b"7": b"0", b"1": b"1", b"2": b"2", b"3": b"3",
          b"4": b"4", b"5": b"5", b"6": b"6"}
_TYPE_NAMES = {b"S": "a GNU sparse file", b"V": "a tar volume header",
               b"M": "a multi-volume continuation", b"D": "a GNU dump directory"}


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _number(raw: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256."""
    if raw[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(raw[1:], "big")
        return n - 256 ** (len(raw) - 1) if raw[0] == 0xFF else n
    text = _cstr(raw).strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise _Refused(f"corrupt tar header: bad {what} field {raw!r}")
    return int(text, 8)


def _check_sum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    body = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(body)
    if stored == unsigned:
        return  # nearly every header: skip the per-byte count of the signed sum
    signed = unsigned - 256 * sum(1 for b in body if b >= 128)
    if stored != signed:
        raise _Refused("corrupt tar header: checksum mismatch")


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """pax records (``"%d %s=%s\\n"``), in time linear in ``data``."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise _Refused("corrupt pax header: bad record length")
        end = pos + int(digits)
        if end <= space + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise _Refused("corrupt pax header: bad record")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise _Refused("corrupt pax header: record without '='")
        out[_text(key)] = value
        pos = end
    return out


def _merge(into: dict[str, bytes], records: dict[str, bytes]) -> None:
    for key, value in records.items():
        if value:
            into[key] = value
        else:  # pax: an empty value cancels the keyword
            into.pop(key, None)


_PAX_INT = re.compile(rb"[0-9]{1,20}")
_PAX_TIME = re.compile(rb"(-?)([0-9]{1,20})(?:\.([0-9]{0,30}))?")


def _pax_int(pax: dict[str, bytes], key: str, default: int) -> int:
    raw = pax.get(key)
    if raw is None:
        return default
    if not _PAX_INT.fullmatch(raw):
        raise _Refused(f"corrupt pax header: bad {key} {raw[:40]!r}")
    return int(raw)


def _pax_time_ns(raw: bytes) -> int:
    m = _PAX_TIME.fullmatch(raw)
    if m is None:
        raise _Refused(f"corrupt pax header: bad mtime {raw[:40]!r}")
    ns = int(m.group(2)) * 10**9 + int((m.group(3) or b"")[:9].ljust(9, b"0"))
    return -ns if m.group(1) else ns


def _xattrs(pax: dict[str, bytes]) -> list[tuple[str, bytes]]:
    out = []
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name, data = key[len("SCHILY.xattr."):], value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote(key[len("LIBARCHIVE.xattr."):], errors="surrogateescape")
            try:
                data = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except binascii.Error:
                raise _Refused(f"corrupt pax header: xattr {name!r} is not base64") from None
        else:
            continue
        if not (name.startswith(_XATTR_PREFIXES) or name in _XATTR_NAMES):
            raise _Refused(f"xattr {name!r} is outside the user, trusted and security "
                           "namespaces and POSIX ACLs")
        if len(os.fsencode(name)) > NAME_MAX or len(data) > XATTR_SIZE_MAX:
            raise _Refused(f"xattr {name!r} is too large for Linux")
        out.append((name, data))
    return out


class _TarReader:
    """Entries of one tar stream, reading only what each entry needs."""

    def __init__(self, src: _Readable, budget: _Budget) -> None:
        self._src = src
        self._budget = budget
        self._pending = 0  # data and padding of the last entry not read yet
        self._global: dict[str, bytes] = {}

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer only at the end of the stream."""
        parts, got = [], 0
        while got < n:
            chunk = self._src.read(min(n - got, _CHUNK))
            if not chunk:
                break
            self._budget.take(len(chunk))
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _exact(self, n: int) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise _Refused("the tar stream is truncated")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _CHUNK)
            self._exact(step)
            n -= step

    def data(self, entry: _Entry) -> Callable[[], bytes]:
        """A function returning the next chunk of ``entry``'s data (b"" at its end)."""
        left = entry.size

        def chunk() -> bytes:
            nonlocal left
            if left == 0:
                return b""
            data = self._exact(min(left, _CHUNK))
            left -= len(data)
            self._pending -= len(data)
            return data
        return chunk

    def next(self) -> _Entry | None:
        """The next entry, or None at the end of the archive."""
        self._skip(self._pending)
        self._pending = 0
        local: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        for _ in range(_MAX_META_HEADERS):
            block = self._read(_BLOCK)
            if not block or block == _ZERO_BLOCK:
                return None  # a stream without end-of-archive blocks is read as Go does
            if len(block) < _BLOCK:
                raise _Refused("the tar stream is truncated")
            _check_sum(block)
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind not in (b"x", b"X", b"g", b"L", b"K"):
                return self._entry(block, kind, size, pax={**self._global, **local},
                                   longname=longname, longlink=longlink)
            if not 0 <= size <= MAX_HEADER_BYTES:
                raise _Refused(f"an extended tar header of {size} bytes (the limit is "
                               f"{MAX_HEADER_BYTES})")
            data = self._exact(size)
            self._skip(-size % _BLOCK)
            if kind == b"g":
                _merge(self._global, _parse_pax(data))
                if len(self._global) > _MAX_GLOBAL_KEYS:
                    raise _Refused("too many pax global header keywords")
            elif kind in (b"x", b"X"):
                _merge(local, _parse_pax(data))
            elif kind == b"L":
                longname = _cstr(data)
            else:
                longlink = _cstr(data)
        raise _Refused(f"more than {_MAX_META_HEADERS} extended headers before one entry")

    def _entry(self, block: bytes, kind: bytes, size: int, *, pax: dict[str, bytes],
               longname: bytes | None, longlink: bytes | None) -> _Entry:
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field (not in GNU's)
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        name = pax.get("path", longname if longname is not None else name)
        link = pax.get("linkpath", longlink if longlink is not None else _cstr(block[157:257]))
        if any(key.startswith("GNU.sparse.") for key in pax):
            kind = b"S"
        if kind == b"\0" and name.endswith(b"/"):
            kind = b"5"  # old tars mark directories by the trailing slash
        norm = _TYPES.get(kind)
        if norm is None:
            what = _TYPE_NAMES.get(kind, f"an entry of unknown tar type {kind!r}")
            raise _Refused(f"{_text(name)!r} is {what}, which banger does not unpack")
        size = _pax_int(pax, "size", size)
        mtime_raw = pax.get("mtime")
        mtime_ns = (_pax_time_ns(mtime_raw) if mtime_raw is not None
                    else _number(block[136:148], "mtime") * 10**9)
        entry = _Entry(
            name=_text(name), type=norm, mode=_number(block[100:108], "mode") & 0o7777,
            uid=_pax_int(pax, "uid", _number(block[108:116], "uid")),
            gid=_pax_int(pax, "gid", _number(block[116:124], "gid")),
            size=size if norm == b"0" else 0,  # other types carry no data (as Go reads them)
            mtime_ns=min(max(mtime_ns, _EXT4_TIME_MIN_NS), _EXT4_TIME_MAX_NS),
            linkname=_text(link),
            devmajor=_number(block[329:337], "devmajor") if norm in (b"3", b"4") else 0,
            devminor=_number(block[337:345], "devminor") if norm in (b"3", b"4") else 0,
            xattrs=_xattrs(pax))
        if entry.size < 0:
            raise _Refused("corrupt tar header: negative size")
        self._pending = entry.size + (-entry.size % _BLOCK)
        return entry


# --- writing: the staging tree ------------------------------------------------------


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_staging(staging: Path) -> int:
    parent = os.stat(staging.parent)
    if parent.st_uid != os.geteuid() or parent.st_mode & 0o077:
        raise ValueError(f"{staging.parent} must be owned by bangerd's user and closed to "
                         "others: the staging tree holds the image's setuid files and devices")
    fd = os.open(staging, _DIR_FLAGS)
    if os.listdir(fd):
        os.close(fd)
        raise ValueError(f"staging directory {staging} is not empty")
    return fd


def _split(name: str) -> tuple[str, ...]:
    """The path's components below the image root (see the module's rules)."""
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise _Refused("the path has a '..' component")
        if len(os.fsencode(comp)) > NAME_MAX:
            raise _Refused(f"a name is longer than {NAME_MAX} bytes (ext4's limit)")
        parts.append(comp)
    if len(parts) > MAX_DEPTH:
        raise _Refused(f"the path is deeper than {MAX_DEPTH} components")
    if len(os.fsencode("/".join(parts))) >= PATH_MAX:
        raise _Refused(f"the path is {PATH_MAX} bytes or longer")
    return tuple(parts)


def _key(parts: Sequence[str]) -> str:
    return "/".join(parts)


def _lstat(fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


def _remove(parent: int, name: str) -> None:
    """Remove ``name`` (a whole tree for a directory), never following a symlink."""
    st = os.lstat(name, dir_fd=parent)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        return
    # Iterative: a tree may be deeper than Python's recursion limit allows.
    frames: list[tuple[int, str, int, list[str]]] = []
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    frames.append((parent, name, fd, os.listdir(fd)))
    try:
        while frames:
            up, here, fd, todo = frames[-1]
            while todo:
                child = todo.pop()
                if stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                    sub = os.open(child, _DIR_FLAGS, dir_fd=fd)
                    frames.append((fd, child, sub, os.listdir(sub)))
                    break
                os.unlink(child, dir_fd=fd)
            else:
                frames.pop()
                os.close(fd)
                os.rmdir(here, dir_fd=up)
    finally:
        for _, _, fd, _ in frames:
            os.close(fd)


class _Extractor:
    """The state of one :func:`flatten` call."""

    def __init__(self, root_fd: int, max_bytes: int, max_entries: int,
                 cancel: CancelToken | None, fixups: Fixups | None = None) -> None:
        self.root = root_fd
        self.fixups = fixups  # None: owners, devices and xattrs go on the host (root)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.cancel = cancel
        self.seen = 0  # tar entries read, whiteouts included
        self.entries = 0
        self.data_bytes = 0
        self.whiteouts = 0
        self.decompressed = 0
        self.dir_mtimes: dict[str, int] = {}  # set last: creating children moves them
        self.layer_paths: set[str] = set()  # paths this layer put or kept
        self.tick: Callable[[], None] = lambda: None  # progress of the current layer

    # -- one layer

    def apply(self, index: int, count: int, layer: LayerSource,
              progress: Progress | None) -> None:
        where = f"layer {index + 1} of {count}" + (f" ({layer.digest})" if layer.digest else "")
        name = ""
        self.layer_paths = set()
        if layer.media_type and layer.media_type not in LAYER_MEDIA_TYPES:
            raise BadRequest(f"{where}: media type {layer.media_type!r} is not a tar layer",
                             hint="banger unpacks plain, gzip and zstd tar layers only",
                             layer=index, digest=layer.digest)
        budget = _Budget(self.max_bytes + METADATA_ALLOWANCE - self.decompressed)
        try:
            with open(layer.path, "rb") as raw:
                reported = 0

                def tick() -> None:
                    nonlocal reported
                    if progress is not None and raw.tell() - reported >= _PROGRESS_STEP:
                        reported = raw.tell()
                        progress(index, reported)

                self.tick = tick
                try:
                    reader = _TarReader(_decompressor(raw), budget)
                    while True:
                        if self.cancel is not None:
                            self.cancel.check()
                        entry = _guard(reader.next)
                        if entry is None:
                            break
                        name = entry.name
                        self._entry(reader, entry)
                        tick()
                finally:
                    self.decompressed = self.max_bytes + METADATA_ALLOWANCE - budget.left
                if progress is not None:  # done, whatever trailing padding was left unread
                    progress(index, os.fstat(raw.fileno()).st_size)
        except _Refused as exc:
            at = f"entry {name!r}" if name else "its first entry"
            raise BadRequest(f"{where}: refusing {at}: {exc}",
                             hint="the image is malformed or hostile; banger will not unpack it",
                             layer=index, digest=layer.digest, entry=name) from None
        except _TooBig as exc:
            raise BadRequest(
                f"{where}: the image is larger than the {_size(self.max_bytes)} limit "
                f"({exc}; at entry {name!r})",
                hint="give the image more room with --size",
                layer=index, digest=layer.digest, entry=name, limit=self.max_bytes) from None
        except OSError as exc:
            hint = "free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
            raise HostError(f"{where}: cannot unpack entry {name!r}: {exc.strerror or exc}",
                            hint=hint, layer=index, digest=layer.digest, entry=name) from exc

    def _entry(self, reader: _TarReader, entry: _Entry) -> None:
        self.seen += 1
        if self.seen > self.max_entries:
            raise _TooBig(f"more than {self.max_entries} entries")
        parts = _split(entry.name)
        base = parts[-1] if parts else ""
        if base.startswith(_WH):
            self.whiteouts += 1
            self._whiteout(parts[:-1], base)
            return
        if not parts:
            if entry.type != b"5":
                raise _Refused("the image root must be a directory")
            self._meta_fd(self.root, entry, "", stat.S_IFDIR)
            self.dir_mtimes[""] = entry.mtime_ns
            return
        if entry.type == b"1":
            self._hardlink(parts, entry)
            return
        parent = self._mkdirs(parts[:-1])
        try:
            self._mark(parts)
            self._put(parent, parts, entry, reader)
        finally:
            os.close(parent)

    def _put(self, parent: int, parts: tuple[str, ...], entry: _Entry,
             reader: _TarReader) -> None:
        name = parts[-1]
        key = _key(parts)
        old = _lstat(parent, name)
        if old is not None and not (entry.type == b"5" and stat.S_ISDIR(old.st_mode)):
            self._remove(parent, parts)
        self.entries += 1
        if entry.type == b"5":
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self._meta_fd(fd, entry, key, stat.S_IFDIR)
            finally:
                os.close(fd)
            self.dir_mtimes[key] = entry.mtime_ns
        elif entry.type == b"0":
            if self.data_bytes + entry.size > self.max_bytes:
                raise _TooBig(f"a file of {_size(entry.size)} after {_size(self.data_bytes)}")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                self._copy(reader.data(entry), fd)
                self._meta_fd(fd, entry, key, stat.S_IFREG)
            finally:
                os.close(fd)
        elif entry.type == b"2":
            if not entry.linkname or len(os.fsencode(entry.linkname)) >= PATH_MAX:
                raise _Refused("a symlink's target must be 1 to 4095 bytes")
            os.symlink(entry.linkname, name, dir_fd=parent)
            self._meta_at(parent, name, entry, key, stat.S_IFLNK)
        elif entry.type == b"6":
            os.mkfifo(name, 0o600, dir_fd=parent)
            self._meta_at(parent, name, entry, key, stat.S_IFIFO)
        else:
            kind = stat.S_IFCHR if entry.type == b"3" else stat.S_IFBLK
            if self.fixups is None:
                os.mknod(name, kind | 0o600, os.makedev(entry.devmajor, entry.devminor),
                         dir_fd=parent)
            else:  # an empty file stands in for it; the ext4 gets the device
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=parent))
            self._meta_at(parent, name, entry, key, kind)

    def _copy(self, chunk: Callable[[], bytes], fd: int) -> None:
        while data := _guard(chunk):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self.data_bytes += len(data)
            self.tick()
            if self.cancel is not None:
                self.cancel.check()

    def _hardlink(self, parts: tuple[str, ...], entry: _Entry) -> None:
        target = _split(entry.linkname)
        if not target:
            raise _Refused("a hard link to the image root")
        tkey, key = _key(target), _key(parts)
        if tkey == key or tkey.startswith(key + "/"):
            raise _Refused("a hard link that would replace its own target")
        tparent = self._find(target[:-1])
        if tparent is None:
            raise _Refused(f"hard link target {entry.linkname!r} is not in the image")
        try:
            st = _lstat(tparent, target[-1])
            if st is None or not stat.S_ISREG(st.st_mode) or (
                    self.fixups is not None and self.fixups.is_device(tkey)):
                raise _Refused(f"hard link target {entry.linkname!r} is not a regular file "
                               "already in the image")
            parent = self._mkdirs(parts[:-1])
            try:
                self._mark(parts)
                if _lstat(parent, parts[-1]) is not None:
                    self._remove(parent, parts)
                os.link(target[-1], parts[-1], src_dir_fd=tparent, dst_dir_fd=parent,
                        follow_symlinks=False)
                if self.fixups is not None:
                    self.fixups.link(tkey, key)
                self.entries += 1
            finally:
                os.close(parent)
        finally:
            os.close(tparent)

    # -- whiteouts

    def _whiteout(self, dir_parts: tuple[str, ...], base: str) -> None:
        if base == _OPAQUE:
            self._prune(dir_parts)
            return
        if base.startswith(_WH + _WH):
            return  # aufs bookkeeping (.wh..wh.plnk, ...): not part of the image
        victim = base[len(_WH):]
        if victim in ("", ".", ".."):
            raise _Refused(f"whiteout {base!r} names no entry")
        parent = self._find(dir_parts)
        if parent is None:
            return
        try:
            self._drop(parent, (*dir_parts, victim))
        finally:
            os.close(parent)

    def _drop(self, parent: int, parts: tuple[str, ...]) -> None:
        """Remove what lower layers have at ``parts``; keep this layer's entries."""
        st = _lstat(parent, parts[-1])
        if st is None:
            return
        if _key(parts) not in self.layer_paths:
            self._remove(parent, parts)
        elif stat.S_ISDIR(st.st_mode):
            self._prune(parts)

    def _prune(self, dir_parts: tuple[str, ...]) -> None:
        """Remove lower layers' entries below ``dir_parts`` (opaque directory)."""
        todo = [dir_parts]
        while todo:
            here = todo.pop()
            fd = self._find(here)
            if fd is None:
                continue
            try:
                for child in os.listdir(fd):
                    parts = (*here, child)
                    if _key(parts) not in self.layer_paths:
                        self._remove(fd, parts)
                    elif stat.S_ISDIR(os.lstat(child, dir_fd=fd).st_mode):
                        todo.append(parts)
            finally:
                os.close(fd)

    def _mark(self, parts: tuple[str, ...]) -> None:
        """Record ``parts`` and its parents as this layer's."""
        for i in range(len(parts), 0, -1):
            key = _key(parts[:i])
            if key in self.layer_paths:
                break
            self.layer_paths.add(key)

    # -- paths and metadata

    def _find(self, parts: Sequence[str]) -> int | None:
        """A descriptor of the directory ``parts``, or None if it is missing."""
        return self._walk(parts, create=False)

    def _mkdirs(self, parts: Sequence[str]) -> int:
        """A descriptor of the directory ``parts``, made (0755 root) where missing."""
        fd = self._walk(parts, create=True)
        assert fd is not None
        return fd

    def _walk(self, parts: Sequence[str], *, create: bool) -> int | None:
        """Open ``parts`` one component at a time from the root, with ``O_NOFOLLOW``.

        A symlink or a non-directory on the way is refused: nothing is ever written
        or removed through a symlink, wherever it points.
        """
        fd = os.dup(self.root)
        try:
            for i, comp in enumerate(parts):
                st = _lstat(fd, comp)
                if st is None:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    os.chmod(comp, 0o755, dir_fd=fd)  # noqa: S103 - Docker's mode, whatever the umask
                    self.entries += 1
                elif stat.S_ISLNK(st.st_mode):
                    raise _Refused(f"{_key(parts[:i + 1])!r} is a symlink: banger never "
                                   "writes through one")
                elif not stat.S_ISDIR(st.st_mode):
                    raise _Refused(f"{_key(parts[:i + 1])!r} is not a directory")
                sub = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    def finish(self) -> None:
        """Give directories their mtimes (creating their children moved them)."""
        for key, ns in self.dir_mtimes.items():
            try:
                fd = self._find(key.split("/") if key else ())
            except _Refused:
                continue  # a later layer put a symlink or file on the way: gone
            if fd is None:
                continue
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)

    def _remove(self, parent: int, parts: tuple[str, ...]) -> None:
        """Remove ``parts`` (in directory ``parent``) and whatever was noted for it."""
        _remove(parent, parts[-1])
        if self.fixups is not None:
            self.fixups.forget(_key(parts))

    def _owned(self, entry: _Entry, key: str, kind: int) -> tuple[int, list[tuple[str, bytes]]]:
        """The mode ``key`` gets on the host and the xattrs set there. As root, the
        entry's own; otherwise a directory stays writable by its owner (this process)
        and the rest is noted in the fixups."""
        if self.fixups is None:
            return entry.mode, entry.xattrs
        wanted = 0o777 if kind == stat.S_IFLNK else entry.mode  # a symlink's is fixed
        mode = wanted | 0o700 if kind == stat.S_IFDIR else wanted
        device = ((entry.devmajor, entry.devminor) if kind in (stat.S_IFCHR, stat.S_IFBLK)
                  else None)
        return mode, self.fixups.note(key, uid=entry.uid, gid=entry.gid,
                                      mode=kind | wanted, host_mode=kind | mode,
                                      xattrs=entry.xattrs, device=device,
                                      mtime_ns=entry.mtime_ns)

    def _meta_fd(self, fd: int, entry: _Entry, key: str, kind: int) -> None:
        """Owner, then mode (a chown clears setuid), xattrs (a chown clears file
        capabilities), then mtime, on an open file or directory."""
        _check_ids(entry)
        mode, xattrs = self._owned(entry, key, kind)
        if self.fixups is None:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, mode)
        for name, value in xattrs:
            os.setxattr(fd, name, value)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _meta_at(self, parent: int, name: str, entry: _Entry, key: str, kind: int) -> None:
        """The same for an entry not to be opened (a symlink, a device, a fifo)."""
        _check_ids(entry)
        mode, xattrs = self._owned(entry, key, kind)
        if self.fixups is None:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if kind != stat.S_IFLNK:  # just made here: no symlink to follow
            os.chmod(name, mode, dir_fd=parent)
        # No xattr call takes a dir_fd: name the entry through the parent's descriptor.
        for xname, value in xattrs:
            os.setxattr(f"/proc/self/fd/{parent}/{name}", xname, value,
                        follow_symlinks=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent,
                 follow_symlinks=False)


_T = TypeVar("_T")
# isal's stubs declare its error an instance (``error: Exception``); it is a class.
_ISAL_ERROR = cast("type[Exception]", isal_zlib.error)


def _guard(read: Callable[[], _T]) -> _T:
    """Run a read of the layer, turning decompression errors into refusals."""
    try:
        return read()
    except (EOFError, _ISAL_ERROR, zstandard.ZstdError, igzip.BadGzipFile) as exc:
        raise _Refused(f"corrupt compressed stream: {exc}") from None


def _check_ids(entry: _Entry) -> None:
    if not (0 <= entry.uid <= _ID_MAX and 0 <= entry.gid <= _ID_MAX):
        raise _Refused(f"owner {entry.uid}:{entry.gid} is out of range")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
