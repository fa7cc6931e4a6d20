"""Guest kernels: inspecting a kernel file, and the recipe that builds banger's own.

Two jobs live here, both pure helpers that the daemon's kernel registry drives:

* :func:`inspect_kernel_file` tells what a user-supplied kernel file is (an ELF
  ``vmlinux`` or a ``bzImage``), which VMMs can boot it and which version it
  is. The file is untrusted: reads are bounded, offsets are checked against
  the file size, and anything that is not an x86_64 kernel is a
  :class:`~banger.errors.BadRequest`.
* :func:`build_kernel` builds a kernel from Debian's ``linux-source-6.1``
  tarball: the base config (by default the source tree's own
  ``make x86_64_defconfig``; any kernel config the caller names instead) with
  banger's own fragment (``kernel-fragment.config`` beside this module) merged
  on top by ``make olddefconfig`` (:func:`configure_tree`). Every fragment
  option is checked in the result, then ``vmlinux`` and ``bzImage`` are built.
  Everything is built in: the kernel needs neither modules nor an initrd
  (``root=/dev/vda``).

Why the tree's defconfig and not Debian's config (``/boot/config-*``): with
modules off every ``=m`` becomes built in, and Debian's config has thousands
of them (hours of compiling, a kernel of hundreds of MB); it also follows the
host's running kernel, not the source being built. The defconfig comes from
the very tree being built, so it always matches its version, needs no file
from outside banger and the source package, and makes the build reproducible
from its inputs (the cache key is source + fragment). What a generic PC
config adds that a microVM has no use for (GPU, sound, radio) the fragment
turns off.

What the built kernel needs from QEMU: ``-M microvm,pit=on,pic=on,rtc=on``
(ACPI left on, its default: the DSDT describes the virtio-mmio devices), or
the same with ``acpi=off``, in which case QEMU appends ``virtio_mmio.device=``
arguments itself and ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` picks them up. The
kernel command line is ``root=/dev/vda rw console=ttyS0`` plus banger's
``banger.*`` arguments and, under TCG, ``tsc_early_khz=`` (see
``banger.daemon.qemuproc.tcg_kernel_args``). ``-kernel`` may be the bzImage
or the vmlinux (PVH entry).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import re
import shutil
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from banger.errors import BadRequest, HostError
from banger.runner import CancelToken, Runner

KERNEL_RECIPE_VERSION = 1  # bump when the build procedure changes in a way the inputs do not show

FRAGMENT_PATH = Path(__file__).with_name("kernel-fragment.config")
SOURCE_PACKAGE = "linux-source-6.1"
DEFAULT_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# The make target that writes the source tree's own base config when the caller
# names none (see the module docstring for why this one).
DEFCONFIG_TARGET = "x86_64_defconfig"

# --- inspection -------------------------------------------------------------------------

# A kernel larger than this is not something banger will boot: a vmlinux with full
# DWARF debug info is ~500 MiB, a bzImage ~10-15 MiB.
MAX_KERNEL_BYTES = 2 << 30
# How much of a vmlinux's loadable segments we scan for the "Linux version" banner.
# The banner sits in .rodata, well inside the first 64 MiB of any real kernel.
BANNER_SCAN_BYTES = 256 << 20
SCAN_CHUNK = 1 << 20
MAX_PHNUM = 512  # real kernels have < 10 program headers; more is garbage
MAX_NOTE_BYTES = 1 << 16  # a kernel's PT_NOTE segment is a few hundred bytes

# x86 boot protocol (Documentation/x86/boot.rst): offsets in the bzImage header.
_SETUP_SECTS = 0x1F1
_SYSSIZE = 0x1F4
_BOOT_FLAG = 0x1FE
_HDRS = 0x202
_PROTOCOL = 0x206
_KERNEL_VERSION = 0x20E
_XLOADFLAGS = 0x236
_XLF_KERNEL_64 = 1 << 0  # "this kernel has the legacy 64-bit entry point at 0x200"

# ELF constants (System V ABI, elf.h).
_EM_X86_64 = 62
_ET_EXEC = 2
_PT_LOAD = 1
_PT_NOTE = 4
_ELF_TYPES = {1: "relocatable object", 3: "shared object or PIE program", 4: "core dump"}
# include/xen/interface/elfnote.h: the 32-bit physical PVH entry point. Its presence is
# what lets QEMU (and newer Firecracker) boot an uncompressed vmlinux directly.
_XEN_ELFNOTE_PHYS32_ENTRY = 18

_BANNER = re.compile(rb"Linux version (\d+\.\d+[0-9A-Za-z.+_~-]{0,60}) \(")
_VERSION = re.compile(r"^\d+\.\d+[0-9A-Za-z.+_~-]{0,60}$")


class KernelKind(enum.StrEnum):
    """The two kernel file formats banger boots."""

    VMLINUX = "vmlinux"  # an uncompressed x86_64 ELF executable
    BZIMAGE = "bzimage"  # the compressed image with the x86 boot-protocol header


@dataclass(frozen=True)
class KernelFileInfo:
    """What :func:`inspect_kernel_file` found.

    Attributes:
        path: The file inspected.
        kind: ``vmlinux`` or ``bzimage``.
        vmms: The VMM drivers that can boot it (``firecracker``, ``qemu``), sorted.
        version: The kernel release (``6.1.192-banger``) or None if not found.
        pvh: For a vmlinux, whether it carries the PVH entry note.
        size: File size in bytes.
    """

    path: Path
    kind: KernelKind
    vmms: tuple[str, ...]
    version: str | None
    pvh: bool
    size: int

    def suits(self, vmm: str) -> bool:
        """Whether the VMM driver named ``vmm`` can boot this kernel."""
        return vmm in self.vmms


def inspect_kernel_file(path: Path) -> KernelFileInfo:
    """Identify an x86_64 guest kernel file.

    A ``bzImage`` suits QEMU; an ELF ``vmlinux`` suits Firecracker, and QEMU too
    when it carries the PVH entry note (QEMU boots ELF kernels only that way).

    Args:
        path: The file to inspect (untrusted: any bytes at all).

    Returns:
        The kind, the VMMs that can boot it, its version if the file names one.

    Raises:
        BadRequest: not a regular readable file, not a kernel, not x86_64, or truncated.
    """
    try:
        # O_NONBLOCK: a FIFO must not hang us; it is refused below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"cannot read kernel {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"kernel {path} is not a regular file")
        if st.st_size > MAX_KERNEL_BYTES:
            raise BadRequest(f"kernel {path} is {st.st_size} bytes, larger than any "
                             f"kernel banger boots ({MAX_KERNEL_BYTES} bytes)")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return _inspect(fh, st.st_size, path)
    except OSError as exc:
        raise BadRequest(f"cannot read kernel {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _inspect(fh: BinaryIO, size: int, path: Path) -> KernelFileInfo:
    head = _read_at(fh, 0, 0x400)
    if head[:4] == b"\x7fELF":
        return _inspect_elf(fh, size, path, head)
    if len(head) >= _HDRS + 4 and head[_HDRS:_HDRS + 4] == b"HdrS":
        return _inspect_bzimage(fh, size, path, head)
    raise BadRequest(
        f"{path} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)",
        hint="give the uncompressed vmlinux or the bzImage/vmlinuz from a kernel build")


def _read_at(fh: BinaryIO, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def _inspect_bzimage(fh: BinaryIO, size: int, path: Path, head: bytes) -> KernelFileInfo:
    if len(head) < _XLOADFLAGS + 2:
        raise BadRequest(f"{path}: bzImage header is truncated ({size} bytes)")
    protocol = struct.unpack_from("<H", head, _PROTOCOL)[0]
    if protocol < 0x20C or not struct.unpack_from("<H", head, _XLOADFLAGS)[0] & _XLF_KERNEL_64:
        # Boot protocol 2.12 added xloadflags; an older or 32-bit-only image cannot run
        # banger's x86_64 userland.
        raise BadRequest(f"{path} is not an x86_64 kernel (a 32-bit or pre-3.8 bzImage)")
    setup_sects = head[_SETUP_SECTS] or 4  # 0 means 4, for historical reasons
    syssize = struct.unpack_from("<I", head, _SYSSIZE)[0]  # in 16-byte paragraphs
    expected = (setup_sects + 1) * 512 + syssize * 16
    if size < expected:
        raise BadRequest(f"{path}: bzImage is truncated ({size} of {expected} bytes)")
    version = None
    ptr = struct.unpack_from("<H", head, _KERNEL_VERSION)[0]
    if ptr:
        # The pointer is relative to the start of the real-mode setup (offset 0x200).
        raw = _read_at(fh, ptr + 0x200, 256)
        version = _version_token(raw.split(b"\0", 1)[0])
    return KernelFileInfo(path=path, kind=KernelKind.BZIMAGE, vmms=("qemu",),
                          version=version, pvh=False, size=size)


def _version_token(raw: bytes) -> str | None:
    first = raw.decode("ascii", errors="replace").split(" ", 1)[0]
    return first if _VERSION.match(first) else None


@dataclass(frozen=True)
class _Segment:
    type: int
    offset: int
    filesz: int


def _inspect_elf(fh: BinaryIO, size: int, path: Path, head: bytes) -> KernelFileInfo:
    if len(head) < 64:
        raise BadRequest(f"{path}: ELF header is truncated ({size} bytes)")
    if head[4] != 2 or head[5] != 1:
        raise BadRequest(f"{path} is not an x86_64 kernel (not a 64-bit little-endian ELF)")
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    if e_machine != _EM_X86_64:
        raise BadRequest(f"{path} is not an x86_64 kernel (ELF machine {e_machine})")
    if e_type != _ET_EXEC:
        what = _ELF_TYPES.get(e_type, f"ELF type {e_type}")
        raise BadRequest(f"{path} is not a kernel: an ELF {what}, not an executable")
    e_phoff = struct.unpack_from("<Q", head, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    # ELF64 program headers are 56 bytes; allow padding, not a gigabyte-sized table.
    if e_phnum == 0 or e_phnum > MAX_PHNUM or not 56 <= e_phentsize <= 1024:
        raise BadRequest(f"{path} is not a kernel: bad ELF program headers "
                         f"({e_phnum} of {e_phentsize} bytes)")
    if e_phoff + e_phnum * e_phentsize > size:
        raise BadRequest(f"{path}: ELF program headers run past the end of the file "
                         "(truncated)")
    table = _read_at(fh, e_phoff, e_phnum * e_phentsize)
    segments = []
    for i in range(e_phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", table, i * e_phentsize)
        p_filesz = struct.unpack_from("<Q", table, i * e_phentsize + 32)[0]
        if p_type in (_PT_LOAD, _PT_NOTE):
            if p_offset + p_filesz > size:
                raise BadRequest(f"{path}: ELF segment {i} runs past the end of the file "
                                 "(truncated)")
            segments.append(_Segment(p_type, p_offset, p_filesz))
    if not any(s.type == _PT_LOAD for s in segments):
        raise BadRequest(f"{path} is not a kernel: an ELF with nothing to load")
    pvh = any(_has_pvh_note(_read_at(fh, s.offset, min(s.filesz, MAX_NOTE_BYTES)))
              for s in segments if s.type == _PT_NOTE)
    version = _find_banner(fh, [s for s in segments if s.type == _PT_LOAD])
    vmms = ("firecracker", "qemu") if pvh else ("firecracker",)
    return KernelFileInfo(path=path, kind=KernelKind.VMLINUX, vmms=vmms, version=version,
                          pvh=pvh, size=size)


def _iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each ELF note in ``data``; stops at the first malformed one."""
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if end > len(data):
            return
        yield data[name_at:name_at + namesz], ntype, data[desc_at:desc_at + descsz]
        pos = end


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _has_pvh_note(data: bytes) -> bool:
    return any(name.rstrip(b"\0") == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY
               and len(desc) >= 4 for name, ntype, desc in _iter_notes(data))


