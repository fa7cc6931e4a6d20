"""Kernel registry, image kernels, per-VMM boot files, VMM selection, file sync targets."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import cast

import pytest

from banger.api.params import CreateParams
from banger.config import parse_config
from banger.daemon import images, kernels, reconcile, vmcreate, vmmselect
from banger.daemon.core import Daemon
from banger.daemon.fcproc import driver as fcdriver
from banger.daemon.fcproc import host as fchost
from banger.daemon.fcproc.driver import FirecrackerDriver
from banger.daemon.vmmselect import resolve_vmm
from banger.daemon.workspaces import check_sync_target
from banger.errors import AlreadyExists, BadRequest, HostError, InvalidState, NotFound
from banger.hostops.client import HostOps
from banger.runner import SubprocessRunner


def bzimage(path: Path, version: str = "6.1.99-banger") -> Path:
    """A minimal, well-formed x86_64 bzImage header (boot protocol 2.15)."""
    data = bytearray(2048)
    data[0x1F1] = 1  # one setup sector
    struct.pack_into("<I", data, 0x1F4, (len(data) - 1024) // 16)  # syssize in paragraphs
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    struct.pack_into("<H", data, 0x20E, 0x100)  # version string at 0x100 + 0x200
    data[0x236] = 1  # XLF_KERNEL_64
    banner = f"{version} (banger@test) #1 SMP".encode() + b"\0"
    data[0x300:0x300 + len(banner)] = banner
    path.write_bytes(bytes(data))
    return path


def test_import_list_show_rm(daemon: Daemon, tmp_path: Path) -> None:
    k = kernels.import_files(daemon, "k1", [str(bzimage(tmp_path / "bz"))], None)
    assert k["vmms"] == ["qemu"] and k["version"] == "6.1.99-banger"
    assert Path(k["bzimage"]).read_bytes() == (tmp_path / "bz").read_bytes()
    assert [x["name"] for x in kernels.list_kernels(daemon)] == ["k1"]
    assert kernels.show(daemon, "k1")["bzimage"].endswith("/kernels/k1/bzImage")
    with pytest.raises(AlreadyExists):
        kernels.import_files(daemon, "k1", [str(tmp_path / "bz")], None)
    kernels.remove(daemon, "k1")
    assert not daemon.layout.kernel_dir("k1").exists()
    with pytest.raises(NotFound):
        kernels.show(daemon, "k1")


def test_import_refuses_non_kernels_and_leaves_nothing(daemon: Daemon, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"#!/bin/sh\necho not a kernel\n")
    with pytest.raises(BadRequest):
        kernels.import_files(daemon, "bad", [str(junk)], None)
    with pytest.raises(BadRequest):
        kernels.import_files(daemon, "Bad_Name", [str(bzimage(tmp_path / "bz"))], None)
    with pytest.raises(BadRequest):
        kernels.import_files(daemon, "two", [str(bzimage(tmp_path / "a")),
                                             str(bzimage(tmp_path / "b"))], None)
    assert kernels.list_kernels(daemon) == []
    assert not list(daemon.layout.staging_dir.glob("*"))  # no half-imported kernel left


def test_image_kernel_selection_per_vmm(daemon: Daemon, tmp_path: Path) -> None:
    kernels.import_files(daemon, "qk", [str(bzimage(tmp_path / "bz"))], None)
    img = daemon.db.get_image("debian-bookworm")
    # the fake image bundles a file that is no kernel at all: Firecracker refuses it
    with pytest.raises(BadRequest) as exc:
        kernels.boot_files(daemon, img, "firecracker")
    assert "set-kernel" in exc.value.hint
    assert kernels.boot_files(daemon, img, "qemu").kernel == Path(img.kernel)
    images.set_kernel(daemon, "debian-bookworm", "qk")
    img = daemon.db.get_image("debian-bookworm")
    assert kernels.boot_files(daemon, img, "qemu").kernel.name == "bzImage"
    with pytest.raises(BadRequest) as exc:
        kernels.boot_files(daemon, img, "firecracker")
    assert "no vmlinux" in exc.value.message
    with pytest.raises(InvalidState):
        kernels.remove(daemon, "qk")  # still used by the image
    with pytest.raises(NotFound):
        images.set_kernel(daemon, "debian-bookworm", "missing")
    images.set_kernel(daemon, "debian-bookworm", None)
    kernels.remove(daemon, "qk")


def test_vm_boots_the_registry_kernel(daemon: Daemon, tmp_path: Path, world: object) -> None:
    kernels.import_files(daemon, "qk", [str(bzimage(tmp_path / "bz"))], None)
    images.set_kernel(daemon, "debian-bookworm", "qk")
    vmcreate.create_sync(daemon, CreateParams(name="kvm1"))
    plan = world.vmm.launched[-1]  # type: ignore[attr-defined]
    assert plan.kernel == daemon.layout.kernel_dir("qk") / "bzImage"
    with pytest.raises(BadRequest):
        vmcreate.create_sync(daemon, CreateParams(name="fc1", vmm="firecracker"))
    assert daemon.db.find_vm("fc1") is None


def test_auto_vmm_needs_binary_kvm_and_a_bootable_kernel(tmp_path: Path) -> None:
    fc = tmp_path / "firecracker"
    fc.write_text("#!/bin/sh\n")
    fc.chmod(0o755)
    cfg = parse_config({"firecracker_bin": str(fc)})
    assert resolve_vmm(cfg, "qemu") == "qemu"
    assert resolve_vmm(cfg, "auto", lambda vmm: False) == "qemu"
    assert resolve_vmm(parse_config({"vmm": "qemu"}), "auto") == "qemu"
    with pytest.raises(BadRequest):
        resolve_vmm(cfg, "xen")


class Helper:
    """The root helper as far as choosing Firecracker asks it: what it found."""

    def __init__(self, firecracker: str, jailer: str) -> None:
        self.found = (firecracker, jailer)

    def fc_status(self) -> tuple[str, str]:
        return self.found


def test_a_daemon_that_is_not_root_runs_firecracker_only_under_the_helpers_jailer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jail is built by the root helper, with the jailer it found; an unjailed
    Firecracker would need a root daemon. Without the jailer, `auto` picks QEMU and
    `firecracker` is a clear error."""
    fc = tmp_path / "firecracker"
    fc.write_text("#!/bin/sh\necho Firecracker v1.7.0\n")
    fc.chmod(0o755)
    for module in (fchost.os, fcdriver.os):
        monkeypatch.setattr(module, "geteuid", lambda: 1000)
    cfg = parse_config({"firecracker_bin": str(fc), "jailer_bin": str(tmp_path / "no-jailer")})
    blockers = vmmselect.firecracker_blockers(cfg)
    assert any("bangerd is not root" in b and "jailer" in b for b in blockers), blockers
    assert resolve_vmm(cfg, "auto") == "qemu"
    without = cast(HostOps, Helper(str(fc), ""))
    with pytest.raises(HostError, match="root helper found no Firecracker and jailer") as err:
        vmmselect.make_driver(cfg, SubprocessRunner(), "firecracker", without)
    assert "vmm = qemu" in err.value.hint
    off = parse_config({"firecracker_bin": str(fc), "jailer_enabled": False})
    with pytest.raises(HostError, match="needs a daemon running as root"):
        vmmselect.make_driver(off, SubprocessRunner(), "firecracker", without)

    # The helper's jailer counts, even one this user cannot see.
    helper = cast(HostOps, Helper(str(fc), "/usr/sbin/jailer"))
    drv = vmmselect.make_driver(cfg, SubprocessRunner(), "firecracker", helper)
    assert isinstance(drv, FirecrackerDriver) and drv.jail is helper
    jailer = tmp_path / "jailer"
    jailer.write_text("#!/bin/sh\n")
    jailer.chmod(0o755)
    jailed = parse_config({"firecracker_bin": str(fc), "jailer_bin": str(jailer)})
    assert not any("jailer" in b for b in vmmselect.firecracker_blockers(jailed))


