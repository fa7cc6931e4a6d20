"""Id maps for the daemon's own user namespaces (``userns.map``), as ``newuidmap`` would.

A daemon that is not root builds images in a user namespace of its own: debootstrap
and the packages' scripts give files to many users (``_apt``, ``man``, ``messagebus``),
which needs more ids than its one. The root helper writes that namespace's maps: in
it, 0 is the daemon's own uid and gid (what it makes stays its own on the host) and
1..65535 are the owner's subordinate ids from ``/etc/subuid`` and ``/etc/subgid``
(``banger system install`` reserves them). Only a process running wholly as the
daemon's user, in a namespace with no map yet, is mapped; its maps can be written once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from banger.errors import HostError, Refused
from banger.fsutil import atomic_write

SUBID_COUNT = 65536  # ids a build namespace has: 0 and 65535 subordinate ones
SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


@dataclass(frozen=True)
class IdRange:
    """A user's subordinate ids: ``count`` of them from ``start``."""

    start: int
    count: int


def _ranges(path: Path) -> Iterator[tuple[str, IdRange]]:
    """The ``NAME_OR_ID:START:COUNT`` lines of ``path`` that parse (none if unreadable)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3:
            continue
        try:
            yield fields[0], IdRange(int(fields[1]), int(fields[2]))
        except ValueError:
            continue


def subordinate(path: Path, user: str, uid: int) -> IdRange | None:
    """``user``'s first range of at least :data:`SUBID_COUNT` ids in ``path`` (lines
    ``NAME_OR_ID:START:COUNT``), or None."""
    for name, ids in _ranges(path):
        if name in (user, str(uid)) and ids.start > 0 and ids.count >= SUBID_COUNT \
                and ids.start + ids.count <= 2**32 - 1:
            return ids
    return None


def map_ids(pid: int, uid: int, gid: int, subuids: IdRange | None,
            subgids: IdRange | None) -> None:
    """Write the uid and gid maps of ``pid``'s user namespace.

    Raises:
        Refused: no subordinate ids; ``pid`` is not wholly the daemon's (uid ``uid``),
            or its namespace has a map already (the helper's own, or one written).
        HostError: the process is gone, or the kernel refused the maps.
    """
    if subuids is None or subgids is None:
        raise Refused("userns.map: the daemon's user has no 65536 subordinate ids in "
                      f"{SUBUID} and {SUBGID}",
                      hint="`banger system install --owner USER` reserves them "
                           "(or: usermod --add-subuids / --add-subgids)")
    try:
        proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise HostError(f"userns.map: process {pid} is gone") from exc
    try:  # every read and write below is this one process's, even if the pid is reused
        ids = _status_ids(proc)
        if ids["Uid"] != {uid} or ids["Gid"] != {gid}:
            raise Refused(f"userns.map: process {pid} is not the daemon's "
                          f"(uids {sorted(ids['Uid'])}, gids {sorted(ids['Gid'])})")
        if _read(proc, "uid_map").strip() or _read(proc, "gid_map").strip():
            raise Refused(f"userns.map: process {pid} is not in a new user namespace "
                          "without a map")
        _write(proc, "uid_map", f"0 {uid} 1\n1 {subuids.start} {SUBID_COUNT - 1}\n")
        _write(proc, "gid_map", f"0 {gid} 1\n1 {subgids.start} {SUBID_COUNT - 1}\n")
    except OSError as exc:
        raise HostError(f"userns.map: cannot map process {pid}'s ids: "
                        f"{exc.strerror or exc}") from exc
    finally:
        os.close(proc)


def _status_ids(proc: int) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"Uid": set(), "Gid": set()}
    for line in _read(proc, "status").splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            out[key] = {int(x) for x in rest.split()}
    return out


def _read(proc: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    with contextlib.closing(os.fdopen(fd, "r")) as f:
        return f.read(1 << 16)


def _write(proc: int, name: str, text: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        os.write(fd, text.encode())  # one write: a map is written once, whole
    finally:
        os.close(fd)


def reserve(user: str, uid: int, subuid: Path = SUBUID, subgid: Path = SUBGID
            ) -> tuple[IdRange, IdRange]:
    """``user``'s subordinate uids and gids, a fresh :data:`SUBID_COUNT` of each appended
    to ``subuid``/``subgid`` where it has none (from 100000 up, past every range either
    file holds)."""
    found = subordinate(subuid, user, uid), subordinate(subgid, user, uid)
    if found[0] is not None and found[1] is not None:
        return found[0], found[1]
    end = max([100000, *(ids.start + ids.count for path in (subuid, subgid)
                         for _, ids in _ranges(path))])
    fresh = IdRange(end, SUBID_COUNT)
    out = []
    for path, have in ((subuid, found[0]), (subgid, found[1])):
        if have is None:
            text = path.read_text() if path.exists() else ""
            text += ("" if not text or text.endswith("\n") else "\n") \
                + f"{user}:{fresh.start}:{fresh.count}\n"
            atomic_write(path, text.encode(), 0o644)
        out.append(have or fresh)
    return out[0], out[1]