def _find_banner(fh: BinaryIO, loads: Sequence[_Segment]) -> str | None:
    budget = BANNER_SCAN_BYTES
    overlap = 128  # a banner split across two chunks is still found
    for seg in loads:
        pos, end = seg.offset, seg.offset + seg.filesz
        carry = b""
        while pos < end and budget > 0:
            n = min(SCAN_CHUNK, end - pos, budget)
            chunk = carry + _read_at(fh, pos, n)
            if len(chunk) == len(carry):
                break
            match = _BANNER.search(chunk)
            if match:
                return match.group(1).decode("ascii")
            carry = chunk[-overlap:]
            pos += n
            budget -= n
    return None


# --- the fragment and config checking ---------------------------------------------------

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str | None]:
    """A kernel ``.config`` (or fragment) as ``{symbol: value}``.

    ``# CONFIG_X is not set`` maps to None. A later line for the same symbol wins,
    as it does in Kconfig, which is what lets a fragment appended to a base config
    override it.

    Args:
        text: The config text.

    Returns:
        Symbol (with its ``CONFIG_`` prefix) to raw value (quotes kept) or None.
    """
    out: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            out[m.group(1)] = None
    return out


def load_fragment(path: Path = FRAGMENT_PATH) -> str:
    """The text of banger's kernel config fragment."""
    return path.read_text()


