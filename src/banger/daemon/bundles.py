"""Bundles: ``image export`` writes one, ``image pull`` and ``kernel pull`` read one.

A bundle is a zstd-compressed tar whose first member is ``manifest.json``::

    {"format": "banger-bundle/1", "kind": "image" | "kernel", "name", "arch": "x86_64",
     "created_at", "members": {"rootfs.ext4": {"size", "sha256"}, ...},
     "kernel": {"name": <registry kernel name or null>, "version": <or null>}}

An image bundle holds ``rootfs.ext4``, ``workseed.tar`` (an uncompressed tar of the
image's work seed, when it has one) and its kernel: ``vmlinuz`` (+ ``initrd.img``)
when the image bundles its own, or the registry kernel's ``vmlinux``/``bzImage``
(+ ``initrd.img``) when it boots one (``kernel.name``). A kernel bundle holds
``vmlinux``/``bzImage`` (+ ``initrd.img``).

A pulled bundle is untrusted (bangerd is root): the manifest must come first and be at
most :data:`MANIFEST_MAX`; members are regular files with known names only, each
once, of the manifest's size and sha256, none missing; sizes are capped; the tar is
read by ``oci.flatten``'s own bounded reader and ``workseed.tar`` is unpacked by
``oci.flatten`` (no ``..``, no writes through symlinks). The rootfs must be ext4 and
gets banger's guest agent, as a registered image does. A bundled registry kernel is
imported under its name, or reused when one of that name has the same files.
Everything happens in a staging directory; a failure or cancel leaves no image, no
kernel and no staging files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import zstandard

from banger.daemon import catalog, images, kernels
from banger.daemon.imagemgr.kernel import inspect_kernel_file
from banger.daemon.oci import fixups as oci_fixups
from banger.daemon.oci.flatten import LayerSource, flatten, tar_members
from banger.daemon.opstate import ByteReport, Operation
from banger.daemon.store import ImageRecord
from banger.errors import AlreadyExists, BadRequest
from banger.fsutil import remove_tree, write_sparse
from banger.names import check_name
from banger.runner import CancelToken

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.bundles")

FORMAT = "banger-bundle/1"
ARCH = "x86_64"
MANIFEST = "manifest.json"
MANIFEST_MAX = 1 << 20
ROOTFS_MAX = 64 << 30  # without --size
WORKSEED_MAX = 16 << 30  # the unpacked work seed, as an OCI image's default cap
KERNEL_FILE_MAX = 1 << 30  # a kernel or an initrd (Debian's initrds are ~60 MiB)
TAR_ALLOWANCE = 64 << 20  # tar headers and padding beyond the members' data
ROOTFS, WORKSEED = "rootfs.ext4", "workseed.tar"
VMLINUZ, INITRD = "vmlinuz", "initrd.img"
VMLINUX, BZIMAGE = kernels.VMLINUX, kernels.BZIMAGE
IMAGE_MEMBERS = frozenset({ROOTFS, WORKSEED, VMLINUZ, INITRD, VMLINUX, BZIMAGE})
KERNEL_MEMBERS = frozenset({VMLINUX, BZIMAGE, INITRD})
EXPORT_STAGES = ["collect", "hash", "write"]
PULL_STAGES = ["download", "unpack", "check", "publish"]
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Member:
    """What the manifest says about one member."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A checked ``manifest.json``."""

    kind: str
    name: str
    members: dict[str, Member]
    kernel_name: str | None
    kernel_version: str | None


@dataclass(frozen=True)
class BundleRequest:
    """An ``image pull`` / ``kernel pull`` of a bundle, checked."""

    source: catalog.Source
    kind: str  # "image" or "kernel"
    name: str | None  # --name; None: the manifest's name
    size_bytes: int | None  # the rootfs cap (default ROOTFS_MAX)
    sent_from: str | None = None  # a sent file: where the client read it

    @property
    def text(self) -> str:
        """The source as the user named it (for joins and messages)."""
        return self.source.origin

    @property
    def origin(self) -> str:
        """What the image records as its origin: where the bundle was read."""
        return self.sent_from or self.source.origin


