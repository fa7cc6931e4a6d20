"""The kernel registry: import, build, list, remove, and picking a VM's boot files.

A kernel is an ELF ``vmlinux`` (Firecracker; QEMU too when it has a PVH entry)
and/or a ``bzImage`` (QEMU), optionally with an initrd, plus a manifest saying
which VMMs it suits. An image boots its own bundled kernel unless it names a
registry kernel (``image set-kernel`` / ``image register --kernel-name``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.daemon.imagemgr.kernel import (
    DEFAULT_SOURCE_TARBALL,
    build_kernel,
    cache_key,
    check_build_host,
    inspect_kernel_file,
)
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, KernelRecord, now
from banger.errors import AlreadyExists, BadRequest, HostError
from banger.fsutil import atomic_write, existing_file, move_aside, remove_tree
from banger.names import check_name
from banger.vmmuser import BOOT_FILE_MODE

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.kernels")

VMLINUX = "vmlinux"
BZIMAGE = "bzImage"
INITRD = "initrd.img"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path | None


def view(k: KernelRecord) -> dict[str, Any]:
    """``k`` as the JSON-ready dict the kernel RPCs return (``created_at`` in ISO 8601)."""
    return {"name": k.name, "vmlinux": k.vmlinux, "bzimage": k.bzimage, "initrd": k.initrd,
            "vmms": list(k.vmms), "version": k.version, "source": k.source,
            "size_bytes": k.size_bytes, "created_at": k.created_at.isoformat(),
            "origin": k.origin}


def refuse_taken(d: Daemon, name: str, instead: str = "") -> None:
    """Refuse a new kernel ``name`` when one is registered; the hint says to remove it,
    or ``instead``.

    Raises:
        AlreadyExists: kernel ``name`` exists.
    """
    if d.db.find_kernel(name) is not None:
        raise AlreadyExists(f"kernel {name!r} already exists",
                            hint=f"remove it first with `banger kernel rm {name}`"
                                 + (f", or {instead}" if instead else ""))


def import_files(d: Daemon, name: str, paths: list[str], initrd: str | None,
                 source: str = "imported", *, origin: str | None = None) -> dict[str, Any]:
    """Validate kernel files, copy them into the registry and record the kernel
    (``origin``: where a pulled kernel's bundle was read)."""
    check_name(name, "kernel")
    if not paths:
        raise BadRequest("give at least one kernel file (a vmlinux and/or a bzImage)")
    found: dict[str, tuple[Path, Any]] = {}
    for raw in paths:
        p = existing_file(raw, "kernel file")
        info = inspect_kernel_file(p)
        if info.kind in found:
            raise BadRequest(f"two {info.kind} files given ({found[info.kind][0]} and {p})",
                             hint="give at most one vmlinux and one bzImage")
        found[info.kind] = (p, info)
    initrd_p = existing_file(initrd, "--initrd") if initrd else None
    refuse_taken(d, name)
    staging = d.layout.staging_dir / f"kernel-{name}-{secrets.token_hex(4)}"
    final = d.layout.kernel_dir(name)
    try:
        staging.mkdir(parents=True)
        vmms: set[str] = set()
        versions = []
        files: dict[str, str | None] = {"vmlinux": None, "bzimage": None, "initrd": None}
        for kind, (p, info) in found.items():
            fname = VMLINUX if kind == "vmlinux" else BZIMAGE
            shutil.copy2(p, staging / fname)
            os.chmod(staging / fname, BOOT_FILE_MODE)
            files[kind] = str(final / fname)
            vmms.update(info.vmms)
            if info.version:
                versions.append(info.version)
        if initrd_p is not None:
            shutil.copy2(initrd_p, staging / INITRD)
            os.chmod(staging / INITRD, BOOT_FILE_MODE)
            files["initrd"] = str(final / INITRD)
        version = versions[0] if versions else None
        manifest = {"name": name, "vmms": sorted(vmms), "version": version,
                    "files": {k: Path(v).name for k, v in files.items() if v},
                    "source": source, "origin": origin}
        atomic_write(staging / "manifest.json", json.dumps(manifest, indent=1).encode(), 0o644)
        record = KernelRecord(
            name=name, vmlinux=files["vmlinux"], bzimage=files["bzimage"],
            initrd=files["initrd"], vmms=tuple(sorted(vmms)), version=version,
            source=source, origin=origin,
            size_bytes=sum(f.stat().st_size for f in staging.iterdir() if f.is_file()),
            created_at=now())
        with d.image_ops_mu:
            # Checked again under the lock: a concurrent import of the same name may
            # have registered meanwhile, and its files must not be touched.
            refuse_taken(d, name)
            debris = move_aside(final)  # left by a crashed import, never a registered one
            os.rename(staging, final)
            try:
                d.db.add_kernel(record)
            except BaseException:
                remove_tree(final)
                raise
    except BaseException:
        remove_tree(staging)
        raise
    if debris is not None:
        remove_tree(debris)
    log.info("kernel %s imported (%s)", name, ", ".join(record.vmms))
    return view(record)


def remove(d: Daemon, name: str) -> dict[str, Any]:
    """Unregister kernel ``name`` and remove its directory (refused while an image uses it)."""
    with d.image_ops_mu:
        d.db.delete_kernel(name)
        trash = move_aside(d.layout.kernel_dir(name))
    if trash is not None:
        remove_tree(trash)
    return {"deleted": name}


def list_kernels(d: Daemon) -> list[dict[str, Any]]:
    """Every registered kernel as a :func:`view` dict, sorted by name."""
    return [view(k) for k in d.db.list_kernels()]


def show(d: Daemon, name: str) -> dict[str, Any]:
    """Kernel ``name`` as a :func:`view` dict; NotFound when it is not registered."""
    return view(d.db.get_kernel(name))


def boot_files(d: Daemon, img: ImageRecord, vmm: str) -> BootFiles:
    """The kernel (and initrd) ``vmm`` should boot for ``img``, or a clear refusal."""
    if img.kernel_name:
        k = d.db.get_kernel(img.kernel_name)
        if vmm == "firecracker":
            if not k.vmlinux:
                raise BadRequest(f"kernel {k.name!r} has no vmlinux for Firecracker",
                                 hint="`banger kernel build` makes one that suits both VMMs")
            return BootFiles(Path(k.vmlinux), Path(k.initrd) if k.initrd else None)
        if k.bzimage:
            return BootFiles(Path(k.bzimage), Path(k.initrd) if k.initrd else None)
        if k.vmlinux and "qemu" in k.vmms:
            return BootFiles(Path(k.vmlinux), Path(k.initrd) if k.initrd else None)
        raise BadRequest(f"kernel {k.name!r} cannot boot under QEMU",
                         hint="import a bzImage, or a vmlinux with a PVH entry")
    own = BootFiles(Path(img.kernel), Path(img.initrd) if img.initrd else None)
    if vmm == "firecracker" and "firecracker" not in _own_vmms(img):
        raise BadRequest(
            f"image {img.name!r} bundles a kernel Firecracker cannot boot (it needs an ELF "
            "vmlinux)",
            hint=f"`banger kernel build`, then `banger image set-kernel {img.name} KERNEL`; "
                 "or use --vmm qemu")
    return own


def _own_vmms(img: ImageRecord) -> tuple[str, ...]:
    try:
        vmms: tuple[str, ...] = tuple(inspect_kernel_file(Path(img.kernel)).vmms)
    except (BadRequest, OSError):
        return ()
    return vmms


def suits(d: Daemon, img: ImageRecord | None, vmm: str) -> bool:
    """Whether ``img`` (None: a built-in image still to be built) can boot under ``vmm``."""
    if img is None:
        return vmm == "qemu"  # the built-in image bundles Debian's bzImage + initrd
    try:
        boot_files(d, img, vmm)
    except (BadRequest, HostError):
        return False
    return True


# ------------------------------------------------------------------ building

BUILD_STAGES = ["check", "unpack", "configure", "compile", "collect", "import"]


def given_base_config(path: str | None) -> Path | None:
    """The base config a build request names, checked now; None: the source's defconfig.

    Raises:
        BadRequest: the path is not an existing regular file. Never a fallback to the
            defconfig: a config the user named that is not there is a mistake to report.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise BadRequest(
            f"no base kernel config at {p}",
            hint="pass --base-config (or $BANGER_KERNEL_BASE_CONFIG) an existing kernel "
                 ".config, or neither to start from the kernel source's own "
                 "x86_64_defconfig")
    return p


def begin_build(d: Daemon, name: str, base_config: str | None, source: str | None,
                jobs: int | None) -> Operation:
    """Check the host now (clear errors at once), then build on a worker thread."""
    check_name(name, "kernel")
    refuse_taken(d, name)
    base = given_base_config(base_config)
    src = Path(source) if source else DEFAULT_SOURCE_TARBALL
    check_build_host(src)
    op = Operation(kind="kernel.build", target=name, stages=list(BUILD_STAGES))
    with d.image_ops_mu:
        if any(o.target == name for o in d.kernel_ops.active()):
            raise AlreadyExists(f"kernel {name!r} is already being built",
                                hint="wait for it, or pick another --name")
        op.enter("check")
        d.kernel_ops.add(op)
    return d.kernel_ops.run(op, lambda o: _build(d, o, name, base=base, src=src, jobs=jobs),
                            name=f"kernel-{name}")


def _complete_build(directory: Path) -> bool:
    """Whether a kernel build directory holds both boot files."""
    return (directory / VMLINUX).is_file() and (directory / BZIMAGE).is_file()


def _build(d: Daemon, op: Operation, name: str, *, base: Path | None, src: Path,
           jobs: int | None) -> dict[str, Any]:
    cached = d.layout.kernel_build_cache / cache_key(base, src)
    if not _complete_build(cached):
        work = d.layout.staging_dir / f"kbuild-{op.id}"

        def progress(stage: str, line: str) -> None:
            if stage != op.stage:
                op.enter(stage, line)
            else:
                op.report(line)

        built = build_kernel(d.runner, workdir=work, source_tarball=src, base_config=base,
                             jobs=jobs, on_progress=progress, cancel=op.cancel)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with d.image_ops_mu:
            # Another build of the same inputs may have finished first: keep its files
            # (an import may be reading them) and drop ours.
            if _complete_build(cached):
                leftover: Path | None = work  # ours alone: no need to move it first
            else:
                leftover = move_aside(cached)
                os.rename(work, cached)
        if leftover is not None:
            remove_tree(leftover)
        log.info("kernel %s built: %s (%s)", name, built.version, cached)
    else:
        log.info("kernel %s: reusing the build in %s", name, cached)
    op.enter("import")
    return import_files(d, name, [str(cached / VMLINUX), str(cached / BZIMAGE)], None,
                        source="built")
