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

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from banger.errors import CommandFailed, HostError
from banger.fsutil import write_sparse
from banger.runner import Runner

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
SECTOR = 512
DM_CHUNK_SECTORS = 8  # 4 KiB exception chunks: the page size, the usual choice
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


def copy_device(src: Path, dst: Path, chunk: int = 1 << 20) -> None:
    """Copy block device (or file) ``src`` to a new sparse file ``dst``: blocks of zeros
    become holes (:func:`fsutil.write_sparse`; a device has no SEEK_DATA to say where
    its data is)."""
    with src.open("rb", buffering=0) as fin, dst.open("wb") as fout:
        size = os.lseek(fin.fileno(), 0, os.SEEK_END)
        offset = 0
        while offset < size:
            buf = os.pread(fin.fileno(), min(chunk, size - offset), offset)
            if not buf:
                raise OSError(errno.EIO, f"{src} ended at {offset} of {size} bytes")
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
    """dm-snapshot over loop devices. Needs root and the dm-snapshot target."""

    name = "dmsnap"

    def __init__(self, runner: Runner, dm_prefix: str) -> None:
        self.runner = runner
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
        try:
            base = self._losetup(origin, read_only=True)
            loops.append(base)
            note(CowHandle(self.name, handle.path, loops=list(loops)))
            cow = self._losetup(Path(handle.path), read_only=False)
            loops.append(cow)
            sectors = origin.stat().st_size // SECTOR
            dm_name = self.dm_prefix + vm_id
            # Named before it exists: removing a dm target that is not there is harmless.
            note(CowHandle(self.name, handle.path, loops=list(loops), dm_name=dm_name))
            table = f"0 {sectors} snapshot {base} {cow} P {DM_CHUNK_SECTORS}"
            self.runner.run(["dmsetup", "create", dm_name, "--table", table],
                            desc=f"create dm snapshot {dm_name}", timeout=30)
        except Exception:
            for loop in reversed(loops):
                self._detach(loop)
            raise
        return CowHandle(self.name, handle.path, device=f"/dev/mapper/{dm_name}",
                         loops=loops, dm_name=dm_name)

    def deactivate(self, handle: CowHandle) -> CowHandle:
        """Remove the dm target and detach the loops; returns the bare handle.

        Raises:
            CommandFailed: ``dmsetup remove`` failed for a reason other than a missing device.
        """
        if handle.dm_name:
            res = self.runner.run(["dmsetup", "remove", "--retry", handle.dm_name],
                                  desc=f"remove dm snapshot {handle.dm_name}", timeout=30,
                                  check=False)
            if res.returncode != 0 and "No such device" not in res.err:
                raise CommandFailed(f"dmsetup remove {handle.dm_name} failed: {res.err.strip()}")
        for loop in reversed(handle.loops):
            self._detach(loop)
        return CowHandle(self.name, handle.path)

    def remove(self, handle: CowHandle) -> None:
        """Delete the exception store file (after :meth:`deactivate`)."""
        Path(handle.path).unlink(missing_ok=True)

    def _losetup(self, path: Path, *, read_only: bool) -> str:
        argv = ["losetup", "--find", "--show"]
        if read_only:
            argv.append("--read-only")
        res = self.runner.run([*argv, str(path)], desc=f"attach {path.name} to a loop device",
                              timeout=30)
        return res.out.strip()

    def _detach(self, loop: str) -> None:
        with contextlib.suppress(CommandFailed):
            self.runner.run(["losetup", "--detach", loop], desc=f"detach {loop}", timeout=30,
                            check=False)


def choose_strategy(requested: str, state_dir: Path, runner: Runner,
                    dm_prefix: str) -> CowStrategy:
    """``auto`` picks reflink when ``state_dir`` supports it, else a sparse copy.

    ``dm_prefix`` (see :func:`banger.layout.dm_prefix_for`) names the dm targets of ``dmsnap``.
    """
    if requested == "dmsnap":
        if not dm_snapshot_supported():
            raise HostError("cow_strategy = dmsnap but this kernel has no device-mapper",
                            hint="use cow_strategy = auto")
        return DmSnapshotCow(runner, dm_prefix)
    if requested == "reflink" or (requested == "auto" and reflink_supported(state_dir)):
        return ReflinkCow()
    return CopyCow()


def strategy_for(handle: CowHandle, runner: Runner, dm_prefix: str) -> CowStrategy:
    """The strategy that made ``handle`` (for teardown after a restart, or a re-activation
    whose dm target is named with ``dm_prefix``)."""
    if handle.strategy == "dmsnap":
        return DmSnapshotCow(runner, dm_prefix)
    if handle.strategy == "reflink":
        return ReflinkCow()
    return CopyCow()
