"""What an unprivileged flatten cannot write on the host, kept for the ext4 instead.

A daemon that is not root cannot give a file another owner, make a device node or
set a ``trusted.``/``security.`` xattr. Its :func:`~banger.daemon.oci.flatten.flatten`
writes every entry as its own (``mkfs.ext4 -d`` in a user namespace that maps it to
root then makes them root's) and notes here, per path, what the image says instead: an
owner other than root, a mode the tree could not carry (a directory the daemon must
keep writing into), a device (an empty file stands in for it in the tree), privileged
xattrs. :meth:`Fixups.script` turns the notes into ``debugfs`` commands that
:func:`apply` runs on the finished ext4 (no mount).

Paths are the image's, untrusted: each is quoted for debugfs, and one that quoting
cannot carry (a double quote, a line break) is refused.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from banger.errors import BadRequest, CommandFailed, HostError
from banger.runner import Runner

# What an owner may set on its own files without privilege: these go on the host. POSIX
# ACLs go there too (the kernel fits the file's mode to them) but are noted as well:
# they name uids, which mkfs would read back through the namespace's map.
HOST_XATTRS = ("user.", "system.posix_acl_access", "system.posix_acl_default")
_UNQUOTABLE = frozenset(b'"\n\r\0')
DEVICE_NUMBER_MAX = 0xFFFF  # debugfs's mknod takes 16-bit majors and minors
ACCESS_ACL = "system.posix_acl_access"
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permissions, id (linux/posix_acl_xattr.h)
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class Fixup:
    """One path's metadata as the image has it, where the host tree differs."""

    uid: int
    gid: int
    mode: int  # file type and permission bits (st_mode)
    device: tuple[int, int] | None = None  # (major, minor) of a character/block device
    xattrs: tuple[tuple[str, bytes], ...] = ()  # the privileged ones
    mtime_s: int = 0  # a device's (debugfs makes it anew; others keep the tree's)


