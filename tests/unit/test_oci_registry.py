"""The registry client and blob cache against a real registry.

Debian's ``docker-registry`` (the distribution project's registry) serves on a free
port on 127.0.0.1 in the host's network namespace (loopback is plain HTTP by the
client's rules); ``skopeo`` pushes images the test writes as OCI layouts: two gzip
layers and a config, as OCI, as Docker schema 2, and a linux/amd64 + linux/arm64 index.
Between client and registry sits ``Front``, a small loopback HTTP proxy that counts
requests and can demand Bearer or Basic auth (it is also the token server), redirect
blob GETs, corrupt or lengthen a blob, or serve a document of its own.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from banger.daemon.oci import registry
from banger.daemon.oci.blobs import PARTIAL_PREFIX, BlobCache
from banger.daemon.oci.reference import parse
from banger.daemon.oci.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Credentials,
    Platform,
    parse_challenge,
    parse_manifest,
    pull,
)
from banger.errors import Cancelled, NotFound, RegistryError
from banger.runner import CancelToken

pytestmark = pytest.mark.skipif(
    not (shutil.which("docker-registry") and shutil.which("skopeo")),
    reason="needs docker-registry and skopeo (apt-get install docker-registry skopeo; "
           "scripts/install-deps installs them)")

FAST = httpx.Timeout(10.0, connect=5.0)


# -- images ------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Built:
    """An image the test pushed: its blobs by digest and what pull should report."""

    config: bytes
    layers: list[bytes]
    manifest: bytes

    @property
    def layer_digests(self) -> list[str]:
        return [sha(la) for la in self.layers]


def write_layout(root: Path, tag: str, arch: str, marker: str) -> Built:
    """An OCI layout at ``root`` holding one image tagged ``tag``."""
    tars = [tar_of({"etc/os-release": f"ID={marker}\n".encode()}),
            tar_of({"usr/bin/hello": f"#!/bin/sh\necho {marker}\n".encode() * 50})]
    layers = [gzip.compress(t, mtime=0) for t in tars]
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", f"MARK={marker}"],
                   "Entrypoint": ["/usr/bin/hello"], "Cmd": ["--loud"],
                   "User": "1000:1000", "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(la), "size": len(la)} for la in layers],
    }).encode()
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (*layers, config, manifest):
        (blobs / sha(data).removeprefix("sha256:")).write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": sha(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return Built(config=config, layers=layers, manifest=manifest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """The real registry and what was pushed to it."""

    port: int
    images: dict[str, Built] = field(default_factory=dict)
    index: bytes = b""

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, timeout=60,
                   capture_output=True)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("registry")
    port = free_port()
    (tmp / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = tmp / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(tmp / "config.yml")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15  # it serves within a second
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.05)
        r = Registry(port)
        dest = f"docker://{r.host}"
        r.images["amd64"] = write_layout(tmp / "amd64", "1", "amd64", "amd")
        skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp / 'amd64'}:1",
               f"{dest}/team/img:1")
        skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2",
               f"oci:{tmp / 'amd64'}:1", f"{dest}/team/img:v2s2")
        r.images["arm64"] = write_layout(tmp / "arm64", "1", "arm64", "arm")
        skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp / 'arm64'}:1",
               f"{dest}/team/multi:arm64")
        skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp / 'amd64'}:1",
               f"{dest}/team/multi:amd64")
        # The index goes up by hand: arm64 first, so picking the first entry is wrong.
        entries = [{"mediaType": OCI_MANIFEST, "digest": sha(r.images[a].manifest),
                    "size": len(r.images[a].manifest),
                    "platform": {"os": "linux", "architecture": a}}
                   for a in ("arm64", "amd64")]
        r.index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                              "manifests": entries}).encode()
        put = httpx.put(f"http://{r.host}/v2/team/multi/manifests/1", content=r.index,
                        headers={"Content-Type": OCI_INDEX}, timeout=10)
        assert put.status_code == 201, put.text
        yield r
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- the front ---------------------------------------------------------------------

TOKEN = "tok-123"


class Front:
    """A loopback proxy before the registry; every knob is off until a test sets it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str]] = []  # (path with query, Authorization)
        self.mu = threading.Lock()
        self.bearer = False  # demand "Bearer TOKEN"
        self.token_creds: tuple[str, str] | None = None  # the token server demands these
        self.basic: tuple[str, str] | None = None  # demand Basic auth with these
        self.redirect_blobs: str | None = None  # "self" (via /storage), or a URL prefix
        self.corrupt: set[str] = set()
        self.extend: set[str] = set()
        self.chunked = False  # no Content-Length on altered blobs
        self.serve: dict[str, tuple[str, bytes]] = {}  # path -> (content type, body)
        self.delay_blobs = 0.0
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front.handle(self)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up on a refused blob is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def paths(self, part: str) -> list[str]:
        with self.mu:
            return [p for p, _ in self.requests if part in p]

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        auth = h.headers.get("Authorization", "")
        with self.mu:
            self.requests.append((h.path, auth))
        path = urlsplit(h.path).path
        if path == "/token":
            if self.token_creds and auth != basic(*self.token_creds):
                return reply(h, 401, b'{"details": "bad credentials"}')
            return reply(h, 200, json.dumps({"token": TOKEN, "expires_in": 300}).encode())
        if path.startswith("/v2/"):
            challenge = None
            if self.bearer and auth != f"Bearer {TOKEN}":
                challenge = (f'Bearer realm="http://{self.host}/token",service="front",'
                             f'scope="repository:{path.split("/")[2]}/'
                             f'{path.split("/")[3]}:pull"')
            if self.basic and auth != basic(*self.basic):
                challenge = 'Basic realm="front"'
            if challenge:
                return reply(h, 401, b'{"errors": [{"code": "UNAUTHORIZED", '
                                     b'"message": "authentication required"}]}',
                             {"WWW-Authenticate": challenge})
        if path in self.serve:
            ctype, body = self.serve[path]
            return reply(h, 200, body, {"Content-Type": ctype})
        if "/blobs/" in path and self.redirect_blobs and path.startswith("/v2/"):
            prefix = (f"http://{self.host}/storage" if self.redirect_blobs == "self"
                      else self.redirect_blobs)
            return reply(h, 307, b"", {"Location": prefix + path})
        if path.startswith("/storage/"):
            path = path.removeprefix("/storage")
        if "/blobs/" in path and self.delay_blobs:
            time.sleep(self.delay_blobs)
        up = httpx.get(f"http://{self.upstream}{path}", timeout=10,
                       headers={k: v for k, v in h.headers.items()
                                if k.lower() in ("accept",)})
        body = up.content
        digest = path.rsplit("/", 1)[-1]
        if digest in self.corrupt:
            body = bytes([body[0] ^ 1]) + body[1:]
        if digest in self.extend:
            body += b"X" * 100
        headers = {k: v for k, v in up.headers.items()
                   if k.lower() in ("content-type", "docker-content-digest")}
        altered = digest in self.corrupt | self.extend
        reply(h, up.status_code, body, headers, chunked=self.chunked and altered)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
          headers: dict[str, str] | None = None, *, chunked: bool = False) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if chunked:
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(body), 4096):
            part = body[i:i + 4096]
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
        return
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def front(reg: Registry) -> Iterator[Front]:
    f = Front(reg.host)
    yield f
    f.server.shutdown()
    f.server.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "cache" / "oci" / "blobs")


