"""banger's initramfs for the built-in image: module order, static BusyBox, the archive.

The kernel is its real reader: every end-to-end VM boots through it, and
tests/e2e/test_boot.py boots it with a root that is not there. Here GNU cpio reads the
archive back.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from banger.daemon.imagemgr import Recipe, initramfs
from banger.daemon.imagemgr.initramfs import (
    BOOT_MODULES,
    INIT,
    Entry,
    build,
    entries,
    is_static_elf,
    module_bytes,
    module_order,
    newc,
)
from banger.errors import BadRequest

VERSION = "6.1.0-50-cloud-amd64"
# The lines of Debian's modules.dep for the virtio drivers (6.1 cloud kernel).
V = "kernel/drivers/virtio"
RING_AND_CORE = f"{V}/virtio_ring.ko {V}/virtio.ko"
MODULES_DEP = "".join(f"{line}\n" for line in (
    f"{V}/virtio.ko:",
    f"{V}/virtio_ring.ko:",
    f"{V}/virtio_mmio.ko: {RING_AND_CORE}",
    f"kernel/drivers/block/virtio_blk.ko: {RING_AND_CORE}",
    "kernel/net/core/failover.ko:",
    "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko",
    "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
    f"kernel/net/core/failover.ko {RING_AND_CORE}",
    f"kernel/drivers/char/virtio_console.ko: {RING_AND_CORE}",
    "kernel/fs/fuse/fuse.ko:",
))


def elf(*, interp: bool) -> bytes:
    """A minimal ELF64 header and program header table: one PT_LOAD, and a PT_INTERP
    (a dynamically linked program) when ``interp``."""
    types = [1, 3] if interp else [1]
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, 64)  # e_phoff
    struct.pack_into("<HH", header, 54, 56, len(types))  # e_phentsize, e_phnum
    phdrs = b"".join(struct.pack("<I", t) + bytes(52) for t in types)
    return bytes(header) + phdrs


def module_names(order: list[str]) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in order]


def test_modules_load_after_their_dependencies_each_once() -> None:
    order = module_order(MODULES_DEP, BOOT_MODULES)
    assert module_names(order) == [
        "virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "virtio_blk.ko", "failover.ko",
        "net_failover.ko", "virtio_net.ko", "virtio_console.ko"]


def test_a_built_in_driver_is_not_loaded_and_a_missing_one_is_refused() -> None:
    builtin = "kernel/drivers/block/virtio_blk.ko\n"
    assert "virtio_blk.ko" not in module_names(module_order(MODULES_DEP, BOOT_MODULES,
                                                            builtin))
    assert module_names(module_order(MODULES_DEP, ["virtio-blk"])) == [
        "virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]  # - and _ alike, as for modprobe
    with pytest.raises(BadRequest, match="no module virtio_scsi") as e:
        module_order(MODULES_DEP, ["virtio_scsi"])
    assert e.value.hint
    broken = MODULES_DEP.replace("kernel/net/core/failover.ko:\n", "")
    with pytest.raises(BadRequest, match=r"failover\.ko is a dependency"):
        module_order(broken, ["virtio_net"])


def test_compressed_modules_are_unpacked_for_insmod(tmp_path: Path) -> None:
    data = b"\x7fELF module" * 100
    (tmp_path / "a.ko").write_bytes(data)
    (tmp_path / "b.ko.xz").write_bytes(lzma.compress(data))
    (tmp_path / "c.ko.gz").write_bytes(gzip.compress(data))
    (tmp_path / "d.ko.zst").write_bytes(b"zstd")
    for name in ("a.ko", "b.ko.xz", "c.ko.gz"):
        assert module_bytes(tmp_path / name) == data
    with pytest.raises(BadRequest, match=r"only \.ko, \.ko\.xz and \.ko\.gz"):
        module_bytes(tmp_path / "d.ko.zst")


def test_a_decompression_bomb_module_is_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initramfs, "MODULE_MAX", 1000)
    (tmp_path / "bomb.ko.xz").write_bytes(lzma.compress(bytes(10_000)))
    with pytest.raises(BadRequest, match="larger than"):
        module_bytes(tmp_path / "bomb.ko.xz")


def test_only_a_static_elf_counts_as_static(tmp_path: Path) -> None:
    assert is_static_elf(elf(interp=False))
    assert not is_static_elf(elf(interp=True))
    assert not is_static_elf(b"#!/bin/sh\n" + bytes(100))
    assert not is_static_elf(elf(interp=False)[:70])  # program headers cut off
    sh = Path(shutil.which("sh") or "/bin/sh").resolve()
    assert not is_static_elf(sh.read_bytes())  # Debian's dash is dynamically linked


def image_tree(root: Path, *, busybox: bytes | None = None) -> Path:
    moddir = root / "lib/modules" / VERSION
    for line in MODULES_DEP.splitlines():
        path = moddir / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"module {path.name}".encode())
    (moddir / "modules.dep").write_text(MODULES_DEP)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(busybox if busybox is not None
                                           else elf(interp=False))
    return root


def cpio_list(archive: Path) -> list[str]:
    out = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(archive)], capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.skipif(shutil.which("cpio") is None,
                    reason="needs GNU cpio (scripts/install-deps installs it)")
def test_the_archive_holds_init_busybox_the_drivers_and_their_order(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "root")
    dest = tmp_path / "initrd.img"
    size = build(root, VERSION, dest)
    assert size == dest.stat().st_size and size % 4 == 0
    listing = cpio_list(dest)
    names = [line.split()[-1] for line in listing]
    assert names[:5] == ["bin", "dev", "modules", "proc", "root"]
    assert {"init", "bin/busybox", "modules/order", "modules/virtio_blk.ko"} <= set(names)
    assert "modules/fuse.ko" not in names  # only what the boot loads
    console = next(line for line in listing if line.endswith(" dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    init = next(line for line in listing if line.endswith(" init"))
    assert init.startswith("-rwxr-xr-x") and " root " in init
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "-F", str(dest)],
                   cwd=out, check=True)
    assert (out / "init").read_text() == INIT
    assert (out / "modules/order").read_text().split() == [
        "virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "virtio_blk.ko", "failover.ko",
        "net_failover.ko", "virtio_net.ko", "virtio_console.ko"]
    assert (out / "modules/virtio_net.ko").read_bytes() == b"module virtio_net.ko"
    assert build(root, VERSION, tmp_path / "again.img") == size
    assert (tmp_path / "again.img").read_bytes() == dest.read_bytes()  # reproducible


def test_a_tree_without_what_the_initramfs_needs_is_refused(tmp_path: Path) -> None:
    dynamic = image_tree(tmp_path / "dynamic", busybox=elf(interp=True))
    with pytest.raises(BadRequest, match="not a static") as e:
        entries(dynamic, VERSION)
    assert "busybox-static" in (e.value.hint or "")
    missing = image_tree(tmp_path / "missing")
    (missing / "usr/bin/busybox").unlink()
    with pytest.raises(BadRequest, match="no busybox"):
        entries(missing, VERSION)
    with pytest.raises(BadRequest, match=r"modules\.dep"):
        entries(image_tree(tmp_path / "other"), "6.1.0-51-cloud-amd64")
    escaping = image_tree(tmp_path / "escaping")
    (escaping / "lib/modules" / VERSION / "modules.dep").write_text(
        "../../../../etc/virtio_blk.ko:\n")
    with pytest.raises(BadRequest, match="not in the image tree"):
        entries(escaping, VERSION, ["virtio_blk"])


def test_newc_pads_every_header_and_body_to_four_bytes() -> None:
    data = newc([Entry("a", stat.S_IFREG | 0o644, b"xyz")])
    assert data.startswith(b"070701") and len(data) % 4 == 0
    # header (110) + "a\0" padded to 112, then the 3-byte body padded to 4
    assert data[112:116] == b"xyz\0"
    assert data[116:122] == b"070701" and b"TRAILER!!!\0" in data


def test_the_init_script_parses_and_the_recipe_carries_its_parts() -> None:
    assert subprocess.run(["sh", "-n"], input=INIT, text=True).returncode == 0
    assert INIT.startswith("#!/bin/busybox sh\n")
    assert "exec $bb switch_root /root" in INIT
    recipe = Recipe()
    assert "busybox-static" in recipe.packages
    changed = INIT.replace("0.05", "0.1")
    doc_before = recipe.digest()
    original = initramfs.INIT
    try:
        initramfs.INIT = changed
        assert Recipe().digest() != doc_before  # the image is rebuilt when /init changes
    finally:
        initramfs.INIT = original
