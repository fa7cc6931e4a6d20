"""A flattened image tree, read and changed as the guest will see it (never the host).

The tree under staging came from untrusted layers: any name in it may be a symlink,
absolute or full of ``..``, meant to point the host's own ``/etc`` out. Everything
here resolves paths the way the guest's kernel will after boot, with the tree as
``/``: an absolute link target restarts at the tree's root, ``..`` stops there, at
most :data:`MAX_LINKS` links are followed. The result is a host path whose every
component was checked with ``lstat`` to be a real directory, so writing there cannot
leave the tree (nothing else writes to staging while a pull holds it).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from banger.daemon.oci.fixups import Fixups
from banger.errors import BadRequest

MAX_LINKS = 40  # Linux's own limit on symlinks followed in one lookup
OS_RELEASE_MAX = 64 << 10
OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")

# Where a Debian-like guest keeps each piece banger's guest set-up needs.
SYSTEMD_PATHS = ("usr/lib/systemd/systemd", "lib/systemd/systemd")
SSHD_PATHS = ("usr/sbin/sshd", "sbin/sshd")
# banger-init runs these (see imagemgr.GUEST_INIT); ``ip`` is the one container
# images most often lack (iproute2).
TOOLS = {
    "ip": ("usr/sbin/ip", "sbin/ip", "usr/bin/ip", "bin/ip"),
    "ssh-keygen": ("usr/bin/ssh-keygen", "bin/ssh-keygen"),
    "mount": ("usr/bin/mount", "bin/mount"),
    "blkid": ("usr/sbin/blkid", "sbin/blkid"),
}
# What a Debian or Ubuntu image without them gets installed with its own apt.
APT_PACKAGES = ("systemd-sysv", "openssh-server", "iproute2", "udev", "kmod", "util-linux")


class EscapeError(Exception):
    """A lookup met more than :data:`MAX_LINKS` links or a non-directory in the middle."""


def resolve(root: Path, rel: str, *, follow_last: bool = True) -> Path | None:
    """The host path of guest path ``rel`` in the tree ``root``, or None if it is missing.

    Every directory on the way is a real directory (links resolved inside the tree);
    the last component is resolved too unless ``follow_last`` is false.

    Raises:
        EscapeError: a link loop, or a component that is a file where a directory is needed.
    """
    todo = [p for p in rel.split("/") if p not in ("", ".")]
    todo.reverse()  # a stack: pop() gives the next component
    done: list[str] = []
    links = 0
    while todo:
        comp = todo.pop()
        if comp == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, comp)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise EscapeError(f"/{'/'.join(done)} is not a directory") from None
        last = not todo
        if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
            links += 1
            if links > MAX_LINKS:
                raise EscapeError(f"more than {MAX_LINKS} links in /{rel}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        if not last and not stat.S_ISDIR(st.st_mode):
            raise EscapeError(f"/{'/'.join([*done, comp])} is not a directory")
        done.append(comp)
    return root.joinpath(*done)


def _is_executable(root: Path, rel: str) -> bool:
    try:
        p = resolve(root, rel)
    except EscapeError:
        return False
    if p is None:
        return False
    st = os.lstat(p)
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _first_executable(root: Path, candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if _is_executable(root, c)), None)


@dataclass(frozen=True)
class RootInfo:
    """What a flattened tree has of what banger's guest set-up needs."""

    os_id: str  # os-release ID ("debian", "ubuntu", "alpine"; "" when unknown)
    os_like: tuple[str, ...]  # ID_LIKE
    version_codename: str
    systemd: str | None  # path of systemd, if any
    init_is_systemd: bool  # /sbin/init leads to systemd
    sshd: str | None
    tools: dict[str, str | None]

    @property
    def debian_like(self) -> bool:
        """Debian, Ubuntu or a derivative: its apt can install what is missing."""
        return self.os_id in ("debian", "ubuntu") or "debian" in self.os_like

    def missing(self) -> list[str]:
        """What the tree lacks to boot under banger, in words for an error message."""
        out = []
        if self.systemd is None:
            out.append("systemd")
        elif not self.init_is_systemd:
            out.append("/sbin/init as systemd (install systemd-sysv)")
        if self.sshd is None:
            out.append("sshd (openssh-server)")
        out += [f"{tool}" for tool, path in sorted(self.tools.items()) if path is None]
        return out


def has_apt(root: Path) -> bool:
    """Whether the tree has an executable ``apt-get`` (finalize can install with it)."""
    return _first_executable(root, ("usr/bin/apt-get", "bin/apt-get")) is not None