def merge_fragment(base: str, fragment: str) -> str:
    """The base config with the fragment appended (later lines override, see :func:`parse_config`).

    ``make olddefconfig`` then resolves dependencies; :func:`config_mismatches`
    tells which fragment options did not survive that.
    """
    return base.rstrip("\n") + "\n\n# --- banger kernel fragment ---\n" + fragment


@dataclass(frozen=True)
class Mismatch:
    """One fragment option the final config does not honour."""

    symbol: str
    wanted: str | None  # None: "is not set"
    got: str | None

    def __str__(self) -> str:
        return f"{self.symbol}: wanted {_show(self.wanted)}, got {_show(self.got)}"


def _show(value: str | None) -> str:
    return "not set" if value is None else value


def config_mismatches(fragment: Mapping[str, str | None],
                      config: Mapping[str, str | None]) -> list[Mismatch]:
    """The fragment options the final config does not have as asked.

    ``is not set``, ``=n`` and a symbol missing from the config all mean "off":
    Kconfig omits symbols whose dependencies are off, and that is still "off".

    Args:
        fragment: The parsed fragment (:func:`parse_config`).
        config: The parsed final ``.config``.

    Returns:
        One :class:`Mismatch` per option that did not survive, in fragment order.
    """
    out = []
    for symbol, wanted in fragment.items():
        got = config.get(symbol)
        if _off(wanted) and _off(got):
            continue
        if wanted != got:
            out.append(Mismatch(symbol, wanted, got))
    return out


