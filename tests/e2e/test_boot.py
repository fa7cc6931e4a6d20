"""banger's initramfs under a real kernel when the root cannot be mounted.

Every other end-to-end test boots through it to a running system; these boot the test
image's kernel and initramfs in a bare QEMU (no network, no banger) with a root that is
missing or not ext4, and read the reason from the serial console: the VM must say why
and stop (panic=1, -no-reboot), not hang.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.daemon.qemuproc import host_tsc_khz, machine_args, tcg_kernel_args
from banger.daemon.vmboot import BOOT_ARGS
from tests.e2e.conftest import CachedImage


@pytest.mark.parametrize(("root", "disk", "says"), [
    ("/dev/vdz", True, "banger initramfs: no root device /dev/vdz after 5 s"),
    ("/dev/vda", True, "banger initramfs: cannot mount /dev/vda (ext4)"),
    ("LABEL=banger-root", False, "only a device path (/dev/...) is supported"),
])
def test_a_root_that_cannot_be_mounted_is_named_on_the_console_and_the_vm_stops(
        tmp_path: Path, test_image: CachedImage, root: str, disk: bool, says: str) -> None:
    args = [a for a in BOOT_ARGS if not a.startswith("root=")]
    cmdline = " ".join([*args, f"root={root}", *tcg_kernel_args(host_tsc_khz())])
    serial = tmp_path / "serial.log"
    argv = ["qemu-system-x86_64", *machine_args("tcg"), "-m", "512", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(test_image.kernel), "-initrd", str(test_image.initrd),
            "-append", cmdline, "-serial", f"file:{serial}"]
    if disk:
        blank = tmp_path / "blank.img"
        blank.write_bytes(bytes(1 << 20))  # a disk, but no file system on it
        argv += ["-drive", f"id=root,file={blank},format=raw,if=none",
                 "-device", "virtio-blk-device,drive=root"]
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=180,
                         check=False)
    console = serial.read_text(errors="replace")
    assert res.returncode == 0, res.stderr  # the guest stopped itself: -no-reboot exits 0
    assert says in console, console[-2000:]
    assert "Kernel panic" in console  # init exited: the kernel stops the VM (panic=1)
