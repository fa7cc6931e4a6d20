"""What the pull tests push and look for: layers over the test image's tree with
whiteouts, an opaque directory, owners, modes, an xattr, a hard link, a setuid file and
a device node, and the probe that reads them back from inside the booted guest."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from tests.ocilayout import Layer, layer_from_members, member

# Left out of the base layer: finalize must put them back for the VM to boot and answer.
AGENT = ["usr/local/sbin/banger-init", "etc/systemd/system/banger-init.service",
         "etc/systemd/system/multi-user.target.wants/banger-init.service",
         "etc/ssh/sshd_config.d/banger.conf", "etc/systemd/system/ssh.service.d"]


def top_layers(where: Path) -> list[Layer]:
    """Two layers over the base: the second whites out, makes a directory opaque and adds
    files with owners, modes, an xattr, a hard link and a device node."""
    d = tarfile.DIRTYPE
    lower = layer_from_members([
        member("opt/", d, mode=0o755),
        member("opt/gone", data=b"whited out above\n"),
        member("opt/app/", d, mode=0o755),
        member("opt/app/old", data=b"hidden by the opaque dir above\n"),
    ], where / "lower.tar.gz")
    upper = layer_from_members([
        member("opt/.wh.gone"),
        member("opt/app/", d, mode=0o750, uid=1234, gid=5678),
        member("opt/app/.wh..wh..opq"),
        member("opt/app/new", data=b"pulled\n", mode=0o640, uid=1234, gid=5678,
               xattrs={"user.banger": "yes"}),
        member("opt/app/hard", tarfile.LNKTYPE, linkname="opt/app/new"),
        member("opt/app/suid", data=b"#!/bin/sh\necho suid\n", mode=0o4755),
        member("opt/app/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("opt/app/link", tarfile.SYMTYPE, linkname="/etc/hostname"),
    ], where / "upper.tar.gz")
    return [lower, upper]


PROBE = r"""
import json, os, stat
def st(p):
    s = os.lstat(p)
    return [oct(stat.S_IMODE(s.st_mode)), s.st_uid, s.st_gid, s.st_ino, stat.S_IFMT(s.st_mode)]
out = {p: st(p) for p in ("/opt/app", "/opt/app/new", "/opt/app/hard", "/opt/app/suid",
                          "/opt/app/null")}
out["null_rdev"] = [os.major(os.lstat("/opt/app/null").st_rdev),
                    os.minor(os.lstat("/opt/app/null").st_rdev)]
out["xattr"] = os.getxattr("/opt/app/new", "user.banger").decode()
out["link"] = os.readlink("/opt/app/link")
out["absent"] = [p for p in ("/opt/gone", "/opt/app/old") if not os.path.lexists(p)]
out["modules"] = os.listdir("/lib/modules")
out["agent"] = [p for p in ("/usr/local/sbin/banger-init", "/etc/ssh/sshd_config.d/banger.conf")
                if os.path.exists(p)]
out["hostname"] = open("/etc/hostname").read().strip()
nic = [n for n in os.listdir("/sys/class/net") if n != "lo"][0]
out["netdrv"] = os.path.basename(os.readlink(f"/sys/class/net/{nic}/device/driver"))
print(json.dumps(out))
"""


def check_pulled(seen: dict[str, Any], hostname: str) -> None:
    """The probe's answer is what :func:`top_layers` put there, on a booting image."""
    assert seen["/opt/app"][:3] == ["0o750", 1234, 5678]
    assert seen["/opt/app/new"][:3] == ["0o640", 1234, 5678]
    assert seen["/opt/app/hard"][3] == seen["/opt/app/new"][3]  # one inode
    assert seen["/opt/app/suid"][0] == "0o4755"
    assert seen["/opt/app/null"][4] == 0o020000 and seen["null_rdev"] == [1, 3]
    assert seen["xattr"] == "yes"
    assert seen["link"] == "/etc/hostname"
    assert seen["absent"] == ["/opt/gone", "/opt/app/old"]
    assert len(seen["modules"]) == 1  # the default image's kernel's, copied in
    assert len(seen["agent"]) == 2
    assert seen["hostname"] == hostname
    assert seen["netdrv"] == "virtio_net"
