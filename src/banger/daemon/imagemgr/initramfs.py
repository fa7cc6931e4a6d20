"""The built-in image's initramfs: BusyBox, four virtio drivers and a twenty-line /init.

Debian's cloud kernel has its virtio drivers as modules, so mounting the root disk
takes an initramfs. Debian's own (initramfs-tools) is a general one: 12 MB the kernel
decompresses, then scripts that probe, run hooks and load modules through kmod, a
second under TCG before the root is even mounted. A VM banger boots needs none of
that: its root is always ext4 on the first virtio disk. This one is a plain
(uncompressed) newc archive holding the guest's own static BusyBox, the drivers
:data:`BOOT_MODULES` name (and their dependencies, from the guest's ``modules.dep``)
and :data:`INIT`, which loads them, mounts the root and hands over to its init.

Pure functions; the image build calls :func:`build` on the debootstrapped tree.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from banger.errors import BadRequest

# What the initramfs loads: the virtio-mmio bus and the root disk's driver; the NIC's and
# the console port's too, so banger-init finds its NIC at once and banger-ident its port.
BOOT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console")

# Where a Debian root keeps the static BusyBox (package busybox-static).
BUSYBOX_PATHS = ("usr/bin/busybox", "bin/busybox")

# The initramfs's /init. It runs BusyBox applets by full path (the archive has no
# applet links), reads root=, rootfstype=, rootflags=, ro/rw and init= as the kernel
# would, waits at most 5 s for the root device, and on any failure says why on the
# console before the kernel panics (banger boots with panic=1: the VM stops, and `vm
# logs` shows the line).
INIT = r"""#!/bin/busybox sh
# banger's initramfs /init (written by banger): load the virtio drivers, mount the root.
bb=/bin/busybox
fail() { echo "banger initramfs: $*" > /dev/console; exit 1; }
$bb mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
$bb mount -t proc proc /proc || fail "cannot mount /proc"
while read -r m; do
  $bb insmod "/modules/$m" || fail "cannot load $m"