def _off(value: str | None) -> bool:
    return value is None or value == "n"


def verify_config(fragment_text: str, config_text: str) -> None:
    """Fail unless every fragment option is in the final config.

    Raises:
        BadRequest: naming every option ``make olddefconfig`` dropped or changed
            (usually a dependency the base config lacks, or a kernel source of a
            different version).
    """
    bad = config_mismatches(parse_config(fragment_text), parse_config(config_text))
    if bad:
        raise BadRequest(
            "the kernel config lost options banger's fragment asks for: "
            + "; ".join(str(m) for m in bad),
            hint="the base config or kernel source does not support them; use "
                 f"{SOURCE_PACKAGE} with its own {DEFCONFIG_TARGET} (no --base-config), "
                 "or fix the fragment",
            options=[m.symbol for m in bad])


# --- host requirements ------------------------------------------------------------------

# Executable -> Debian package: the minimal set for this config on bookworm. Not
# needed: pahole (no BTF), libssl-dev (with no keyrings and no module signing no
# host program links libcrypto: the build's HOSTCC list has no extract-cert or
# sign-file), cpio (no in-kernel headers), kmod (no modules), pkg-config (Kbuild
# falls back to -lelf).
_TOOL_PACKAGES: dict[str, str] = {
    "make": "make", "gcc": "gcc", "ld": "binutils", "bc": "bc", "bison": "bison",
    "flex": "flex", "perl": "perl", "tar": "tar", "xz": "xz-utils", "gzip": "gzip",
}
# objtool (stack validation, built on the host for every x86_64 kernel) links libelf.
_HEADER_PACKAGES: dict[str, str] = {"libelf.h": "libelf-dev", "gelf.h": "libelf-dev"}


def required_build_tools() -> list[str]:
    """Executables :func:`build_kernel` runs (besides a C library and libelf headers)."""
    return list(_TOOL_PACKAGES)


def build_packages() -> list[str]:
    """Every Debian package the build needs, for an ``apt-get install`` line."""
    return sorted({*_TOOL_PACKAGES.values(), *_HEADER_PACKAGES.values(), SOURCE_PACKAGE})


