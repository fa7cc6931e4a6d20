"""Image references: the distribution grammar, Docker Hub's defaults, bounded and
strict on bad input; and telling an OCI reference from a bundle."""

from __future__ import annotations

import pytest

from banger.daemon.oci.reference import Reference, check_digest, is_oci_reference, parse
from banger.errors import BadRequest

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("debian", "docker.io", "library/debian", "latest", None),
    ("debian:bookworm", "docker.io", "library/debian", "bookworm", None),
    ("team/dev", "docker.io", "team/dev", "latest", None),
    ("docker.io/debian", "docker.io", "library/debian", "latest", None),
    ("index.docker.io/library/debian:12", "docker.io", "library/debian", "12", None),
    ("registry-1.docker.io/team/x", "docker.io", "team/x", "latest", None),
    ("127.0.0.1:5000/team/dev:1.2", "127.0.0.1:5000", "team/dev", "1.2", None),
    ("localhost/dev", "localhost", "dev", "latest", None),
    ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
    ("Ghcr.IO/org/tool:v1", "ghcr.io", "org/tool", "v1", None),
    ("[::1]:5000/team/dev", "[::1]:5000", "team/dev", "latest", None),
    ("[0:0::1]/x", "[::1]", "x", "latest", None),
    (f"debian@{D}", "docker.io", "library/debian", None, D),
    (f"quay.io/a/b:tag@{D}", "quay.io", "a/b", "tag", D),
    ("a.b/x__y/z-w.v---q:_T.-9", "a.b", "x__y/z-w.v---q", "_T.-9", None),
    ("host:05000/x", "host:5000", "x", "latest", None),
    ("x:" + "t" * 128, "docker.io", "library/x", "t" * 128, None),
])
def test_parse(text: str, registry: str, repository: str, tag: str | None,
               digest: str | None) -> None:
    ref = parse(text)
    assert ref == Reference(registry, repository, tag, digest)
    assert ref.target == (digest or tag)
    assert parse(str(ref)) == ref  # the canonical form parses back to the same


def test_api_host_and_display() -> None:
    assert parse("debian").api_host == "registry-1.docker.io"
    assert str(parse("debian")) == "docker.io/library/debian:latest"
    assert parse("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    assert str(parse(f"x@{D}")) == f"docker.io/library/x@{D}"


@pytest.mark.parametrize(("text", "why"), [
    ("", "1-"),
    ("x" * 600, "1-"),
    (" debian", "spaces"),
    ("deb ian", "spaces"),
    ("debian\n", "spaces"),
    ("deb\x00ian", "control"),
    ("Debian", "repository component 'Debian'"),
    ("team/Dev", "'Dev'"),
    ("team//dev", "''"),
    ("team/dev/", "''"),
    ("/dev", "''"),
    ("-dev", "'-dev'"),
    ("dev-", "'dev-'"),
    ("a..b", "'a..b'"),
    ("a___b", "'a___b'"),
    ("debian:", "tag ''"),
    ("debian:.x", "tag '.x'"),
    ("debian:-x", "tag '-x'"),
    ("debian:a/b", "port"),            # 'debian:a' reads as a host and port
    ("debian:" + "t" * 129, "tag"),
    ("debian@sha256:abc", "64 lower-case hex"),
    ("debian@sha256:" + "AB" * 32, "64 lower-case hex"),
    ("debian@sha512:" + "ab" * 64, "only sha256"),
    ("debian@" + "ab" * 32, "no algorithm"),
    ("debian@", "no algorithm"),
    ("host:0/x", "port"),
    ("host:70000/x", "port"),
    ("host:123456/x", "port"),
    ("host:/x", "port"),
    ("host:p/x", "port"),
    ("bad_host.io/x", "host name"),
    ("-bad.io/x", "host name"),
    ("[::1/x", "IPv6"),
    ("[127.0.0.1]/x", "IPv6"),
    ("[::1]x/y", "port"),
    (":tag", "no repository"),
    ("a" * 256, "longer than 255"),
    ("h.io/" + "a/" * 130 + "b", "longer than 255"),
])
def test_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse(text)
    assert why in str(exc.value)
    assert "[HOST[:PORT]/]REPO" in exc.value.hint
    assert len(str(exc.value)) < 400  # long input is shortened in the message


def test_check_digest() -> None:
    assert check_digest(D) == D
    with pytest.raises(BadRequest):
        check_digest("md5:" + "ab" * 16)


@pytest.mark.parametrize(("text", "oci"), [
    ("debian-bookworm", False),           # a catalog name
    ("dev", False),
    ("https://example.com/x.tar.zst", False),
    ("http://example.com/img", False),
    ("HTTPS://example.com/img", False),
    ("file:///srv/img.tar.zst", False),
    ("./img.tar.zst", False),
    ("/srv/images/img.tar.zst", False),
    ("img.tar.zst", False),
    ("debian:bookworm", True),            # catalog names never hold ':'
    ("team/dev", True),
    ("127.0.0.1:5000/team/dev:1.2", True),
    ("ghcr.io/org/tool", True),
    (f"debian@{D}", True),
    ("Debian/X", True),                   # OCI, though parse refuses it
])
def test_is_oci_reference(text: str, oci: bool) -> None:
    assert is_oci_reference(text) is oci
