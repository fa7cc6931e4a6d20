"""Where a bundle comes from: a local file, a ``file://`` or ``http(s)://`` URL, or a
name in the catalog; and the transport that fetches it.

The catalog (config ``catalog_url``, a ``file://`` or ``http(s)://`` URL) is a JSON
document ``{"bundles": [{"name", "version", "kind", "url", "sha256", "size"}]}`` of at
most :data:`CATALOG_MAX` bytes; an entry's ``url`` may be relative to the catalog's.
A name resolves to the newest version of that kind; the bundle fetched for it must
have the entry's size and sha256.

Transport rules (those of the OCI registry client, ``oci.registry``): plain HTTP only
to a loopback host or with ``insecure``, checked before any connection; redirects
followed by hand, at most :data:`REDIRECTS_MAX`, never downgraded to plain HTTP
under that rule, never from a remote host to loopback; no proxies or ``.netrc`` from
the environment. A catalog fetched over HTTP may only name HTTP(S) bundles, never a
``file://`` one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from banger.daemon.oci.registry import is_loopback
from banger.errors import BadRequest, NotFound, RegistryError
from banger.names import check_name
from banger.runner import CancelToken

CATALOG_MAX = 4 << 20  # the catalog document; a thousand entries are ~200 KiB
BUNDLE_MAX = 80 << 30  # a bundle of unknown size: a 64 GiB rootfs, kernel and work seed
REDIRECTS_MAX = 5  # a file server -> storage/CDN is one or two hops
# Connecting takes well under a second on a working network; a read stalls 60 s only
# when the peer is gone. The catalog must arrive whole within DOC_DEADLINE_S; a bundle
# (GiBs) has no total deadline: the read timeout or a cancel stops it.
TIMEOUT = httpx.Timeout(60.0, connect=15.0)
DOC_DEADLINE_S = 120.0
KINDS = ("image", "kernel")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_CATALOG_HINT = ("set catalog_url in the config (a file:// or http(s):// URL), or pull "
                    "a bundle by path or URL (FILE.tar.zst, https://.../FILE.tar.zst)")

Progress = Callable[[int, int | None], None]
"""``progress(bytes_done, total_or_None)``."""


@dataclass(frozen=True)
class Entry:
    """One bundle the catalog lists."""

    name: str
    version: str
    kind: str
    url: str  # absolute
    sha256: str
    size: int

    def view(self) -> dict[str, Any]:
        """The JSON-ready dict ``image list --available`` shows."""
        return {"name": self.name, "version": self.version, "kind": self.kind,
                "url": self.url, "sha256": self.sha256, "size_bytes": self.size}


@dataclass(frozen=True)
class Source:
    """Where to read one bundle, and what it must be (when a catalog said so)."""

    url: str  # an http(s) URL, or "" for a local file
    path: Path | None  # the local file
    origin: str  # what the image records: the URL or path
    name: str | None = None  # the catalog name it was resolved from
    sha256: str | None = None
    size: int | None = None
    insecure: bool = False


def is_catalog_name(text: str) -> bool:
    """Whether ``text`` is a bare catalog name (a DNS label), not a path or URL."""
    return re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", text) is not None


def check_url(url: str, *, insecure: bool, what: str) -> httpx.URL:
    """``url`` if the transport rules allow it (HTTPS, or plain HTTP to loopback or
    ``insecure``); checked before any connection.

    Raises:
        BadRequest: not an http(s) URL, or plain HTTP to a remote host.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise BadRequest(f"{what} {url!r} is not a valid URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(f"{what} {url!r} is not an http(s) URL")
    if parsed.scheme == "http" and not (insecure or is_loopback(parsed.host)):
        raise BadRequest(f"{what} {url} is plain HTTP to {parsed.host}; refused",
                         hint="banger speaks plain HTTP only to loopback; use https://, or "
                              "pass --insecure to allow it")
    return parsed


def file_url_path(url: str, what: str) -> Path:
    """The absolute local path of a ``file://`` URL (no host but ``localhost``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise BadRequest(f"{what} {url!r} is not a local file:// URL",
                         hint="write it file:///absolute/path")
    return Path(unquote(parts.path))


def resolve(catalog_url: str, text: str, *, kind: str, insecure: bool) -> Source:
    """The source ``text`` names: a local ``.tar.zst`` path (absolute), a URL, or a
    catalog name (the newest ``kind`` entry of that name).

    Raises:
        BadRequest: a relative path, a bad URL, plain HTTP to a remote host.
        NotFound: no catalog configured, or no such name in it.
    """
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("http", "https"):
        check_url(text, insecure=insecure, what="bundle URL")
        return Source(url=text, path=None, origin=text, insecure=insecure)
    if scheme == "file":
        return Source(url="", path=file_url_path(text, "bundle URL"), origin=text)
    if scheme:
        raise BadRequest(f"{text!r}: banger fetches bundles over http(s):// and file:// only")
    if is_catalog_name(text):
        entry = find(catalog_url, text, kind=kind, insecure=insecure)
        if entry.url.startswith("file://"):
            return Source(url="", path=file_url_path(entry.url, "catalog entry"),
                          origin=entry.url, name=entry.name, sha256=entry.sha256,
                          size=entry.size)
        return Source(url=entry.url, path=None, origin=entry.url, name=entry.name,
                      sha256=entry.sha256, size=entry.size, insecure=insecure)
    path = Path(text)
    if not path.is_absolute():
        raise BadRequest(f"bundle path {text!r} must be absolute",
                         hint="the CLI makes paths absolute; over RPC give an absolute path")
    if not path.is_file():
        raise BadRequest(f"bundle {path} does not exist or is not a regular file",
                         hint="check the path; a catalog name has no '.tar.zst' or '/'")
    return Source(url="", path=path, origin=str(path))


# ------------------------------------------------------------------------ catalog


def load(catalog_url: str, *, insecure: bool) -> list[Entry]:
    """Every valid entry of the catalog at ``catalog_url``.

    Raises:
        NotFound: no catalog is configured.
        BadRequest: the catalog is not the documented JSON, or too large.
        RegistryError: it cannot be fetched.
    """
    if not catalog_url:
        raise NotFound("no catalog is configured", hint=_NO_CATALOG_HINT)
    if catalog_url.startswith("file://"):
        path = file_url_path(catalog_url, "catalog_url")
        try:
            with path.open("rb") as fh:
                body = fh.read(CATALOG_MAX + 1)
        except OSError as exc:
            raise NotFound(f"cannot read the catalog {path}: {exc.strerror}",
                           hint="check catalog_url in the config") from exc
    else:
        check_url(catalog_url, insecure=insecure, what="catalog_url")
        with open_url(catalog_url, insecure=insecure, what="the catalog") as resp:
            body = read_bounded(resp, CATALOG_MAX + 1, "the catalog",
                                time.monotonic() + DOC_DEADLINE_S)
    if len(body) > CATALOG_MAX:
        raise BadRequest(f"the catalog {catalog_url} is larger than {CATALOG_MAX} bytes")
    return parse(body, catalog_url)


def parse(body: bytes, base_url: str) -> list[Entry]:
    """The catalog document's entries, ``url`` made absolute against ``base_url``.

    Raises:
        BadRequest: not JSON, or an entry lacks a field or has a bad one.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the catalog {base_url} is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("bundles"), list):
        raise BadRequest(f"the catalog {base_url} has no \"bundles\" list")
    remote = not base_url.startswith("file://")
    entries = []
    for i, raw in enumerate(doc["bundles"]):
        where = f"the catalog {base_url}: bundle {i + 1}"
        if not isinstance(raw, dict):
            raise BadRequest(f"{where} is not an object")
        name, version, kind = raw.get("name"), raw.get("version"), raw.get("kind")
        url, sha, size = raw.get("url"), raw.get("sha256"), raw.get("size")
        if not isinstance(name, str) or not is_catalog_name(name):
            raise BadRequest(f"{where}: name {name!r} is not a DNS label")
        if not isinstance(version, str) or not 0 < len(version) <= 64:
            raise BadRequest(f"{where} ({name}): version must be a string of 1-64 characters")
        if kind not in KINDS:
            raise BadRequest(f"{where} ({name}): kind must be \"image\" or \"kernel\"")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.removeprefix("sha256:")):
            raise BadRequest(f"{where} ({name}): sha256 must be 64 lower-case hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= BUNDLE_MAX:
            raise BadRequest(f"{where} ({name}): size must be a positive number of bytes")
        if not isinstance(url, str) or not url:
            raise BadRequest(f"{where} ({name}): url is missing")
        absolute = urljoin(base_url, url)
        if remote and not absolute.lower().startswith(("http://", "https://")):
            raise BadRequest(f"{where} ({name}): a catalog fetched over HTTP may name "
                             "http(s) bundles only")
        entries.append(Entry(name=name, version=version, kind=str(kind), url=absolute,
                             sha256=sha.removeprefix("sha256:"), size=size))
    return entries


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key where ``1.10`` > ``1.9`` and numbers sort before words."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.findall(r"\d+|[A-Za-z]+", version))


def available(catalog_url: str, *, kind: str, insecure: bool = False) -> list[dict[str, Any]]:
    """The catalog's entries of ``kind``: by name, newest version first."""
    entries = [e for e in load(catalog_url, insecure=insecure) if e.kind == kind]
    entries.sort(key=lambda e: version_key(e.version), reverse=True)
    entries.sort(key=lambda e: e.name)
    return [e.view() for e in entries]


def find(catalog_url: str, name: str, *, kind: str, insecure: bool) -> Entry:
    """The newest entry of ``kind`` called ``name``.

    Raises:
        NotFound: no catalog, or no such entry (the hint lists what there is).
    """
    check_name(name, kind)
    entries = [e for e in load(catalog_url, insecure=insecure) if e.kind == kind]
    matches = [e for e in entries if e.name == name]
    if not matches:
        names = sorted({e.name for e in entries})
        listed = f"it has {', '.join(names[:10])}" if names else f"it lists no {kind}s"
        raise NotFound(f"the catalog has no {kind} named {name!r}",
                       hint=f"{listed}; see `banger {kind} list --available`")
    return max(matches, key=lambda e: version_key(e.version))


# ---------------------------------------------------------------------- transport


@contextlib.contextmanager
def open_url(url: str, *, insecure: bool, what: str) -> Iterator[httpx.Response]:
    """GET ``url`` under the transport rules; yields the 200 response, streaming.

    Raises:
        BadRequest: the URL or a redirect breaks the transport rules.
        NotFound: HTTP 404.
        RegistryError: any other failure to fetch it.
    """
    current = check_url(url, insecure=insecure, what=what)
    origin_loopback = is_loopback(current.host)
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False, trust_env=False,
                      headers={"Accept-Encoding": "identity", "User-Agent": "banger"}) as http:
        for _ in range(REDIRECTS_MAX + 1):
            try:
                resp = http.send(http.build_request("GET", current), stream=True)
            except httpx.HTTPError as exc:
                raise _network_error(current, what, exc) from exc
            try:
                if resp.status_code in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise RegistryError(f"{what}: {current.host} redirected without a "
                                            "Location")
                    current = check_url(str(current.join(location)), insecure=insecure,
                                        what=f"{what}'s redirect")
                    if is_loopback(current.host) and not origin_loopback:
                        raise BadRequest(f"{what}: a remote server redirected to this "
                                         "host's loopback; refused")
                    continue
                if resp.status_code == 404:
                    raise NotFound(f"{what}: {current} is not there (HTTP 404)",
                                   hint="check the URL (and the catalog)")
                if resp.status_code != 200:
                    raise RegistryError(f"{what}: GET {current} answered HTTP "
                                        f"{resp.status_code}")
                yield resp
                return
            finally:
                resp.close()
        raise RegistryError(f"{what}: more than {REDIRECTS_MAX} redirects")