def check_build_host(source_tarball: Path = DEFAULT_SOURCE_TARBALL, *,
                     which: Callable[[str], str | None] = shutil.which,
                     include_dir: Path = Path("/usr/include")) -> None:
    """Fail clearly when the host cannot build a kernel.

    Args:
        source_tarball: The kernel source tarball the build will unpack.
        which: Tool lookup (a seam for tests).
        include_dir: Where system headers live (a seam for tests).

    Raises:
        HostError: naming what is missing, with the ``apt-get install`` line that fixes it.
    """
    missing: list[str] = []
    packages: list[str] = []
    for tool, pkg in _TOOL_PACKAGES.items():
        if which(tool) is None:
            missing.append(tool)
            packages.append(pkg)
    for header, pkg in _HEADER_PACKAGES.items():
        if not (include_dir / header).is_file():
            missing.append(str(include_dir / header))
            packages.append(pkg)
    if not source_tarball.is_file():
        missing.append(str(source_tarball))
        if source_tarball == DEFAULT_SOURCE_TARBALL:
            packages.append(SOURCE_PACKAGE)
    if missing:
        pkgs = " ".join(dict.fromkeys(packages))
        hint = (f"apt-get install -y --no-install-recommends {pkgs}" if pkgs
                else f"put a kernel source tarball at {source_tarball}")
        raise HostError(f"cannot build a kernel here, missing: {', '.join(missing)}",
                        hint=hint, missing=missing)


