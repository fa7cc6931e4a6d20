"""Loop devices and device-mapper snapshots, for ``cow_strategy = dmsnap``.

The executor's side of ``loop.*`` and ``dm.*`` (:mod:`banger.hostops.ops`). A loop
device is only ever attached to a descriptor the executor opened below the state
directory, and only detached, listed or used in a snapshot when the file behind it
(as the kernel reports it, ``/sys/block/loopN/loop/backing_file``) lies there too. A
dm target's name is always the install's prefix and a VM id; its table is written
here from the two loops' kernel-reported sizes, never taken from a request.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from banger.errors import CommandFailed, HostError, Refused
from banger.runner import Runner

SYS_BLOCK = Path("/sys/block")
LOOP = re.compile(r"/dev/(loop[0-9]{1,6})")
SECTOR = 512
DM_CHUNK_SECTORS = 8  # 4 KiB exception chunks: the page size, the usual choice
TIMEOUT_S = 30.0
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Loop:
    """A loop device and what the kernel says is behind it."""

    device: str  # /dev/loopN
    backing: Path | None  # None: not attached
    read_only: bool
    sectors: int


def loop_info(device: str, sys_block: Path = SYS_BLOCK) -> Loop:
    """What is behind loop ``device`` (``/dev/loopN``), from sysfs.

    Raises:
        Refused: ``device`` is not a loop device's name.
    """
    m = LOOP.fullmatch(device)
    if m is None:
        raise Refused(f"{device!r} is not a loop device")
    base = sys_block / m.group(1)
    try:
        backing = (base / "loop" / "backing_file").read_text().rstrip("\n")
    except OSError:  # no such device, or nothing attached to it
        return Loop(device, None, False, 0)
    return Loop(device, Path(backing.removesuffix(_DELETED)),
                _read_int(base / "ro") == 1, _read_int(base / "size"))


def loops_below(root: Path, sys_block: Path = SYS_BLOCK) -> list[Loop]:
    """Every attached loop device whose file lies below ``root``."""
    found = []
    for entry in sorted(sys_block.glob("loop*")):
        device = f"/dev/{entry.name}"
        if LOOP.fullmatch(device) is None:
            continue
        info = loop_info(device, sys_block)
        if info.backing is not None and below(info.backing, root):
            found.append(info)
    return found


def below(path: Path, root: Path) -> bool:
    """``path`` (as the kernel names it: symlinks resolved) lies strictly below ``root``."""
    real_root = Path(os.path.realpath(root))
    return path != real_root and path.is_relative_to(real_root) and ".." not in path.parts


def attach(runner: Runner, fd: int, *, read_only: bool) -> str:
    """Attach the file open at ``fd`` to a free loop device; its ``/dev/loopN``.

    ``losetup`` re-opens it through ``/proc/self/fd`` (the same file, whatever the
    path now names).

    Raises:
        HostError: no free loop device, or losetup answered something else.
    """
    argv = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []),
            f"/proc/self/fd/{fd}"]
    try:
        res = runner.run(argv, desc="attach a loop device", timeout=TIMEOUT_S, pass_fds=[fd])
    except CommandFailed as exc:
        raise HostError(f"cannot attach a loop device: {exc.message}",
                        hint="`losetup --list` shows the ones in use") from exc
    device = res.out.strip()
    if LOOP.fullmatch(device) is None:
        raise HostError(f"losetup answered {device[:60]!r}, not a loop device")
    return device


def detach(runner: Runner, device: str) -> None:
    """Detach ``device`` (not attached: nothing to do)."""
    runner.run(["losetup", "--detach", device], desc=f"detach {device}", timeout=TIMEOUT_S,
               check=False)


def check_regular(fd: int, owner: int, what: str) -> None:
    """Refuse a descriptor that is not a regular file owned by ``owner``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{what} is not a regular file")
    if st.st_uid != owner:
        raise Refused(f"{what} is not the daemon's file (uid {st.st_uid})")


def snapshot_table(origin: Loop, cow: Loop) -> str:
    """The ``snapshot`` target over ``origin`` with exceptions in ``cow``, persistent."""
    return (f"0 {origin.sectors} snapshot {origin.device} {cow.device} P "
            f"{DM_CHUNK_SECTORS}")


def dm_create(runner: Runner, name: str, table: str) -> None:
    """Create dm target ``name`` with ``table``."""
    runner.run(["dmsetup", "create", name, "--table", table],
               desc=f"create dm snapshot {name}", timeout=TIMEOUT_S)


def dm_remove(runner: Runner, name: str) -> None:
    """Remove dm target ``name`` (a missing one is not an error).

    Raises:
        HostError: dmsetup failed for another reason (e.g. the device is open).
    """
    res = runner.run(["dmsetup", "remove", "--retry", name], desc=f"remove dm target {name}",
                     timeout=TIMEOUT_S, check=False)
    if res.returncode != 0 and "No such device" not in res.err:
        raise HostError(f"dmsetup remove {name} failed: {res.err.strip()[:500]}",
                        hint="a process still has the device open: `dmsetup info` names it")


def dm_names(runner: Runner) -> list[str]:
    """Every dm target's name (none when dmsetup cannot list them)."""
    res = runner.run(["dmsetup", "ls"], desc="list dm targets", timeout=TIMEOUT_S,
                     check=False)
    if res.returncode != 0:
        return []
    names = []
    for line in res.out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] != "No":  # "No devices found"
            names.append(words[0])
    return names


def open_dm(path: Path, flags: int) -> int:
    """Open dm device ``path`` (``/dev/mapper/<name>``, udev's symlink to a ``/dev/dm-N``
    node): only a block device directly in /dev.

    Raises:
        Refused: it leads elsewhere, or is not a block device.
        OSError: it does not exist.
    """
    real = Path(os.path.realpath(path))
    if real.parent != Path("/dev"):
        raise Refused(f"{path} does not lead to a device node in /dev")
    fd = os.open(real, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{path} is not a block device")
    return fd


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
