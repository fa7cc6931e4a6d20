"""The image registry: build the built-in image, register your own, list, delete.

Builds and registrations happen in a staging directory; only the final
rename and store insert run under ``image_ops_mu``, so a slow debootstrap never
blocks ``image list`` or an unrelated ``image delete``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from banger.api import ImageView
from banger.daemon import bootsnap
from banger.daemon.buildns import BuildNamespace
from banger.daemon.dmsnap import clone_or_copy
from banger.daemon.imagemgr import (
    BUILTIN_RECIPES,
    Recipe,
    debugfs_script,
    finalize_tree,
    find_kernel,
    guest_agent_files,
    initramfs,
    injected_dirs,
    install_files,
    recipe_for,
    rootfs_size,
    tree_size,
    write_files,
)
from banger.daemon.imagemgr.kernel import inspect_kernel_file
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord, now
from banger.daemon.vms import user_vms
from banger.errors import AlreadyExists, BadRequest, NotFound
from banger.fsutil import existing_file, move_aside, remove_tree
from banger.names import check_name
from banger.runner import Runner
from banger.vmmuser import BOOT_FILE_MODE

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.images")

BUILD_STAGES = ["debootstrap", "configure", "kernel", "rootfs", "publish"]
EXT4_MAGIC_OFFSET = 1080  # superblock at 1024 + s_magic at 0x38 (ext4 disk layout)
EXT4_MAGIC = b"\x53\xef"


def view(img: ImageRecord) -> dict[str, Any]:
    """``img`` as the JSON-ready :class:`ImageView` the RPC returns."""
    return ImageView(
        name=img.name, source=img.source, rootfs=img.rootfs, kernel=img.kernel,
        initrd=img.initrd, size_bytes=img.size_bytes, created_at=img.created_at,
        recipe_hash=img.recipe_hash, kernel_name=img.kernel_name, origin=img.origin,
    ).model_dump(mode="json")


def set_kernel(d: Daemon, name: str, kernel_name: str | None) -> dict[str, Any]:
    """Make ``name`` boot the registry kernel ``kernel_name`` (None: its own again)."""
    with d.image_ops_mu:
        return view(d.db.set_image_kernel(name, kernel_name))


def recipe_or_missing(name: str) -> Recipe:
    """The built-in recipe for a missing image, or a not-found error with a hint."""
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name]
    raise NotFound(
        f"no image named {name!r}",
        hint=f"build the default with `banger image build`, or register one with "
             f"`banger image register --name {name} --rootfs ... --kernel ...`",
    )


def ensure_image(d: Daemon, name: str, op: Operation) -> ImageRecord:
    """The image, building it first when it is a missing built-in one."""
    img = d.db.find_image(name)
    if img is not None:
        return img
    recipe_or_missing(name)
    build_op = begin_build(d, name, join_existing=True)
    while not build_op.wait(0.5):
        if op.cancel.cancelled:
            # The build may be shared with other creates; it carries on without us.
            op.cancel.check()
        op.report(f"building image {name}: {build_op.stage} {build_op.progress}".strip())
    if build_op.error is not None:
        raise build_op.error
    return d.db.get_image(name)


def begin_build(d: Daemon, name: str, *, join_existing: bool = False) -> Operation:
    """Start building the built-in image ``name`` in the background.

    Args:
        join_existing: return a build of ``name`` already in progress instead of
            refusing (used when a VM create needs the image).

    Returns:
        The build operation (stages: ``BUILD_STAGES``).

    Raises:
        BadRequest: ``name`` is not a valid image name.
        NotFound: there is no built-in recipe called ``name``.
        AlreadyExists: the image exists, or is being built and ``join_existing`` is false.
    """
    check_name(name, "image")
    recipe = recipe_for(name)
    with d.image_ops_mu:
        for existing in d.image_ops.active():
            if existing.target == name and existing.kind != "image.export":
                if join_existing:
                    return existing
                raise AlreadyExists(f"image {name!r} is already being built",
                                    hint=f"follow it with `banger image build {name}` later")
        refuse_taken(d, name)
        op = Operation(kind="image.build", target=name, stages=list(BUILD_STAGES))
        builder = d.seams.image_build or build
        return d.image_ops.run(op, lambda o: builder(d, recipe, o), name=f"build-{name}")


_DEBOOTSTRAP_STEP = re.compile(r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring|"
                               r"Installing|Checking|Resolving|Found|Base system)")


def build(d: Daemon, recipe: Recipe, op: Operation) -> dict[str, Any]:
    """debootstrap -> configure -> kernel -> mkfs.ext4 -d -> publish.

    A daemon that is not root builds in a namespace of its own (:mod:`.buildns`), where
    it is root with its user's subordinate ids; the tree is read, made into the ext4
    and removed from inside it.
    """
    if os.geteuid() == 0:
        return _build(d, recipe, op, runner=d.runner, remove=remove_tree,
                      debootstrap_prefix=[])
    with BuildNamespace(d.host) as ns:
        runner = ns.runner(d.runner)
        # No mknod in a user namespace: debootstrap binds the host's /dev nodes instead.
        return _build(d, recipe, op, runner=runner, remove=lambda p: ns.remove(runner, p),
                      debootstrap_prefix=["env", "container=lxc"])


def _build(d: Daemon, recipe: Recipe, op: Operation, *, runner: Runner,
           remove: Callable[[Path], None], debootstrap_prefix: list[str]) -> dict[str, Any]:
    staging = d.layout.staging_dir / f"{recipe.name}-{op.id}"
    root = staging / "rootfs"
    try:
        staging.mkdir(parents=True)
        op.enter("debootstrap", "starting")
        write_files(root, recipe.preseed_files)
        d.layout.debootstrap_cache.mkdir(parents=True, exist_ok=True)
        counter = {"n": 0}

        def progress(line: str) -> None:
            if _DEBOOTSTRAP_STEP.match(line):
                counter["n"] += 1
                op.report(f"[{counter['n']}] {line[3:][:80]}")

        runner.stream(
            [*debootstrap_prefix,
             *recipe.debootstrap_argv(root, d.cfg.debian_mirror, d.layout.debootstrap_cache)],
            desc=f"debootstrap {recipe.suite}", on_line=progress, timeout=3600,
            cancel=op.cancel,
        )
        op.enter("configure")
        install_files(root, recipe.files(), recipe.masked())
        finalize_tree(root, staging / "workseed")
        op.enter("kernel")
        kernel, version = find_kernel(root)
        shutil.copy2(kernel, staging / "vmlinuz")
        op.report("banger's initramfs")
        initramfs.build(root, version, staging / "initrd.img")
        op.enter("rootfs", "mkfs.ext4")
        size = rootfs_size(tree_size(root))
        runner.run(
            ["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-d", str(root),
             str(staging / "rootfs.ext4"), f"{size // 1024}k"],
            desc="make the image root file system", timeout=1800,
        )
        remove(root)
        op.enter("publish")
        return publish(d, recipe.name, staging, source="built", recipe_hash=recipe.digest())
    except BaseException:
        remove(staging)
        raise


def refuse_taken(d: Daemon, name: str, instead: str = "") -> None:
    """Refuse a new image ``name`` when one is registered; the hint says to delete it,
    or ``instead`` (e.g. "pull under another --name").

    Raises:
        AlreadyExists: image ``name`` exists.
    """
    if d.db.find_image(name) is not None:
        raise AlreadyExists(f"image {name!r} already exists",
                            hint=f"delete it first with `banger image delete {name}`"
                                 + (f", or {instead}" if instead else ""))


def publish(d: Daemon, name: str, staging: Path, *, source: str, recipe_hash: str | None,
            kernel_name: str | None = None, origin: str | None = None,
            blobs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Move a finished staging dir into the registry and record it (under image_ops_mu).

    The record names what the dir holds: ``rootfs.ext4``, and ``vmlinuz``,
    ``initrd.img`` and ``workseed/`` where present.
    """
    final = d.layout.image_dir(name)
    with d.image_ops_mu:
        refuse_taken(d, name, "make it under another name")
        for boot_file in (staging / "vmlinuz", staging / "initrd.img"):
            if boot_file.is_file():  # the unprivileged VMM user reads them
                os.chmod(boot_file, BOOT_FILE_MODE)
        debris = move_aside(final)  # left by a crashed publish; never a registered image
        os.rename(staging, final)
        kernel, initrd, workseed = final / "vmlinuz", final / "initrd.img", final / "workseed"
        img = ImageRecord(
            name=name, source=source, rootfs=str(final / "rootfs.ext4"),
            kernel=str(kernel) if kernel.is_file() else "",
            initrd=str(initrd) if initrd.is_file() else None,
            workseed=str(workseed) if workseed.is_dir() else None,
            size_bytes=sum(f.stat().st_size for f in final.iterdir() if f.is_file()),
            recipe_hash=recipe_hash, created_at=now(), kernel_name=kernel_name,
            origin=origin, blobs=blobs,
        )
        try:
            d.db.add_image(img)
        except BaseException:
            remove_tree(final)
            raise
    if debris is not None:
        remove_tree(debris)
    log.info("image %s published (%s)", name, source)
    return view(img)