def cache_key(base_config: Path | None, source_tarball: Path,
              fragment: Path = FRAGMENT_PATH) -> str:
    """A hash naming one build: recipe version, base config, fragment and source bytes.

    Callers keep built kernels under a directory of this name and reuse them when
    the key matches. The compiler version is deliberately not part of it.
    ``base_config`` None stands for the source's own :data:`DEFCONFIG_TARGET`,
    which the source bytes already determine.
    """
    h = hashlib.sha256(f"banger-kernel-{KERNEL_RECIPE_VERSION}\n".encode())
    if base_config is None:
        h.update(f"make {DEFCONFIG_TARGET}\n".encode())
    for p in (*([base_config] if base_config is not None else []), fragment, source_tarball):
        h.update(f"{p.name}\n".encode())
        try:
            with p.open("rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        except OSError as exc:
            raise HostError(f"cannot read kernel build input {p}: {exc.strerror}") from exc
    return h.hexdigest()[:16]


# --- the build --------------------------------------------------------------------------

STAGES = ("unpack", "configure", "compile", "collect")

# Budgets. Measured on this project's test host (2 cores shared with other work,
# load ~4, make -j2): unpack 20 s, olddefconfig 5 s, compile 21.5 min (22 min in
# all). Each budget leaves ~8-30x headroom for a slower or busier host while
# still ending a wedged command.
UNPACK_TIMEOUT_S = 10 * 60.0
CONFIGURE_TIMEOUT_S = 5 * 60.0
COMPILE_TIMEOUT_S = 3 * 3600.0

# Kbuild's short output: "  CC      kernel/fork.o" (also CC [M], AS, LD, AR, ...).
_KBUILD_STEP = re.compile(r"^\s{2}(CC|AS|LD|AR|HOSTCC|HOSTLD|OBJCOPY|GEN)\b")

Progress = Callable[[str, str], None]
"""``on_progress(stage, line)``: ``stage`` is one of :data:`STAGES`."""


@dataclass(frozen=True)
class BuiltKernel:
    """The outputs of :func:`build_kernel`, all inside its workdir.

    Attributes:
        vmlinux: The uncompressed ELF kernel (Firecracker; QEMU through PVH).
        bzimage: The compressed bzImage (QEMU).
        version: The kernel release, what ``uname -r`` prints in the guest.
        config: The final ``.config`` the kernel was built with.
        log: Everything the build printed.
    """

    vmlinux: Path
    bzimage: Path
    version: str
    config: Path
    log: Path


def build_kernel(runner: Runner, *, workdir: Path, source_tarball: Path,
                 base_config: Path | None = None, jobs: int | None = None,
                 on_progress: Progress | None = None, cancel: CancelToken | None = None,
                 fragment: Path = FRAGMENT_PATH) -> BuiltKernel:
    """Build banger's guest kernel (``vmlinux`` and ``bzImage``).

    Unpacks the source into ``workdir/src``, configures it (:func:`configure_tree`:
    base config plus fragment, ``make olddefconfig``, every fragment option
    checked), builds, and leaves ``vmlinux``, ``bzImage``,
    ``config`` and ``build.log`` in ``workdir`` (the source tree is removed). On
    any failure, cancellation included, ``workdir`` is removed entirely.

    Args:
        runner: The subprocess chokepoint.
        workdir: A directory that does not exist yet or is empty.
        source_tarball: A kernel source tarball (``linux-source-6.1.tar.xz``).
        base_config: The config to start from (read as data, never modified);
            None: the source tree's own ``make x86_64_defconfig``.
        jobs: ``make -j`` value; defaults to the CPU count.
        on_progress: Called with (stage, line) at each stage and each Kbuild step
            (``"412 steps: CC kernel/fork.o"``); during ``make`` it runs on the
            runner's output thread, so it must be quick and thread-safe.
        cancel: Cancels the build between and during commands.
        fragment: The fragment merged on top of ``base_config``.

    Returns:
        The built kernel's files and version.

    Raises:
        HostError: tools or source missing (see :func:`check_build_host`), or a
            build command failed (``CommandFailed``/``CommandTimeout``).
        BadRequest: the base config is not a kernel config, or the merged config
            lost fragment options.
        Cancelled: ``cancel`` fired.
    """
    check_build_host(source_tarball)
    if workdir.exists() and any(workdir.iterdir()):
        raise BadRequest(f"kernel build directory {workdir} is not empty")
    base_text = _read_config(base_config) if base_config is not None else None
    fragment_text = fragment.read_text()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _build(runner, workdir=workdir, tarball=source_tarball, base_text=base_text,
                      fragment_text=fragment_text, jobs=jobs or os.cpu_count() or 1,
                      on_progress=on_progress or _no_progress,
                      cancel=cancel or CancelToken())
    except BaseException:
        # Half a kernel tree is ~1.5 GB of nothing useful; the error carries the log tail.
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _no_progress(stage: str, line: str) -> None:
    pass


def _read_config(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(4 << 20)  # real configs are ~100-300 KiB
    except OSError as exc:
        raise BadRequest(f"cannot read base kernel config {path}: {exc.strerror}") from exc
    text = raw.decode("utf-8", errors="replace")
    if not parse_config(text):
        raise BadRequest(f"{path} is not a kernel config (no CONFIG_ lines)")
    return text


class _Log:
    """build.log plus progress lines: one writer shared by every stage's stream."""

    def __init__(self, path: Path, on_progress: Progress) -> None:
        self._fh = path.open("a", encoding="utf-8")
        self._on_progress = on_progress
        self._mu = threading.Lock()  # stream's reader thread and this thread both write
        self.steps = 0
        self.stage = ""

    def enter(self, stage: str, line: str) -> None:
        self.stage = stage
        self.write(f"== {stage}: {line}")
        self._on_progress(stage, line)

    def write(self, line: str) -> None:
        with self._mu:
            self._fh.write(line + "\n")

    def make_line(self, line: str) -> None:
        self.write(line)
        if _KBUILD_STEP.match(line):
            self.steps += 1
            self._on_progress(self.stage, f"{self.steps} steps: {line.strip()}")

    def close(self) -> None:
        with self._mu:
            self._fh.close()


def _build(runner: Runner, *, workdir: Path, tarball: Path, base_text: str | None,
           fragment_text: str, jobs: int, on_progress: Progress,
           cancel: CancelToken) -> BuiltKernel:
    log = _Log(workdir / "build.log", on_progress)
    try:
        cancel.check()
        src_parent = workdir / "src"
        src_parent.mkdir()
        log.enter("unpack", f"unpacking {tarball.name}")
        runner.stream(["tar", "-xf", str(tarball), "-C", str(src_parent)],
                      desc=f"unpack {tarball.name}", on_line=log.write,
                      timeout=UNPACK_TIMEOUT_S, cancel=cancel)
        src = _source_root(src_parent)

        cancel.check()
        base = "the given base config" if base_text is not None else DEFCONFIG_TARGET
        log.enter("configure", f"merging banger's fragment into {base}")
        configure_tree(runner, src, base_text=base_text, fragment_text=fragment_text,
                       on_line=log.write, cancel=cancel)

        cancel.check()
        log.enter("compile", f"make -j{jobs} vmlinux bzImage")
        runner.stream(["make", "-C", str(src), f"-j{jobs}", "vmlinux", "bzImage"],
                      desc="build the kernel", on_line=log.make_line,
                      timeout=COMPILE_TIMEOUT_S, env=_MAKE_ENV, cancel=cancel)

        cancel.check()
        log.enter("collect", "collecting vmlinux, bzImage and config")
        version = _release(src)
        out = BuiltKernel(vmlinux=workdir / "vmlinux", bzimage=workdir / "bzImage",
                          version=version, config=workdir / "config",
                          log=workdir / "build.log")
        os.replace(src / "vmlinux", out.vmlinux)
        os.replace(src / "arch/x86/boot/bzImage", out.bzimage)
        os.replace(src / ".config", out.config)
        for kernel in (out.vmlinux, out.bzimage):
            info = inspect_kernel_file(kernel)
            if info.version != version:
                raise BadRequest(f"built {kernel.name} reports version {info.version!r}, "
                                 f"expected {version!r}")
        log.write(f"== done: {version}")
    finally:
        log.close()
    shutil.rmtree(src_parent)
    return out


def _no_line(line: str) -> None:
    pass


def configure_tree(runner: Runner, src: Path, *, base_text: str | None, fragment_text: str,
                   on_line: Callable[[str], None] = _no_line,
                   cancel: CancelToken | None = None) -> str:
    """Write ``src/.config``: a base config with banger's fragment, resolved by Kconfig.

    The base is ``base_text`` or, when None, what the tree's own
    ``make x86_64_defconfig`` writes. The fragment is appended to it (a later line
    wins, see :func:`merge_fragment`), ``make olddefconfig`` resolves every
    dependency, and the result must still hold every fragment option.

    Args:
        runner: The subprocess chokepoint.
        src: A kernel source tree (its top-level ``Makefile`` and Kconfig files).
        base_text: The base config's text; None for the tree's defconfig.
        fragment_text: banger's fragment (:func:`load_fragment`).
        on_line: Receives every line ``make`` prints.
        cancel: Cancels a running ``make``.

    Returns:
        The final ``.config`` text (also left in ``src/.config``).

    Raises:
        BadRequest: the defconfig is not a kernel config, or the final config lost
            fragment options (:func:`verify_config`).
        HostError: a ``make`` failed or timed out.
    """
    make = ["make", "-C", str(src)]
    if base_text is None:
        runner.stream([*make, DEFCONFIG_TARGET], desc=f"make {DEFCONFIG_TARGET}",
                      on_line=on_line, timeout=CONFIGURE_TIMEOUT_S, env=_MAKE_ENV,
                      cancel=cancel)
        base_text = _read_config(src / ".config")
    (src / ".config").write_text(merge_fragment(base_text, fragment_text))
    runner.stream([*make, "olddefconfig"], desc="make olddefconfig", on_line=on_line,
                  timeout=CONFIGURE_TIMEOUT_S, env=_MAKE_ENV, cancel=cancel)
    final = (src / ".config").read_text()
    verify_config(fragment_text, final)
    return final


# LOCALVERSION set (even empty) stops setlocalversion from appending "+" when the tree
# happens to sit inside some git checkout; the release comes from CONFIG_LOCALVERSION.
_MAKE_ENV: Mapping[str, str] = {
    "LOCALVERSION": "",
    "KBUILD_BUILD_USER": "banger",
    "KBUILD_BUILD_HOST": "banger",
}


def _source_root(parent: Path) -> Path:
    """The one top-level directory a kernel source tarball unpacks to."""
    dirs = [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink()]
    if len(dirs) != 1 or not (dirs[0] / "Makefile").is_file():
        raise BadRequest(f"the kernel source tarball did not unpack to one kernel tree "
                         f"(found {sorted(p.name for p in dirs)})")
    return dirs[0]


def _release(src: Path) -> str:
    path = src / "include/config/kernel.release"
    try:
        with path.open("rb") as fh:
            release = fh.read(256).decode("ascii", errors="replace").strip()
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise HostError(f"the kernel build left no {path}") from exc
        raise HostError(f"cannot read {path}: {exc.strerror}") from exc
    if not _VERSION.match(release):
        raise HostError(f"the kernel build reports a strange release {release!r}")
    return release