def inspect(root: Path) -> RootInfo:
    """Read what :class:`RootInfo` reports from the tree ``root`` (nothing is changed)."""
    release = _os_release(root)
    systemd = _first_executable(root, SYSTEMD_PATHS)
    init_is_systemd = False
    try:
        init = resolve(root, "sbin/init")
        init_is_systemd = systemd is not None and init is not None and any(
            (p := resolve(root, s)) is not None and p == init for s in SYSTEMD_PATHS)
    except EscapeError:
        pass
    return RootInfo(
        os_id=release.get("ID", ""),
        os_like=tuple(release.get("ID_LIKE", "").split()),
        version_codename=release.get("VERSION_CODENAME", ""),
        systemd=systemd,
        init_is_systemd=init_is_systemd,
        sshd=_first_executable(root, SSHD_PATHS),
        tools={tool: _first_executable(root, paths) for tool, paths in TOOLS.items()},
    )


_RELEASE_LINE = re.compile(r"([A-Z_]{1,32})=(.{0,256})")


def _os_release(root: Path) -> dict[str, str]:
    """The tree's os-release keys (bounded read; quotes removed; unknown keys kept)."""
    for rel in OS_RELEASE_PATHS:
        try:
            path = resolve(root, rel)
        except EscapeError:
            continue
        if path is None or not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        with open(path, "rb") as fh:
            text = fh.read(OS_RELEASE_MAX).decode("utf-8", "replace")
        out = {}
        for line in text.splitlines():
            m = _RELEASE_LINE.fullmatch(line.strip())
            if m:
                out[m.group(1)] = m.group(2).strip().strip("\"'")
        return out
    return {}


def make_dirs(root: Path, rel: str) -> Path:
    """Guest directory ``rel`` (made 0755 root-owned where missing); its host path.

    Raises:
        BadRequest: a component on the way is not a directory.
    """
    here = ""
    for comp in [p for p in rel.split("/") if p not in ("", ".")]:
        if comp == "..":
            raise BadRequest(f"bad guest path {rel!r}")
        here = f"{here}/{comp}"
        try:
            path = resolve(root, here)
        except EscapeError as exc:
            raise BadRequest(f"the image's {here} cannot be used: {exc}") from None
        if path is None:
            parent = resolve(root, here.rsplit("/", 1)[0] or "/")
            assert parent is not None  # made by the step before
            path = parent / comp
            if os.path.lexists(path):
                raise BadRequest(f"the image's {here} is a dangling link")
            os.mkdir(path, 0o755)
            if os.geteuid() == 0:  # else the daemon's own: root's in the ext4 (as_root_owner)
                os.chown(path, 0, 0)
        elif not stat.S_ISDIR(os.lstat(path).st_mode):
            raise BadRequest(f"the image's {here} is not a directory")
    final = resolve(root, rel)
    assert final is not None
    return final


def remove(root: Path, rel: str, fixups: Fixups | None = None) -> None:
    """Remove guest file ``rel`` (the link itself, when it is one), if present, and
    what ``fixups`` noted for it."""
    try:
        path = resolve(root, rel, follow_last=False)
    except EscapeError:
        return
    if path is not None and not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        if fixups is not None:
            fixups.forget(str(path.relative_to(root)))


def list_dir(root: Path, rel: str) -> list[str]:
    """The names in guest directory ``rel`` (empty when it is missing or not a directory)."""
    try:
        path = resolve(root, rel)
    except EscapeError:
        return []
    if path is None or not stat.S_ISDIR(os.lstat(path).st_mode):
        return []
    return sorted(os.listdir(path))


def prepare(root: Path, *, modules: Path | None = None, fixups: Fixups | None = None) -> None:
    """Make a pulled tree ready to be many VMs' root: no shared host keys or machine-id,
    and the booting kernel's modules.

    Args:
        modules: a host directory ``.../<kernel version>`` copied to the guest's
            ``/lib/modules/<kernel version>`` (replacing one of that name), so udev
            can load the NIC and disk drivers the image's own tree does not have.
        fixups: the flatten's notes (a daemon that is not root): what is removed here
            is forgotten there.
    """
    for name in list_dir(root, "etc/ssh"):
        if name.startswith("ssh_host_"):
            remove(root, f"etc/ssh/{name}", fixups)
    remove(root, "etc/machine-id", fixups)
    machine_id = make_dirs(root, "etc") / "machine-id"
    machine_id.write_text("")  # systemd makes a fresh one per VM at first boot
    os.chmod(machine_id, 0o444)
    if modules is not None:
        dest_dir = make_dirs(root, "lib/modules")
        dest = dest_dir / modules.name
        if os.path.lexists(dest):
            if stat.S_ISDIR(os.lstat(dest).st_mode):
                shutil.rmtree(dest)
            else:
                os.unlink(dest)
            if fixups is not None:
                fixups.forget(str(dest.relative_to(root)))
        shutil.copytree(modules, dest, symlinks=True)
