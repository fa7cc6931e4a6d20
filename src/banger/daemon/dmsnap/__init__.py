"""Per-VM copy-on-write root disks.

Three strategies behind one small interface:

* :class:`ReflinkCow` - ``FICLONE`` a file on XFS/btrfs: instant, shares blocks.
* :class:`CopyCow` - a sparse copy: works everywhere, costs the image's used bytes.
* :class:`DmSnapshotCow` - a device-mapper ``snapshot`` of the image over loop
  devices with a sparse exception store: instant, needs dm-snapshot in the kernel.

Each returns a :class:`CowHandle` whose ``identity`` is the teardown identity
(files, loop devices, dm target) that the daemon mirrors onto the VM record.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from banger.errors import BangerError, HostError
from banger.fsutil import write_sparse
from banger.hostops.client import HostOps

log = logging.getLogger("banger.dmsnap")

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
@dataclass
class CowHandle:
    """Teardown identity of one VM's root disk."""

    strategy: str
    path: str  # the file (reflink/copy) or exception store (dmsnap)
    device: str | None = None  # what the VMM opens when it is not ``path``
    loops: list[str] = field(default_factory=list)
    dm_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The handle as a JSON object (``handles.json`` and the VM's runtime record)."""
        return {"strategy": self.strategy, "path": self.path, "device": self.device,
                "loops": list(self.loops), "dm_name": self.dm_name}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CowHandle:
        """Rebuild a handle from :meth:`to_json` output."""
        return cls(strategy=str(data["strategy"]), path=str(data["path"]),
                   device=data.get("device"), loops=list(data.get("loops") or []),
                   dm_name=data.get("dm_name"))

    @property
    def disk(self) -> str:
        """The path the VMM should open as the root disk."""
        return self.device or self.path


Record = Callable[["CowHandle"], None]
"""Persists a partially activated handle (the daemon writes it to handles.json)."""


class CowStrategy(Protocol):
    name: str

    def create(self, origin: Path, target: Path) -> CowHandle:
        """Make the VM's private view of ``origin`` at ``target`` (not yet attached)."""
        ...

    def activate(self, handle: CowHandle, origin: Path, vm_id: str,
                 record: Record | None = None) -> CowHandle:
        """Make the disk openable by the VMM (loop/dm set-up); idempotent.

        ``record`` is called with the handle as each kernel object is made, before the
        next, so a crash mid-way leaves a handle naming everything to tear down.
        """
        ...

    def deactivate(self, handle: CowHandle) -> CowHandle:
        """Undo :meth:`activate`; idempotent, tolerant of half-done state."""
        ...

    def remove(self, handle: CowHandle) -> None:
        """Delete the disk for good (after :meth:`deactivate`)."""
        ...

    def open_disk(self, handle: CowHandle) -> int:
        """A read-only descriptor on activated ``handle``'s disk (the caller closes it)."""
        ...


def reflink_supported(directory: Path) -> bool:
    """Try a real ``FICLONE`` between two scratch files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as src, \
            tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as dst:
        src.write(b"banger" * 700)
        src.flush()
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError:
            return False
    return True


def dm_snapshot_supported() -> bool:
    """True when the kernel has device-mapper with the snapshot target (or can load it)."""
    if not Path("/dev/mapper/control").exists():
        return False
    try:
        targets = Path("/proc/misc").read_text()
    except OSError:
        return False
    return "device-mapper" in targets


class _FileCow:
    """A VM disk that is a plain file: nothing to attach, nothing to detach."""

    name = "file"

    def activate(self, handle: CowHandle, origin: Path, vm_id: str,
                 record: Record | None = None) -> CowHandle:
        return handle

    def deactivate(self, handle: CowHandle) -> CowHandle:
        return handle

    def remove(self, handle: CowHandle) -> None:
        Path(handle.path).unlink(missing_ok=True)

    def open_disk(self, handle: CowHandle) -> int:
        return os.open(handle.path, os.O_RDONLY | os.O_CLOEXEC)


class ReflinkCow(_FileCow):
    name = "reflink"

    def create(self, origin: Path, target: Path) -> CowHandle:
        """``FICLONE`` ``origin`` to ``target``: instant, blocks shared until written.

        Raises:
            HostError: the file system cannot reflink (the partial target is removed).
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with origin.open("rb") as src, target.open("wb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise HostError(f"reflink of {origin} failed: {exc.strerror}",
                            hint="the state_dir filesystem must support reflinks") from exc
        return CowHandle(self.name, str(target))


class CopyCow(_FileCow):
    name = "copy"

    def create(self, origin: Path, target: Path) -> CowHandle:
        """Sparse-copy ``origin`` to ``target`` (data extents only).

        Raises:
            HostError: the copy failed, e.g. out of space (the partial target is removed).
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Not synced: a VM's root disk is written with flushes ignored (cache=unsafe,
            # Firecracker's Unsafe), so a host crash leaves it as undefined as an
            # unsynced copy would; syncing 0.5-2 s of every create bought nothing.
            sparse_copy(origin, target, durable=False)
        except OSError as exc:
            target.unlink(missing_ok=True)
            hint = "free some disk space" if exc.errno == errno.ENOSPC else ""
            raise HostError(f"copy of {origin} failed: {exc.strerror}", hint=hint) from exc
        return CowHandle(self.name, str(target))


def clone_or_copy(src: Path, dst: Path) -> str:
    """Reflink ``src`` to ``dst`` when both sit on one reflink-capable file system, else a
    sparse copy. Returns which happened ("reflink" or "copy")."""
    try:
        ReflinkCow().create(src, dst)
        return "reflink"
    except HostError:  # EXDEV, EOPNOTSUPP, EINVAL (partial dst removed): copy instead
        pass
    sparse_copy(src, dst)
    return "copy"


def sparse_copy(src: Path, dst: Path, *, durable: bool = True) -> None:
    """Copy only the data extents of ``src`` (SEEK_DATA/SEEK_HOLE), keeping holes; with
    ``durable``, on disk (fsync) before this returns."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), data, hole - data)
            pos = hole
        fout.truncate(size)
        if durable:
            os.fsync(fout.fileno())


def copy_device(src: int, dst: Path, chunk: int = 1 << 20) -> None:
    """Copy the block device (or file) open at ``src`` to a new sparse file ``dst``:
    blocks of zeros become holes (:func:`fsutil.write_sparse`; a device has no
    SEEK_DATA to say where its data is)."""
    with dst.open("wb") as fout:
        size = os.lseek(src, 0, os.SEEK_END)
        offset = 0
        while offset < size:
            buf = os.pread(src, min(chunk, size - offset), offset)
            if not buf:
                raise OSError(errno.EIO, f"the device ended at {offset} of {size} bytes")
            write_sparse(fout, buf)
            offset += len(buf)
        fout.truncate(size)
        os.fsync(fout.fileno())


def _copy_range(fin: int, fout: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset``: in the kernel when it can, else through memory
    (copy_file_range refuses some cross-file-system pairs with EXDEV)."""
    left = length
    while left > 0:
        try:
            n = os.copy_file_range(fin, fout, min(left, 1 << 30), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(fout, os.pread(fin, min(left, 8 << 20), offset), offset)
        if n == 0:
            raise OSError(errno.EIO, "short copy")
        offset += n
        left -= n


class DmSnapshotCow:
    """dm-snapshot over loop devices, made and removed by the host operations (the
    root helper, or this process in root mode): the daemon only names its files and
    its VM."""

    name = "dmsnap"

    def __init__(self, host: HostOps, dm_prefix: str) -> None:
        self.host = host
        self.dm_prefix = dm_prefix  # layout.dm_prefix_for(install tag): this install's

    def create(self, origin: Path, target: Path) -> CowHandle:
        """Make an empty sparse exception store at ``target``, the size of ``origin``."""
        # The exception store only needs to hold changed chunks; a sparse file the
        # size of the origin can never overflow (persistent snapshots invalidate on overflow).
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as fh:
            fh.truncate(origin.stat().st_size)
        return CowHandle(self.name, str(target))

    def activate(self, handle: CowHandle, origin: Path, vm_id: str,
                 record: Record | None = None) -> CowHandle:
        """Attach origin and store to loop devices and create the snapshot target.

        A handle whose device already exists is returned unchanged; anything left of
        an earlier activation is torn down first. On failure the loops made are detached.

        Returns:
            The handle with ``device`` (``/dev/mapper/<dm_prefix><vm id>``), loops and dm
            name.
        """
        if handle.device and Path(handle.device).exists():
            return handle
        handle = self.deactivate(handle)
        loops: list[str] = []
        note = record or (lambda h: None)
        dm_name = self.dm_prefix + vm_id
        try:
            loops.append(self.host.loop_attach(origin, read_only=True))
            note(CowHandle(self.name, handle.path, loops=list(loops)))
            loops.append(self.host.loop_attach(Path(handle.path), read_only=False))
            # Named before it exists: removing a dm target that is not there is harmless.
            note(CowHandle(self.name, handle.path, loops=list(loops), dm_name=dm_name))
            device = self.host.dm_snapshot(vm_id, loops[0], loops[1])
        except Exception:
            for loop in reversed(loops):
                self._detach(loop)
            raise
        return CowHandle(self.name, handle.path, device=device, loops=loops, dm_name=dm_name)

    def deactivate(self, handle: CowHandle) -> CowHandle:
        """Remove the dm target and detach the loops; returns the bare handle.

        Raises:
            HostError: the dm target could not be removed (still open), or its name is
                not this install's.
        """
        vm_id = self._vm_id(handle.dm_name) if handle.dm_name else None
        if vm_id is not None:
            self.host.dm_remove(vm_id)
        for loop in reversed(handle.loops):  # in use by a target left: freed with it
            self._detach(loop)
        if handle.dm_name and vm_id is None:
            raise self._foreign(handle.dm_name)
        return CowHandle(self.name, handle.path)

    def remove(self, handle: CowHandle) -> None:
        """Delete the exception store file (after :meth:`deactivate`)."""
        Path(handle.path).unlink(missing_ok=True)

    def open_disk(self, handle: CowHandle) -> int:
        """The snapshot's device, opened by the host operations (root's: the daemon
        need not be able to open it)."""
        if not handle.dm_name:
            raise HostError(f"{handle.path}: the snapshot is not active")
        vm_id = self._vm_id(handle.dm_name)
        if vm_id is None:
            raise self._foreign(handle.dm_name)
        return self.host.dm_read(vm_id)

    def _vm_id(self, dm_name: str) -> str | None:
        """The VM id in dm target name ``dm_name``; None when the name is not this
        install's (e.g. made before the state dir moved)."""
        return dm_name.removeprefix(self.dm_prefix) if dm_name.startswith(self.dm_prefix) \
            else None

    def _foreign(self, dm_name: str) -> HostError:
        return HostError(f"dm target {dm_name} is not this install's ({self.dm_prefix}...)",
                         hint=f"remove it by hand: dmsetup remove {dm_name}")

    def _detach(self, loop: str) -> None:
        try:
            self.host.loop_detach(loop)
        except BangerError as exc:  # the sweep finds a loop left behind
            log.warning("cannot detach %s: %s", loop, exc.message)


def choose_strategy(requested: str, state_dir: Path, host: HostOps,
                    dm_prefix: str) -> CowStrategy:
    """``auto`` picks reflink when ``state_dir`` supports it, else a sparse copy.

    ``dm_prefix`` (see :func:`banger.layout.dm_prefix_for`) names the dm targets of ``dmsnap``.
    """
    if requested == "dmsnap":
        if not dm_snapshot_supported():
            raise HostError("cow_strategy = dmsnap but this kernel has no device-mapper",
                            hint="use cow_strategy = auto")
        return DmSnapshotCow(host, dm_prefix)
    if requested == "reflink" or (requested == "auto" and reflink_supported(state_dir)):
        return ReflinkCow()
    return CopyCow()


def strategy_for(handle: CowHandle, host: HostOps, dm_prefix: str) -> CowStrategy:
    """The strategy that made ``handle`` (for teardown after a restart, or a re-activation
    whose dm target is named with ``dm_prefix``)."""
    if handle.strategy == "dmsnap":
        return DmSnapshotCow(host, dm_prefix)
    if handle.strategy == "reflink":
        return ReflinkCow()
    return CopyCow()