# -------------------------------------------------------------------------- export


def begin_export(d: Daemon, name: str, output: str,
                 owner: tuple[int, int] | None = None) -> Operation:
    """Start writing image ``name`` as a bundle to ``output`` (an absolute path).

    The bundle is written to a temp file beside ``output``, created by bangerd and
    handed to ``owner`` (uid, gid: the CLI's user, who would own a file the CLI wrote,
    as with ``workspace export -o``), and renamed over ``output`` at the end; a failed
    or cancelled export leaves no file.

    Raises:
        NotFound: no such image.
        BadRequest: ``output`` is relative, a directory, or its directory is missing.
    """
    img = d.db.get_image(name)
    out = Path(output)
    if not out.is_absolute():
        raise BadRequest(f"output {output!r} must be an absolute path")
    if out.is_dir():
        raise BadRequest(f"output {out} is a directory", hint="name a file, e.g. -o dev.tar.zst")
    if not out.parent.is_dir():
        raise BadRequest(f"output directory {out.parent} does not exist")
    op = Operation(kind="image.export", target=name, stages=list(EXPORT_STAGES))
    return d.image_ops.run(op, lambda o: export(d, img, out, owner, o), name=f"export-{name}")


def export(d: Daemon, img: ImageRecord, out: Path, owner: tuple[int, int] | None,
           op: Operation) -> dict[str, Any]:
    """collect -> hash -> write (see :func:`begin_export`)."""
    staging = d.layout.staging_dir / f"export-{img.name}-{op.id}"
    tmp = out.with_name(f".{out.name}.{op.id}.partial")
    try:
        staging.mkdir(parents=True, mode=0o700)
        op.enter("collect")
        files, kernel = _image_files(d, img, staging)
        op.enter("hash")
        total = sum(p.stat().st_size for p in files.values())
        report = ByteReport(op, total)
        members: dict[str, Member] = {}
        done = 0
        for member, path in files.items():
            members[member] = _hash_file(path, op.cancel,
                                         lambda n, before=done: report(before + n, "hashing"))
            done += members[member].size
        manifest = {
            "format": FORMAT, "kind": "image", "name": img.name, "arch": ARCH,
            "created_at": datetime.now(UTC).isoformat(),
            "members": {m: {"size": v.size, "sha256": v.sha256} for m, v in members.items()},
            "kernel": kernel,
        }
        op.enter("write")
        size, digest = _write_bundle(tmp, owner, json.dumps(manifest, indent=1).encode(),
                                     files=files, members=members, op=op, report=report)
        os.rename(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        remove_tree(staging)
    log.info("image %s exported to %s (%d bytes, sha256:%s)", img.name, out, size, digest)
    return {"name": img.name, "path": str(out), "size_bytes": size, "sha256": digest,
            "members": manifest["members"], "kernel": kernel}


def _image_files(d: Daemon, img: ImageRecord, staging: Path
                 ) -> tuple[dict[str, Path], dict[str, str | None]]:
    """The files an image's bundle holds (``workseed.tar`` made in ``staging``) and
    the manifest's ``kernel``."""
    files = {ROOTFS: Path(img.rootfs)}
    if img.workseed and Path(img.workseed).is_dir():
        tar_path = staging / WORKSEED
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(img.workseed, arcname=".", recursive=True)
        files[WORKSEED] = tar_path
    if img.kernel_name:
        k = d.db.get_kernel(img.kernel_name)
        for member, path in ((VMLINUX, k.vmlinux), (BZIMAGE, k.bzimage), (INITRD, k.initrd)):
            if path:
                files[member] = Path(path)
        return files, {"name": k.name, "version": k.version}
    files[VMLINUZ] = Path(img.kernel)
    if img.initrd:
        files[INITRD] = Path(img.initrd)
    version = None
    with contextlib.suppress(BadRequest, OSError):
        version = inspect_kernel_file(Path(img.kernel)).version
    return files, {"name": None, "version": version}


def _write_bundle(tmp: Path, owner: tuple[int, int] | None, manifest: bytes, *,
                  files: dict[str, Path], members: dict[str, Member], op: Operation,
                  report: ByteReport) -> tuple[int, str]:
    """Write the bundle to the new file ``tmp``; returns its size and sha256.

    The members are hashed again as they are written: a file that changed since the
    hash stage fails the export instead of making a bundle that will not verify.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "wb") as raw:
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            try:
                os.fchown(raw.fileno(), *owner)
            except PermissionError:
                log.warning("cannot give %s to uid %d (bangerd is not root); it stays "
                            "bangerd's", tmp, owner[0])
        sink = _HashingWriter(raw)
        compressor = zstandard.ZstdCompressor(level=3)
        with compressor.stream_writer(cast(IO[bytes], sink), closefd=False) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            mtime = int(time.time())
            _add(tar, MANIFEST, len(manifest), io.BytesIO(manifest), mtime)
            done = 0
            for member, path in files.items():
                with path.open("rb") as fh:
                    reader = _HashingReader(fh, op.cancel,
                                            lambda n, before=done: report(before + n, "writing"))
                    _add(tar, member, members[member].size, cast(IO[bytes], reader), mtime)
                if reader.hexdigest() != members[member].sha256:
                    raise BadRequest(f"{path} changed while it was exported; export again")
                done += members[member].size
        raw.flush()
        os.fsync(raw.fileno())
    return sink.size, sink.hexdigest()


def _add(tar: tarfile.TarFile, name: str, size: int, fh: IO[bytes], mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    tar.addfile(info, fh)


class _HashingWriter(io.RawIOBase):
    """Hashes and counts what is written through it to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._out.write(view)
        self.size += len(view)
        return len(view)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _HashingReader(io.RawIOBase):
    """Hashes what is read through it; checks the cancel token and reports progress."""

    def __init__(self, src: IO[bytes], cancel: CancelToken,
                 progress: Any = None, limit: int | None = None) -> None:
        self._src = src
        self._hash = hashlib.sha256()
        self._cancel = cancel
        self._progress = progress
        self._limit = limit
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self._cancel.check()
        data = self._src.read(_CHUNK if n is None or n < 0 else n)
        self._hash.update(data)
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise BadRequest(f"the bundle is larger than the {self._limit} bytes allowed")
        if self._progress is not None:
            self._progress(self.size)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _hash_file(path: Path, cancel: CancelToken, progress: Any) -> Member:
    with path.open("rb") as fh:
        reader = _HashingReader(fh, cancel, progress)
        while reader.read(_CHUNK):
            pass
    return Member(size=reader.size, sha256=reader.hexdigest())


# ---------------------------------------------------------------------------- pull


def check_request(d: Daemon, text: str, *, kind: str, name: str | None,
                  size_bytes: int | None, insecure: bool,
                  sent_from: str | None = None) -> BundleRequest:
    """Validate a bundle pull before anything is downloaded (a catalog name is looked
    up now; plain HTTP to a remote host is refused before any connection).

    Raises:
        BadRequest: a bad name, size, path or URL; ``sent_from`` for a bundle that is
            not a local file, or with a control character.
        NotFound: no catalog, or the name is not in it.
    """
    if name is not None:
        check_name(name, kind)
    if size_bytes is not None and not 64 << 20 <= size_bytes <= ROOTFS_MAX:
        raise BadRequest(f"--size {size_bytes} bytes is out of range for a bundle",
                         hint="give 64M to 64G, e.g. --size 8G")
    source = catalog.resolve(d.cfg.catalog_url, text, kind=kind, insecure=insecure)
    if sent_from is not None and (source.path is None or source.name is not None):
        raise BadRequest(f"sent_from names where a sent bundle file was read; {text!r} "
                         "is not a file")
    if sent_from is not None and not sent_from.isprintable():
        raise BadRequest("sent_from has a control character")
    return BundleRequest(source=source, kind=kind, name=name, size_bytes=size_bytes,
                         sent_from=sent_from)


def begin_pull(d: Daemon, req: BundleRequest) -> Operation:
    """Start pulling the bundle ``req`` names on a worker thread.

    Raises:
        AlreadyExists: an image or kernel of the requested name exists already, or
            another operation is making it.
    """
    registry = d.image_ops if req.kind == "image" else d.kernel_ops
    target = req.name or req.source.name or req.text
    with d.image_ops_mu:
        named = req.name or req.source.name  # known before the download: checked now
        if named is not None:
            refuse = images.refuse_taken if req.kind == "image" else kernels.refuse_taken
            refuse(d, named, "pull under another --name")
        for existing in registry.active():
            if existing.target == target and existing.kind != "image.export":
                raise AlreadyExists(f"{req.kind} {target!r} is already being made by "
                                    f"another {existing.kind}",
                                    hint="wait for it, or pull under another --name")
        op = Operation(kind=f"{req.kind}.pull", target=target, stages=list(PULL_STAGES))
        work = pull_image if req.kind == "image" else pull_kernel
        return registry.run(op, lambda o: work(d, req, o), name=f"pull-{target[:40]}")


def pull_image(d: Daemon, req: BundleRequest, op: Operation) -> dict[str, Any]:
    """download -> unpack and verify -> check ext4, kernel, work seed -> publish."""
    staging = d.layout.staging_dir / f"bundle-{op.id}"
    image_dir = staging / "image"
    imported: str | None = None
    try:
        staging.mkdir(parents=True, mode=0o700)
        image_dir.mkdir(mode=0o700)
        bundle, sha = _fetch(req, staging, op)
        op.enter("unpack")
        kernel_dir = staging / "kernel"
        kernel_dir.mkdir(mode=0o700)
        caps = {ROOTFS: req.size_bytes or ROOTFS_MAX, WORKSEED: WORKSEED_MAX}

        def place(member: str) -> Path:
            if member in (VMLINUX, BZIMAGE):
                return kernel_dir / member
            return image_dir / member

        manifest, sha = unpack(bundle, kind="image", caps=caps, place=place,
                               expect_sha=sha, op=op)
        # --name, else the catalog name it was pulled by, else the name it was exported as.
        name = check_name(req.name or req.source.name or manifest.name, "image")
        op.enter("check")
        _check_ext4(image_dir / ROOTFS)
        kernel_name: str | None = None
        if manifest.kernel_name is not None:
            if INITRD in manifest.members:
                shutil.move(image_dir / INITRD, kernel_dir / INITRD)
            kernel_name, imported = _bundled_kernel(d, manifest.kernel_name, kernel_dir,
                                                    f"{req.origin}#sha256:{sha}")
        else:
            inspect_kernel_file(image_dir / VMLINUZ)
        if WORKSEED in manifest.members:
            op.report("unpacking the work seed")
            seed = image_dir / "workseed"
            seed.mkdir(mode=0o700)
            fixups = oci_fixups.for_this_process()
            flatten([LayerSource(image_dir / WORKSEED, "workseed.tar")], seed,
                    max_bytes=WORKSEED_MAX, cancel=op.cancel, fixups=fixups)
            if fixups is not None and fixups.notes:
                # The seed stays a tree (each work disk is made from it as root's): an
                # owner, device or privileged xattr a daemon without root cannot keep.
                raise BadRequest(
                    "the bundle's work seed has entries a daemon without root cannot "
                    f"make: {', '.join('/' + k for k in sorted(fixups.notes)[:5])}",
                    hint="import it with a root daemon, or export it again from a VM "
                         "whose /root holds only root's files")
            (image_dir / WORKSEED).unlink()
        op.report("adding banger's guest agent")
        images.inject_guest_agent(d, image_dir / ROOTFS, image_dir)
        op.enter("publish")
        return images.publish(d, name, image_dir, source="bundle", recipe_hash=None,
                              kernel_name=kernel_name, origin=f"{req.origin}#sha256:{sha}")
    except BaseException:
        if imported is not None:
            with contextlib.suppress(Exception):
                kernels.remove(d, imported)
        raise
    finally:
        remove_tree(staging)


def pull_kernel(d: Daemon, req: BundleRequest, op: Operation) -> dict[str, Any]:
    """download -> unpack and verify -> import into the kernel registry."""
    staging = d.layout.staging_dir / f"bundle-{op.id}"
    try:
        staging.mkdir(parents=True, mode=0o700)
        bundle, sha = _fetch(req, staging, op)
        op.enter("unpack")
        files = staging / "kernel"
        files.mkdir(mode=0o700)
        manifest, sha = unpack(bundle, kind="kernel", caps={}, place=lambda m: files / m,
                             expect_sha=sha, op=op)
        name = check_name(req.name or req.source.name or manifest.name, "kernel")
        op.enter("check")
        paths = [str(files / m) for m in (VMLINUX, BZIMAGE) if m in manifest.members]
        initrd = str(files / INITRD) if INITRD in manifest.members else None
        op.enter("publish")
        return kernels.import_files(d, name, paths, initrd, source="bundle",
                                    origin=f"{req.origin}#sha256:{sha}")
    finally:
        remove_tree(staging)


def _fetch(req: BundleRequest, staging: Path, op: Operation) -> tuple[Path, str | None]:
    """The bundle as a local file, and the sha256 it must have (None: any).

    An HTTP bundle is downloaded into ``staging`` and checked against the catalog's
    sha256 before it is unpacked; a local one is read in place and its sha256 checked
    as it is unpacked (before anything is published).
    """
    src = req.source
    op.enter("download", src.origin)
    if src.path is None:
        report = ByteReport(op, src.size)
        dest = staging / "bundle.tar.zst"
        got = catalog.download(src, dest, progress=lambda n, _t: report(n, "downloading"),
                               cancel=op.cancel)
        _check_sha(src, got)
        return dest, got
    if not src.path.is_file():
        raise BadRequest(f"bundle {src.path} does not exist or is not a regular file")
    if src.size is not None and src.path.stat().st_size != src.size:
        raise BadRequest(f"bundle {src.path} is {src.path.stat().st_size} bytes, not the "
                         f"{src.size} the catalog says",
                         hint="the catalog entry is out of date, or the file is not the one "
                              "it names")
    return src.path, src.sha256


def _check_sha(src: catalog.Source, got: str) -> None:
    if src.sha256 is not None and got != src.sha256:
        raise BadRequest(f"bundle {src.origin} has sha256 {got}, not the catalog's "
                         f"{src.sha256}; refused",
                         hint="the catalog entry is out of date, or the file was changed "
                              "or tampered with")


def unpack(bundle: Path, *, kind: str, caps: dict[str, int], place: Callable[[str], Path],
           expect_sha: str | None, op: Operation) -> tuple[Manifest, str]:
    """Read and verify the bundle, writing each member to ``place(member)``.

    Returns:
        The manifest, and the bundle's sha256. Every member the manifest lists was
        written and matched its size and sha256; when ``expect_sha`` is given, the
        whole file matched it too.

    Raises:
        BadRequest: anything about the bundle is wrong (the message says what).
    """
    with bundle.open("rb") as raw:
        total = os.fstat(raw.fileno()).st_size
        report = ByteReport(op, total)
        if raw.read(4) != b"\x28\xb5\x2f\xfd":
            raise BadRequest(f"{bundle} is not a zstd-compressed bundle",
                             hint="a bundle is made by `banger image export`")
        raw.seek(0)
        hashed = _HashingReader(raw, op.cancel, lambda n: report(n, "verifying"),
                                limit=catalog.BUNDLE_MAX)
        stream = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], hashed),
                                                            read_across_frames=True,
                                                            closefd=False)
        caps_all = {m: caps.get(m, KERNEL_FILE_MAX) for m in _allowed(kind)}
        members = tar_members(cast(BinaryIO, stream), what=f"bundle {bundle.name}",
                              max_bytes=MANIFEST_MAX + sum(caps_all.values()) + TAR_ALLOWANCE)
        first = next(members, None)
        if first is None or first.name != MANIFEST:
            raise BadRequest(f"bundle {bundle.name}: {MANIFEST} must be its first member",
                             hint="a bundle is made by `banger image export`")
        if first.kind != "file" or first.size > MANIFEST_MAX:
            raise BadRequest(f"bundle {bundle.name}: {MANIFEST} must be a regular file of at "
                             f"most {MANIFEST_MAX} bytes")
        manifest = parse_manifest(_read_all(first.read), kind=kind, caps=caps_all,
                                  where=f"bundle {bundle.name}")
        seen: set[str] = set()
        for m in members:
            where = f"bundle {bundle.name}: member {m.name!r}"
            if m.name.startswith("/") or ".." in m.name.split("/"):
                raise BadRequest(f"{where} has an unsafe name (absolute or '..')",
                                 hint="the bundle is malformed or hostile")
            if m.name not in manifest.members:
                raise BadRequest(f"{where} is not in its manifest")
            if m.name in seen:
                raise BadRequest(f"{where} appears twice")
            if m.kind != "file":
                raise BadRequest(f"{where} is a {m.kind}, not a regular file",
                                 hint="the bundle is malformed or hostile")
            want = manifest.members[m.name]
            if m.size != want.size:
                raise BadRequest(f"{where} is {m.size} bytes, not the manifest's {want.size}")
            seen.add(m.name)
            digest = _write_member(m.read, place(m.name), sparse=m.name == ROOTFS,
                                   cancel=op.cancel)
            if digest != want.sha256:
                raise BadRequest(f"{where} has sha256 {digest}, not the manifest's "
                                 f"{want.sha256}; refused",
                                 hint="the bundle is corrupt or was tampered with")
        missing = sorted(set(manifest.members) - seen)
        if missing:
            raise BadRequest(f"bundle {bundle.name} lacks {', '.join(missing)}, which its "
                             "manifest lists")
        while hashed.read(_CHUNK):  # what follows the tar: the whole file is hashed
            pass
    if expect_sha is not None and hashed.hexdigest() != expect_sha:
        raise BadRequest(f"bundle {bundle} has sha256 {hashed.hexdigest()}, not the "
                         f"catalog's {expect_sha}; refused",
                         hint="the catalog entry is out of date, or the file was changed or "
                              "tampered with")
    return manifest, hashed.hexdigest()


