"""oci.flatten: layers applied to a real staging tree as root, hostile layers refused
with nothing written outside it, and a real mkfs.ext4 -d read back with debugfs."""

from __future__ import annotations

import base64
import gzip
import io
import os
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard

from banger.daemon.oci import flatten as fl
from banger.daemon.oci.flatten import FlattenStats, LayerSource, flatten, make_ext4
from banger.errors import BadRequest, Cancelled
from banger.runner import CancelToken, SubprocessRunner

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="flattening keeps owners and makes device nodes: root only")

MTIME = 1_600_000_000
MiB = 1 << 20
# VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (13): what `setcap cap_net_raw+ep` writes.
CAP_NET_RAW = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)


# --- building layers --------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def _ti(name: str, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: int = MTIME, xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, mtime
    for key, value in (xattrs or {}).items():
        ti.pax_headers["SCHILY.xattr." + key] = value
    return ti


def f(name: str, data: bytes = b"", **kw: object) -> Member:
    ti = _ti(name, tarfile.REGTYPE, **kw)  # type: ignore[arg-type]
    ti.size = len(data)
    return ti, data


def d(name: str, **kw: object) -> Member:
    kw.setdefault("mode", 0o755)
    return _ti(name, tarfile.DIRTYPE, **kw), b""  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> Member:
    ti = _ti(name, tarfile.SYMTYPE, mode=0o777, **kw)  # type: ignore[arg-type]
    ti.linkname = target
    return ti, b""


def hard(name: str, target: str) -> Member:
    ti = _ti(name, tarfile.LNKTYPE)
    ti.linkname = target
    return ti, b""


def node(name: str, kind: bytes, major: int = 0, minor: int = 0, **kw: object) -> Member:
    ti = _ti(name, kind, **kw)  # type: ignore[arg-type]
    ti.devmajor, ti.devminor = major, minor
    return ti, b""


