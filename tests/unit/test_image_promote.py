"""imagepromote with the fake world: state rules, what is copied, identity removed.

The real thing (edit in a VM, stop, promote, boot a new VM and see the edit) is in
tests/e2e/test_lifecycle.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.daemon import images, vmcreate, vmpower, vms
from banger.daemon.core import Daemon
from banger.daemon.imagepromote import promote
from banger.errors import AlreadyExists, BadRequest, InvalidState, NotFound


def test_promote_a_stopped_vm(daemon: Daemon) -> None:
    vmcreate.create_sync(daemon, vmcreate.CreateParams(name="src"))
    with pytest.raises(InvalidState) as exc:
        promote(daemon, "src", "gold")
    assert "banger vm stop src" in exc.value.hint
    vmpower.stop(daemon, "src")
    vm = vms.resolve(daemon, "src")
    paths = daemon.layout.vm(vm.id)
    with paths.rootfs.open("r+b") as fh:
        fh.write(b"EDITED-ROOT")
    paths.work_disk.write_bytes(b"work disk")  # the fake runner made no ext4
    img = promote(daemon, "src", "gold")
    assert img["source"] == "promoted" and img["origin"] == "vm src (image debian-bookworm)"
    assert Path(img["rootfs"]).read_bytes()[:11] == b"EDITED-ROOT"
    assert Path(img["kernel"]).read_bytes() == b"kernel"
    scripts = [c for c in daemon.runner.calls if c[:2] == ["debugfs", "-w"]]  # type: ignore[attr-defined]
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
    vms.update_runtime(daemon, vm.id, cow={"strategy": "dmsnap", "path": "x"})
    with pytest.raises(BadRequest, match="dm-snapshot"):
        promote(daemon, "src", "other")
    assert images.show(daemon, "gold")["name"] == "gold"
