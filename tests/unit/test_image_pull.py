"""imagepull: request checks, joining a pull in flight, the cache prune rules.

A fake pull stands in at the seam (``imagepull.pull``); the real pipeline, against a
real registry and booted in a real VM, is tests/e2e/test_image_pull.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from banger.daemon import bundles, imagepull, images
from banger.daemon.core import Daemon
from banger.daemon.oci.blobs import PARTIAL_PREFIX
from banger.daemon.opstate import Operation
from banger.errors import AlreadyExists, BadRequest, InvalidState, NotFound


def request(d: Daemon, ref: str = "127.0.0.1:5000/team/dev:1", **kw: Any
            ) -> imagepull.PullRequest:
    args: dict[str, Any] = {"name": None, "size_bytes": None, "kernel_name": None,
                            "insecure": False, **kw}
    return imagepull.check_request(d, ref, **args)


def test_check_request(daemon: Daemon) -> None:
    req = request(daemon)
    assert req.name == "dev-1" and str(req.ref) == "127.0.0.1:5000/team/dev:1"
    # bundles go to banger.daemon.bundles (tests/unit/test_bundles.py)
    assert isinstance(request(daemon, "https://example.com/x.tar.zst"), bundles.BundleRequest)
    with pytest.raises(BadRequest, match="absolute"):
        request(daemon, "./dev.tar.zst")
    with pytest.raises(NotFound, match="no catalog"):
        request(daemon, "dev")
    with pytest.raises(BadRequest):
        request(daemon, "127.0.0.1:5000/Team/dev")
    with pytest.raises(BadRequest, match="name"):
        request(daemon, name="Not_A_Label")
    with pytest.raises(BadRequest, match="out of range"):
        request(daemon, size_bytes=1 << 20)
    with pytest.raises(NotFound, match="kernel"):
        request(daemon, kernel_name="missing")


def test_a_pull_needs_a_kernel(daemon: Daemon) -> None:
    images.delete(daemon, "debian-bookworm")
    with pytest.raises(NotFound) as exc:
        request(daemon)
    assert "image build" in exc.value.hint and "--kernel" in exc.value.hint


def test_same_pull_joins_other_is_refused(daemon: Daemon, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    gate = threading.Event()
    calls: list[str] = []

    def fake_pull(d: Daemon, req: imagepull.PullRequest, op: Operation) -> dict[str, Any]:
        calls.append(req.name)
        gate.wait(10)
        return {"name": req.name}

    monkeypatch.setattr(imagepull, "pull", fake_pull)
    first = imagepull.begin_pull(daemon, request(daemon))
    assert imagepull.begin_pull(daemon, request(daemon)) is first
    with pytest.raises(AlreadyExists, match="already being made"):
        imagepull.begin_pull(daemon, request(daemon, "127.0.0.1:5000/team/dev:2",
                                             name="dev-1"))
    with pytest.raises(InvalidState, match="pull is running"):
        imagepull.prune_cache(daemon, dry_run=True)
    gate.set()
    assert first.wait(10) and first.result == {"name": "dev-1"}
    assert calls == ["dev-1"]
    with pytest.raises(AlreadyExists, match="already exists"):
        imagepull.begin_pull(daemon, request(daemon, name="debian-bookworm"))


def test_prune_keeps_the_blobs_of_images(daemon: Daemon) -> None:
    blobs = daemon.blobs
    for data in (b"kept", b"loose"):
        blobs.put_stream(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), [data])
    kept = f"sha256:{hashlib.sha256(b'kept').hexdigest()}"
    loose = f"sha256:{hashlib.sha256(b'loose').hexdigest()}"
    staging = daemon.layout.staging_dir / "p"
    staging.mkdir(parents=True)
    (staging / "rootfs.ext4").write_bytes(b"")
    images.publish(daemon, "pulled", staging, source="pulled", recipe_hash=None,
                   origin="127.0.0.1:5000/x:1@sha256:" + "c" * 64, blobs=(kept,))
    assert images.show(daemon, "pulled")["origin"].startswith("127.0.0.1:5000/x:1@")
    dry = imagepull.prune_cache(daemon, dry_run=True)
    assert [r["digest"] for r in dry["removed"]] == [loose] and dry["kept"] == 1
    assert blobs.get(loose) is not None
    imagepull.prune_cache(daemon, dry_run=False)
    assert blobs.get(loose) is None and blobs.get(kept) is not None
    images.delete(daemon, "pulled")
    assert [r["digest"] for r in imagepull.prune_cache(daemon, dry_run=False)["removed"]] \
        == [kept]


def test_start_up_removes_partials_of_dead_writers(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon.blobs.root / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    dead = d / f"{PARTIAL_PREFIX}{'a' * 64}-999999999-abcdef"  # no such pid
    mine = d / f"{PARTIAL_PREFIX}{'b' * 64}-{os.getpid()}-abcdef"
    dead.write_bytes(b"x")
    mine.write_bytes(b"y")
    assert daemon.blobs.sweep_partial() == 1
    assert not dead.exists() and mine.exists()
