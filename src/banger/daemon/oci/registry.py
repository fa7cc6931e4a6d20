"""A registry HTTP API v2 client and :func:`pull`: a reference in, verified blobs out.

:func:`pull` resolves a reference to one linux/amd64 image manifest (through an OCI
index or Docker manifest list when the registry has one), then fetches the image
config and the layers into the :class:`~banger.daemon.oci.blobs.BlobCache`, skipping
blobs already cached. Nothing is used before it matches its digest.

Everything a registry sends is untrusted and bounded: manifests, indexes and configs
(:data:`DOC_MAX` bytes each), token responses, the number of layers, each blob's
declared size (a blob may not send more than its manifest declares), redirects,
and time (connect/read timeouts; a deadline on small documents).

Transport rules:

- plain HTTP only for a loopback registry (``localhost``, 127.0.0.0/8, ``::1``) or
  with ``insecure=True`` (which means plain HTTP, not HTTPS without verification);
  everything else is HTTPS with the system's certificate checks;
- redirects (registries send blob GETs to storage/CDNs) are followed by hand, at most
  :data:`REDIRECTS_MAX`; a redirect may not downgrade to plain HTTP under the rule
  above, nor lead from a remote registry to a loopback address, and the
  registry's ``Authorization`` is never sent to another origin;
- auth: anonymous first; a ``401`` with ``WWW-Authenticate: Bearer realm=...`` gets a
  token from the realm (with the credentials as Basic auth when given, anonymous
  otherwise) for the challenge's scope (default ``repository:<repo>:pull``) and the
  request is retried once; a ``Basic`` challenge is answered with the credentials.
  The realm must pass the same HTTPS rule, so credentials never travel in clear text
  off this host. Environment proxies and ``.netrc`` are not used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from banger.errors import BadRequest, BangerError, NotFound, RegistryError
from banger.runner import CancelToken

from .blobs import BlobCache
from .reference import Reference, check_digest, parse

# -- media types -----------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

# Layer media type -> compression of its tar ("none", "gzip", "zstd").
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
# Layers a registry may not serve: they live at URLs of their vendor's (Windows base
# layers). banger fetches nothing from such URLs and refuses the image.
FOREIGN_LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})

# -- bounds and budgets -------------------------------------------------------------

DOC_MAX = 4 << 20  # manifest, index or config JSON; real ones are a few KiB
TOKEN_MAX = 1 << 20  # a token server's JSON answer (JWTs are a few KiB)
ERROR_BODY_MAX = 64 << 10  # of an error response read for its message
LAYERS_MAX = 256  # Docker's own limit on an image's layers is 127
BLOB_MAX = 64 << 30  # a declared blob size past this is refused outright
REDIRECTS_MAX = 5  # registry -> storage is one hop; CDNs add one or two
CHALLENGE_MAX = 8 << 10  # a WWW-Authenticate header
# Connecting takes well under a second on a working network; a read stalls 60 s only
# when the peer is gone. A small document (manifest, token, error) must arrive whole
# within DOC_DEADLINE_S even if it trickles; blobs have no total deadline (layers of
# GiBs on slow links) and are stopped by the read timeout or the cancel token.
TIMEOUT = httpx.Timeout(60.0, connect=15.0)
DOC_DEADLINE_S = 120.0
_CHUNK = 256 << 10
_MESSAGE_MAX = 200  # characters of a registry's own error message quoted to the user

_PULL_HINT = ("check the image reference; a private image needs credentials "
              "(a public one may be rate limited: wait, or log in)")


@dataclass(frozen=True)
class Credentials:
    """A registry user name and password (or token), sent only as the rules allow."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` an index entry or a config names."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


