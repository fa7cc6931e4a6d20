"""``image pull`` end to end: a real registry in the test's namespace, real layers, a real VM.

The base layer is the test image's own root file system (tarred from a read-only loop
mount, without its kernel modules and banger's guest agent, which the pull must add
back); layers on top carry whiteouts, an opaque directory, a hard link, a setuid file,
owners, an xattr and a device node. The image is pushed with ``skopeo`` to Debian's
``docker-registry`` on loopback inside the namespace, pulled, booted, and inspected
from inside the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.config import Config
from tests.e2e.conftest import CACHE, CachedImage, Host, open_host
from tests.e2e.pulled import PROBE, check_pulled, top_layers
from tests.mirrorrelay import MirrorProxy, Relay
from tests.ocilayout import (
    Layer,
    Registry,
    cached_debootstrap_layer,
    layer_from_members,
    member,
    registry_tools_missing,
    write_layout,
)

pytestmark = pytest.mark.xdist_group("pull")

@pytest.fixture
def pull_host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage,
              vmm: str) -> Iterator[Host]:
    """A host with a blob cache of its own (so the registry's log counts its downloads)."""
    yield from open_host(request, tmp_path, test_image, vmm, cache_dir=tmp_path / "cache")


@pytest.fixture
def registry(pull_host: Host, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry", wrap=lambda argv: pull_host.netns(*argv))
    reg.start()
    yield reg
    reg.stop()


def staging_debris(host: Host) -> list[str]:
    staging = host.state / "staging"
    return sorted(os.listdir(staging)) if staging.is_dir() else []


def test_pull_boot_and_inspect(pull_host: Host, registry: Registry, base_layer: Layer,
                               tmp_path: Path) -> None:
    host = pull_host
    layers = [base_layer, *top_layers(tmp_path)]
    write_layout(tmp_path / "layout", layers, "1")
    ref = registry.push(tmp_path / "layout", "1", "team/dev")

    # Two pulls of one reference at once: one operation, each blob fetched once.
    procs = [host.popen("image", "pull", ref, "--json") for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1]
    img = results[0]
    assert img["name"] == "dev-1" and img["source"] == "pulled"
    assert img["origin"].startswith(f"{ref}@sha256:")
    for la in layers:
        assert registry.blob_gets(la.digest) == 1, la.digest
    assert staging_debris(host) == []
    again = host.cli("image", "pull", ref)
    assert again.returncode != 0 and "already exists" in again.stderr

    host.ok("vm", "create", "--image", "dev-1", "--name", "pulled", timeout=900)
    seen = json.loads(host.ok("vm", "exec", "pulled", "--", "python3", "-c", PROBE))
    check_pulled(seen, "pulled")

    # The cache keeps an image's blobs; deleting the image frees them.
    assert host.json("image", "cache", "prune", "--dry-run")["removed"] == []
    host.ok("vm", "delete", "pulled", timeout=300)
    host.ok("image", "delete", "dev-1")
    pruned = host.json("image", "cache", "prune")
    assert {r["digest"] for r in pruned["removed"]} >= {la.digest for la in layers}


def test_refusals_and_a_killed_pull(pull_host: Host, registry: Registry, base_layer: Layer,
                                    tmp_path: Path) -> None:
    host = pull_host
    marker = tmp_path / "escaped"
    evil = layer_from_members([
        member("etc/", tarfile.DIRTYPE, mode=0o755),
        member(f"../../../../../../..{marker}", data=b"out\n"),
    ], tmp_path / "evil.tar.gz")
    write_layout(tmp_path / "evil", [evil], "1")
    bad = host.cli("image", "pull", registry.push(tmp_path / "evil", "1", "evil"))
    assert bad.returncode != 0
    assert "layer 1 of 1" in bad.stderr and ".." in bad.stderr
    assert not marker.exists()

    bare = layer_from_members([
        member("etc/", tarfile.DIRTYPE, mode=0o755),
        member("etc/os-release", data=b'ID=alpine\nNAME="Alpine Linux"\n'),
        member("bin/", tarfile.DIRTYPE, mode=0o755),
        member("bin/sh", data=b"#!/bin/true\n", mode=0o755),
    ], tmp_path / "bare.tar.gz")
    write_layout(tmp_path / "bare", [bare], "1")
    refused = host.cli("image", "pull", registry.push(tmp_path / "bare", "1", "bare"))
    assert refused.returncode != 0
    assert "has no systemd, sshd" in refused.stderr
    assert host.json("image", "list") and all(
        i["source"] != "pulled" for i in host.json("image", "list"))
    assert staging_debris(host) == []

    # kill -9 while a layer is half downloaded: no image, no partial file, and the
    # next pull works from what was cached.
    write_layout(tmp_path / "big", [base_layer], "1")
    ref = registry.push(tmp_path / "big", "1", "big")
    host.stop_daemon()
    host.start_daemon(pause_at="pull-mid-blob")
    pulling = host.popen("image", "pull", ref, "--name", "big")
    host.wait_paused("pull-mid-blob")
    blobs = host.cache_dir / "oci" / "blobs" / "sha256"
    assert any(n.startswith(".partial-") for n in os.listdir(blobs))
    host.kill_daemon(9)
    with contextlib.suppress(subprocess.TimeoutExpired):
        pulling.communicate(timeout=30)
    pulling.kill()
    host.start_daemon()
    assert not any(n.startswith(".partial-") for n in os.listdir(blobs))
    assert staging_debris(host) == []
    assert "big" not in {i["name"] for i in host.json("image", "list")}
    done = host.json("image", "pull", ref, "--name", "big")
    assert done["name"] == "big" and (host.state / "images" / "big" / "rootfs.ext4").exists()


# ------------------------------------------------------------------ finalize with apt

MINBASE_SUITE = "bookworm"
RELAY_PORT = 8642


@pytest.fixture(scope="session")
def minbase_layer() -> Layer:
    """A minbase Debian (apt, no init, no sshd, no iproute2) as one layer, made once."""
    reason = registry_tools_missing()
    if reason:
        pytest.skip(reason)
    mirror = Config().debian_mirror
    return cached_debootstrap_layer(CACHE / "oci-layers" / f"minbase-{MINBASE_SUITE}-v1",
                                    suite=MINBASE_SUITE, mirror=mirror)


@pytest.mark.xdist_group("pull-apt")
def test_pull_installs_what_a_debian_image_lacks(
        request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage, vmm: str,
        minbase_layer: Layer) -> None:
    """A Debian image without systemd, sshd or ip gets them from its own apt, run in a
    helper VM that reaches the mirror only through banger's SSH forward (the test relays
    the real mirror into its namespace on loopback); the result boots."""
    upstream = Config().debian_mirror
    proxy = MirrorProxy(upstream, tmp_path / "mirror.sock")
    proxy.start()
    gen = open_host(request, tmp_path, test_image, vmm, cache_dir=tmp_path / "cache")
    host = next(gen)
    relay = Relay(RELAY_PORT, tmp_path / "mirror.sock", lambda argv: host.netns(*argv))
    reg = Registry(tmp_path / "registry", wrap=lambda argv: host.netns(*argv))
    try:
        relay.start()
        reg.start()
        host.stop_daemon()
        host.write_config(f'debian_mirror = "http://127.0.0.1:{RELAY_PORT}/debian"')
        host.start_daemon()
        write_layout(tmp_path / "layout", [minbase_layer], "1")
        ref = reg.push(tmp_path / "layout", "1", "library/debian")

        pulled = host.cli("image", "pull", ref, "--name", "mini", "--json", timeout=1800)
        print(pulled.stderr)  # the stages and their times, kept in the test's output
        assert pulled.returncode == 0, pulled.stdout
        img = json.loads(pulled.stdout)
        assert img["name"] == "mini" and img["source"] == "pulled"
        assert any("/pool/main/o/openssh/" in r for r in proxy.requests)
        assert proxy.refused == []
        vms = host.json("vm", "list")
        assert [v["name"] for v in vms] == []  # the helper VM is gone
        assert staging_debris(host) == []

        host.ok("vm", "create", "--image", "mini", "--name", "mini", timeout=900)
        # minbase has no python3: a shell script, one fact per line.
        script = "; ".join([
            *(f"dpkg-query -W -f='${{Package}} ${{Status}}\\n' {p}"
              for p in ("openssh-server", "systemd-sysv", "iproute2")),
            "readlink -f /sbin/init",
            "cat /etc/apt/sources.list",
            "test -e /usr/sbin/policy-rc.d && echo policy-rc.d left",
            "test -e /tmp/banger-apt && echo scratch left",
            "echo relay lists: $(ls /var/lib/apt/lists | grep -c 127.0.0.1)",
            "hostname",
        ])
        out = host.ok("vm", "exec", "mini", "--", "sh", "-c", script).splitlines()
        assert out[:3] == [f"{p} install ok installed"
                           for p in ("openssh-server", "systemd-sysv", "iproute2")]
        assert out[3].endswith("/systemd")
        # The image's own sources list is as debootstrap wrote it, not the relay's.
        assert out[4] == f"deb {upstream} {MINBASE_SUITE} main"
        assert not any(line.endswith(" left") for line in out)
        assert "relay lists: 0" in out  # apt's lists went to a scratch directory
        assert out[-1] == "mini"
    finally:
        reg.stop()
        relay.stop()
        proxy.stop()
        with contextlib.suppress(StopIteration):
            next(gen)