def cached_files(cache: BlobCache) -> list[str]:
    d = cache.root / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# -- pulls -------------------------------------------------------------------------

def test_pull_oci_image_then_cache_hit(reg: Registry, front: Front,
                                       cache: BlobCache) -> None:
    img = reg.images["amd64"]
    seen: list[tuple[str, int, int]] = []
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST,
               progress=lambda d, done, total: seen.append((d, done, total)))
    assert got.manifest_digest == sha(img.manifest)
    assert got.index_digest is None
    assert got.config_digest == sha(img.config)
    assert got.config == registry.ImageConfig(
        env=("PATH=/usr/bin:/bin", "MARK=amd"), cmd=("--loud",),
        entrypoint=("/usr/bin/hello",), user="1000:1000", working_dir="/srv")
    assert [la.digest for la in got.layers] == img.layer_digests
    assert [la.compression for la in got.layers] == ["gzip", "gzip"]
    assert [la.path.read_bytes() for la in got.layers] == img.layers
    assert set(got.downloaded) == {sha(img.config), *img.layer_digests}
    assert got.blob_digests == {sha(img.config), *img.layer_digests}
    # progress ends complete for every blob
    last = {d: (done, total) for d, done, total in seen}
    assert all(done == total > 0 for done, total in last.values())
    assert len(front.paths("/blobs/")) == 3

    again = pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert again.downloaded == ()
    assert again.layers == got.layers
    assert len(front.paths("/blobs/")) == 3  # no blob fetched the second time
    assert len(front.paths("/manifests/")) == 2  # the tag is resolved every time