LINUX_AMD64 = Platform("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    """What a manifest says about a blob or another manifest."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a VM needs (``config`` of the config JSON)."""

    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    user: str = ""
    working_dir: str = ""


@dataclass(frozen=True)
class Layer:
    """One layer, in application order, cached and verified."""

    digest: str
    media_type: str
    compression: str  # "none", "gzip" or "zstd"
    size: int
    path: Path


@dataclass(frozen=True)
class PulledImage:
    """The result of :func:`pull`.

    Attributes:
        reference: The reference pulled, as parsed.
        manifest_digest: The digest of the image manifest (the platform's, under an index).
        index_digest: The digest of the index the tag resolved to, if it was one.
        config_digest: The config blob's digest; ``config``: its relevant fields.
        layers: The layers, bottom first.
        downloaded: Digests of the blobs fetched this time (the rest were cache hits).
    """

    reference: Reference
    manifest_digest: str
    index_digest: str | None
    config_digest: str
    config: ImageConfig
    layers: tuple[Layer, ...]
    downloaded: tuple[str, ...]

    @property
    def blob_digests(self) -> frozenset[str]:
        """Every cached blob this image uses (for the cache's ``prune`` keep set)."""
        return frozenset({self.config_digest, *(la.digest for la in self.layers)})


# (digest, done bytes, total bytes) of each blob as it arrives.
Progress = Callable[[str, int, int], None]


def pull(ref: Reference | str, blobs: BlobCache, *, insecure: bool = False,
         credentials: Credentials | None = None, progress: Progress | None = None,
         cancel: CancelToken | None = None, platform: Platform = LINUX_AMD64,
         timeout: httpx.Timeout = TIMEOUT) -> PulledImage:
    """Resolve ``ref`` to its ``platform`` image and cache its config and layers.

    Args:
        ref: The image reference (parsed here when a string).
        blobs: The blob cache; blobs already in it are not downloaded again.
        insecure: Allow plain HTTP to a registry that is not on loopback.
        credentials: Sent to the token server (or as Basic auth) when challenged.
        progress: Told ``(digest, done, total)`` per chunk of each blob.
        cancel: Checked between requests and chunks.
        platform: The os/architecture to pick from an index (linux/amd64).
        timeout: The httpx timeouts (tests shorten them).

    Returns:
        The manifest digest, the parsed config and the cached layers in order.

    Raises:
        BadRequest: ``ref`` is not a valid reference.
        NotFound: The registry has no such repository, tag or digest, or no
            ``platform`` image under it.
        RegistryError: The registry could not be reached, refused, or sent something
            invalid, oversized or not matching its digest.
        Cancelled: ``cancel`` fired.
    """
    if isinstance(ref, str):
        ref = parse(ref)
    check = cancel.check if cancel is not None else (lambda: None)
    with RegistryClient(ref, insecure=insecure, credentials=credentials,
                        timeout=timeout) as client:
        check()
        media_type, body, digest = client.manifest(ref.target)
        index_digest = None
        if media_type in INDEX_TYPES:
            index_digest = digest
            entry = pick_platform(ref, parse_index(body), platform)
            check()
            media_type, body, digest = client.manifest(entry.digest, size=entry.size)
            if media_type not in MANIFEST_TYPES:
                raise RegistryError(f"{ref}: the {platform} entry of its index is a "
                                    f"{media_type}, not an image manifest")
        config_desc, layer_descs = parse_manifest(ref, media_type, body)

        downloaded: list[str] = []

        def fetch(desc: Descriptor) -> Path:
            check()
            report = progress
            blob_progress = (None if report is None else
                             lambda done, total: report(desc.digest, done, total))
            path, fetched = blobs.ensure(desc.digest, desc.size, lambda: client.blob(desc),
                                         progress=blob_progress, cancel=cancel)
            if fetched:
                downloaded.append(desc.digest)
            return path

        config = parse_config(ref, fetch(config_desc).read_bytes(), platform)
        layers = tuple(
            Layer(digest=d.digest, media_type=d.media_type,
                  compression=LAYER_TYPES[d.media_type], size=d.size, path=fetch(d))
            for d in layer_descs)
    return PulledImage(reference=ref, manifest_digest=digest, index_digest=index_digest,
                       config_digest=config_desc.digest, config=config, layers=layers,
                       downloaded=tuple(downloaded))


# -- documents ---------------------------------------------------------------------

def parse_index(body: bytes) -> list[Descriptor]:
    """The manifests an OCI index or Docker manifest list names (any platform)."""
    doc = _json(body, "index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError("the registry's index has no 'manifests' list")
    return [_descriptor(e, "index entry", with_platform=True) for e in entries]


def pick_platform(ref: Reference, entries: list[Descriptor],
                  platform: Platform) -> Descriptor:
    """The first image manifest for ``platform`` (variant ignored).

    Raises:
        NotFound: None; the message lists the platforms the index has.
    """
    for e in entries:
        if (e.platform is not None and e.media_type in MANIFEST_TYPES
                and e.platform.os == platform.os
                and e.platform.architecture == platform.architecture):
            return e
    have = sorted({str(e.platform) for e in entries if e.platform is not None
                   and e.platform.os != "unknown"})  # "unknown/unknown": attestations
    raise NotFound(f"{ref} has no {platform} image (it has: {', '.join(have) or 'none'})",
                   hint=f"banger boots {platform} guests: pick an image built for it")


def parse_manifest(ref: Reference, media_type: str,
                   body: bytes) -> tuple[Descriptor, list[Descriptor]]:
    """The config and layer descriptors of an image manifest, all checked.

    Raises:
        RegistryError: Not an image manifest, a config that is not a container image
            config, too many layers, a layer type banger cannot apply.
    """
    if media_type in DOCKER_SCHEMA1:
        raise RegistryError(f"{ref} is a Docker schema 1 image, which is not supported",
                            hint="push it again with a current tool (schema 2 or OCI)")
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{ref} is a {media_type!r}, not a container image manifest")
    doc = _json(body, "manifest")
    if doc.get("schemaVersion") != 2:
        raise RegistryError(f"{ref}: manifest schemaVersion is not 2")
    config = _descriptor(doc.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise RegistryError(f"{ref} is not a container image (its config is a "
                            f"{config.media_type!r})", hint="pull a container image")
    if config.size > DOC_MAX:
        raise RegistryError(f"{ref}: its config declares {config.size} bytes, more than "
                            f"the {DOC_MAX} banger reads")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise RegistryError(f"{ref}: manifest has no 'layers' list")
    if len(raw_layers) > LAYERS_MAX:
        raise RegistryError(f"{ref} has {len(raw_layers)} layers; banger applies at most "
                            f"{LAYERS_MAX}", hint="squash the image")
    layers = [_descriptor(la, "layer") for la in raw_layers]
    for la in layers:
        if la.media_type in FOREIGN_LAYER_TYPES:
            raise RegistryError(
                f"{ref} has a non-distributable layer ({la.media_type}, {la.digest}) that "
                "registries do not serve; banger does not fetch layers from other URLs",
                hint="use a Linux image whose layers are all in the registry")
        if la.media_type not in LAYER_TYPES:
            raise RegistryError(f"{ref}: layer {la.digest} has an unsupported media type "
                                f"{la.media_type!r}",
                                hint="banger applies tar layers: plain, gzip or zstd")
    return config, layers


def parse_config(ref: Reference, body: bytes, platform: Platform) -> ImageConfig:
    """The run settings of an image config JSON; refuses another platform's image."""
    doc = _json(body, "image config")
    got_os, got_arch = doc.get("os"), doc.get("architecture")
    if (isinstance(got_os, str) and got_os != platform.os) or (
            isinstance(got_arch, str) and got_arch != platform.architecture):
        raise NotFound(f"{ref} is a {got_os}/{got_arch} image, not {platform}",
                       hint=f"banger boots {platform} guests: pick an image built for it")
    cfg = doc.get("config")
    if cfg is None:
        return ImageConfig()
    if not isinstance(cfg, dict):
        raise RegistryError(f"{ref}: image config's 'config' is not an object")

    def strings(key: str) -> tuple[str, ...] | None:
        value = cfg.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RegistryError(f"{ref}: image config's {key} is not a list of strings")
        return tuple(value)

    def string(key: str) -> str:
        value = cfg.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise RegistryError(f"{ref}: image config's {key} is not a string")
        return value

    return ImageConfig(env=strings("Env") or (), cmd=strings("Cmd"),
                       entrypoint=strings("Entrypoint"), user=string("User"),
                       working_dir=string("WorkingDir"))


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RegistryError(f"the registry's {what} is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise RegistryError(f"the registry's {what} is not a JSON object")
    return doc


def _descriptor(raw: object, what: str, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(f"a manifest's {what} is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not 0 < len(media_type) <= 255:
        raise RegistryError(f"a manifest's {what} has no valid mediaType")
    if not isinstance(digest, str):
        raise RegistryError(f"a manifest's {what} has no digest")
    try:
        check_digest(digest)
    except BadRequest as exc:
        raise RegistryError(f"a manifest's {what} has a bad digest: {exc}") from None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= BLOB_MAX:
        raise RegistryError(f"a manifest's {what} {digest} has no valid size "
                            f"(0..{BLOB_MAX} bytes)")
    platform = None
    raw_platform = raw.get("platform")
    if with_platform and isinstance(raw_platform, dict):
        os_, arch, variant = (raw_platform.get(k) for k in ("os", "architecture", "variant"))
        if isinstance(os_, str) and isinstance(arch, str):
            platform = Platform(os_[:64], arch[:64],
                                variant[:64] if isinstance(variant, str) and variant else None)
    return Descriptor(media_type=media_type, digest=digest, size=size, platform=platform)


# -- HTTP --------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, brackets allowed) is this machine's
    loopback: ``localhost``, 127.0.0.0/8 or ``::1``. Names other than ``localhost``
    are not resolved."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:hostport.index("]")]
    return hostport.partition(":")[0]


class RegistryClient:
    """One repository on one registry; holds the auth token it earned.

    Not thread-safe: one client per pull.
    """

    def __init__(self, ref: Reference, *, insecure: bool = False,
                 credentials: Credentials | None = None,
                 timeout: httpx.Timeout = TIMEOUT) -> None:
        self.ref = ref
        self.insecure = insecure
        self.credentials = credentials
        self._loopback = is_loopback(_host_of(ref.api_host))
        scheme = "http" if insecure or self._loopback else "https"
        self.base = httpx.URL(f"{scheme}://{ref.api_host}/v2/{ref.repository}/")
        self._auth: str | None = None  # the Authorization value the registry accepted
        # Redirects and auth are handled here (see the module docstring); no proxies or
        # .netrc from the environment.
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                                  headers={"Accept-Encoding": "identity",
                                           "User-Agent": "banger"})

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def manifest(self, target: str, *, size: int | None = None) -> tuple[str, bytes, str]:
        """GET a manifest or index by tag or digest.

        Args:
            target: A tag or a ``sha256:`` digest; a digest is verified.
            size: The size an index declared for it, checked when given.

        Returns:
            ``(media type, body, sha256 digest of the body)``.
        """
        deadline = time.monotonic() + DOC_DEADLINE_S
        with self._get(f"manifests/{target}", accept=ACCEPT, what="manifest") as resp:
            body = _read_bounded(resp, DOC_MAX, f"{self.ref}'s manifest", deadline)
            header_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if target.startswith("sha256:") and digest != target:
            raise RegistryError(f"{self.ref}: manifest {target} does not match its digest "
                                f"(it hashes to {digest}); refused",
                                hint="the registry or a proxy in between is broken or hostile")
        if size is not None and len(body) != size:
            raise RegistryError(f"{self.ref}: manifest {target} is {len(body)} bytes, not "
                                f"the {size} its index declares")
        media_type = header_type
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(body)
            if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
                media_type = doc["mediaType"]
            elif isinstance(doc, dict) and media_type not in INDEX_TYPES | MANIFEST_TYPES:
                # OCI lets mediaType be omitted; tell the two by their fields.
                media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        return media_type, body, digest

    @contextlib.contextmanager
    def blob(self, desc: Descriptor) -> Iterator[Iterator[bytes]]:
        """Stream a blob's raw bytes (unverified: the cache verifies them).

        Refuses up front a ``Content-Length`` past the declared size.
        """
        with self._get(f"blobs/{desc.digest}", accept=None, what="blob") as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > desc.size:
                raise RegistryError(
                    f"{self.ref}: blob {desc.digest} is {length} bytes, more than the "
                    f"{desc.size} its manifest declares; refused",
                    hint="the registry or a proxy in between is broken or hostile")
            yield _chunks(resp, f"blob {desc.digest}")

    @contextlib.contextmanager
    def _get(self, path: str, *, accept: str | None, what: str) -> Iterator[httpx.Response]:
        """GET ``path`` under the repository: auth, redirects, errors; yields a 200."""
        url = self.base.join(path)
        hops = 0
        reauthed = False
        while True:
            headers = {"Accept": accept} if accept else {}
            same_origin = _origin(url) == _origin(self.base)
            if self._auth and same_origin:
                headers["Authorization"] = self._auth
            resp = self._send(url, headers)
            try:
                if resp.status_code == 401 and same_origin and not reauthed:
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.close()
                    self._authenticate(challenge)
                    reauthed = True
                    continue
                if resp.status_code in (301, 302, 303, 307, 308):
                    hops += 1
                    if hops > REDIRECTS_MAX:
                        raise RegistryError(f"{self.ref}: more than {REDIRECTS_MAX} "
                                            f"redirects fetching a {what}")
                    url = self._redirect_target(url, resp.headers.get("Location"))
                    resp.close()
                    continue
                if resp.status_code != 200:
                    raise self._status_error(resp, what, url)
                yield resp
                return
            finally:
                resp.close()

    def _send(self, url: httpx.URL, headers: dict[str, str]) -> httpx.Response:
        try:
            return self._http.send(self._http.build_request("GET", url, headers=headers),
                                   stream=True)
        except httpx.HTTPError as exc:
            raise _network_error(url, exc) from exc

    def _redirect_target(self, current: httpx.URL, location: str | None) -> httpx.URL:
        if not location:
            raise RegistryError(f"{self.ref}: the registry redirected without a Location")
        try:
            target = current.join(location)
        except httpx.InvalidURL as exc:
            raise RegistryError(f"{self.ref}: the registry redirected to an invalid URL") \
                from exc
        self._check_url(target, "a redirect")
        return target

    def _check_url(self, url: httpx.URL, what: str) -> None:
        """Refuse a plain-HTTP URL off loopback (unless insecure), another scheme, and a
        loopback URL named by a remote registry."""
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"{self.ref}: {what} leads to a {url.scheme!r} URL; refused")
        target_loopback = is_loopback(url.host)
        if url.scheme == "http" and not (self.insecure or target_loopback):
            raise RegistryError(
                f"{self.ref}: {what} leads to plain HTTP ({url.host}); refused",
                hint="banger speaks plain HTTP only to loopback or --insecure registries")
        if target_loopback and not self._loopback:
            raise RegistryError(f"{self.ref}: {what} from a remote registry leads to this "
                                "host's loopback; refused")

    def _authenticate(self, challenge: str) -> None:
        """Answer a 401's challenge: set :attr:`_auth` for the retry."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise RegistryError(f"{self.ref}: the registry requires a user name and "
                                    "password", hint="pass registry credentials")
            self._auth = _basic(self.credentials)
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"{self.ref}: the registry asks for an authentication "
                                f"banger does not speak ({scheme or 'none'})")
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL as exc:
            raise RegistryError(f"{self.ref}: the registry's token realm is not a URL") \
                from exc
        self._check_url(realm, "the token realm")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = _basic(self.credentials)
        token_url = realm.copy_merge_params(query)
        deadline = time.monotonic() + DOC_DEADLINE_S
        resp = self._send(token_url, headers)
        try:
            if resp.status_code != 200:
                raise RegistryError(
                    f"{self.ref}: the token server {realm.host} refused "
                    f"(HTTP {resp.status_code})",
                    hint="check the credentials" if self.credentials else _PULL_HINT)
            body = _read_bounded(resp, TOKEN_MAX, "the token server's answer", deadline)
        finally:
            resp.close()
        doc = _json(body, "token answer")
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token.isascii() or not token.isprintable() \
                or " " in token:
            raise RegistryError(f"{self.ref}: the token server's answer has no usable token")
        self._auth = f"Bearer {token}"

    def _status_error(self, resp: httpx.Response, what: str, url: httpx.URL) -> BangerError:
        status = resp.status_code
        detail = ""
        with contextlib.suppress(BangerError):
            body = _read_bounded(resp, ERROR_BODY_MAX, "error", time.monotonic() + 10.0)
            detail = _registry_message(body)
        said = f": {detail}" if detail else ""
        if status == 404 and what == "manifest":
            return NotFound(f"{self.ref} not found on {self.ref.registry}{said}",
                            hint="check the repository name and tag")
        if status in (401, 403):
            return RegistryError(f"{self.ref}: access denied (HTTP {status}){said}",
                                 hint=_PULL_HINT)
        if status == 429:
            return RegistryError(f"{self.ref}: the registry is rate limiting pulls{said}",
                                 hint="wait and pull again, or pull with credentials")
        return RegistryError(f"{self.ref}: GET {what} from {url.host} answered "
                             f"HTTP {status}{said}")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``WWW-Authenticate`` into its lower-cased scheme and its parameters.

    Handles ``key=token`` and ``key="quoted, \\"escaped\\""`` pairs separated by
    commas; the header is refused past :data:`CHALLENGE_MAX` characters.
    """
    if len(header) > CHALLENGE_MAX:
        raise RegistryError("the registry's WWW-Authenticate header is too long")
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1  # the closing quote
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


def _basic(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _read_bounded(resp: httpx.Response, limit: int, what: str, deadline: float) -> bytes:
    """The whole (raw) body, refused past ``limit`` bytes or ``deadline``."""
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RegistryError(f"{what} is {length} bytes; banger reads at most {limit}")
    buf = bytearray()
    for chunk in _chunks(resp, what):
        buf += chunk
        if len(buf) > limit:
            raise RegistryError(f"{what} is longer than the {limit} bytes banger reads")
        if time.monotonic() > deadline:
            raise RegistryError(f"{what} did not arrive within {DOC_DEADLINE_S:g} s")
    return bytes(buf)


def _chunks(resp: httpx.Response, what: str) -> Iterator[bytes]:
    """The raw body (no content decoding: digests cover the bytes as stored), with
    httpx's errors translated."""
    try:
        yield from resp.iter_raw(_CHUNK)
    except httpx.HTTPError as exc:
        raise _network_error(resp.request.url, exc, f" while reading {what}") from exc


def _network_error(url: httpx.URL, exc: httpx.HTTPError, during: str = "") -> RegistryError:
    if isinstance(exc, httpx.TimeoutException):
        return RegistryError(f"{url.host} timed out{during}",
                             hint="check the network; pull again")
    hint = "check the registry address and the network"
    if url.scheme == "https":
        hint += "; a registry that speaks plain HTTP needs --insecure"
    return RegistryError(f"cannot talk to {url.host}{during}: {exc}", hint=hint)


def _registry_message(body: bytes) -> str:
    """The first message of a registry's ``{"errors": [{"code", "message"}]}`` body."""
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        text = f"{first.get('code', '')} {first.get('message', '')}".strip()
    except (ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError):
        return ""
    text = "".join(c for c in text if c.isprintable())
    return text[:_MESSAGE_MAX]
