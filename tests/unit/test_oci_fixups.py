"""An unprivileged pull's flatten (oci.fixups): the tree written as the daemon's own,
owners, devices and privileged xattrs noted and given to the ext4 by debugfs. The
image it makes must be the one a root flatten makes: both are built from the same
layers here (the noted one also as ``nobody``, the way a service daemon runs it),
loop-mounted read-only and compared entry by entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from banger.daemon.oci.fixups import Fixups
from banger.daemon.oci.flatten import LayerSource, flatten, make_ext4
from banger.errors import BadRequest
from banger.runner import SubprocessRunner
from tests.copyruntime import SYSTEM_PYTHON, copy_runtime
from tests.unit.test_oci_flatten import CAP_NET_RAW, World, d, f, hard, node, sym

NOBODY = 65534
# POSIX ACL (xattr form, version 2): owner rw, user 1001 rw, group r, mask rw, other none.
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 6, 1001), (0x04, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF)))
SIZE = 64 << 20


# ----------------------------------------------------------------- the notes alone

def test_notes_follow_the_tree() -> None:
    fx = Fixups()
    assert fx.note("etc/x", uid=0, gid=0, mode=0o100644, host_mode=0o100644, xattrs=[]) == []
    assert fx.notes == {}
    kept = fx.note("usr/bin/ping", uid=0, gid=0, mode=0o100755, host_mode=0o100755,
                   xattrs=[("security.capability", b"c"), ("user.a", b"1")])
    assert kept == [("user.a", b"1")]  # the daemon sets this one on its own file
    fx.note("var/mail", uid=0, gid=8, mode=0o42775, host_mode=0o42775, xattrs=[])
    fx.note("var/mail/alice", uid=1000, gid=8, mode=0o100660, host_mode=0o100660, xattrs=[])
    fx.note("proc", uid=0, gid=0, mode=0o40555, host_mode=0o40755, xattrs=[])
    fx.note("dev/null", uid=0, gid=0, mode=0o20666, host_mode=0o20666, xattrs=[],
            device=(1, 3), mtime_ns=5 * 10**9)
    assert fx.is_device("dev/null") and not fx.is_device("proc")
    fx.link("var/mail/alice", "home/alice-mail")
    assert fx.notes["home/alice-mail"].uid == 1000
    fx.forget("var/mail")  # the directory and all below it
    assert sorted(fx.notes) == ["dev/null", "home/alice-mail", "proc", "usr/bin/ping"]
    fx.note("proc", uid=0, gid=0, mode=0o40755, host_mode=0o40755, xattrs=[])
    assert "proc" not in fx.notes  # a later layer made it plain again


def test_forgetting_a_path_takes_its_whole_noted_subtree_and_nothing_else() -> None:
    """Notes below a directory that has none of its own, a sibling sharing a prefix,
    and a path noted again after it was forgotten."""
    fx = Fixups()
    for key in ("opt/a/b/c/deep", "opt/a/b/x", "opt/ab", "opt/a/bc", "opt/a"):
        fx.note(key, uid=0, gid=0, mode=0o100600, host_mode=0o100644, xattrs=[])
    fx.forget("opt/a/b")  # not noted itself; two notes below it
    assert sorted(fx.notes) == ["opt/a", "opt/a/bc", "opt/ab"]
    fx.note("opt/a/b/new", uid=5, gid=5, mode=0o100644, host_mode=0o100644, xattrs=[])
    fx.forget("opt/a")
    assert sorted(fx.notes) == ["opt/ab"]
    fx.forget("opt/nothing-here")
    fx.note("opt/a/b/again", uid=5, gid=5, mode=0o100644, host_mode=0o100644, xattrs=[])
    fx.forget("")  # the root: everything
    assert fx.notes == {}


def test_the_script_quotes_paths_and_refuses_what_it_cannot_quote(tmp_path: Path) -> None:
    fx = Fixups()
    fx.note("a b/it's $x", uid=5, gid=6, mode=0o100600, host_mode=0o100600, xattrs=[])
    fx.note("dev/null", uid=0, gid=0, mode=0o20666, host_mode=0o20666, xattrs=[],
            device=(1, 3), mtime_ns=7 * 10**9)
    fx.note("bin/ping", uid=0, gid=0, mode=0o100755, host_mode=0o100755,
            xattrs=[("security.capability", CAP_NET_RAW)])
    script = fx.script(tmp_path).decode().splitlines()
    assert 'sif "/a b/it\'s $x" uid 5' in script and 'sif "/a b/it\'s $x" gid 6' in script
    at = script.index('rm "/dev/null"')
    assert script[at:at + 5] == ['rm "/dev/null"', 'cd "/dev"', 'mknod "null" c 1 3', "cd /",
                                 'sif "/dev/null" mtime @7']
    ea = [line for line in script if line.startswith("ea_set")]
    assert len(ea) == 1 and ea[0].endswith('"/bin/ping" "security.capability"')
    assert Path(ea[0].split('"')[1]).read_bytes() == CAP_NET_RAW
    for bad in ('x"; rm -rf /', "x\nsif / uid 0"):
        fx = Fixups()
        fx.note(bad, uid=1, gid=1, mode=0o100644, host_mode=0o100644, xattrs=[])
        with pytest.raises(BadRequest, match="cannot give its owner"):
            fx.script(tmp_path)


def test_what_debugfs_cannot_carry_is_refused_or_made_to_agree(tmp_path: Path) -> None:
    fx = Fixups()
    with pytest.raises(BadRequest, match="only as root"):
        fx.note("dev/big", uid=0, gid=0, mode=0o20600, host_mode=0o20600, xattrs=[],
                device=(1, 70000))
    fx.note("dev/old", uid=0, gid=0, mode=0o20600, host_mode=0o20600, xattrs=[],
            device=(1, 3), mtime_ns=-500_000_000)
    assert fx.notes["dev/old"].mtime_s == 0  # debugfs cannot be told a time before 1970
    fx.note("", uid=0, gid=0, mode=0o40555, host_mode=0o40755, xattrs=[])
    assert "" not in fx.notes  # the root directory keeps mke2fs's 0755, as a root pull's
    fx.note("dev/tagged", uid=0, gid=0, mode=0o20600, host_mode=0o20600,
            xattrs=[("user.x", b"1")], device=(1, 5))
    assert fx.notes["dev/tagged"].xattrs == (("user.x", b"1"),)  # not lost with its stand-in
    fx = Fixups()
    fx.note("a\0b", uid=1, gid=1, mode=0o100644, host_mode=0o100644, xattrs=[])
    with pytest.raises(BadRequest):
        fx.script(tmp_path)


# ----------------------------------------------------------------- root's image and the noted one

def layers(w: World) -> list[LayerSource]:
    """Owners, setuid/setgid, devices, fifos, privileged and user xattrs, a directory its
    owner cannot write, hard links, and later layers that remove, replace and white out
    noted paths."""
    base = w.layer([
        d("./", mode=0o755),
        d("./usr"), d("./usr/bin"),
        f("./usr/bin/sudo", b"#!sudo", mode=0o4755),
        f("./usr/bin/wall", b"#!wall", mode=0o2755, gid=5),
        f("./usr/bin/ping", b"#!ping", xattrs={
            "security.capability": CAP_NET_RAW.decode("latin-1"), "trusted.t": "1",
            "user.u": "2"}, mode=0o755),
        hard("./usr/bin/ping6", "./usr/bin/ping"),
        sym("./bin", "usr/bin"),
        sym("./home-link", "home", uid=1000, gid=1000),
        d("./proc", mode=0o555), d("./sys", mode=0o555),
        f("./proc/.keep", b"", mode=0o444),  # written below an 0555 directory
        d("./home"), d("./home/alice", mode=0o700, uid=1000, gid=1000),
        f("./home/alice/notes", b"hi", mode=0o600, uid=1000, gid=1000),
        f("./home/alice/locked", b"no one reads", mode=0o000, uid=1000, gid=1000),
        f("./home/alice/shared", b"alice and bob", mode=0o640, uid=1000, gid=1000,
          xattrs={"system.posix_acl_access": ACL.decode("utf-8", "surrogateescape")}),
        d("./dev"),
        node("./dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        node("./dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6),
        node("./dev/gone", tarfile.CHRTYPE, 1, 5, mode=0o666),
        node("./dev/replaced", tarfile.CHRTYPE, 1, 7, mode=0o666),
        node("./run.fifo", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8),
        d("./var"), d("./var/mail", mode=0o2775, gid=8),
        f("./var/mail/alice", b"mail", mode=0o660, uid=1000, gid=8),
        d("./opq"), f("./opq/old", b"o", uid=9, gid=9),
        f("./relinked", b"r", uid=11, gid=12),
        hard("./relinked2", "./relinked"),
    ])
    top = w.layer([
        f("./dev/.wh.gone"),
        f("./dev/replaced", b"a file now", mode=0o644),
        f("./var/.wh.mail"),
        d("./opq"), f("./opq/.wh..wh..opq"), f("./opq/new", b"n", uid=13, gid=14),
        f("./relinked", b"new content", mode=0o644),
        f("./usr/bin/wall", b"#!wall2", mode=0o2755, gid=5),
    ], comp="zstd")
    return [base, top]


def _image(w: World, tag: str, fixups: Fixups | None) -> Path:
    flatten(layers(w), w.staging, max_bytes=SIZE, fixups=fixups)
    image = w.tmp / f"{tag}.ext4"
    make_ext4(SubprocessRunner(), w.staging, image, SIZE, label="t", fixups=fixups)
    w.fresh()
    return image


_AS_NOBODY = """
import json, sys
from pathlib import Path
from banger.daemon.oci.fixups import Fixups
from banger.daemon.oci.flatten import LayerSource, flatten, make_ext4
from banger.runner import SubprocessRunner
a = json.loads(sys.argv[1])
fx = Fixups()
flatten([LayerSource(Path(p)) for p in a["layers"]], Path(a["staging"]), max_bytes=a["size"],
        fixups=fx)
