"""remotecopy: the tar stream a command sends to a remote host, unpacked there, and
what a killed send leaves (swept). Real files, tarfile and flock; no SSH (the e2e
remote tests carry streams over real SSH)."""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
from pathlib import Path

import pytest

from banger import remotecopy
from banger.errors import BadRequest


def test_received_directories_a_crash_left_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "received"
    root.mkdir()
    old, new = root / "repo-old", root / "repo-new"
    for d in (old, new):
        d.mkdir()
    day_ago = remotecopy.time.time() - remotecopy.STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    remotecopy.sweep(root)
    assert sorted(p.name for p in root.iterdir()) == ["repo-new"]


def test_a_received_directory_still_coming_in_is_never_swept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    remotecopy.write_files({"rootfs": _file(tmp_path / "a.img", b"x" * (1 << 20))}, buf)
    root = tmp_path / "received"
    swept_during: list[list[str]] = []

    class Slow(io.BytesIO):
        """A stream that, half-way, has a second send sweep with every directory stale."""

        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0 and not swept_during:
                with monkeypatch.context() as m:
                    m.setattr(remotecopy, "STALE_S", -3600.0)
                    remotecopy.sweep(root)
                swept_during.append([p.name for p in root.iterdir()])
            return super().read(size)

    got = remotecopy.unpack(remotecopy.FILES, Slow(buf.getvalue()), root)
    assert swept_during and swept_during[0] == [got.parent.name]
    assert (got / "rootfs" / "a.img").read_bytes() == b"x" * (1 << 20)
    # Once whole, its 24 hours count from the end of the send.
    remotecopy.sweep(root)
    assert got.exists()
    # A stale directory whose lock someone holds stays; unheld, it goes.
    day_ago = remotecopy.time.time() - remotecopy.STALE_S - 60
    os.utime(got.parent, (day_ago, day_ago))
    held = os.open(got.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        remotecopy.sweep(root)
        assert got.exists()
    finally:
        os.close(held)
    remotecopy.sweep(root)
    assert list(root.iterdir()) == []


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_files_go_as_key_and_name_and_arrive_whole(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * 5000)
    other = tmp_path / "other"
    other.mkdir()
    (other / "vmlinuz").write_bytes(b"second file of the same name")
    buf = io.BytesIO()
    counted: list[int] = []
    remotecopy.write_files({"kernel0": kernel, "kernel1": other / "vmlinuz"}, buf, counted.append)
    assert sum(counted) == 5000 + len(b"second file of the same name")
    buf.seek(0)
    got = remotecopy.unpack(remotecopy.FILES, buf, tmp_path / "received")
    assert (got / "kernel0" / "vmlinuz").read_bytes() == b"K" * 5000
    assert (got / "kernel1" / "vmlinuz").read_bytes() == b"second file of the same name"
    with pytest.raises(BadRequest, match="not a regular file"):
        remotecopy.write_files({"dir": other}, io.BytesIO())
    # A symlink (/boot/vmlinuz is one) goes as the file it names.
    (tmp_path / "link").symlink_to(kernel)
    buf = io.BytesIO()
    remotecopy.write_files({"kernel": tmp_path / "link"}, buf)
    buf.seek(0)
    got = remotecopy.unpack(remotecopy.FILES, buf, tmp_path / "received")
    assert (got / "kernel" / "link").read_bytes() == b"K" * 5000


def test_a_file_that_cannot_be_sent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"cannot send .*nope: No such file"):
        remotecopy.send_files(None, {"kernel0": tmp_path / "nope"})  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="not a file key"):
        remotecopy.send_files(None, {"../x": tmp_path})  # type: ignore[arg-type]


def _sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


@pytest.mark.parametrize("pieces", [
    {1 << 20: b"a" * 4096, 40 << 20: b"b" * 8192},  # holes around and between
    {0: b"head", (64 << 20) - 5: b"tail!"},  # data at both ends
    {},  # all hole
])
def test_a_sparse_file_goes_as_its_data_and_arrives_with_its_holes(
        tmp_path: Path, pieces: dict[int, bytes]) -> None:
    image = _sparse(tmp_path / "rootfs.ext4", 64 << 20, pieces)
    if os.stat(image).st_blocks * 512 >= 64 << 20:
        pytest.skip(f"{tmp_path} keeps no holes")
    runs = remotecopy.data_runs(os.open(image, os.O_RDONLY), 64 << 20)
    assert runs is not None and len(runs) == len(pieces)
    buf = io.BytesIO()
    counted: list[int] = []
    remotecopy.write_files({"rootfs": image}, buf, counted.append)
    data_bytes = sum(n for _, n in runs)
    assert sum(counted) == data_bytes == remotecopy.sent_bytes(image)
    assert len(buf.getvalue()) < data_bytes + 16 * 1024  # the holes did not travel
    buf.seek(0)
    got = remotecopy.unpack(remotecopy.FILES, buf, tmp_path / "received") / "rootfs" / image.name
    assert got.read_bytes() == image.read_bytes()
    assert os.stat(got).st_blocks * 512 <= data_bytes + 64 * 1024  # holes again
    # GNU tar reads the same stream as the same file.
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", "-C", str(out), "-xf", "-"], input=buf.getvalue(), check=True)
    assert (out / "rootfs" / image.name).read_bytes() == image.read_bytes()
    assert sorted(p.name for p in (out / "rootfs").iterdir()) == [image.name]


def test_a_file_without_holes_goes_whole(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(100_000))
    assert remotecopy.data_runs(os.open(kernel, os.O_RDONLY), 100_000) is None
    buf = io.BytesIO()
    remotecopy.write_files({"kernel": kernel}, buf)
    assert b"GNU.sparse" not in buf.getvalue()
    buf.seek(0)
    got = remotecopy.unpack(remotecopy.FILES, buf, tmp_path / "received")
    assert (got / "kernel" / "vmlinuz").read_bytes() == kernel.read_bytes()
