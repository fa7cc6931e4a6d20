"""Bundles end to end: export an image, pull it back from a ``file://`` catalog and from a
loopback HTTP server inside the test's namespace, and boot both copies."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE, Host

pytestmark = pytest.mark.xdist_group("bundles")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_export_pull_from_catalog_and_http_then_boot(host: Host, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    bundle = www / "golden.tar.zst"
    out = host.json("image", "export", IMAGE, "-o", str(bundle))
    assert out["sha256"] == sha256_of(bundle) and bundle.stat().st_size == out["size_bytes"]

    # A file:// catalog naming the bundle by a URL relative to the catalog.
    catalog = www / "catalog.json"
    catalog.write_text(json.dumps({"bundles": [{
        "name": "golden", "version": "1", "kind": "image", "url": "golden.tar.zst",
        "sha256": out["sha256"], "size": out["size_bytes"]}]}))
    host.stop_daemon()
    host.write_config(f'catalog_url = "{catalog.as_uri()}"')
    host.start_daemon()
    available = host.json("image", "list", "--available")
    assert [(a["name"], a["version"]) for a in available] == [("golden", "1")]
    from_catalog = json.loads(host.ok("image", "pull", "golden", "--json", timeout=900))
    assert from_catalog["name"] == "golden" and from_catalog["source"] == "bundle"

    # The same file over plain HTTP on loopback, inside the namespace.
    server = subprocess.Popen(
        host.netns("python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                   str(www), "8765"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        host.sh("sh", "-c", "for i in $(seq 50); do "
                            "curl -sf -o /dev/null http://127.0.0.1:8765/catalog.json && exit 0; "
                            "sleep 0.1; done; exit 1")
        over_http = json.loads(host.ok("image", "pull", "http://127.0.0.1:8765/golden.tar.zst",
                                       "--name", "golden-http", "--json", timeout=900))
    finally:
        server.kill()
        server.wait()
    assert over_http["origin"].startswith("http://127.0.0.1:8765/golden.tar.zst")

    # Both copies boot (at once), with the exported image's kernel and files.
    creates = [host.popen("vm", "create", "--image", img, "--name", f"vm-{img}")
               for img in ("golden", "golden-http")]
    for p in creates:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    for img in ("golden", "golden-http"):
        seen = host.ok("vm", "exec", f"vm-{img}", "--", "sh", "-c",
                       "uname -r; hostname; . /etc/os-release; echo $VERSION_CODENAME; "
                       "test -x /usr/local/sbin/banger-init && echo agent").split()
        assert seen == [out["kernel"]["version"], f"vm-{img}", "bookworm", "agent"]
