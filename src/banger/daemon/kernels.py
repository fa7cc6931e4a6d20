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

from banger.daemon.store import ImageRecord, KernelRecord, now
from banger.errors import AlreadyExists, BadRequest, HostError
from banger.fsutil import atomic_write, remove_tree
from banger.names import check_name

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
    return {"name": k.name, "vmlinux": k.vmlinux, "bzimage": k.bzimage, "initrd": k.initrd,
            "vmms": list(k.vmms), "version": k.version, "source": k.source,
            "size_bytes": k.size_bytes, "created_at": k.created_at.isoformat()}


def import_files(d: Daemon, name: str, paths: list[str], initrd: str | None,
                 source: str = "imported") -> dict[str, Any]:
    """Validate kernel files, copy them into the registry and record the kernel."""
    check_name(name, "kernel")
    if not paths:
        raise BadRequest("give at least one kernel file (a vmlinux and/or a bzImage)")
    from banger.daemon.imagemgr.kernel import inspect_kernel_file

    found: dict[str, tuple[Path, Any]] = {}
    for raw in paths:
        p = Path(raw)
        if not p.is_absolute() or not p.is_file():
            raise BadRequest(f"{raw} is not an existing file (absolute path)")
        info = inspect_kernel_file(p)
        if info.kind in found:
            raise BadRequest(f"two {info.kind} files given ({found[info.kind][0]} and {p})",
                             hint="give at most one vmlinux and one bzImage")
        found[info.kind] = (p, info)
    initrd_p = Path(initrd) if initrd else None
    if initrd_p is not None and not initrd_p.is_file():
        raise BadRequest(f"--initrd {initrd} is not an existing file")
    if d.db.find_kernel(name) is not None:
        raise AlreadyExists(f"kernel {name!r} already exists",
                            hint=f"remove it first with `banger kernel rm {name}`")
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
            files[kind] = str(final / fname)
            vmms.update(info.vmms)
            if info.version:
                versions.append(info.version)
        if initrd_p is not None:
            shutil.copy2(initrd_p, staging / INITRD)
            files["initrd"] = str(final / INITRD)
        version = versions[0] if versions else None
        manifest = {"name": name, "vmms": sorted(vmms), "version": version,
                    "files": {k: Path(v).name for k, v in files.items() if v},
                    "source": source}
        atomic_write(staging / "manifest.json", json.dumps(manifest, indent=1).encode(), 0o644)
        record = KernelRecord(
            name=name, vmlinux=files["vmlinux"], bzimage=files["bzimage"],
            initrd=files["initrd"], vmms=tuple(sorted(vmms)), version=version,
            source=source,
            size_bytes=sum(f.stat().st_size for f in staging.iterdir() if f.is_file()),
            created_at=now())
        with d.image_ops_mu:
            remove_tree(final)
            os.rename(staging, final)
            try:
                d.db.add_kernel(record)
            except BaseException:
                remove_tree(final)
                raise
    except BaseException:
        remove_tree(staging)
        raise
    log.info("kernel %s imported (%s)", name, ", ".join(record.vmms))
    return view(record)


def remove(d: Daemon, name: str) -> dict[str, Any]:
    with d.image_ops_mu:
        d.db.delete_kernel(name)
        remove_tree(d.layout.kernel_dir(name))
    return {"deleted": name}


def list_kernels(d: Daemon) -> list[dict[str, Any]]:
    return [view(k) for k in d.db.list_kernels()]


def show(d: Daemon, name: str) -> dict[str, Any]:
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
    from banger.daemon.imagemgr.kernel import inspect_kernel_file

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
