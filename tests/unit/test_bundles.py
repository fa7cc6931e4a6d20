"""Bundles and the catalog with the fake world and real files: image export, image
pull of a bundle (local path, file:// catalog, loopback HTTP), kernel pull, and the
refusals of hostile bundles, each leaving no image, kernel or staging file.

The fake runner skips debugfs (guest agent injection is asserted called, not run);
the root file systems are real ext4 made with ``mkfs.ext4 -d``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from banger.daemon import bundles, catalog, imagepull, images, kernels
from banger.daemon.core import Daemon
from banger.daemon.imagemgr.kernel import inspect_kernel_file
from banger.daemon.oci import fixups as oci_fixups
from banger.daemon.oci.fixups import Fixups
from banger.daemon.opstate import Operation
from banger.daemon.store import ImageRecord
from banger.errors import AlreadyExists, BadRequest, BangerError, NotFound
from tests.bundlefiles import build_bundle
from tests.conftest import FakeWorld
from tests.unit.test_registry import bzimage


def make_ext4(tmp: Path, name: str = "root.ext4") -> Path:
    tree = tmp / f"{name}.tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("bundled\n")
    (tree / "data.bin").write_bytes(bytes(range(256)) * 4096)
    image = tmp / name
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "banger-root", "-d", str(tree), str(image),
                    "16M"], check=True, capture_output=True)
    return image


def add_image(d: Daemon, tmp: Path, name: str = "src", *, kernel_name: str | None = None
              ) -> ImageRecord:
    """An image in the registry, as a register would leave it: real ext4, a bzImage,
    an initrd and a work seed with a nested file."""
    staging = d.layout.staging_dir / f"test-{name}"
    staging.mkdir(parents=True)
    (staging / "rootfs.ext4").write_bytes(make_ext4(tmp).read_bytes())
    if kernel_name is None:
        bzimage(staging / "vmlinuz")
        (staging / "initrd.img").write_bytes(b"initrd" * 100)
    seed = staging / "workseed"
    (seed / ".config").mkdir(parents=True)
    (seed / ".config" / "x").write_text("seeded\n")
    (seed / ".bashrc").write_text("alias ll='ls -l'\n")
    images.publish(d, name, staging, source="registered", recipe_hash=None,
                   kernel_name=kernel_name)
    return d.db.get_image(name)


def finished(op: Operation) -> Any:
    assert op.wait(60), op.stage
    if op.error is not None:
        raise op.error
    return op.result


def export(d: Daemon, name: str, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = finished(bundles.begin_export(d, name, str(out)))
    return result


def pull(d: Daemon, text: str, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"name": None, "size_bytes": None, "kernel_name": None,
                            "insecure": False, **kw}
    req = imagepull.check_request(d, text, **args)
    result: dict[str, Any] = finished(imagepull.begin_pull(d, req))
    return result


def set_catalog(d: Daemon, url: str) -> None:
    d.cfg = d.cfg.model_copy(update={"catalog_url": url})


def write_catalog(path: Path, entries: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"bundles": entries}))
    return path.as_uri()


def entry(name: str, bundle: Path, *, kind: str = "image", version: str = "1",
          url: str | None = None, sha: str | None = None) -> dict[str, Any]:
    data = bundle.read_bytes()
    return {"name": name, "version": version, "kind": kind, "url": url or bundle.name,
            "sha256": sha or hashlib.sha256(data).hexdigest(), "size": len(data)}


def nothing_left(d: Daemon, image: str | None = None) -> None:
    assert not d.layout.staging_dir.exists() or not list(d.layout.staging_dir.iterdir())
    if image is not None:
        assert d.db.find_image(image) is None
        assert not d.layout.image_dir(image).exists()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over plain HTTP on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- round trip


def test_export_then_pull_back_three_ways(daemon: Daemon, world: FakeWorld, tmp_path: Path,
                                          http_dir: tuple[Path, str]) -> None:
    src = add_image(daemon, tmp_path)
    original = Path(src.rootfs).read_bytes()
    out = tmp_path / "out" / "src.tar.zst"
    out.parent.mkdir()
    res = export(daemon, "src", out)
    assert res["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert res["size_bytes"] == out.stat().st_size
    assert sorted(res["members"]) == ["initrd.img", "rootfs.ext4", "vmlinuz", "workseed.tar"]
    assert res["kernel"] == {"name": None, "version": "6.1.99-banger"}
    assert [p.name for p in out.parent.iterdir()] == ["src.tar.zst"]  # no temp file left
    with _open_bundle(out) as tar:
        first = tar.next()
        assert first is not None and first.name == "manifest.json"
    nothing_left(daemon)
    images.delete(daemon, "src")

    # 1. a local path
    img = pull(daemon, str(out))
    assert img["name"] == "src" and img["source"] == "bundle"
    assert img["origin"] == f"{out}#sha256:{res['sha256']}"
    assert Path(img["rootfs"]).read_bytes() == original
    assert Path(img["rootfs"]).stat().st_blocks * 512 < len(original) // 2  # written sparse
    assert inspect_kernel_file(Path(img["kernel"])).kind == "bzimage"
    # The unprivileged VMM user reads the boot files (the bundle's members came out 0600).
    assert {oct(Path(img[f]).stat().st_mode & 0o777) for f in ("kernel", "initrd")} == {"0o644"}
    seed = daemon.layout.image_dir("src") / "workseed"
    assert (seed / ".config" / "x").read_text() == "seeded\n"
    assert daemon.db.get_image("src").workseed == str(seed)
    injected = [c for c in world.runner.calls if c[:2] == ["debugfs", "-w"]]
    assert injected and injected[-1][-1].endswith("/rootfs.ext4")
    nothing_left(daemon)
    images.delete(daemon, "src")

    # 1b. a file a remote client sent: the origin is where that client read it; only
    # a bundle file can say so
    img = pull(daemon, str(out), sent_from="laptop:/home/u/src.tar.zst")
    assert img["origin"] == f"laptop:/home/u/src.tar.zst#sha256:{res['sha256']}"
    images.delete(daemon, "src")
    for text, sent_from, why in [
            ("127.0.0.1:5000/team/dev:1", "laptop:/x", "is an OCI image"),
            ("http://127.0.0.1:1/x.tar.zst", "laptop:/x", "is not a file"),
            (str(out), "laptop:/x\n", "control character")]:
        with pytest.raises(BadRequest, match=why):
            imagepull.check_request(daemon, text, name=None, size_bytes=None,
                                    kernel_name=None, insecure=False, sent_from=sent_from)

    # 2. a file:// catalog (relative url), under another name
    set_catalog(daemon, write_catalog(out.parent / "catalog.json", [entry("src", out)]))
    img = pull(daemon, "src", name="copy")
    assert img["name"] == "copy" and Path(img["rootfs"]).read_bytes() == original
    assert img["origin"].startswith(out.as_uri())
    images.delete(daemon, "copy")
    # Without --name the image is called what the catalog calls it, and a name taken
    # is refused before anything is fetched.
    write_catalog(out.parent / "catalog.json", [entry("golden", out)])
    assert pull(daemon, "golden")["name"] == "golden"
    with pytest.raises(AlreadyExists) as exists:
        imagepull.begin_pull(daemon, imagepull.check_request(
            daemon, "golden", name=None, size_bytes=None, kernel_name=None, insecure=False))
    assert "banger image delete golden" in (exists.value.hint or "")
    images.delete(daemon, "golden")

    # 3. an HTTP catalog on loopback
    root, base = http_dir
    (root / "b").mkdir()
    (root / "b" / "src.tar.zst").write_bytes(out.read_bytes())
    older = tmp_path / "old.tar.zst"
    older.write_bytes(b"never fetched")
    write_catalog(root / "catalog.json", [
        entry("src", out, url="b/src.tar.zst", version="1.10"),
        entry("src", older, url="b/old.tar.zst", version="1.9"),
    ])
    set_catalog(daemon, f"{base}/catalog.json")
    listed = catalog.available(daemon.cfg.catalog_url, kind="image")
    assert [(e["name"], e["version"]) for e in listed] == [("src", "1.10"), ("src", "1.9")]
    img = pull(daemon, "src")
    assert Path(img["rootfs"]).read_bytes() == original
    assert img["origin"].startswith(f"{base}/b/src.tar.zst#sha256:")
    nothing_left(daemon)
    # and by URL
    images.delete(daemon, "src")
    assert pull(daemon, f"{base}/b/src.tar.zst")["name"] == "src"


def _open_bundle(path: Path) -> tarfile.TarFile:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(),
                                                  max_output_size=256 << 20)
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def test_export_of_a_registry_kernel_image_imports_or_reuses_it(
        daemon: Daemon, tmp_path: Path) -> None:
    kernels.import_files(daemon, "qk", [str(bzimage(tmp_path / "bz"))], None)
    add_image(daemon, tmp_path, "withk", kernel_name="qk")
    out = tmp_path / "withk.tar.zst"
    res = export(daemon, "withk", out)
    assert res["kernel"] == {"name": "qk", "version": "6.1.99-banger"}
    assert sorted(res["members"]) == ["bzImage", "rootfs.ext4", "workseed.tar"]
    images.delete(daemon, "withk")
    assert pull(daemon, str(out))["kernel_name"] == "qk"  # the same kernel: reused
    images.delete(daemon, "withk")
    kernels.remove(daemon, "qk")
    img = pull(daemon, str(out))  # absent: imported from the bundle
    assert img["kernel_name"] == "qk" and kernels.show(daemon, "qk")["source"] == "bundle"
    assert kernels.show(daemon, "qk")["origin"] == img["origin"]  # the image bundle's
    images.delete(daemon, "withk")
    kernels.remove(daemon, "qk")
    kernels.import_files(daemon, "qk", [str(bzimage(tmp_path / "other", "6.1.1-x"))], None)
    with pytest.raises(AlreadyExists) as exc:
        pull(daemon, str(out))
    assert "kernel rm qk" in (exc.value.hint or "")
    nothing_left(daemon, "withk")
    assert kernels.show(daemon, "qk")["version"] == "6.1.1-x"


def test_a_failed_export_leaves_no_file(daemon: Daemon, tmp_path: Path) -> None:
    src = add_image(daemon, tmp_path)
    out = tmp_path / "out.tar.zst"
    Path(src.rootfs).unlink()
    with pytest.raises(BangerError):
        export(daemon, "src", out)
    assert list(tmp_path.glob("*.tar.zst*")) == [] and not list(tmp_path.glob(".out*"))
    nothing_left(daemon)
    with pytest.raises(BadRequest, match="absolute"):
        bundles.begin_export(daemon, "src", "rel.tar.zst")
    with pytest.raises(NotFound):
        bundles.begin_export(daemon, "nope", str(out))


# ------------------------------------------------------------------------ refusals


@pytest.fixture
def good_files(tmp_path: Path) -> dict[str, bytes]:
    return {"rootfs.ext4": make_ext4(tmp_path).read_bytes(),
            "vmlinuz": bzimage(tmp_path / "bz").read_bytes()}


def workseed_with(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return buf.getvalue()


def symlink(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
    return info


@pytest.mark.parametrize(("case", "message"), [
    ("bad-sha", "sha256"),
    ("unknown-member", "not in its manifest"),
    ("unknown-in-manifest", "unknown member"),
    ("dotdot", "unsafe name"),
    ("absolute", "unsafe name"),
    ("symlink", "symlink, not a regular file"),
    ("manifest-not-first", "must be its first member"),
    ("manifest-too-big", "at most 1048576 bytes"),
    ("missing", "lacks"),
    ("size", "not the manifest's"),
    ("workseed-dotdot", "'..'"),
    ("not-ext4", "not an ext4"),
    ("kernel-kind", "not an image bundle"),
])
def test_hostile_bundles_are_refused_and_leave_nothing(
        daemon: Daemon, tmp_path: Path, good_files: dict[str, bytes], case: str,
        message: str) -> None:
    files = dict(good_files)
    path = tmp_path / "evil.tar.zst"
    kw: dict[str, Any] = {}
    items = list(files.items())
    if case == "bad-sha":
        kw["manifest"] = {"members": {n: {"size": len(b), "sha256": "0" * 64}
                                     for n, b in files.items()}}
    elif case == "unknown-member":
        kw["members"] = [*items, ("extra", b"x")]
    elif case == "unknown-in-manifest":
        files["extra"] = b"x"
    elif case in ("dotdot", "absolute"):
        kw["members"] = [*items, ("../x" if case == "dotdot" else "/etc/x", b"x")]
    elif case == "symlink":
        kw["members"] = [items[0], ("vmlinuz", symlink("vmlinuz"))]
    elif case == "manifest-not-first":
        kw["manifest_first"] = False
    elif case == "manifest-too-big":
        kw["pad_manifest"] = bundles.MANIFEST_MAX
    elif case == "missing":
        kw["members"] = items[:1]
    elif case == "size":
        kw["members"] = [items[0], ("vmlinuz", files["vmlinuz"] + b"x")]
    elif case == "workseed-dotdot":
        files["workseed.tar"] = workseed_with("../escaped")
    elif case == "not-ext4":
        files["rootfs.ext4"] = b"\0" * 8192
    elif case == "kernel-kind":
        kw["kind"] = "kernel"
    build_bundle(path, files, **kw)
    with pytest.raises(BadRequest, match=message):
        pull(daemon, str(path))
    nothing_left(daemon, "evil")
    assert not (tmp_path / "escaped").exists() and kernels.list_kernels(daemon) == []


def test_a_daemon_without_root_refuses_a_work_seed_it_cannot_make(
        daemon: Daemon, tmp_path: Path, good_files: dict[str, bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed stays a tree for every work disk made as root's: an owner other than
    root cannot be kept by a daemon that is not root, so the import says so."""
    monkeypatch.setattr(oci_fixups, "for_this_process", Fixups)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, uid in (("plain", 0), ("alices", 1000)):
            info = tarfile.TarInfo(name)
            info.size, info.uid = 4, uid
            tar.addfile(info, io.BytesIO(b"seed"))
    path = tmp_path / "owned.tar.zst"
    build_bundle(path, {**good_files, "workseed.tar": buf.getvalue()})
    with pytest.raises(BadRequest, match="without root cannot make: /alices") as err:
        pull(daemon, str(path))
    assert "root daemon" in err.value.hint
    nothing_left(daemon, "evil")  # the bundle's own name
    path.unlink()
    build_bundle(path, {**good_files, "workseed.tar": workseed_with("plain")})
    pull(daemon, str(path))  # root's files only: nothing to note
    assert (daemon.layout.image_dir("evil") / "workseed" / "plain").read_bytes() == b"evil"


