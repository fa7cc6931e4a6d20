"""Loop devices and device-mapper snapshots, for ``cow_strategy = dmsnap``.

The executor's side of ``loop.*`` and ``dm.*`` (:mod:`banger.hostops.ops`), done by
:class:`BlockDevices` one request at a time:

- a loop device is attached with ioctls to the very descriptor the executor opened and
  checked below the state directory (never by a path something could swap, as
  ``losetup`` would reopen it), and the kernel's record of it is checked against that
  descriptor afterwards;
- a loop device is detached, listed or put in a snapshot only while the executor holds
  it open (a detach from elsewhere then waits for that close, so its number cannot be
  given to another file in between), and only when the file behind it, as the kernel
  names it (``/sys/block/loopN/loop/backing_file``), lies below the state directory,
  compared as text with the directory resolved once: a symlink the daemon puts in its
  own tree moves nothing;
- a dm target's name is always the install's prefix and a VM id; its table is written
  here, from the held loops' device numbers and kernel-reported sizes;
- the loops and targets one install may have are capped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from banger.errors import HostError, Refused
from banger.runner import Runner

SYS_BLOCK = Path("/sys/block")
LOOP = re.compile(r"/dev/(loop[0-9]{1,6})")
LOOP_MAJOR = 7
DM_CHUNK_SECTORS = 8  # 4 KiB exception chunks: the page size, the usual choice
# dmsetup talks to the kernel through one ioctl; udev settling is its longest wait.
TIMEOUT_S = 30.0
MAX_LOOPS = 512  # attached below one state directory: two per dm-snapshot VM
MAX_TARGETS = 256  # dm targets of one install: one per VM
_DELETED = " (deleted)"
# linux/loop.h
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
# struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt_type,
# encrypt_key_size, flags, file_name[64], crypt_name[64], encrypt_key[32], init[2].
_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
_ATTEMPTS = 8  # a free loop another process takes first is tried again


@dataclass(frozen=True)
class Loop:
    """A loop device and what the kernel says is behind it."""

    device: str  # /dev/loopN
    backing: Path | None  # None: not attached
    read_only: bool
    sectors: int
    rdev: int = 0  # its device number, while held


class BlockDevices:
    """One install's loop devices and dm snapshots, below ``state_dir``."""

    def __init__(self, runner: Runner, state_dir: Path, daemon_uid: int,
                 sys_block: Path = SYS_BLOCK) -> None:
        self.runner = runner
        self.state = Path(os.path.realpath(state_dir))  # resolved once: the config's
        self.daemon_uid = daemon_uid
        self.sys_block = sys_block
        self._mu = threading.Lock()

    # -- loops

    def attach(self, op: str, fd: int, *, read_only: bool) -> str:
        """Attach the daemon's regular file open at ``fd`` to a free loop device.

        Raises:
            Refused: not a regular file of the daemon's, or the install has
                :data:`MAX_LOOPS` attached.
            HostError: no loop device could be had.
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{op}: not a regular file")
        if st.st_uid != self.daemon_uid:
            raise Refused(f"{op}: not the daemon's file (uid {st.st_uid})")
        with self._mu:
            if len(self.loops()) >= MAX_LOOPS:
                raise Refused(f"{op}: this install has {MAX_LOOPS} loop devices attached")
            return _attach(fd, read_only=read_only)

    def detach(self, op: str, device: str) -> None:
        """Detach ``device`` if its file is below the state dir (nothing attached: done).

        Raises:
            Refused: its file lies elsewhere.
            HostError: the kernel refused.
        """
        with self._mu, self._held(op, device) as (loop, fd):
            if loop.backing is None:
                return
            try:
                fcntl.ioctl(fd, LOOP_CLR_FD)  # done when the last opener (this) closes
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: detached meanwhile
                    raise HostError(f"{op}: cannot detach {device}: {exc.strerror}") from exc

    def loops(self) -> list[Loop]:
        """Every attached loop device whose file lies below the state dir."""
        found = []
        for entry in sorted(self.sys_block.glob("loop*")):
            device = f"/dev/{entry.name}"
            if LOOP.fullmatch(device) is None:
                continue
            loop = self._info(device)
            if loop.backing is not None and self._below(loop.backing, self.state):
                found.append(loop)
        return found

    # -- dm snapshots

    def snapshot(self, op: str, name: str, vm_id: str, origin: str, cow: str) -> None:
        """Make dm target ``name``: ``origin`` (a read-only loop of a file below the state
        dir) with its exceptions in ``cow`` (a writable loop of a file in VM ``vm_id``'s
        directory, ``<state dir>/vms/<vm id>``).

        Raises:
            Refused: a loop holds another file, the origin is writable or the store
                read-only, one loop twice, or the install has :data:`MAX_TARGETS`.
            HostError: a loop has nothing attached, or dmsetup failed.
        """
        with self._mu, self._held(op, origin) as (o, _), \
                self._held(op, cow, self.state / "vms" / vm_id) as (c, _):
            if o.backing is None or c.backing is None:
                raise HostError(f"{op}: {origin} or {cow} has nothing attached")
            if not o.read_only or c.read_only or o.rdev == c.rdev:
                raise Refused(f"{op}: the origin must be a read-only loop and the "
                              "exception store another, writable one")
            if len(self.target_names(name.removesuffix(vm_id))) >= MAX_TARGETS:
                raise Refused(f"{op}: this install has {MAX_TARGETS} dm targets")
            table = (f"0 {o.sectors} snapshot {_numbers(o.rdev)} {_numbers(c.rdev)} P "
                     f"{DM_CHUNK_SECTORS}")
            self.runner.run(["dmsetup", "create", name, "--table", table],
                            desc=f"create dm snapshot {name}", timeout=TIMEOUT_S)

    def remove(self, name: str) -> None:
        """Remove dm target ``name`` (a missing one is not an error).

        Raises:
            HostError: dmsetup failed for another reason (e.g. the device is open).
        """
        res = self.runner.run(["dmsetup", "remove", "--retry", name],
                              desc=f"remove dm target {name}", timeout=TIMEOUT_S, check=False)
        if res.returncode != 0 and "No such device" not in res.err:
            raise HostError(f"dmsetup remove {name} failed: {res.err.strip()[:500]}",
                            hint="a process still has the device open: `dmsetup info` "
                                 "names it")

    def target_names(self, prefix: str) -> list[str]:
        """The dm targets whose names start with ``prefix`` (none when dmsetup cannot
        list them)."""
        res = self.runner.run(["dmsetup", "ls"], desc="list dm targets", timeout=TIMEOUT_S,
                              check=False)
        if res.returncode != 0:
            return []
        names = []
        for line in res.out.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] != "No" and words[0].startswith(prefix):
                names.append(words[0])  # "No devices found" is no target
        return names

    @staticmethod
    def open_dm(path: Path, flags: int) -> int:
        """Open dm device ``path`` (``/dev/mapper/<name>``, udev's symlink to a
        ``/dev/dm-N`` node): only a block device directly in /dev.

        Raises:
            Refused: it leads elsewhere, or is not a block device.
            HostError: it does not exist.
        """
        real = Path(os.path.realpath(path))
        if real.parent != Path("/dev"):
            raise Refused(f"{path} does not lead to a device node in /dev")
        try:
            fd = os.open(real, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise HostError(f"cannot open {path}: {exc.strerror or exc}") from exc
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            os.close(fd)
            raise Refused(f"{path} is not a block device")
        return fd

    # -- what the kernel says

    @contextlib.contextmanager
    def _held(self, op: str, device: str, within: Path | None = None
              ) -> Iterator[tuple[Loop, int]]:
        """Loop ``device`` opened (so its binding cannot change) and described; refused
        when its file lies outside ``within`` (default: the state dir)."""
        if LOOP.fullmatch(device) is None:
            raise Refused(f"{op}: {device!r} is not a loop device")
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            yield Loop(device, None, False, 0), -1
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR:
                raise Refused(f"{op}: {device} is not a loop device")
            loop = self._info(device)
            root = within or self.state
            if loop.backing is not None and not self._below(loop.backing, root):
                raise Refused(f"{op}: {device} holds {loop.backing}, which is outside {root}")
            yield Loop(loop.device, loop.backing, loop.read_only, loop.sectors,
                       st.st_rdev), fd
        finally:
            os.close(fd)

    def _info(self, device: str) -> Loop:
        base = self.sys_block / device.removeprefix("/dev/")
        try:
            backing = (base / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:  # no such device, or nothing attached to it
            return Loop(device, None, False, 0)
        return Loop(device, Path(backing.removesuffix(_DELETED)),
                    _read_int(base / "ro") == 1, _read_int(base / "size"))

    @staticmethod
    def _below(path: Path, root: Path) -> bool:
        """``path`` (the kernel's name: no symlink, no ``..``) lies strictly below
        ``root``, compared as text."""
        return path != root and path.is_relative_to(root) and ".." not in path.parts


def _attach(fd: int, *, read_only: bool) -> str:
    """Bind ``fd`` to a free loop device (``LOOP_CONFIGURE``, else ``LOOP_SET_FD`` and
    ``LOOP_SET_STATUS64``); checks the kernel's record names ``fd``'s file."""
    st = os.fstat(fd)
    flags = LO_FLAGS_READ_ONLY if read_only else 0
    info = _INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, b"banger", b"", b"", 0, 0)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(_ATTEMPTS):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{n}"
            lfd = os.open(device, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            try:
                try:
                    fcntl.ioctl(lfd, LOOP_CONFIGURE, struct.pack("=II", fd, 0) + info
                                + bytes(64))
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue  # taken by another process since GET_FREE
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    fcntl.ioctl(lfd, LOOP_SET_FD, fd)  # a kernel before 5.8
                    fcntl.ioctl(lfd, LOOP_SET_STATUS64, info)
                got = _INFO64.unpack(fcntl.ioctl(lfd, LOOP_GET_STATUS64, bytes(_INFO64.size)))
                if (got[0], got[1]) != (st.st_dev, st.st_ino):
                    fcntl.ioctl(lfd, LOOP_CLR_FD)
                    raise HostError(f"{device} came up over another file than the one "
                                    "opened")
                return device
            finally:
                os.close(lfd)
    except OSError as exc:
        raise HostError(f"cannot attach a loop device: {exc.strerror or exc}",
                        hint="`losetup --list` shows the ones in use") from exc
    finally:
        os.close(ctl)
    raise HostError(f"no free loop device after {_ATTEMPTS} tries",
                    hint="`losetup --list` shows the ones in use")


def _numbers(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