def _allowed(kind: str) -> frozenset[str]:
    return IMAGE_MEMBERS if kind == "image" else KERNEL_MEMBERS


def parse_manifest(data: bytes, *, kind: str, caps: dict[str, int], where: str) -> Manifest:
    """Check a ``manifest.json`` (see the module doc).

    Raises:
        BadRequest: not the format, another kind or arch, unknown members, sizes past
            ``caps``, a bad digest, or no kernel.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{where}: {MANIFEST} is not valid JSON") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadRequest(f"{where}: not a {FORMAT} bundle",
                         hint="a bundle is made by `banger image export`")
    if doc.get("kind") != kind:
        raise BadRequest(f"{where} is a {doc.get('kind')!r} bundle, not an {kind} bundle",
                         hint=f"pull it with `banger {doc.get('kind')} pull`"
                         if doc.get("kind") in catalog.KINDS else None)
    if doc.get("arch") != ARCH:
        raise BadRequest(f"{where} is for {doc.get('arch')!r}; banger runs {ARCH} guests")
    name = doc.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"{where}: the manifest has no name")
    check_name(name, kind)
    raw_members = doc.get("members")
    if not isinstance(raw_members, dict):
        raise BadRequest(f"{where}: the manifest has no members")
    members: dict[str, Member] = {}
    for member, info in raw_members.items():
        if member not in caps:
            raise BadRequest(f"{where}: unknown member {member!r} in the manifest",
                             hint=f"an {kind} bundle holds {', '.join(sorted(caps))}")
        size = info.get("size") if isinstance(info, dict) else None
        sha = info.get("sha256") if isinstance(info, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{where}: member {member!r} has no valid size")
        if size > caps[member]:
            raise BadRequest(f"{where}: member {member} is {size} bytes, more than the "
                             f"{caps[member]} allowed",
                             hint="pull with a larger --size" if member == ROOTFS else None)
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise BadRequest(f"{where}: member {member!r} has no valid sha256")
        members[member] = Member(size=size, sha256=sha)
    kernel = doc.get("kernel")
    if not isinstance(kernel, dict):
        kernel = {}
    kname, version = kernel.get("name"), kernel.get("version")
    if kname is not None:
        if not isinstance(kname, str):
            raise BadRequest(f"{where}: kernel.name must be a string or null")
        check_name(kname, "kernel")
    if not isinstance(version, str | None):
        raise BadRequest(f"{where}: kernel.version must be a string or null")
    registry_files = {VMLINUX, BZIMAGE} & set(members)
    if kind == "kernel" and not registry_files:
        raise BadRequest(f"{where}: a kernel bundle needs a vmlinux or a bzImage")
    if kind == "image":
        if ROOTFS not in members:
            raise BadRequest(f"{where}: an image bundle needs {ROOTFS}")
        if kname is None and (VMLINUZ not in members or registry_files):
            raise BadRequest(f"{where}: an image bundle without kernel.name needs vmlinuz "
                             "(and no vmlinux or bzImage)")
        if kname is not None and (VMLINUZ in members or not registry_files):
            raise BadRequest(f"{where}: an image bundle with kernel.name needs vmlinux or "
                             "bzImage (and no vmlinuz)")
    return Manifest(kind=kind, name=name, members=members, kernel_name=kname,
                    kernel_version=version)


def _read_all(read: Any) -> bytes:
    parts = []
    while chunk := read():
        parts.append(chunk)
    return b"".join(parts)


def _write_member(read: Any, dest: Path, *, sparse: bool, cancel: CancelToken) -> str:
    """Write a member's data to the new file ``dest``; returns its sha256.

    ``sparse``: all-zero 64 KiB blocks are skipped by seeking (a hole), so a 4 GiB
    root file system with 500 MiB of data takes 500 MiB.
    """
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        size = 0
        while chunk := read():
            cancel.check()
            digest.update(chunk)
            size += len(chunk)
            if sparse:
                write_sparse(out, chunk)
            else:
                out.write(chunk)
        out.truncate(size)
    return digest.hexdigest()


def _check_ext4(rootfs: Path) -> None:
    with rootfs.open("rb") as fh:
        fh.seek(images.EXT4_MAGIC_OFFSET)
        if fh.read(2) != images.EXT4_MAGIC:
            raise BadRequest("the bundle's rootfs.ext4 is not an ext4 file system",
                             hint="a bundle is made by `banger image export`")


def _bundled_kernel(d: Daemon, name: str, files: Path, origin: str) -> tuple[str, str | None]:
    """Register the bundle's kernel ``name`` from ``files`` (``origin``: the bundle's),
    or reuse the registry's when it has the same files.

    Returns:
        The kernel name, and that name again when this call imported it (to remove on
        a later failure), else None.

    Raises:
        AlreadyExists: a different kernel of that name is registered.
    """
    bundled = {m: _sha_of(files / m) for m in (VMLINUX, BZIMAGE, INITRD)
               if (files / m).is_file()}
    for attempt in range(2):
        k = d.db.find_kernel(name)
        if k is not None:
            have = {m: _sha_of(Path(p)) for m, p in
                    ((VMLINUX, k.vmlinux), (BZIMAGE, k.bzimage), (INITRD, k.initrd)) if p}
            if have != bundled:
                raise AlreadyExists(
                    f"the bundle boots kernel {name!r}, and a different kernel of that "
                    "name is registered",
                    hint=f"remove it with `banger kernel rm {name}` if no image uses it, "
                         "or `banger kernel show` it to compare")
            return name, None
        paths = [str(files / m) for m in (VMLINUX, BZIMAGE) if m in bundled]
        initrd = str(files / INITRD) if INITRD in bundled else None
        try:
            kernels.import_files(d, name, paths, initrd, source="bundle", origin=origin)
        except AlreadyExists:
            if attempt:
                raise
            continue  # imported meanwhile by another pull: compare with it
        return name, name
    raise AssertionError("unreachable")


def _sha_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