def register(d: Daemon, name: str, rootfs: str, kernel: str | None, initrd: str | None,
             *, kernel_name: str | None = None) -> dict[str, Any]:
    """Copy a user's rootfs (and kernel/initrd) into the registry, adding banger's guest agent.

    The kernel is either bundled (``kernel``, copied like the rootfs) or a registry
    kernel named by ``kernel_name``; at least one is required.
    """
    check_name(name, "image")
    rootfs_p = existing_file(rootfs, "--rootfs")
    if not kernel and not kernel_name:
        raise BadRequest("an image needs a kernel", hint="pass --kernel FILE or --kernel-name K")
    kernel_p = existing_file(kernel, "--kernel") if kernel else None
    initrd_p = existing_file(initrd, "--initrd") if initrd else None
    with rootfs_p.open("rb") as fh:
        fh.seek(EXT4_MAGIC_OFFSET)
        if fh.read(2) != EXT4_MAGIC:
            raise BadRequest(f"{rootfs_p} is not an ext4 file system image",
                             hint="make one with `mkfs.ext4 -d DIR IMAGE SIZE`")
    if kernel_p is not None:
        inspect_kernel_file(kernel_p)  # a clear refusal for anything that is not a kernel
    if kernel_name is not None:
        d.db.get_kernel(kernel_name)
    refuse_taken(d, name)
    staging = d.layout.staging_dir / f"register-{name}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        target = staging / "rootfs.ext4"
        clone_or_copy(rootfs_p, target)
        if kernel_p is not None:
            shutil.copy2(kernel_p, staging / "vmlinuz")
        if initrd_p is not None:
            shutil.copy2(initrd_p, staging / "initrd.img")
        extract_workseed(d, target, staging / "workseed")
        inject_guest_agent(d, target, staging)
        return publish(d, name, staging, source="registered", recipe_hash=None,
                       kernel_name=kernel_name)
    except BaseException:
        remove_tree(staging)
        raise


