"""``vm show`` lists the guest changes re-prepares saved, in the JSON and the text."""

from __future__ import annotations

from banger.api.params import CreateParams
from banger.cli.output import vm_detail
from banger.daemon import Daemon, vmcreate, vms
from tests.unit.test_images_qemu import VM


def test_show_lists_workspace_backups_oldest_first(daemon: Daemon) -> None:
    vm = vmcreate.create_sync(daemon, CreateParams(name="ws"))
    assert vms.show(daemon, "ws")["workspace_backups"] == []
    saved = daemon.layout.vm(str(vm["id"])).workspace_backups
    saved.mkdir(parents=True)
    for name in ("20261123T120000.000002Z.patch", "20261123T110000.000001Z.patch",
                 "unrelated.txt"):
        (saved / name).write_bytes(b"patch")
    assert vms.show(daemon, "ws")["workspace_backups"] == [
        str(saved / "20261123T110000.000001Z.patch"),
        str(saved / "20261123T120000.000002Z.patch")]


def test_vm_detail_prints_one_line_per_backup_newest_last() -> None:
    shown = vm_detail({**VM, "workspace": {
        "host_path": "/home/ada/proj", "guest_path": "/root/proj", "prepared": True,
        "base_commit": "c0ffee"}, "workspace_backups": ["/s/20261123T110000.000001Z.patch",
                                                        "/s/20261123T120000.000002Z.patch"]})
    assert shown.splitlines()[-2:] == [
        "workspace backup: /s/20261123T110000.000001Z.patch",
        "workspace backup: /s/20261123T120000.000002Z.patch",
    ]