@pytest.mark.parametrize("guest", ["/root/.config/x", "/root/a/b/c"])
def test_sync_targets_ok(guest: str) -> None:
    assert check_sync_target(guest) == guest


@pytest.mark.parametrize("guest", ["/etc/passwd", "/root", "/root/../etc/x", "root/x",
                                   "/root/a/./b", "/root/x\n", "/rootkit/x"])
def test_sync_targets_refused(guest: str) -> None:
    with pytest.raises(BadRequest):
        check_sync_target(guest)


@pytest.mark.parametrize(("entry", "error"), [
    ({"guest": "/etc/cron.d/x"}, "must be a normalised path under /root"),
    ({"mode": "rw-------"}, "is not an octal number"),
    ({"mode": "17777"}, "is outside 0000-7777"),
])
def test_bad_file_sync_entries_are_refused_when_the_config_loads(entry: dict[str, str],
                                                                 error: str) -> None:
    """Not at VM start, after the guest booted (a bad mode was a bare ValueError there)."""
    good = {"host": "/etc/hostname", "guest": "/root/.config/x", "mode": "0644"}
    assert parse_config({"file_sync": [good]}).file_sync[0].mode == "0644"
    with pytest.raises(BadRequest, match=error) as exc:
        parse_config({"file_sync": [{**good, **entry}]})
    assert exc.value.message.startswith("config: file_sync.0.")


