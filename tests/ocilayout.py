"""Test helpers for OCI images: layers from trees or members, OCI layouts, a real registry.

Layers are real tar streams (GNU tar for whole trees, Python's tarfile for hand-made
members), laid out as an OCI image layout that ``skopeo copy`` pushes to Debian's
``docker-registry`` serving on loopback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

OCI_LAYOUT = '{"imageLayoutVersion": "1.0.0"}'
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def registry_tools_missing() -> str | None:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install docker-registry skopeo; scripts/install-deps)"
    return None


@dataclass(frozen=True)
class Layer:
    path: Path  # the compressed blob
    digest: str  # of the blob
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes to ``out``."""

    def __init__(self, out: io.BufferedWriter) -> None:
        self.out = out
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.h.update(b)
        self.n += len(b)
        self.out.write(b)
        return len(b)


def layer_from_tree(root: Path, out: Path, *, exclude: Sequence[str] = ()) -> Layer:
    """A zstd layer of the whole tree ``root`` (owners, modes, xattrs kept), by GNU tar."""
    argv = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--format=pax",
            "--sort=name", "-C", str(root)]
    argv += [f"--exclude=./{e.lstrip('./')}" for e in exclude]
    argv += ["-cf", "-", "."]
    diff = hashlib.sha256()
    with out.open("wb") as f:
        hashing = _Hashing(f)  # type: ignore[arg-type]
        comp = zstandard.ZstdCompressor(level=3, threads=2).stream_writer(hashing, closefd=False)
        with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(1 << 20):
                diff.update(chunk)
                comp.write(chunk)
            comp.flush(zstandard.FLUSH_FRAME)
        if proc.returncode != 0:
            raise RuntimeError(f"tar of {root} failed")
    return Layer(out, f"sha256:{hashing.h.hexdigest()}", f"sha256:{diff.hexdigest()}",
                 hashing.n, ZSTD_LAYER)


def _cached_layer(where: Path, make: Callable[[Path], Layer]) -> Layer:
    """The layer ``make(where)`` built, made once and described in ``where/layer.json``."""
    meta = where / "layer.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return Layer(Path(m["path"]), m["digest"], m["diff_id"], m["size"], m["media_type"])
    where.mkdir(parents=True, exist_ok=True)
    layer = make(where)
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"path": str(layer.path), "digest": layer.digest,
                               "diff_id": layer.diff_id, "size": layer.size,
                               "media_type": layer.media_type}))
    tmp.rename(meta)
    return layer


def cached_tree_layer(rootfs: Path, where: Path, *, exclude: Sequence[str] = ()) -> Layer:
    """A zstd layer of the ext4 image ``rootfs``'s tree (read-only loop mount), made once
    and kept in ``where`` (key it by what decides the image's content)."""
    def make(where: Path) -> Layer:
        mnt = where / "mnt"
        mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "ro,loop", str(rootfs), str(mnt)], check=True)
        try:
            return layer_from_tree(mnt, where / "layer.tar.zst", exclude=exclude)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)

    return _cached_layer(where, make)


def cached_debootstrap_layer(where: Path, *, suite: str, mirror: str) -> Layer:
    """A minbase Debian (``debootstrap --variant=minbase``: apt and dpkg, no init, no
    sshd, no iproute2, like the registry's ``debian`` images) as one layer, made once."""
    def make(where: Path) -> Layer:
        tree = where / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", suite, str(tree), mirror],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            return layer_from_tree(tree, where / "layer.tar.zst",
                                   exclude=["var/cache/apt/archives/*.deb", "dev/*"])
        finally:
            shutil.rmtree(tree, ignore_errors=True)

    return _cached_layer(where, make)


Member = tuple[tarfile.TarInfo, bytes | None]


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, *,
           mode: int = 0o644, uid: int = 0, gid: int = 0, linkname: str = "",
           xattrs: dict[str, str] | None = None, devmajor: int = 0,
           devminor: int = 0) -> Member:
    """One tar entry for :func:`layer_from_members`."""
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = int(time.time())
    ti.linkname = linkname
    ti.devmajor, ti.devminor = devmajor, devminor
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if data is not None:
        ti.size = len(data)
    return ti, data


def layer_from_members(members: Sequence[Member], out: Path) -> Layer:
    """A gzip layer holding ``members`` in order (pax format, so xattrs survive)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    tar_bytes = raw.getvalue()
    blob = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    out.write_bytes(blob)
    return Layer(out, f"sha256:{hashlib.sha256(blob).hexdigest()}",
                 f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}", len(blob), GZIP_LAYER)


def write_layout(layout: Path, layers: Sequence[Layer], tag: str, *,
                 corrupt: Callable[[Path], None] | None = None) -> str:
    """An OCI image layout at ``layout`` with one linux/amd64 image tagged ``tag``.

    Layer blobs are hard-linked (or copied) in. Returns the manifest digest.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(OCI_LAYOUT)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    for la in layers:
        dest = blobs / la.digest.split(":", 1)[1]
        if not dest.exists():
            try:
                dest.hardlink_to(la.path)
            except OSError:
                shutil.copy2(la.path, dest)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
    }).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": la.media_type, "digest": la.digest, "size": la.size}
                   for la in layers],
    }).encode()
    manifest_digest, manifest_size = put(manifest)
    index_file = layout / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                          != tag]
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_file.write_text(json.dumps(index))
    return manifest_digest


@dataclass
class Registry:
    """Debian's docker-registry serving ``storage`` on 127.0.0.1:``port``; ``wrap`` turns
    an argv into one run in the test's network namespace (identity: this one)."""

    root: Path
    port: int = 5000
    wrap: Callable[[list[str]], list[str]] = lambda argv: argv
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'storage'}\n"
            f"http:\n  addr: {self.address}\n")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.wrap(["docker-registry", "serve", str(config)]),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run(self.wrap(["python3", "-c", (
                "import socket,sys; s=socket.socket(); s.settimeout(1);"
                f"sys.exit(s.connect_ex(('127.0.0.1', {self.port})))")]), check=False)
            if probe.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def push(self, layout: Path, tag: str, repo: str) -> str:
        """``skopeo copy`` the layout's ``tag`` to ``repo:tag`` here; returns the reference."""
        ref = f"{self.address}/{repo}:{tag}"
        subprocess.run(self.wrap(["skopeo", "--insecure-policy", "copy", "--quiet",
                                  "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                                  f"docker://{ref}"]), check=True, timeout=600)
        return ref

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob ``digest`` the access log shows."""
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if f"/blobs/{digest}" in line and '"GET ' in line)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