@dataclass
class Fixups:
    """The notes of one flatten, keyed by the path below the image root ("" is the root)."""

    notes: dict[str, Fixup] = field(default_factory=dict)
    # Directory key -> the keys below it on the way to a note (noted or not): what
    # ``forget`` walks, so removing a path costs its noted subtree, not every note.
    _below: dict[str, set[str]] = field(default_factory=dict, repr=False)

    def _set(self, key: str, fixup: Fixup) -> None:
        self.notes[key] = fixup
        child = key
        while child:
            parent = child.rpartition("/")[0]
            seen = self._below.setdefault(parent, set())
            if child in seen:
                break  # its ancestors lead here already
            seen.add(child)
            child = parent

    def note(self, key: str, *, uid: int, gid: int, mode: int, host_mode: int,
             xattrs: list[tuple[str, bytes]], device: tuple[int, int] | None = None,
             mtime_ns: int = 0) -> list[tuple[str, bytes]]:
        """Note what ``key`` needs beyond the tree (``host_mode``: the st_mode it has
        there, owned by the daemon); returns the xattrs to set on the host."""
        if device is not None and max(device) > DEVICE_NUMBER_MAX:
            raise BadRequest(f"/{key} is device {device[0]}:{device[1]}, which banger can "
                             "make only as root",
                             hint="pull this image with a root daemon")
        if not key:  # the root directory: mke2fs's own mode, as a root daemon's pull has
            mode = host_mode = stat.S_IFDIR | 0o755
        # A device's are all noted: its stand-in file is replaced.
        on_host = [(n, v) for n, v in xattrs if n.startswith(HOST_XATTRS) and device is None]
        privileged = tuple((n, v) for n, v in xattrs
                           if device is not None or not n.startswith("user."))
        for name, value in on_host:
            if name == ACCESS_ACL:  # as the kernel fits the host file's mode to it
                mode, kept = acl_mode(mode, value)
                host_mode, _ = acl_mode(host_mode, value)
                if not kept:
                    privileged = tuple(x for x in privileged if x[0] != ACCESS_ACL)
        if uid or gid or mode != host_mode or privileged or device is not None:
            self._set(key, Fixup(uid, gid, mode, device, privileged,
                                 max(0, mtime_ns // 10**9) if device is not None else 0))
        else:
            self.notes.pop(key, None)
        return on_host

    def link(self, target: str, key: str) -> None:
        """``key`` became a hard link to ``target``: it shares the target's inode."""
        if target in self.notes:
            self._set(key, replace(self.notes[target], device=None))
        else:
            self.notes.pop(key, None)

    def is_device(self, key: str) -> bool:
        """``key`` is a device (the tree has a stand-in file there)."""
        note = self.notes.get(key)
        return note is not None and note.device is not None

    def forget(self, key: str) -> None:
        """``key`` and everything below it were removed from the tree."""
        stack = [key]
        while stack:
            k = stack.pop()
            self.notes.pop(k, None)
            stack.extend(self._below.pop(k, ()))
        if key:
            self._below.get(key.rpartition("/")[0], set()).discard(key)

    def script(self, xattr_dir: Path) -> bytes:
        """The debugfs commands that give the ext4 what the notes say; each privileged
        xattr's value is written to a file in ``xattr_dir`` (``ea_set -f``).

        Raises:
            BadRequest: a path debugfs cannot be told (a double quote or line break).
        """
        lines: list[bytes] = []
        for n, (key, note) in enumerate(sorted(self.notes.items())):
            path = _quoted("/" + key)
            if note.device is not None:
                parent, _, name = ("/" + key).rpartition("/")
                lines += [b"rm " + path, b"cd " + _quoted(parent or "/"),
                          b"mknod " + _quoted(name) + (b" c " if stat.S_ISCHR(note.mode)
                                                       else b" b ")
                          + f"{note.device[0]} {note.device[1]}".encode(), b"cd /",
                          b"sif " + path + f" mtime @{note.mtime_s}".encode()]
            lines += [b"sif " + path + f" mode 0{note.mode:o}".encode(),
                      b"sif " + path + f" uid {note.uid}".encode(),
                      b"sif " + path + f" gid {note.gid}".encode()]
            for i, (name, value) in enumerate(note.xattrs):
                value_file = xattr_dir / f"{n}-{i}"
                value_file.write_bytes(value)
                lines.append(b"ea_set -f " + _quoted(str(value_file)) + b" " + path + b" "
                             + _quoted(name))
        return b"".join(line + b"\n" for line in lines)


def acl_mode(mode: int, acl: bytes) -> tuple[int, bool]:
    """``mode`` with its permission bits as setting access ACL ``acl`` leaves them, and
    whether the kernel keeps the ACL (one that only repeats the mode is not stored).
    A malformed ACL changes nothing (setting it fails, as on the host)."""
    if len(acl) < 4 or (len(acl) - 4) % _ACL_ENTRY.size or acl[:4] != b"\x02\0\0\0":
        return mode, True
    bits, mask, extended = 0, None, False
    for tag, raw, _id in _ACL_ENTRY.iter_unpack(acl[4:]):
        perm = raw & 0o7
        if tag == _USER_OBJ:
            bits |= perm << 6
        elif tag == _GROUP_OBJ:
            bits |= perm << 3
        elif tag == _OTHER:
            bits |= perm
        elif tag == _MASK:
            mask, extended = perm << 3, True
        elif tag in (_USER, _GROUP):
            extended = True
    if mask is not None:
        bits = (bits & ~0o070) | mask
    return (mode & ~0o777) | bits, extended


def for_this_process() -> Fixups | None:
    """Fixups to note an image's owners in when this process is not root; None when it
    is (it gives files their owners on the host itself)."""
    return None if os.geteuid() == 0 else Fixups()


def apply(runner: Runner, image: Path, fixups: Fixups, workdir: Path) -> None:
    """Run :meth:`Fixups.script` on ext4 ``image`` with ``debugfs -w``.

    debugfs exits 0 whatever its commands did, so any complaint on its stderr (beyond
    its version banner) is a failure.

    Raises:
        BadRequest: a path debugfs cannot be told.
        HostError: a command failed (the image is the caller's to discard).
    """
    if not fixups.notes:
        return
    xattr_dir = workdir / "xattrs"
    xattr_dir.mkdir(mode=0o700, exist_ok=True)
    script = workdir / "fixups.debugfs"
    script.write_bytes(fixups.script(xattr_dir))
    try:
        res = runner.run(["debugfs", "-w", "-f", str(script), str(image)],
                         desc="give the image's files their owners", timeout=1800)
    except CommandFailed as exc:
        raise HostError(f"cannot give the image's files their owners: {exc.message}") from exc
    complaints = [line for line in res.err.splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
    if complaints:
        raise HostError("debugfs could not give the image's files their owners: "
                        + "; ".join(complaints[:5])[:1000])


def _quoted(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if _UNQUOTABLE & set(raw):
        raise BadRequest(f"the image has a path banger cannot give its owner: {text[:200]!r}",
                         hint="a name with a double quote or a line break needs a root "
                              "daemon to pull")
    return b'"' + raw + b'"'