def test_remove_renames_under_the_lock_and_deletes_after(daemon: Daemon, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.import_files(daemon, "k1", [str(bzimage(tmp_path / "bz"))], None)
    seen: list[tuple[str, bool]] = []
    real = kernels.remove_tree

    def spy(path: Path) -> None:
        seen.append((path.name, daemon.image_ops_mu.locked()))
        real(path)

    monkeypatch.setattr(kernels, "remove_tree", spy)
    kernels.remove(daemon, "k1")
    assert len(seen) == 1
    name, locked = seen[0]
    assert name.startswith(".trash-k1-") and not locked  # the slow delete runs unlocked
    assert list(daemon.layout.kernels_dir.iterdir()) == []


def test_import_over_debris_of_a_crashed_import(daemon: Daemon, tmp_path: Path) -> None:
    debris = daemon.layout.kernel_dir("k1")
    debris.mkdir(parents=True)
    (debris / "bzImage").write_bytes(b"half written")
    k = kernels.import_files(daemon, "k1", [str(bzimage(tmp_path / "bz"))], None)
    assert Path(k["bzimage"]).read_bytes() == (tmp_path / "bz").read_bytes()
    assert [p.name for p in daemon.layout.kernels_dir.iterdir()] == ["k1"]


def test_start_up_finishes_deletes_a_crash_interrupted(daemon: Daemon, tmp_path: Path) -> None:
    kernels.import_files(daemon, "k1", [str(bzimage(tmp_path / "bz"))], None)
    registries = (daemon.layout.kernels_dir, daemon.layout.images_dir,
                  daemon.layout.kernel_build_cache)  # a build replacing a stale cache entry
    for registry in registries:
        trash = registry / ".trash-gone-0123abcd"
        (trash / "sub").mkdir(parents=True)
        (trash / "sub" / "rootfs.ext4").write_bytes(b"x" * 4096)
    reconcile.reconcile(daemon)
    for registry in registries:
        assert not any(p.name.startswith(".trash-") for p in registry.iterdir())
    assert kernels.show(daemon, "k1")["bzimage"]  # registered entries are untouched
    assert Path(kernels.show(daemon, "k1")["bzimage"]).is_file()
    assert images.list_images(daemon)  # and so is the test image


def test_an_image_never_references_a_kernel_that_is_gone(daemon: Daemon, tmp_path: Path) -> None:
    # `image register --kernel-name` checks early, copies for minutes, then inserts:
    # a `kernel rm` in between must make the insert fail, not leave a dangling name.
    base = daemon.db.get_image("debian-bookworm")
    orphan = dataclasses.replace(base, name="orphan", kernel="", kernel_name="removed")
    with pytest.raises(NotFound, match="no kernel named 'removed'"):
        daemon.db.add_image(orphan)
    assert daemon.db.find_image("orphan") is None


def test_set_kernel_back_needs_a_kernel_of_its_own(daemon: Daemon, tmp_path: Path) -> None:
    kernels.import_files(daemon, "qk", [str(bzimage(tmp_path / "bz"))], None)
    base = daemon.db.get_image("debian-bookworm")
    daemon.db.add_image(dataclasses.replace(base, name="kernelless", kernel="",
                                            kernel_name="qk"))
    with pytest.raises(BadRequest, match="no kernel of its own"):
        images.set_kernel(daemon, "kernelless", None)
    assert daemon.db.get_image("kernelless").kernel_name == "qk"


def test_register_refuses_an_empty_kernel_path(daemon: Daemon, tmp_path: Path) -> None:
    rootfs = tmp_path / "root.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    with pytest.raises(BadRequest, match="needs a kernel"):
        images.register(daemon, "nokernel", str(rootfs), "", None)
    assert daemon.db.find_image("nokernel") is None