def test_pull_by_digest_and_unknown(reg: Registry, front: Front, cache: BlobCache) -> None:
    digest = sha(reg.images["amd64"].manifest)
    got = pull(f"{front.host}/team/img@{digest}", cache, timeout=FAST)
    assert got.manifest_digest == digest
    assert got.reference.tag is None
    with pytest.raises(NotFound, match="not found"):
        pull(f"{front.host}/team/img@sha256:{'0' * 64}", cache, timeout=FAST)
    with pytest.raises(NotFound, match=r"MANIFEST_UNKNOWN|not found"):
        pull(f"{front.host}/team/img:nope", cache, timeout=FAST)
    with pytest.raises(NotFound):
        pull(f"{front.host}/team/absent:1", cache, timeout=FAST)


def test_pull_docker_schema2(reg: Registry, cache: BlobCache) -> None:
    img = reg.images["amd64"]
    with registry.RegistryClient(parse(f"{reg.host}/team/img:v2s2"), timeout=FAST) as c:
        media_type, _, _ = c.manifest("v2s2")
    assert media_type == DOCKER_MANIFEST
    got = pull(f"{reg.host}/team/img:v2s2", cache, timeout=FAST)
    assert [la.media_type for la in got.layers] == [
        "application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2
    assert [la.path.read_bytes() for la in got.layers] == img.layers
    assert got.config.entrypoint == ("/usr/bin/hello",)


def test_index_picks_amd64(reg: Registry, front: Front, cache: BlobCache) -> None:
    got = pull(f"{front.host}/team/multi:1", cache, timeout=FAST)
    assert got.index_digest == sha(reg.index)
    assert got.manifest_digest == sha(reg.images["amd64"].manifest)
    assert got.config.env[-1] == "MARK=amd"
    # nothing of the arm64 image was fetched
    arm = {sha(reg.images["arm64"].config), *reg.images["arm64"].layer_digests}
    assert not any(d in p for p in front.paths("/v2/") for d in arm)

    with pytest.raises(NotFound) as exc:
        pull(f"{front.host}/team/multi:1", cache, timeout=FAST,
             platform=Platform("linux", "riscv64"))
    assert "has no linux/riscv64 image (it has: linux/amd64, linux/arm64)" in str(exc.value)


def test_single_manifest_of_another_arch_is_refused(reg: Registry, cache: BlobCache) -> None:
    with pytest.raises(NotFound, match="is a linux/arm64 image, not linux/amd64"):
        pull(f"{reg.host}/team/multi:arm64", cache, timeout=FAST)
    # the config was cached (it was verified), the layers were never fetched
    assert cached_files(cache) == [sha(reg.images["arm64"].config)[7:]]


def test_bearer_token(front: Front, cache: BlobCache) -> None:
    front.bearer = True
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert len(got.layers) == 2
    tokens = front.paths("/token")
    assert len(tokens) == 1  # one token serves the whole pull
    query = parse_qs(urlsplit(tokens[0]).query)
    assert query == {"scope": ["repository:team/img:pull"], "service": ["front"]}
    with front.mu:
        v2 = [(p, a) for p, a in front.requests if p.startswith("/v2/")]
    assert v2[0][1] == ""  # anonymous first
    assert all(a == f"Bearer {TOKEN}" for _, a in v2[1:])
    with front.mu:
        token_auth = [a for p, a in front.requests if p.startswith("/token")]
    assert token_auth == [""]  # an anonymous token


def test_bearer_token_with_credentials(front: Front, cache: BlobCache) -> None:
    front.bearer = True
    front.token_creds = ("ann", "s3cret")
    with pytest.raises(RegistryError, match=r"token server .* refused") as exc:
        pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert "s3cret" not in str(exc.value)
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST,
               credentials=Credentials("ann", "s3cret"))
    assert len(got.layers) == 2
    assert "s3cret" not in repr(Credentials("ann", "s3cret"))


def test_basic_auth(front: Front, cache: BlobCache) -> None:
    front.basic = ("bob", "pw")
    with pytest.raises(RegistryError, match="requires a user name and password"):
        pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    with pytest.raises(RegistryError, match=r"access denied .*401"):
        pull(f"{front.host}/team/img:1", cache, timeout=FAST,
             credentials=Credentials("bob", "wrong"))
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST,
               credentials=Credentials("bob", "pw"))
    assert len(got.layers) == 2


