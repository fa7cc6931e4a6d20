"""``[[file_sync]]`` sources are read as the config file's owner, never through a symlink.

Real files, a real ``setpriv`` to the ``nobody`` user (the tests run as root, like
bangerd); only the guest is a recorder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from banger.config import parse_config
from banger.daemon.workspaces import SyncSkipped, read_sync_source, sync_files
from banger.runner import OwnerRunner, Result, SubprocessRunner

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, like bangerd")


def as_user(uid: int, home: str = "/nonexistent") -> OwnerRunner:
    return OwnerRunner(SubprocessRunner(), uid, uid, home)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory ``nobody`` can search (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="banger-sync-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write(path: Path, data: str, mode: int, uid: int = 0) -> Path:
    path.write_text(data)
    path.chmod(mode)
    os.chown(path, uid, uid)
    return path


def test_reads_a_file_the_owner_can_read(base: Path) -> None:
    token = write(base / "token", "mine\n", 0o600, NOBODY)
    assert read_sync_source(str(token), as_user(NOBODY)) == b"mine\n"


def test_a_root_only_file_is_not_copied_for_a_user(base: Path) -> None:
    secret = write(base / "secret", "root only\n", 0o600)
    with pytest.raises(SyncSkipped, match="cannot read"):
        read_sync_source(str(secret), as_user(NOBODY))


@pytest.mark.parametrize("owner", [NOBODY, 0])
def test_a_symlink_is_never_followed(base: Path, owner: int) -> None:
    secret = write(base / "secret", "root only\n", 0o600)
    (base / "link").symlink_to(secret)
    with pytest.raises(SyncSkipped, match="symlink"):
        read_sync_source(str(base / "link"), as_user(owner))


def test_a_symlinked_directory_is_never_followed(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o755)
    write(real / "token", "public\n", 0o644)
    (base / "dirlink").symlink_to(real)
    with pytest.raises(SyncSkipped, match="symlink"):
        read_sync_source(str(base / "dirlink" / "token"), as_user(NOBODY))


def test_missing_and_special_files_are_skipped(base: Path) -> None:
    with pytest.raises(SyncSkipped, match="does not exist"):
        read_sync_source(str(base / "missing"), as_user(NOBODY))
    os.mkfifo(base / "fifo")
    with pytest.raises(SyncSkipped, match="not a regular file"):
        read_sync_source(str(base / "fifo"), as_user(NOBODY))
    with pytest.raises(SyncSkipped, match="not a regular file"):
        read_sync_source(str(base), as_user(NOBODY))


def test_tilde_is_the_owner_home(base: Path) -> None:
    write(base / "token", "in the owner's home\n", 0o600, NOBODY)
    assert read_sync_source("~/token", as_user(NOBODY, str(base))) == b"in the owner's home\n"


class Recorder:
    ip = "10.0.0.2"

    def __init__(self) -> None:
        self.inputs: list[bytes | None] = []

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "") -> Result:
        self.inputs.append(input)
        return Result(["ssh"], 0, b"", b"")


def test_sync_files_copies_only_what_the_config_owner_may_read(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(base / "config.toml", "", 0o644, NOBODY)
    monkeypatch.setenv("BANGER_CONFIG", str(config))
    mine = write(base / "mine", "user token\n", 0o600, NOBODY)
    secret = write(base / "shadow", "root secret\n", 0o600)
    (base / "link").symlink_to(secret)
    cfg = parse_config({"file_sync": [
        {"host": str(mine), "guest": "/root/mine"},
        {"host": str(secret), "guest": "/root/secret"},
        {"host": str(base / "link"), "guest": "/root/link"},
    ]})
    guest = Recorder()
    d = SimpleNamespace(cfg=cfg, runner=SubprocessRunner(), dial=lambda vm_id, ip: guest)
    vm = SimpleNamespace(id="0123456789ab", name="vm", ip=guest.ip)
    warnings = sync_files(cast(Any, d), cast(Any, vm))
    assert guest.inputs == [b"user token\n"]
    assert len(warnings) == 2
    assert "cannot read" in warnings[0] and str(secret) in warnings[0]
    assert "symlink" in warnings[1]
