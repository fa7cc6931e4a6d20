"""An image's root file system grown once per VM size (``rootgrow``), with the real
e2fsprogs on a real (small) ext4 image; the VMs themselves are fakes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.api.params import CreateParams
from banger.daemon import rootgrow, vmcreate, vms
from banger.daemon.core import Daemon
from banger.errors import BadRequest, CommandFailed
from banger.runner import Result
from tests.conftest import FakeWorld
from tests.fakes import real

IMAGE = "debian-bookworm"


@pytest.fixture
def ext4_image(daemon: Daemon, world: FakeWorld, tmp_path: Path) -> Path:
    """The fake image's rootfs made a real 32 MiB ext4 holding one file; e2fsck and
    resize2fs run for real."""
    img = daemon.db.get_image(IMAGE)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("banger\n")
    rootfs = Path(img.rootfs)
    rootfs.unlink()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(rootfs), "32M"], check=True)
    for tool in ("e2fsck", "resize2fs"):
        world.runner.on((tool,), real)
    return rootfs


def fs_bytes(image: Path) -> int:
    """The ext4 file system's size (block count x block size, from its superblock)."""
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                         check=True).stdout
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    return int(fields["Block count"]) * int(fields["Block size"])


def create(d: Daemon, name: str, disk: str) -> dict[str, object]:
    return vmcreate.create_sync(d, CreateParams(name=name, disk_size=disk))


def test_each_size_is_grown_once_and_every_vm_of_it_copies_that(
        daemon: Daemon, world: FakeWorld, ext4_image: Path) -> None:
    create(daemon, "a", "96M")
    create(daemon, "b", "96M")
    assert len(world.runner.ran("resize2fs")) == 1  # once for both VMs
    grown = ext4_image.parent / "grown" / f"rootfs-{96 << 20}.ext4"
    assert grown.stat().st_size == 96 << 20 and ext4_image.stat().st_size == 32 << 20
    assert fs_bytes(grown) == 96 << 20 and fs_bytes(ext4_image) == 32 << 20
    for name in ("a", "b"):
        disk = daemon.layout.vm(vms.resolve(daemon, name).id).rootfs
        assert disk.read_bytes() == grown.read_bytes()
        assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0
    create(daemon, "c", "128M")  # another size: grown once more
    assert len(world.runner.ran("resize2fs")) == 2
    create(daemon, "d", "32M")  # the image's own size: nothing to grow
    assert len(world.runner.ran("resize2fs")) == 2
    assert {p.name for p in grown.parent.iterdir() if not p.name.startswith(".")} == {
        f"rootfs-{128 << 20}.ext4", f"rootfs-{96 << 20}.ext4"}


def test_a_failed_growth_leaves_no_grown_file_and_no_vm(
        daemon: Daemon, world: FakeWorld, ext4_image: Path) -> None:
    world.runner.handlers.insert(  # ahead of the fixture's real resize2fs
        0, (("resize2fs",), lambda argv: Result(argv, 1, b"", b"no space")))
    with pytest.raises(CommandFailed):
        create(daemon, "a", "96M")
    grown = ext4_image.parent / "grown"
    assert [p.name for p in grown.iterdir()] == [".lock"]  # no partial, no grown file
    assert daemon.db.list_vms() == []


def test_a_disk_smaller_than_the_image_is_refused(daemon: Daemon, ext4_image: Path) -> None:
    img = daemon.db.get_image(IMAGE)
    with pytest.raises(BadRequest) as exc:
        rootgrow.rootfs_at(daemon, img, 16 << 20)
    assert "smaller than the image" in exc.value.message and "--disk-size" in exc.value.hint