@pytest.mark.parametrize("chunked", [False, True])
def test_corrupt_blob_is_refused_and_not_cached(reg: Registry, front: Front,
                                                cache: BlobCache, chunked: bool) -> None:
    bad = reg.images["amd64"].layer_digests[1]
    front.corrupt.add(bad)
    front.chunked = chunked
    with pytest.raises(RegistryError, match="does not match its digest"):
        pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert cache.get(bad) is None
    assert not any(n.startswith(PARTIAL_PREFIX) for n in cached_files(cache))
    assert bad[7:] not in cached_files(cache)
    front.corrupt.clear()
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST)  # the first layer is kept
    assert got.downloaded == (bad,)


@pytest.mark.parametrize("chunked", [False, True])
def test_blob_longer_than_declared(reg: Registry, front: Front, cache: BlobCache,
                                   chunked: bool) -> None:
    long = reg.images["amd64"].layer_digests[0]
    front.extend.add(long)
    front.chunked = chunked
    with pytest.raises(RegistryError, match=r"more than the|longer than the"):
        pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert cache.get(long) is None
    assert not any(n.startswith(PARTIAL_PREFIX) for n in cached_files(cache))


def test_concurrent_pulls_download_each_blob_once(reg: Registry, front: Front,
                                                  cache: BlobCache) -> None:
    front.delay_blobs = 0.2  # the pulls overlap on every blob
    results: list[registry.PulledImage] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(pull(f"{front.host}/team/img:1", cache, timeout=FAST))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 4
    blob_gets = front.paths("/blobs/")
    assert sorted(blob_gets) == sorted(set(blob_gets))
    assert len(blob_gets) == 3
    assert sum(len(r.downloaded) for r in results) == 3


def test_prune(reg: Registry, cache: BlobCache) -> None:
    got = pull(f"{reg.host}/team/img:1", cache, timeout=FAST)
    extra = b"an orphan blob"
    cache.put_stream(sha(extra), len(extra), [extra])
    assert cache.prune(set(got.blob_digests), dry_run=True) == [(sha(extra), len(extra))]
    assert cache.get(sha(extra)) is not None
    assert cache.prune(set(got.blob_digests)) == [(sha(extra), len(extra))]
    assert cache.get(sha(extra)) is None
    assert all(la.path.exists() for la in got.layers)
    assert cache.prune(set()) == sorted((d, s) for d, s in [
        (got.config_digest, len(reg.images["amd64"].config)),
        *((la.digest, la.size) for la in got.layers)])
    assert cached_files(cache) == []


def test_redirects(reg: Registry, front: Front, cache: BlobCache) -> None:
    front.bearer = True
    front.redirect_blobs = "self"
    got = pull(f"{front.host}/team/img:1", cache, timeout=FAST)
    assert len(front.paths("/storage/")) == 3
    with front.mu:
        storage_auth = [a for p, a in front.requests if p.startswith("/storage/")]
    # /storage is the same origin here, so the token goes along; another origin gets none
    assert storage_auth == [f"Bearer {TOKEN}"] * 3
    assert len(got.layers) == 2

    for target, why in [("http://192.0.2.1:9", "plain HTTP"),
                        ("ftp://192.0.2.1", "'ftp' URL"),
                        (f"http://{front.host}/v2", "more than 5 redirects")]:
        front.redirect_blobs = target
        with pytest.raises(RegistryError, match=why):
            pull(f"{front.host}/team/img:1", BlobCache(cache.root / why[:4]), timeout=FAST)


def test_documents_are_bounded(front: Front, cache: BlobCache) -> None:
    path = "/v2/team/img/manifests/huge"
    front.serve[path] = (OCI_MANIFEST, b"{" + b" " * (registry.DOC_MAX + 10) + b"}")
    with pytest.raises(RegistryError, match="bytes; banger reads at most"):
        pull(f"{front.host}/team/img:huge", cache, timeout=FAST)
    front.serve[path] = (OCI_MANIFEST, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RegistryError, match="not valid JSON"):
        pull(f"{front.host}/team/img:huge", cache, timeout=FAST)


def test_unreachable_registry(cache: BlobCache) -> None:
    with pytest.raises(RegistryError, match="cannot talk to 127\\.0\\.0\\.1") as exc:
        pull(f"127.0.0.1:{free_port()}/team/img:1", cache, timeout=FAST)
    assert "registry address" in exc.value.hint