done < /modules/order
root=/dev/vda; fstype=ext4; flags=""; mode=rw; init=/sbin/init
read -r cmdline < /proc/cmdline
for a in $cmdline; do
  case "$a" in
    root=*) root=${a#root=} ;;
    rootfstype=*) fstype=${a#rootfstype=} ;;
    rootflags=*) flags=",${a#rootflags=}" ;;
    ro|rw) mode=$a ;;
    init=*) init=${a#init=} ;;
  esac
done
case "$root" in /dev/*) ;; *) fail "root=$root: only a device path (/dev/...) is supported" ;; esac
i=0
while [ ! -b "$root" ] && [ "$i" -lt 100 ]; do $bb sleep 0.05; i=$((i + 1)); done
[ -b "$root" ] || fail "no root device $root after 5 s"
$bb mount -t "$fstype" -o "$mode$flags" "$root" /root || fail "cannot mount $root ($fstype)"
$bb umount /proc
$bb mount --move /dev /root/dev || fail "cannot move /dev to the root"
exec $bb switch_root /root "$init"
"""

# Bounds on what is read from the root tree (it is banger's own build, but a module
# or a BusyBox this large is not one this archive should carry).
MODULE_MAX = 16 << 20
BUSYBOX_MAX = 16 << 20


@dataclass(frozen=True)
class Entry:
    """One member of a newc archive: a directory, a regular file or a character device."""

    name: str
    mode: int  # file type and permission bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def module_order(modules_dep: str, wanted: Iterable[str], builtin: str = "") -> list[str]:
    """The module files (paths as ``modules.dep`` gives them) to load, dependencies first.

    Args:
        modules_dep: the text of the kernel's ``modules.dep``.
        wanted: module names; ``-`` and ``_`` are the same, as for modprobe.
        builtin: the text of its ``modules.builtin``: wanted modules listed there are
            part of the kernel and need no loading.

    Raises:
        BadRequest: a wanted module (or a dependency) is neither in ``modules.dep`` nor
            built in.
    """
    built_in = {_module_name(line.strip()) for line in builtin.splitlines()}
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if not sep:
            continue
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    order: list[str] = []

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in order or path in chain:
            return
        if path not in deps:
            raise BadRequest(f"module {path} is a dependency but not in modules.dep")
        for dep in deps[path]:
            visit(dep, (*chain, path))
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in built_in:
            continue
        if key not in by_name:
            raise BadRequest(f"the kernel has no module {name}",
                             hint="the built-in image's kernel must have its virtio "
                                  "drivers as modules or built in")
        visit(by_name[key], ())
    return order


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """A module file as ``insmod`` takes it: decompressed when it is ``.ko.xz``/``.ko.gz``.

    Raises:
        BadRequest: it is compressed some other way, or larger than :data:`MODULE_MAX`.
    """
    raw = _read_bounded(path, MODULE_MAX)
    if path.name.endswith(".ko.xz"):
        data = lzma.LZMADecompressor().decompress(raw, MODULE_MAX + 1)
    elif path.name.endswith(".ko.gz"):
        data = gzip.GzipFile(fileobj=io.BytesIO(raw)).read(MODULE_MAX + 1)
    elif path.name.endswith(".ko"):
        data = raw
    else:
        raise BadRequest(f"module {path.name}: only .ko, .ko.xz and .ko.gz are supported")
    if len(data) > MODULE_MAX:
        raise BadRequest(f"module {path.name} is larger than {MODULE_MAX >> 20} MiB")
    return data


def is_static_elf(data: bytes) -> bool:
    """Whether ``data`` is a 64-bit little-endian ELF executable with no program
    interpreter (no ``PT_INTERP``): it runs with no libraries beside it."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < 4 or phoff + phentsize * phnum > len(data):
        return False
    pt_interp = 3
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp
               for i in range(phnum))


def entries(root: Path, kernel_version: str,
            modules: Iterable[str] = BOOT_MODULES) -> list[Entry]:
    """The initramfs's members, from a root tree with a static BusyBox and the kernel's
    modules under ``lib/modules/<kernel_version>``.

    Raises:
        BadRequest: no static BusyBox, no ``modules.dep``, or a module is missing.
    """
    busybox = _find_busybox(root)
    moddir = root / "lib" / "modules" / kernel_version
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        raise BadRequest(f"no {dep_file.relative_to(root)} in the image tree",
                         hint="the kernel package did not install its modules")
    builtin = moddir / "modules.builtin"
    order = module_order(dep_file.read_text(errors="replace"), modules,
                         builtin.read_text(errors="replace") if builtin.is_file() else "")
    out = [Entry(d, stat.S_IFDIR | 0o755) for d in ("bin", "dev", "modules", "proc", "root")]
    out += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
    ]
    names = []
    for rel in order:
        path = moddir / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise BadRequest(f"module file {rel} (from modules.dep) is not in the image tree")
        name = _module_name(rel) + ".ko"
        out.append(Entry(f"modules/{name}", stat.S_IFREG | 0o644, module_bytes(path)))
        names.append(name)
    out.append(Entry("modules/order", stat.S_IFREG | 0o644, "".join(
        f"{n}\n" for n in names).encode()))
    return out


def _find_busybox(root: Path) -> bytes:
    for rel in BUSYBOX_PATHS:
        path = root / rel
        if path.is_file():
            data = _read_bounded(path, BUSYBOX_MAX)
            if not is_static_elf(data):
                raise BadRequest(f"/{rel} in the image tree is not a static x86-64 binary",
                                 hint="the initramfs needs Debian's busybox-static")
            return data
    raise BadRequest("no busybox in the image tree", hint="install busybox-static")


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadRequest(f"{path.name} is larger than {limit >> 20} MiB")
    return data


def newc(members: Iterable[Entry]) -> bytes:
    """``members`` as an uncompressed newc (``070701``) cpio archive, trailer included.

    Every member is owned by root with mtime 0: the same tree gives the same bytes.
    """
    out = bytearray()
    for ino, e in enumerate([*members, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out += b"070701" + "".join(f"{x:08X}" for x in fields).encode() + name
        out += b"\0" * (-len(out) % 4)
        out += e.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build(root: Path, kernel_version: str, dest: Path) -> int:
    """Write the initramfs for the tree ``root`` to ``dest``; its size in bytes.

    Raises:
        BadRequest: see :func:`entries`.
    """
    data = newc(entries(root, kernel_version))
    dest.write_bytes(data)
    return len(data)