def chunks(resp: httpx.Response, what: str) -> Iterator[bytes]:
    """The raw body, httpx's errors translated."""
    try:
        yield from resp.iter_raw(_CHUNK)
    except httpx.HTTPError as exc:
        raise _network_error(resp.request.url, what, exc) from exc


def read_bounded(resp: httpx.Response, limit: int, what: str, deadline: float) -> bytes:
    """The body, stopped past ``limit`` bytes (the caller checks the length) or
    refused past ``deadline``."""
    buf = bytearray()
    for chunk in chunks(resp, what):
        buf += chunk
        if len(buf) >= limit:
            break
        if time.monotonic() > deadline:
            raise RegistryError(f"{what} did not arrive within {DOC_DEADLINE_S:g} s")
    return bytes(buf[:limit])


def download(src: Source, dest: Path, *, progress: Progress,
             cancel: CancelToken) -> str:
    """Fetch ``src.url`` into the new file ``dest``: at most ``src.size`` bytes (else
    :data:`BUNDLE_MAX`), exactly ``src.size`` when given; returns its sha256 (hex).

    Raises:
        BadRequest: the body is larger than allowed or not the size the catalog says.
        RegistryError, NotFound: the fetch failed.
    """
    limit = src.size if src.size is not None else BUNDLE_MAX
    digest = hashlib.sha256()
    done = 0
    with open_url(src.url, insecure=src.insecure, what="the bundle") as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None and length.isdigit() else src.size
        if total is not None and total > limit:
            raise BadRequest(f"the bundle at {src.url} is {total} bytes, more than the "
                             f"{limit} allowed")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks(resp, "the bundle"):
                cancel.check()
                done += len(chunk)
                if done > limit:
                    raise BadRequest(f"the bundle at {src.url} is larger than the {limit} "
                                     "bytes allowed", hint="the catalog entry's size is "
                                     "wrong, or the server is broken or hostile")
                digest.update(chunk)
                out.write(chunk)
                progress(done, total)
    if src.size is not None and done != src.size:
        raise BadRequest(f"the bundle at {src.url} is {done} bytes, not the {src.size} the "
                         "catalog says", hint="the catalog or the server is out of date")
    return digest.hexdigest()


def _network_error(url: httpx.URL, what: str, exc: httpx.HTTPError) -> RegistryError:
    if isinstance(exc, httpx.TimeoutException):
        return RegistryError(f"{what}: {url.host} timed out", hint="check the network; retry")
    return RegistryError(f"{what}: cannot fetch {url}: {exc}",
                         hint="check the URL and the network")