def test_https_for_remote_registries() -> None:
    assert str(registry.RegistryClient(parse("ghcr.io/a/b")).base) == "https://ghcr.io/v2/a/b/"
    assert str(registry.RegistryClient(parse("debian")).base) == \
        "https://registry-1.docker.io/v2/library/debian/"
    assert str(registry.RegistryClient(parse("r.lan:5000/a"), insecure=True).base) == \
        "http://r.lan:5000/v2/a/"
    for host in ("localhost:5000", "127.0.0.2:80", "[::1]:5000"):
        assert registry.RegistryClient(parse(f"{host}/a")).base.scheme == "http"


def test_cancel_mid_blob(reg: Registry, front: Front, cache: BlobCache) -> None:
    token = CancelToken()
    config = sha(reg.images["amd64"].config)

    def progress(digest: str, done: int, total: int) -> None:
        if digest != config:
            token.cancel("stop it")  # in the first layer's first (and only) chunk

    with pytest.raises(Cancelled, match="stop it"):
        pull(f"{front.host}/team/img:1", cache, timeout=FAST, progress=progress,
             cancel=token)
    assert len(cached_files(cache)) == 1  # the config only; nothing partial
    assert not any(n.startswith(PARTIAL_PREFIX) for n in cached_files(cache))


# -- documents and headers, no registry needed ----------------------------------------

REF = parse("127.0.0.1:1/x")


def manifest_with(layers: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + "1" * 64, "size": 10}, "layers": layers, **extra}).encode()


def layer(media_type: str = "application/vnd.oci.image.layer.v1.tar+zstd",
          **over: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + "2" * 64, "size": 5, **over}


def test_parse_manifest_rules() -> None:
    config, layers = parse_manifest(REF, OCI_MANIFEST, manifest_with([layer(), layer(
        "application/vnd.oci.image.layer.v1.tar")]))
    assert [la.media_type[-4:] for la in layers] == ["zstd", ".tar"]
    assert config.size == 10
    cases: list[tuple[str, bytes, str]] = [
        (OCI_MANIFEST, manifest_with([layer()] * 257), "257 layers"),
        (OCI_MANIFEST, manifest_with([layer(
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")]),
         "non-distributable"),
        (OCI_MANIFEST, manifest_with([layer("application/vnd.oci.image.layer.v1.tar+xz")]),
         "unsupported media type"),
        (OCI_MANIFEST, manifest_with([layer(digest="sha512:" + "a" * 128)]), "only sha256"),
        (OCI_MANIFEST, manifest_with([layer(size=-1)]), "no valid size"),
        (OCI_MANIFEST, manifest_with([layer(size=True)]), "no valid size"),
        (OCI_MANIFEST, manifest_with([layer(size=1 << 40)]), "no valid size"),
        (OCI_MANIFEST, manifest_with([], schemaVersion=1), "schemaVersion"),
        (OCI_MANIFEST, json.dumps({"schemaVersion": 2, "config": layer(
            "application/vnd.cncf.helm.config.v1+json"), "layers": []}).encode(),
         "not a container image"),
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}", "schema 1"),
        (OCI_INDEX, b"{}", "not a container image manifest"),
        (OCI_MANIFEST, b"[]", "not a JSON object"),
    ]
    for media_type, body, why in cases:
        with pytest.raises(RegistryError, match=why):
            parse_manifest(REF, media_type, body)


def test_pick_platform() -> None:
    def entry(os_: str, arch: str, media_type: str = OCI_MANIFEST) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": sha(f"{os_}/{arch}".encode()), "size": 1,
                "platform": {"os": os_, "architecture": arch}}

    index = json.dumps({"manifests": [
        entry("unknown", "unknown"), entry("linux", "amd64", OCI_INDEX),
        entry("linux", "arm64"), entry("linux", "amd64"), entry("linux", "amd64")]}).encode()
    got = registry.pick_platform(REF, registry.parse_index(index), registry.LINUX_AMD64)
    assert got.digest == sha(b"linux/amd64") and got.media_type == OCI_MANIFEST
    with pytest.raises(NotFound) as exc:
        registry.pick_platform(REF, registry.parse_index(index), Platform("linux", "s390x"))
    assert "(it has: linux/amd64, linux/arm64)" in str(exc.value)  # no unknown/unknown
    with pytest.raises(RegistryError, match="no 'manifests' list"):
        registry.parse_index(b"{}")


def test_parse_config_rules() -> None:
    assert registry.parse_config(REF, b'{"os": "linux", "architecture": "amd64"}',
                                 registry.LINUX_AMD64) == registry.ImageConfig()
    with pytest.raises(RegistryError, match="Cmd is not a list of strings"):
        registry.parse_config(REF, b'{"config": {"Cmd": "sh -c x"}}', registry.LINUX_AMD64)
    with pytest.raises(RegistryError, match="User is not a string"):
        registry.parse_config(REF, b'{"config": {"User": 0}}', registry.LINUX_AMD64)


def test_parse_challenge() -> None:
    assert parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push"') == ("bearer", {
            "realm": "https://auth.example/token", "service": "reg.example",
            "scope": "repository:a/b:pull,push"})
    assert parse_challenge('basic realm="x \\"y\\"", charset=UTF-8') == (
        "basic", {"realm": 'x "y"', "charset": "UTF-8"})
    assert parse_challenge("") == ("", {})
    assert parse_challenge('Bearer realm="unterminated') == (
        "bearer", {"realm": "unterminated"})
    with pytest.raises(RegistryError, match="too long"):
        parse_challenge("Bearer " + "x" * 10_000)


