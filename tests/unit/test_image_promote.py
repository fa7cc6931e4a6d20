"""imagepromote with the fake world: state rules, what is copied, identity removed.

The real thing (edit in a VM, stop, promote, boot a new VM and see the edit) is in
tests/e2e/test_lifecycle.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger.api.params import CreateParams
from banger.daemon import images, vmcreate, vmpower, vms
from banger.daemon.core import Daemon
from banger.daemon.dmsnap import CowHandle
from banger.daemon.imagepromote import promote
from banger.errors import AlreadyExists, BadRequest, HostError, InvalidState, NotFound


def test_promote_a_stopped_vm(daemon: Daemon) -> None:
    vmcreate.create_sync(daemon, CreateParams(name="src"))
    with pytest.raises(InvalidState) as exc:
        promote(daemon, "src", "gold")
    assert "banger vm stop src" in exc.value.hint
    vmpower.stop(daemon, "src")
    vm = vms.resolve(daemon, "src")
    paths = daemon.layout.vm(vm.id)
    with paths.rootfs.open("r+b") as fh:
        fh.write(b"EDITED-ROOT")
    paths.work_disk.write_bytes(b"work disk")  # the fake runner made no ext4
    before = len(daemon.runner.calls)  # type: ignore[attr-defined]
    img = promote(daemon, "src", "gold")
    assert img["source"] == "promoted" and img["origin"] == "vm src (image debian-bookworm)"
    assert Path(img["rootfs"]).read_bytes()[:11] == b"EDITED-ROOT"
    assert Path(img["kernel"]).read_bytes() == b"kernel"
    scripts = [c for c in daemon.runner.calls[before:]  # type: ignore[attr-defined]
               if c[:2] == ["debugfs", "-w"]]
    assert scripts, "identity removal and agent injection run on the copy"
    assert all("/promote-gold-" in c[-1] and c[-1].endswith("/rootfs.ext4") for c in scripts)
    assert vms.resolve(daemon, "src").state.value == "stopped"  # the VM is untouched
    assert not list(daemon.layout.staging_dir.iterdir())
    with pytest.raises(AlreadyExists):
        promote(daemon, "src", "gold")
    with pytest.raises(BadRequest):
        promote(daemon, "src", "Bad_Name")
    with pytest.raises(NotFound):
        promote(daemon, "nope", "other")
    assert images.show(daemon, "gold")["name"] == "gold"


def test_promote_reads_a_dm_snapshot_through_the_snapshot(
        daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dmsnap disk is activated, read as one device (zeros left as holes) and taken
    down again; the real dm path runs in tests/e2e/test_lifecycle.py where the host has
    device-mapper."""
    vmcreate.create_sync(daemon, CreateParams(name="snap"))
    vmpower.stop(daemon, "snap")
    vm = vms.resolve(daemon, "snap")
    device = tmp_path / "dm-device"  # what the merged snapshot reads as
    with device.open("wb") as fh:
        fh.write(b"MERGED")
        fh.seek(8 << 20)
        fh.write(b"TAIL")
    calls: list[str] = []

    class Snap:
        name = "dmsnap"

        def activate(self, handle: CowHandle, origin: Path, vm_id: str,
                     record: object = None) -> CowHandle:
            calls.append(f"activate {origin.name} {vm_id}")
            return CowHandle("dmsnap", handle.path, device=str(device), dm_name="dm-x")

        def deactivate(self, handle: CowHandle) -> CowHandle:
            calls.append(f"deactivate {handle.dm_name}")
            return CowHandle("dmsnap", handle.path)

        def open_disk(self, handle: CowHandle) -> int:
            return os.open(str(handle.device), os.O_RDONLY)

    monkeypatch.setattr(daemon, "cow_for", lambda handle: Snap())
    vms.update_runtime(daemon, vm.id, cow={"strategy": "dmsnap", "path": "x"})
    daemon.layout.vm(vm.id).work_disk.write_bytes(b"work disk")
    img = promote(daemon, "snap", "from-snap")
    assert calls == [f"activate rootfs.ext4 {vm.id}", "deactivate dm-x"]
    rootfs = Path(img["rootfs"])
    data = rootfs.read_bytes()
    assert data[:6] == b"MERGED" and data[8 << 20:] == b"TAIL"
    assert rootfs.stat().st_blocks * 512 < 4 << 20  # the zeros between stayed a hole

    # A failed read still takes the snapshot down.
    device.unlink()
    calls.clear()
    with pytest.raises(HostError, match="dm-snapshot disk"):
        promote(daemon, "snap", "again")
    assert calls[-1] == "deactivate dm-x"
    assert not list(daemon.layout.staging_dir.iterdir())