def test_a_catalog_sha256_that_does_not_match_is_refused(
        daemon: Daemon, tmp_path: Path, good_files: dict[str, bytes],
        http_dir: tuple[Path, str]) -> None:
    bundle = build_bundle(tmp_path / "ok.tar.zst", good_files)
    set_catalog(daemon, write_catalog(tmp_path / "c.json",
                                      [entry("evil", bundle, sha="ab" * 32)]))
    with pytest.raises(BadRequest, match="not the catalog's"):
        pull(daemon, "evil")
    nothing_left(daemon, "evil")
    root, base = http_dir
    (root / "ok.tar.zst").write_bytes(bundle.read_bytes())
    write_catalog(root / "c.json", [entry("evil", bundle, sha="ab" * 32)])
    set_catalog(daemon, f"{base}/c.json")
    with pytest.raises(BadRequest, match="not the catalog's"):
        pull(daemon, "evil")
    nothing_left(daemon, "evil")


def test_plain_http_off_loopback_is_refused_before_connecting(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_connection(*a: Any, **kw: Any) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(catalog.httpx, "Client", no_connection)
    with pytest.raises(BadRequest, match="plain HTTP") as exc:
        pull(daemon, "http://example.com/dev.tar.zst")
    assert "--insecure" in (exc.value.hint or "")
    set_catalog(daemon, "http://example.com/catalog.json")
    with pytest.raises(BadRequest, match="plain HTTP"):
        pull(daemon, "dev")
    nothing_left(daemon)


def test_catalog_errors_say_what_to_do(daemon: Daemon, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no catalog") as exc:
        pull(daemon, "dev")
    assert "catalog_url" in (exc.value.hint or "")
    set_catalog(daemon, write_catalog(tmp_path / "c.json", []))
    with pytest.raises(NotFound, match="no image named 'dev'") as exc:
        pull(daemon, "dev")
    assert "list --available" in (exc.value.hint or "")
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(BadRequest, match="not valid JSON"):
        catalog.available(daemon.cfg.catalog_url, kind="image")
    with pytest.raises(BadRequest, match="--kernel"):
        pull(daemon, "dev", kernel_name="k")
    with pytest.raises(BadRequest, match="absolute"):
        pull(daemon, "dev.tar.zst")


def test_kernel_pull_from_a_catalog(daemon: Daemon, tmp_path: Path,
                                    http_dir: tuple[Path, str]) -> None:
    root, base = http_dir
    kernel = bzimage(tmp_path / "bz", "6.1.42-cat").read_bytes()
    bundle = build_bundle(root / "k.tar.zst", {"bzImage": kernel, "initrd.img": b"rd"},
                          kind="kernel", manifest={"name": "cat-kernel"})
    write_catalog(root / "catalog.json", [entry("cat-kernel", bundle, kind="kernel")])
    set_catalog(daemon, f"{base}/catalog.json")
    assert [e["name"] for e in catalog.available(daemon.cfg.catalog_url, kind="kernel")] \
        == ["cat-kernel"]
    assert catalog.available(daemon.cfg.catalog_url, kind="image") == []
    req = bundles.check_request(daemon, "cat-kernel", kind="kernel", name=None,
                                size_bytes=None, insecure=False)
    k = finished(bundles.begin_pull(daemon, req))
    assert k["name"] == "cat-kernel" and k["version"] == "6.1.42-cat"
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert k["origin"] == f"{base}/k.tar.zst#sha256:{sha}"
    assert kernels.show(daemon, "cat-kernel")["origin"] == k["origin"]  # kept in the store
    assert Path(k["bzimage"]).read_bytes() == kernel
    assert Path(k["bzimage"]).stat().st_mode & 0o777 == 0o644  # the VMM user reads it
    assert Path(k["initrd"]).read_bytes() == b"rd"
    nothing_left(daemon)
    with pytest.raises(AlreadyExists):  # the manifest names it: found once it is read
        finished(bundles.begin_pull(daemon, req))
    nothing_left(daemon)
    named = bundles.check_request(daemon, "cat-kernel", kind="kernel", name="cat-kernel",
                                  size_bytes=None, insecure=False)
    with pytest.raises(AlreadyExists):  # --name: refused before anything is fetched
        bundles.begin_pull(daemon, named)
    # a kernel bundle file a remote client sent: the origin is where that client read it
    kernels.remove(daemon, "cat-kernel")
    sent = bundles.check_request(daemon, str(bundle), kind="kernel", name=None, size_bytes=None,
                                 insecure=False, sent_from="laptop:/home/u/k.tar.zst")
    assert finished(bundles.begin_pull(daemon, sent))["origin"] == \
        f"laptop:/home/u/k.tar.zst#sha256:{sha}"
    with pytest.raises(BadRequest, match="sent_from"):  # only for a bundle file
        bundles.check_request(daemon, "cat-kernel", kind="kernel", name="x", size_bytes=None,
                              insecure=False, sent_from="laptop:/k.tar.zst")
    assert kernels.import_files(daemon, "plain", [str(tmp_path / "bz")], None)["origin"] is None
    # a kernel bundle with a junk "kernel" is refused by the registry's own checks
    build_bundle(root / "junk.tar.zst", {"bzImage": b"junk"}, kind="kernel")
    bad = bundles.check_request(daemon, f"{base}/junk.tar.zst", kind="kernel", name="junk",
                                size_bytes=None, insecure=False)
    with pytest.raises(BadRequest):
        finished(bundles.begin_pull(daemon, bad))
    assert daemon.db.find_kernel("junk") is None
    nothing_left(daemon)


def test_cancelled_export_and_pull_leave_nothing(daemon: Daemon, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    add_image(daemon, tmp_path)
    out = tmp_path / "src.tar.zst"
    export(daemon, "src", tmp_path / "kept.tar.zst")
    real_add, real_write = bundles._add, bundles._write_member

    def cancel_current() -> None:
        for op in [*daemon.image_ops.active()]:
            op.request_cancel("cancelled by the test")

    def add_then_cancel(tar: Any, name: str, *a: Any) -> None:
        real_add(tar, name, *a)
        if name == "rootfs.ext4":
            cancel_current()

    monkeypatch.setattr(bundles, "_add", add_then_cancel)
    with pytest.raises(BangerError, match="cancelled"):
        export(daemon, "src", out)
    assert not out.exists() and sorted(p.name for p in tmp_path.glob("*.tar.zst*")) \
        == ["kept.tar.zst"] and not list(tmp_path.glob(".src.tar.zst*"))
    nothing_left(daemon)

    def write_then_cancel(read: Any, dest: Path, **kw: Any) -> str:
        digest = real_write(read, dest, **kw)
        cancel_current()
        return digest

    monkeypatch.setattr(bundles, "_write_member", write_then_cancel)
    with pytest.raises(BangerError, match="cancelled"):
        pull(daemon, str(tmp_path / "kept.tar.zst"), name="again")
    nothing_left(daemon, "again")


def test_export_gives_the_file_to_the_caller(daemon: Daemon, tmp_path: Path) -> None:
    add_image(daemon, tmp_path)
    out = tmp_path / "mine.tar.zst"
    finished(bundles.begin_export(daemon, "src", str(out), owner=(4321, 4322)))
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_catalog_documents_are_checked() -> None:
    good = {"name": "dev", "version": "2", "kind": "image", "url": "dev.tar.zst",
            "sha256": "ab" * 32, "size": 10}
    [e] = catalog.parse(json.dumps({"bundles": [good]}).encode(), "https://h/c/index.json")
    assert e.url == "https://h/c/dev.tar.zst"
    local = {**good, "url": "file:///etc/shadow"}
    with pytest.raises(BadRequest, match="http\\(s\\) bundles only"):
        catalog.parse(json.dumps({"bundles": [local]}).encode(), "http://127.0.0.1/c.json")
    assert catalog.parse(json.dumps({"bundles": [local]}).encode(),
                         "file:///srv/c.json")[0].url == "file:///etc/shadow"
    for bad in ({"name": "Dev"}, {"kind": "vm"}, {"sha256": "xyz"}, {"size": -1},
                {"size": True}, {"version": ""}):
        with pytest.raises(BadRequest):
            catalog.parse(json.dumps({"bundles": [{**good, **bad}]}).encode(), "file:///c")
    assert catalog.version_key("1.10") > catalog.version_key("1.9")
    assert catalog.version_key("2") > catalog.version_key("1.99")


def test_catalog_table() -> None:
    from banger.cli.output import catalog_table

    assert catalog_table([], "kernel") == "the catalog lists no kernels"
    text = catalog_table([{"name": "dev", "version": "2", "size_bytes": 3 << 20,
                           "url": "https://h/dev.tar.zst"}], "image")
    assert text.splitlines()[0].split() == ["NAME", "VERSION", "SIZE", "URL"]
    assert text.splitlines()[1].split() == ["dev", "2", "3.0M", "https://h/dev.tar.zst"]