# -- the cache alone ----------------------------------------------------------------

def test_put_stream_verifies_before_naming(cache: BlobCache) -> None:
    data = b"hello blob"
    with pytest.raises(RegistryError, match="does not match"):
        cache.put_stream(sha(data), len(data), [b"hello blub"])
    with pytest.raises(RegistryError, match="ended after 5 of its 10"):
        cache.put_stream(sha(data), len(data), [b"hello"])
    with pytest.raises(RegistryError, match="longer than the 10 bytes"):
        cache.put_stream(sha(data), len(data), [data, b"!"])
    assert cached_files(cache) == []
    path = cache.put_stream(sha(data), len(data), [b"hello ", b"blob"])
    assert path == cache.path_of(sha(data)) and path.read_bytes() == data
    assert cache.get(sha(data), len(data)) == path
    assert cache.get(sha(data), 3) is None  # a wrong size is a miss (re-downloaded)
    assert cache.verify(sha(data))
    path.write_bytes(b"hello blox")
    assert not cache.verify(sha(data))
    assert not cache.verify(sha(b"absent"))


def test_ensure_coalesces_and_survives_a_failed_download(cache: BlobCache) -> None:
    data = b"x" * 100_000
    opens: list[int] = []
    gate = threading.Event()

    def opener(fail: bool = False) -> Callable[[], AbstractContextManager[Iterator[bytes]]]:
        @contextmanager
        def open_stream() -> Iterator[Iterator[bytes]]:
            opens.append(1)
            gate.wait(5)
            if fail:
                raise RegistryError("boom")
            yield iter([data[:50_000], data[50_000:]])
        return open_stream

    with pytest.raises(RegistryError):
        gate.set()
        cache.ensure(sha(data), len(data), opener(fail=True))
    gate.clear()
    out: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: out.append(
        cache.ensure(sha(data), len(data), opener()))) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(opens) == 2  # the failed one, then one for five callers
    assert sorted(fetched for _, fetched in out) == [False] * 4 + [True]


def test_waiting_for_another_download_can_be_cancelled(cache: BlobCache) -> None:
    gate = threading.Event()

    @contextmanager
    def slow() -> Iterator[Iterator[bytes]]:
        gate.wait(10)
        yield iter([b"a"])

    t = threading.Thread(target=lambda: cache.ensure(sha(b"a"), 1, slow))
    t.start()
    time.sleep(0.05)
    token = CancelToken()
    token.cancel("user gave up")
    with pytest.raises(Cancelled, match="user gave up"):
        cache.ensure(sha(b"a"), 1, slow, cancel=token)
    # a digest in flight is never pruned
    gate.set()
    t.join(10)
    assert cache.prune(set()) == [(sha(b"a"), 1)]


def test_sweep_partial(cache: BlobCache) -> None:
    d = cache.root / "sha256"
    d.mkdir(parents=True)
    old, new = d / f"{PARTIAL_PREFIX}aa-1", d / f"{PARTIAL_PREFIX}bb-2"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert cache.sweep_partial() == 1
    assert not old.exists() and new.exists()
    assert list(cache.digests()) == []