make_ext4(SubprocessRunner(), Path(a["staging"]), Path(a["image"]), a["size"], label="t",
          fixups=fx)
"""


@pytest.fixture(scope="module")
def nobody_site() -> Iterator[Path]:
    """A copy of banger's runtime ``nobody`` can read (the venv may sit where it cannot)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"nobody runs banger with {SYSTEM_PYTHON}, which is missing")
    top = Path(tempfile.mkdtemp(prefix="banger-fixups-", dir="/var/tmp"))
    try:
        copy_runtime(top / "site")
        os.chmod(top, 0o755)
        yield top / "site"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _image_as_nobody(site: Path) -> Path:
    """The noted image made by a process that is ``nobody``: no chown, no mknod, no
    privileged xattr; mkfs in a user namespace of its own."""
    work = Path(tempfile.mkdtemp(prefix="nobody-", dir=site.parent))
    w = World(work)
    srcs = layers(w)
    for p in [work, work / "priv", w.staging, *(s.path for s in srcs)]:
        os.chown(p, NOBODY, NOBODY)
    image = work / "nobody.ext4"
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", str(SYSTEM_PYTHON), "-c", _AS_NOBODY,
            json.dumps({"layers": [str(s.path) for s in srcs], "staging": str(w.staging),
                        "image": str(image), "size": SIZE})]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=work,
                         env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"]})
    assert res.returncode == 0, res.stderr
    return image


@contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def inventory(root: Path) -> dict[str, Any]:
    """Every entry's type, mode, owner, device, target, content, xattrs and mtime, and
    which entries share an inode."""
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == "lost+found":
                continue
            s = os.lstat(p)
            entry: dict[str, Any] = {
                "mode": oct(s.st_mode), "owner": [s.st_uid, s.st_gid],
                "mtime": s.st_mtime_ns if not (stat.S_ISCHR(s.st_mode)
                                               or stat.S_ISBLK(s.st_mode))
                else s.st_mtime_ns // 10**9 * 10**9,
                "xattrs": {x: os.getxattr(p, x, follow_symlinks=False).hex()
                           for x in sorted(os.listxattr(p, follow_symlinks=False))}}
            if stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
                entry["rdev"] = [os.major(s.st_rdev), os.minor(s.st_rdev)]
            elif stat.S_ISLNK(s.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(s.st_mode):
                entry["sha"] = hashlib.sha256(p.read_bytes()).hexdigest()
                inodes.setdefault(s.st_ino, []).append(rel)
            out[rel] = entry
    out["hard links"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


@pytest.fixture(scope="module")
def want(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a root flatten of :func:`layers` puts in the ext4."""
    if os.geteuid() != 0:
        pytest.skip("mounting the images and a root flatten need root")
    tmp = tmp_path_factory.mktemp("root-flatten")
    w = World(tmp)
    with mounted(_image(w, "root", None), tmp / "mnt") as a:
        found = inventory(a)
    # The comparisons are about something: this is what the layers say.
    assert found["usr/bin/sudo"]["mode"] == oct(0o104755)
    assert found["usr/bin/wall"]["owner"] == [0, 5]
    assert found["dev/null"]["rdev"] == [1, 3] and found["dev/loop0"]["owner"] == [0, 6]
    assert found["home/alice/locked"]["owner"] == [1000, 1000]
    assert found["proc"]["mode"] == oct(0o40555) and "proc/.keep" in found
    assert found["dev/replaced"]["mode"] == oct(0o100644)
    assert not {"dev/gone", "var/mail", "opq/old"} & found.keys()
    assert found["opq/new"]["owner"] == [13, 14]
    assert found["usr/bin/ping"]["xattrs"].keys() == {
        "security.capability", "trusted.t", "user.u"}
    assert found["home-link"]["owner"] == [1000, 1000]
    assert found["relinked2"]["owner"] == [11, 12]
    assert found["hard links"] == [["usr/bin/ping", "usr/bin/ping6"]]
    shared = found["home/alice/shared"]  # the ACL's mask is the mode's group bits
    assert shared["mode"] == oct(0o100660) and shared["xattrs"] == {
        "system.posix_acl_access": ACL.hex()}
    return found


def test_a_noted_flatten_makes_the_image_a_root_flatten_makes(
        want: dict[str, Any], tmp_path: Path) -> None:
    w = World(tmp_path)
    with mounted(_image(w, "noted", Fixups()), tmp_path / "mnt") as b:
        assert inventory(b) == want


def test_so_does_one_by_a_process_without_privilege(
        want: dict[str, Any], nobody_site: Path, tmp_path: Path) -> None:
    with mounted(_image_as_nobody(nobody_site), tmp_path / "mnt") as c:
        assert inventory(c) == want
