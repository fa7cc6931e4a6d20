"""Shared fixtures: a daemon with fake seams, wired exactly as bangerd wires the real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from banger.config import Config, parse_config
from banger.daemon import Bangerd, Daemon, Seams
from banger.daemon.dmsnap import CopyCow
from tests.fakes import FakeGuest, FakeNet, FakeRunner, FakeVMM, instant_ssh, real

# The suite shares two cores with booting VMs: no wall-clock deadlines in property tests.
settings.register_profile("banger", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("banger")


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return parse_config({
        "state_dir": str(tmp_path / "state"),
        "cache_dir": str(tmp_path / "cache"),
        "runtime_dir": str(tmp_path / "run"),
        "dns_enabled": False,
        "nat": False,  # unit tests must never touch the host's forwarding or firewall
        "tap_pool_size": 1,
        # No root disks copied in the background under the tests' feet;
        # tests/unit/test_spares.py turns them on.
        "spare_root_disks": 0,
        # Every VM boots; tests/unit/test_bootsnap.py turns boot snapshots on.
        "boot_snapshots": False,
        "log_level": "debug",
        "vm_defaults": {"disk_size": "64M", "work_disk_size": "64M"},
    })


class FakeWorld:
    def __init__(self) -> None:
        self.runner = FakeRunner()
        self.runner.on(("ssh-keygen",), real)  # clones' host keys: real, and fast
        self.net = FakeNet()
        self.vmm = FakeVMM()
        self.guests: dict[str, FakeGuest] = {}

    def dial(self, ip: str) -> FakeGuest:
        return self.guests.setdefault(ip, FakeGuest(ip, on_poweroff=self.vmm.poweroff))

    def seams(self) -> Seams:
        return Seams(runner=self.runner, net=self.net, vmm_factory=lambda name: self.vmm,
                     cow=CopyCow(), dial=self.dial, wait_for_ssh=instant_ssh)


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


def add_fake_image(d: Daemon, name: str = "debian-bookworm") -> None:
    """An image whose rootfs is a small sparse file (the fake runner skips mkfs/resize)."""
    from banger.daemon.store import ImageRecord, now

    img_dir = d.layout.image_dir(name)
    img_dir.mkdir(parents=True, exist_ok=True)
    rootfs = img_dir / "rootfs.ext4"
    with rootfs.open("wb") as fh:
        fh.write(b"root" * 1024)
        fh.truncate(32 << 20)
    (img_dir / "vmlinuz").write_bytes(b"kernel")
    d.db.add_image(ImageRecord(name=name, source="built", rootfs=str(rootfs),
                               kernel=str(img_dir / "vmlinuz"), initrd=None, workseed=None,
                               size_bytes=32 << 20, recipe_hash=None, created_at=now()))


def open_fake_daemon(cfg: Config, world: FakeWorld) -> Daemon:
    """A daemon on ``world``'s fakes, with its SSH key and a fake image."""
    key = cfg.key_path
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("PRIVATE")
    key.with_name(key.name + ".pub").write_text("ssh-ed25519 AAAA test\n")
    d = Bangerd.open(cfg, world.seams(), log_to_stderr=True)
    add_fake_image(d)
    return d


@pytest.fixture
def daemon(cfg: Config, world: FakeWorld) -> Iterator[Daemon]:
    d = open_fake_daemon(cfg, world)
    yield d
    world.vmm.reap_all()
    d.close()
