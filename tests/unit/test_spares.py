"""Spare root disks (:mod:`banger.daemon.spares`): copies made ahead, taken by a
rename, never of a source that changed since, never left half made."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.api.params import CreateParams
from banger.config import Config
from banger.daemon import Bangerd, vmcreate
from banger.daemon import spares as spares_mod
from banger.daemon.core import Daemon
from banger.daemon.dmsnap import sparse_copy
from banger.daemon.spares import TEMP_PREFIX, Spares
from tests.conftest import FakeWorld, open_fake_daemon


def copying(source: Path, target: Path) -> None:
    sparse_copy(source, target, durable=False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs.ext4"
    with path.open("wb") as fh:
        fh.write(b"root" * 4096)
        fh.truncate(8 << 20)  # a hole after the data, as an image has
    return path


def spare_files(spares: Spares) -> list[str]:
    return sorted(p.name for p in spares.root.iterdir()) if spares.root.exists() else []


def test_a_spare_is_a_whole_copy_taken_by_a_rename(tmp_path: Path, source: Path) -> None:
    spares = Spares(tmp_path / "spares", 2, copying)
    target = tmp_path / "vm" / "rootfs.ext4"
    target.parent.mkdir()
    assert not spares.take(source, target)  # none made yet: the caller copies
    spares.refill(source)
    assert len(spare_files(spares)) == 2
    inode = os.stat(spares.root / spare_files(spares)[0]).st_ino
    assert spares.take(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_ino == inode  # moved, not copied again
    assert len(spare_files(spares)) == 1
    spares.refill(source)
    assert len(spare_files(spares)) == 2


def test_a_changed_source_gets_no_old_copy(tmp_path: Path, source: Path) -> None:
    spares = Spares(tmp_path / "spares", 1, copying)
    spares.refill(source)
    old = spare_files(spares)
    with source.open("r+b") as fh:  # the image was rebuilt or grown since
        fh.write(b"new!")
    target = tmp_path / "taken.ext4"
    assert not spares.take(source, target)
    assert not target.exists()
    spares.refill(source)  # drops the stale copy, makes a current one
    assert spare_files(spares) != old and len(spare_files(spares)) == 1
    assert spares.take(source, target)
    assert target.read_bytes()[:4] == b"new!"


def test_no_half_made_copy_is_ever_taken_or_kept(tmp_path: Path, source: Path) -> None:
    def failing(src: Path, dst: Path) -> None:
        dst.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    spares = Spares(tmp_path / "spares", 1, failing)
    spares.refill(source)  # says why (a warning); the creates copy as before
    assert spare_files(spares) == []
    # a daemon killed mid-copy leaves its temporary file: the next start removes it
    spares.root.joinpath(f"{TEMP_PREFIX}abc-1234.ext4").write_bytes(b"half")
    spares.sweep()
    assert spare_files(spares) == []


def test_no_spare_where_it_would_leave_too_little_free(
        tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(spares_mod.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=spares_mod.FREE_MARGIN))
    spares = Spares(tmp_path / "spares", 1, copying)
    spares.refill(source)
    assert spare_files(spares) == []


def test_off_means_none_made_and_old_ones_dropped(tmp_path: Path, source: Path) -> None:
    spares = Spares(tmp_path / "spares", 1, copying)
    spares.refill(source)
    spares.keep = 0
    spares.refill(source)
    assert not spares.take(source, tmp_path / "t.ext4")
    spares.drop()
    assert spare_files(spares) == []


def test_one_refill_at_a_time(tmp_path: Path, source: Path) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(src: Path, dst: Path) -> None:
        started.set()
        release.wait(10)
        copying(src, dst)

    spares = Spares(tmp_path / "spares", 1, slow)
    first = threading.Thread(target=spares.refill, args=(source,))
    first.start()
    assert started.wait(10)
    t0 = time.monotonic()
    spares.refill(source)  # returns at once: the first one makes the copy
    assert time.monotonic() - t0 < 1
    release.set()
    first.join(10)
    assert len(spare_files(spares)) == 1


@pytest.fixture
def spare_daemon(cfg: Config, world: FakeWorld) -> Iterator[Daemon]:
    d = open_fake_daemon(cfg.model_copy(update={"spare_root_disks": 1}), world)
    yield d
    world.vmm.reap_all()
    d.close()


def wait_for_spares(d: Daemon, n: int) -> list[Path]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [p for p in d.layout.spares_dir.glob("*.ext4")
                 if not p.name.startswith(TEMP_PREFIX)]
        if len(ready) == n:
            return ready
        time.sleep(0.05)
    raise AssertionError(f"no {n} spare root disks in {d.layout.spares_dir}")


def test_creates_take_the_copy_the_one_before_made(spare_daemon: Daemon) -> None:
    d = spare_daemon
    assert d.spares.keep == 1  # the fake world's strategy is "copy"
    vmcreate.create_sync(d, CreateParams(name="one", start=False))
    (spare,) = wait_for_spares(d, 1)  # made in the background after the first create
    inode = os.stat(spare).st_ino
    vmcreate.create_sync(d, CreateParams(name="two", start=False))
    one, two = d.db.find_vm("one"), d.db.find_vm("two")
    assert one is not None and two is not None
    rootfs = d.layout.vm(two.id).rootfs
    assert os.stat(rootfs).st_ino == inode  # the spare became its root disk
    assert rootfs.read_bytes() == d.layout.vm(one.id).rootfs.read_bytes()
    wait_for_spares(d, 1)  # and the next one is made


def test_a_daemon_with_spares_off_removes_them(cfg: Config, world: FakeWorld,
                                               spare_daemon: Daemon) -> None:
    vmcreate.create_sync(spare_daemon, CreateParams(name="one", start=False))
    wait_for_spares(spare_daemon, 1)
    spare_daemon.close()
    d = Bangerd.open(cfg, world.seams(), log_to_stderr=True)  # spare_root_disks = 0
    try:
        assert d.spares.keep == 0
        assert list(d.layout.spares_dir.glob("*.ext4")) == []
    finally:
        d.close()