def extract_workseed(d: Daemon, rootfs: Path, dest: Path) -> None:
    """Copy the image's /root out (debugfs rdump: no mount) to seed work disks."""
    dest.mkdir(mode=0o700)
    res = d.runner.run(["debugfs", "-R", f"rdump /root {dest}", str(rootfs)],
                       desc="read /root from the image", timeout=300, check=False)
    dumped = dest / "root"
    if dumped.is_dir():
        for item in dumped.iterdir():
            shutil.move(str(item), dest / item.name)
        dumped.rmdir()
    elif res.returncode != 0:
        log.info("image has no /root to seed from: %s", res.err.strip())


def inject_guest_agent(d: Daemon, rootfs: Path, staging: Path) -> None:
    """Write banger's guest agent into the ext4 image ``rootfs`` with debugfs.

    No mount needed; only directories the image lacks are created (probed with
    ``debugfs stat`` first). Scratch files go in ``staging`` and are removed after.
    """
    files = guest_agent_files()
    missing = set()
    for directory in injected_dirs(files):
        res = d.runner.run(["debugfs", "-R", f"stat {directory}", str(rootfs)],
                           desc=f"look for {directory} in the image", timeout=60, check=False)
        if "File not found" in res.err:
            missing.add(directory)
    script, temps = debugfs_script(files, staging, missing)
    script_file = staging / "inject.debugfs"
    script_file.write_text(script)
    d.runner.run(["debugfs", "-w", "-f", str(script_file), str(rootfs)],
                 desc="add banger's guest agent to the image", timeout=300)
    for t in [*temps, script_file]:
        t.unlink(missing_ok=True)


def delete(d: Daemon, name: str) -> dict[str, Any]:
    """Unregister image ``name`` and remove its directory (refused while a VM or a
    snapshot taken with `vm snapshot` uses it; its boot snapshots go with it)."""
    if all(vm.image != name for vm in user_vms(d)):  # else the delete is refused
        bootsnap.forget_image(d, name)  # and the pool's clones of it
    with d.image_ops_mu:
        d.db.delete_image(name)
        trash = move_aside(d.layout.image_dir(name))
    if trash is not None:
        remove_tree(trash)  # gigabytes: never under the lock
    d.spares.drop()  # they may be this image's copies (the next create makes new ones)
    return {"deleted": name}


def list_images(d: Daemon) -> list[dict[str, Any]]:
    """Every registered image as an :class:`ImageView` dict, sorted by name."""
    return [view(i) for i in d.db.list_images()]


def show(d: Daemon, name: str) -> dict[str, Any]:
    """Image ``name`` as an :class:`ImageView` dict; NotFound when it is not registered."""
    return view(d.db.get_image(name))