def tar_bytes(members: Iterable[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


class World:
    """A root-only dir holding the staging tree and a sentinel dir beside it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.priv = tmp / "priv"
        self.priv.mkdir(mode=0o700)
        self.staging = self.priv / "staging"
        self.staging.mkdir()
        self.outside = self.priv / "outside"
        self.outside.mkdir()
        (self.outside / "keep").write_bytes(b"sentinel")
        self.n = 0

    def layer(self, members: Iterable[Member], *, comp: str = "gzip",
              fmt: int = tarfile.PAX_FORMAT, media_type: str = "") -> LayerSource:
        raw = tar_bytes(members, fmt)
        if comp == "gzip":
            raw = gzip.compress(raw, compresslevel=1)
        elif comp == "zstd":
            raw = zstandard.ZstdCompressor().compress(raw)
        self.n += 1
        path = self.tmp / f"layer{self.n}"
        path.write_bytes(raw)
        return LayerSource(path=path, digest=f"sha256:{self.n:064x}", media_type=media_type)

    def flatten(self, *layers: LayerSource, max_bytes: int = 64 * MiB) -> FlattenStats:
        return flatten(layers, self.staging, max_bytes=max_bytes)

    def fresh(self) -> None:
        """An empty staging dir again (a failed flatten leaves it to the caller)."""
        subprocess.run(["rm", "-rf", "--", str(self.staging)], check=True)
        self.staging.mkdir()

    def outside_untouched(self) -> bool:
        return (sorted(p.name for p in self.outside.iterdir()) == ["keep"]
                and (self.outside / "keep").read_bytes() == b"sentinel"
                and sorted(p.name for p in self.priv.iterdir()) == ["outside", "staging"])

    def tree(self) -> set[str]:
        return {str(p.relative_to(self.staging)) for p in self.staging.rglob("*")}


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def lst(p: Path) -> os.stat_result:
    return os.lstat(p)


# --- an ordinary image ------------------------------------------------------------


def test_multi_layer_image_keeps_types_owners_modes_times_and_xattrs(w: World) -> None:
    base = w.layer([
        d("./", mode=0o755),
        d("./etc"),
        f("./etc/passwd", b"root:x:0:0\n"),
        f("./etc/hostname", b"base\n"),
        d("./usr"), d("./usr/bin"),
        f("./usr/bin/sudo", b"#!sudo", mode=0o4755, uid=0, gid=0),
        f("./usr/bin/wall", b"#!wall", mode=0o2755, gid=5),
        f("./usr/bin/ping", b"#!ping", mode=0o755,
          xattrs={"security.capability": CAP_NET_RAW.decode("latin-1")}),
        hard("./usr/bin/ping6", "./usr/bin/ping"),
        sym("./bin", "usr/bin"),
        d("./tmp", mode=0o1777),
        d("./home"), d("./home/alice", mode=0o700, uid=1000, gid=1000),
        f("./home/alice/notes", b"hi", mode=0o600, uid=1000, gid=1000, mtime=1_234_567_890,
          xattrs={"user.note": "yes"}),
        d("./dev"),
        node("./dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        node("./dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6),
        node("./run.fifo", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8),
        d("./gone"), f("./gone/a", b"a"), d("./gone/sub"), f("./gone/sub/b", b"b"),
        d("./opq"), f("./opq/lower", b"lower"), d("./opq/keepdir"), f("./opq/keepdir/old", b"o"),
        f("./becomes_dir", b"file"),
        d("./becomes_file"), f("./becomes_file/x", b"x"),
        f("./old-ping-link", b"p"),
    ])
    top = w.layer([
        f("./etc/.wh.hostname"),
        f("./.wh.gone"),
        d("./opq"), f("./opq/.wh..wh..opq"), f("./opq/new", b"new"),
        d("./opq/keepdir"), f("./opq/keepdir/fresh", b"f"),
        d("./becomes_dir", mode=0o750, uid=3, gid=4), f("./becomes_dir/inside", b"i"),
        f("./becomes_file", b"now a file", mode=0o640),
        f("./etc/passwd", b"root:x:0:0\nalice:x:1000:1000\n"),
        f("./.wh..wh.plnk"),  # aufs bookkeeping: ignored
    ], comp="zstd")
    stats = w.flatten(base, top)

    s = w.staging
    assert w.tree() == {
        "etc", "etc/passwd", "usr", "usr/bin", "usr/bin/sudo", "usr/bin/wall",
        "usr/bin/ping", "usr/bin/ping6", "bin", "tmp", "home", "home/alice",
        "home/alice/notes", "dev", "dev/null", "dev/loop0", "run.fifo", "opq", "opq/new",
        "opq/keepdir", "opq/keepdir/fresh", "becomes_dir", "becomes_dir/inside",
        "becomes_file", "old-ping-link"}
    assert stats.layers == 2 and stats.whiteouts == 4
    assert stats.data_bytes == sum(len(x) for x in (
        b"root:x:0:0\n", b"base\n", b"#!sudo", b"#!wall", b"#!ping", b"hi", b"a", b"b",
        b"lower", b"o", b"file", b"x", b"p", b"new", b"f", b"i", b"now a file",
        b"root:x:0:0\nalice:x:1000:1000\n"))

    assert (s / "etc/passwd").read_bytes() == b"root:x:0:0\nalice:x:1000:1000\n"
    assert stat.S_IMODE(lst(s / "usr/bin/sudo").st_mode) == 0o4755
    wall = lst(s / "usr/bin/wall")
    assert (stat.S_IMODE(wall.st_mode), wall.st_gid) == (0o2755, 5)
    ping, ping6 = lst(s / "usr/bin/ping"), lst(s / "usr/bin/ping6")
    assert ping.st_ino == ping6.st_ino and ping.st_nlink == 2
    assert os.getxattr(s / "usr/bin/ping", "security.capability") == CAP_NET_RAW
    assert os.readlink(s / "bin") == "usr/bin"
    assert stat.S_IMODE(lst(s / "tmp").st_mode) == 0o1777
    alice = lst(s / "home/alice")
    assert (alice.st_uid, alice.st_gid, stat.S_IMODE(alice.st_mode)) == (1000, 1000, 0o700)
    notes = lst(s / "home/alice/notes")
    assert (notes.st_uid, notes.st_gid, notes.st_mtime_ns) == (1000, 1000, 1_234_567_890 * 10**9)
    assert os.getxattr(s / "home/alice/notes", "user.note") == b"yes"
    null = lst(s / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = lst(s / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0)
    assert (stat.S_IMODE(loop.st_mode), loop.st_gid) == (0o660, 6)
    fifo = lst(s / "run.fifo")
    assert stat.S_ISFIFO(fifo.st_mode)
    assert (stat.S_IMODE(fifo.st_mode), fifo.st_uid, fifo.st_gid) == (0o620, 7, 8)
    bd = lst(s / "becomes_dir")
    assert stat.S_ISDIR(bd.st_mode) and (bd.st_uid, bd.st_gid, stat.S_IMODE(bd.st_mode)) == (
        3, 4, 0o750)
    bf = lst(s / "becomes_file")
    assert stat.S_ISREG(bf.st_mode) and stat.S_IMODE(bf.st_mode) == 0o640
    assert (s / "becomes_file").read_bytes() == b"now a file"
    # Directory mtimes are the headers', after their children were made.
    for p in ("etc", "usr/bin", "opq", "becomes_dir", "home/alice", ""):
        assert lst(s / p).st_mtime_ns == MTIME * 10**9, p
    assert lst(s / "bin").st_mtime_ns == MTIME * 10**9  # the symlink's own
    assert w.outside_untouched()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_long_names_and_plain_layers(w: World, fmt: int) -> None:
    deep = "/".join(["d" * 60] * 2) + "/" + "n" * 90  # a GNU long name, ustar prefix or pax
    layer = w.layer([f(deep, b"deep", mode=0o640, uid=2**21 - 1), sym("l", "t" * 99)],
                    comp="none", fmt=fmt, media_type="application/vnd.oci.image.layer.v1.tar")
    w.flatten(layer)
    assert (w.staging / deep).read_bytes() == b"deep"
    assert lst(w.staging / deep).st_uid == 2**21 - 1
    assert lst(w.staging / deep).st_mtime_ns == MTIME * 10**9
    assert os.readlink(w.staging / "l") == "t" * 99


def test_pax_big_ids_subsecond_mtime_and_binary_xattr(w: World) -> None:
    ti, data = f("big", b"x")
    ti.uid, ti.gid = 3_000_000_000, 70_000
    ti.pax_headers["mtime"] = "1600000000.123456789"
    ti.pax_headers["LIBARCHIVE.xattr.user.bin%3Dary"] = base64.b64encode(
        b"\xff\x00\xfe").decode().rstrip("=")
    w.flatten(w.layer([(ti, data)]))
    st = lst(w.staging / "big")
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (3_000_000_000, 70_000,
                                                      1_600_000_000_123_456_789)
    assert os.getxattr(w.staging / "big", "user.bin=ary") == b"\xff\x00\xfe"


def test_whiteouts_spare_entries_of_the_same_layer_in_any_order(w: World) -> None:
    lower = w.layer([d("a"), f("a/lower", b"1"), d("a/sub"), f("a/sub/lower", b"2"),
                     f("b", b"old")])
    # '-x' sorts before '.wh..wh..opq': this layer's entries come before the marker.
    upper = w.layer([d("a"), f("a/-x", b"mine"), d("a/sub"), f("a/sub/mine", b"3"),
                     f("a/.wh..wh..opq"), f("b", b"new"), f(".wh.b")])
    w.flatten(lower, upper)
    assert w.tree() == {"a", "a/-x", "a/sub", "a/sub/mine", "b"}
    assert (w.staging / "b").read_bytes() == b"new"


def test_replacing_a_hard_linked_file_leaves_the_other_link_alone(w: World) -> None:
    w.flatten(w.layer([f("x", b"orig"), hard("y", "x")]), w.layer([f("x", b"changed")]))
    assert (w.staging / "y").read_bytes() == b"orig"
    assert (w.staging / "x").read_bytes() == b"changed"
    assert lst(w.staging / "y").st_nlink == 1


def test_missing_parents_are_made_and_the_empty_layer_is_fine(w: World) -> None:
    empty = w.tmp / "empty"
    empty.write_bytes(gzip.compress(bytes(1024)))  # Docker's empty layer
    stats = w.flatten(LayerSource(empty), w.layer([f("/abs/dir/file", b"z")]))
    assert (w.staging / "abs/dir/file").read_bytes() == b"z"
    assert stat.S_IMODE(lst(w.staging / "abs").st_mode) == 0o755
    assert stats.entries == 3


def test_progress_reports_each_layer(w: World) -> None:
    layers = [w.layer([f("a", os.urandom(3 * MiB))], comp="none"), w.layer([f("b", b"b")])]
    seen: list[tuple[int, int]] = []
    flatten(layers, w.staging, max_bytes=64 * MiB, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (1, layers[1].path.stat().st_size)
    assert (0, layers[0].path.stat().st_size) in seen
    assert len([s for s in seen if s[0] == 0]) >= 4  # during the big file, not only at its end


def test_cancel_stops_the_flatten(w: World) -> None:
    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(Cancelled, match="stop"):
        flatten([w.layer([f("a", b"a")])], w.staging, max_bytes=MiB, cancel=token)


def test_staging_must_be_empty_and_private(w: World, tmp_path: Path) -> None:
    (w.staging / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty"):
        flatten([], w.staging, max_bytes=MiB)
    open_parent = tmp_path / "open"
    open_parent.mkdir(mode=0o755)
    (open_parent / "s").mkdir()
    with pytest.raises(ValueError, match="closed to others"):
        flatten([], open_parent / "s", max_bytes=MiB)


# --- hostile layers ---------------------------------------------------------------


def refused(w: World, *layers: LayerSource, match: str, max_bytes: int = 64 * MiB) -> BadRequest:
    w.fresh()
    with pytest.raises(BadRequest, match=match) as exc:
        w.flatten(*layers, max_bytes=max_bytes)
    assert w.outside_untouched()
    return exc.value


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/../b", "./../priv/outside/x",
                                  "../.wh.outside", "a/../.wh..wh..opq"])
def test_dotdot_is_refused(w: World, name: str) -> None:
    err = refused(w, w.layer([d("a"), f(name, b"evil")]), match="'..' component")
    assert f"layer 1 of 1 (sha256:{1:064x})" in err.message and repr(name) in err.message
    assert err.details["entry"] == name


def test_leading_slash_is_relative_to_the_image_root(w: World) -> None:
    w.flatten(w.layer([f(str(w.outside / "abs"), b"in"), f("//etc//x", b"y")]))
    assert (w.staging / str(w.outside).lstrip("/") / "abs").read_bytes() == b"in"
    assert (w.staging / "etc/x").read_bytes() == b"y"
    assert w.outside_untouched()


def test_symlink_then_file_through_it_same_layer(w: World) -> None:
    refused(w, w.layer([sym("lib", str(w.outside)), f("lib/passwd", b"pwn")]),
            match="'lib' is a symlink")


def test_symlink_then_file_through_it_across_layers(w: World) -> None:
    lower = w.layer([d("usr"), sym("usr/lib", str(w.outside))])
    refused(w, lower, w.layer([d("usr/lib/x"), f("usr/lib/x/y", b"pwn")]),
            match="'usr/lib' is a symlink")


def test_symlink_aimed_inside_is_not_followed_either(w: World) -> None:
    refused(w, w.layer([d("real"), sym("alias", "real"), f("alias/f", b"x")]),
            match="'alias' is a symlink")
    assert not (w.staging / "real/f").exists()


def test_whiteout_and_opaque_through_a_symlink(w: World) -> None:
    lower = w.layer([sym("lib", str(w.outside))])
    refused(w, lower, w.layer([f("lib/.wh.keep")]), match="'lib' is a symlink")


def test_opaque_marker_through_a_symlink(w: World) -> None:
    lower = w.layer([sym("lib", str(w.outside))])
    refused(w, lower, w.layer([f("lib/.wh..wh..opq")]), match="'lib' is a symlink")


def test_a_whiteout_of_a_symlink_removes_only_the_link(w: World) -> None:
    w.flatten(w.layer([sym("lib", str(w.outside))]), w.layer([f(".wh.lib")]))
    assert w.tree() == set()
    assert w.outside_untouched()


def test_file_over_a_symlink_replaces_the_link(w: World) -> None:
    w.flatten(w.layer([sym("keep", str(w.outside / "keep"))]), w.layer([f("keep", b"new")]))
    assert stat.S_ISREG(lst(w.staging / "keep").st_mode)
    assert w.outside_untouched()


def test_hard_link_through_a_symlink_to_outside(w: World) -> None:
    refused(w, w.layer([sym("out", str(w.outside)), hard("stolen", "out/keep")]),
            match="'out' is a symlink")


@pytest.mark.parametrize(("target", "match"), [
    ("/etc/shadow", "not in the image"),
    ("../x", "'..' component"),
    ("dir", "not a regular file"),
    ("link", "not a regular file"),
    ("missing", "not a regular file"),
    ("./", "image root"),
])
def test_bad_hard_link_targets(w: World, target: str, match: str) -> None:
    refused(w, w.layer([d("dir"), sym("link", "/etc/shadow"), hard("h", target)]), match=match)
    assert not (w.staging / "h").exists()


def test_hard_link_replacing_its_own_target(w: World) -> None:
    refused(w, w.layer([d("a"), f("a/f", b"x"), hard("a", "a/f")]), match="its own target")


def test_too_long_names(w: World) -> None:
    refused(w, w.layer([f("x" * 256, b"")]), match="longer than 255 bytes")
    refused(w, w.layer([f("/".join(["y" * 200] * 21), b"")]), match="4096 bytes")
    refused(w, w.layer([f("/".join(["z"] * 300), b"")]), match="deeper than 256")


def test_names_ext4_carries_are_kept_verbatim(w: World) -> None:
    odd = "tab\there-\x1b[31m-\u00e9-" + "\udcff"  # control chars and a non-UTF-8 byte
    w.flatten(w.layer([f(odd, b"odd"), f("x" * 255, b"max")]))
    assert sorted(os.listdir(os.fsencode(w.staging))) == sorted([
        b"tab\there-\x1b[31m-\xc3\xa9-\xff", b"x" * 255])


def test_root_must_be_a_directory(w: World) -> None:
    refused(w, w.layer([f("./", b"")]), match="root must be a directory")


def test_file_below_a_file_is_refused(w: World) -> None:
    refused(w, w.layer([f("a", b"x"), f("a/b", b"y")]), match="'a' is not a directory")


def test_unsupported_xattr_namespace(w: World) -> None:
    refused(w, w.layer([f("x", b"", xattrs={"system.nfs4_acl": "x"})]), match="namespaces")


@pytest.mark.parametrize(("members_kind", "match"), [
    (tarfile.GNUTYPE_SPARSE, "GNU sparse file"),
    (b"V", "volume header"),
    (b"Z", "unknown tar type"),
])
def test_unsupported_entry_types(w: World, members_kind: bytes, match: str) -> None:
    ti = _ti("odd", members_kind)
    raw = ti.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    path = w.tmp / "odd.tar"
    path.write_bytes(raw)
    refused(w, LayerSource(path), match=match)


def test_pax_sparse_is_refused(w: World) -> None:
    ti, data = f("sparse", b"")
    ti.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
    refused(w, w.layer([(ti, data)]), match="sparse")


def test_media_type_must_be_a_tar_layer(w: World) -> None:
    refused(w, w.layer([f("a")], media_type="application/vnd.oci.image.layer.v1.tar+encrypted"),
            match="not a tar layer")


def test_compression_is_read_from_the_bytes(w: World) -> None:
    # Labelled gzip, really zstd: read as zstd. xz: refused by name.
    w.flatten(w.layer([f("a", b"z")], comp="zstd",
                      media_type="application/vnd.oci.image.layer.v1.tar+gzip"))
    assert (w.staging / "a").read_bytes() == b"z"
    xz = w.tmp / "x.xz"
    xz.write_bytes(b"\xfd7zXZ\x00" + bytes(100))
    refused(w, LayerSource(xz), match="xz and bzip2")


def test_signed_header_checksum(w: World) -> None:
    """Old tars summed the header as signed bytes; a name with bytes >= 128 then gets a
    different checksum, still accepted (and a wrong one still refused)."""
    raw = bytearray(tar_bytes([f("caf\xe9", b"x")], fmt=tarfile.USTAR_FORMAT))
    header = raw[:148] + b" " * 8 + raw[156:512]
    signed = sum(b - 256 if b >= 128 else b for b in header)
    assert signed != sum(header)
    raw[148:156] = b"%06o\0 " % signed
    path = w.tmp / "signed.tar"
    path.write_bytes(bytes(raw))
    w.flatten(LayerSource(path))
    assert w.tree() == {"caf\xe9"}
    raw[148:156] = b"%06o\0 " % (signed + 1)
    path.write_bytes(bytes(raw))
    w.fresh()
    with pytest.raises(BadRequest, match="checksum mismatch"):
        w.flatten(LayerSource(path))


def test_corrupt_streams(w: World) -> None:
    good = tar_bytes([f("a", b"abc" * 1000)])
    for name, raw in [
        ("trunc.gz", gzip.compress(good)[:-20]),
        ("deflate.gz", gzip.compress(good)[:10] + b"\xff" * 64),
        ("trunc.tar", good[:700]),
        ("badsum.tar", good[:148] + b"0000000\0" + good[156:]),
        ("garbage.zst", b"\x28\xb5\x2f\xfd" + b"\x55" * 64),
    ]:
        path = w.tmp / name
        path.write_bytes(raw)
        w.fresh()
        with pytest.raises(BadRequest, match="refusing") as exc:
            flatten([LayerSource(path)], w.staging, max_bytes=MiB)
        assert exc.value.details["layer"] == 0, name
    assert w.outside_untouched()


def zero_layer(path: Path, files: list[tuple[str, int]]) -> None:
    """A gzip tar of zero-filled files, streamed (never whole in memory)."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip
    with path.open("wb") as out:
        for name, size in files:
            ti = _ti(name, tarfile.REGTYPE)
            ti.size = size
            out.write(comp.compress(ti.tobuf(tarfile.PAX_FORMAT)))
            chunk = bytes(MiB)
            for _ in range(size // MiB):
                out.write(comp.compress(chunk))
            out.write(comp.compress(bytes(size % MiB + (-size % 512))))
        out.write(comp.compress(bytes(1024)) + comp.flush())


def test_one_huge_file_is_refused_before_a_byte_is_written(w: World) -> None:
    path = w.tmp / "bomb.gz"
    zero_layer(path, [("zeros", 200 * MiB)])
    assert path.stat().st_size < MiB
    t0 = time.monotonic()
    err = refused(w, LayerSource(path, digest="sha256:bomb"), max_bytes=50 * MiB,
                  match=r"larger than the 50.0 MiB limit")
    assert time.monotonic() - t0 < 2
    assert "--size" in err.hint and err.details["digest"] == "sha256:bomb"
    assert w.tree() == set()


def test_many_files_stop_at_the_cap(w: World) -> None:
    path = w.tmp / "bomb.gz"
    zero_layer(path, [(f"z{i}", 10 * MiB) for i in range(8)])
    refused(w, LayerSource(path), max_bytes=35 * MiB, match="'z3'")
    written = sum(lst(p).st_size for p in w.staging.iterdir())
    assert written == 30 * MiB


def test_data_never_written_still_counts_towards_the_stream_cap(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fl, "METADATA_ALLOWANCE", MiB)
    path = w.tmp / "wh.gz"
    zero_layer(path, [(".wh.nothing", 20 * MiB)])  # a whiteout's data is skipped, not written
    refused(w, LayerSource(path), max_bytes=MiB, match="decompresses to more")


def test_entry_cap(w: World) -> None:
    layer = w.layer([f(f"f{i}") for i in range(20)])
    with pytest.raises(BadRequest, match="more than 10 entries"):
        flatten([layer], w.staging, max_bytes=MiB, max_entries=10)


def test_pax_headers_parse_in_linear_time(w: World) -> None:
    ti, data = f("a", b"ok")
    ti.pax_headers["comment"] = "1" * (900 * 1024)  # quadratic in 3.11.7's tarfile
    t0 = time.monotonic()
    w.flatten(w.layer([(ti, data)]))
    assert time.monotonic() - t0 < 2
    assert (w.staging / "a").read_bytes() == b"ok"
    # A record that is all digits (the CVE-2024-6232 shape) is refused at once.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, body = tarfile.XHDTYPE, b"1" * (512 * 1024)
    pax.size = len(body)
    path = w.tmp / "redos.tar"
    path.write_bytes(pax.tobuf(tarfile.USTAR_FORMAT) + body + tar_bytes([f("b")]))
    refused(w, LayerSource(path), match="bad record")
    assert time.monotonic() - t0 < 3


def test_extended_header_size_is_bounded(w: World) -> None:
    ti, data = f("a", b"")
    ti.pax_headers["comment"] = "x" * (fl.MAX_HEADER_BYTES + 1)
    refused(w, w.layer([(ti, data)]), match="extended tar header")


# --- make_ext4 ----------------------------------------------------------------------


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, check=True, timeout=30).stdout


def test_make_ext4_carries_the_tree(w: World) -> None:
    w.flatten(w.layer([
        d("./", mode=0o755, gid=10),
        d("bin", uid=0, gid=0),
        f("bin/su", b"#!su", mode=0o4750, uid=0, gid=42),
        f("bin/ping", b"#!ping", xattrs={"security.capability":
                                          CAP_NET_RAW.decode("latin-1")}),
        hard("bin/ping2", "bin/ping"),
        sym("sh", "bin/su"),
        d("home/u", mode=0o700, uid=1000, gid=1001),
        f("home/u/f", b"data", mode=0o640, uid=1000, gid=1001, xattrs={"user.tag": "v1"}),
        node("null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        node("pipe", tarfile.FIFOTYPE, mode=0o600),
    ]))
    image = w.priv / "rootfs.ext4"
    make_ext4(SubprocessRunner(), w.staging, image, 16 * MiB, label="banger-oci", inodes=64)

    root = debugfs(image, "stat /")
    assert "User:     0   Group:    10" in root and "Mode:  0755" in root
    su = debugfs(image, "stat /bin/su")
    assert "User:     0   Group:    42" in su and "Mode:  04750" in su
    u = debugfs(image, "stat /home/u/f")
    assert "User:  1000   Group:  1001" in u and "Mode:  0640" in u
    assert "Links: 2" in debugfs(image, "stat /bin/ping2")
    assert "user.tag (2) = \"v1\"" in debugfs(image, "ea_list /home/u/f")
    assert "security.capability (20)" in debugfs(image, "ea_list /bin/ping")
    assert "Type: character special" in debugfs(image, "stat /null")
    assert "Device major/minor number: 01:03" in debugfs(image, "stat /null")
    assert "Type: FIFO" in debugfs(image, "stat /pipe")
    assert "Fast link dest: \"bin/su\"" in debugfs(image, "stat /sh")
    assert debugfs(image, "cat /home/u/f") == "data"
    assert "Filesystem volume name:   banger-oci" in debugfs(image, "stats")
    assert "Inode count:              64" in debugfs(image, "stats")


def test_make_ext4_overwrites_with_a_zeroed_journal(w: World) -> None:
    """The journal is not written (lazy_journal_init), yet reads as zeros: over an old
    file full of junk too, which mke2fs discards first. e2fsck finds it clean."""
    w.flatten(w.layer([f("etc/hostname", b"dev")]))
    image = w.priv / "rootfs.ext4"
    image.write_bytes(b"\xa5" * (16 * MiB))
    make_ext4(SubprocessRunner(), w.staging, image, 16 * MiB, label="banger-oci")
    assert "has_journal" in debugfs(image, "stats")
    journal = subprocess.run(["debugfs", "-R", "cat <8>", str(image)], capture_output=True,
                             check=True).stdout
    assert len(journal) >= MiB and journal[1024:].count(0) == len(journal) - 1024
    subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=True)


def test_make_ext4_checks_its_arguments(w: World) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        make_ext4(SubprocessRunner(), w.staging, w.priv / "i", 1000, label="x")
    with pytest.raises(ValueError, match="label"):
        make_ext4(SubprocessRunner(), w.staging, w.priv / "i", 4096, label="x" * 17)
