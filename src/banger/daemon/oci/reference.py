"""Image references: ``[host[:port]/]repo/path[:tag][@sha256:<hex>]``.

The grammar is the distribution project's reference grammar, checked strictly and with
bounded lengths: a reference is untrusted user input that ends up in URLs. The first
``/``-separated component is the registry host when it looks like one (it holds a ``.``
or a ``:``, is ``localhost`` or an ``[IPv6]`` literal); otherwise the reference names
Docker Hub, whose API host is ``registry-1.docker.io`` and whose single-component
repositories live under ``library/``. A reference with neither tag nor digest means
the tag ``latest``; with a digest, the digest decides what is pulled and a tag is kept
only for display.

:func:`is_oci_reference` decides whether ``banger image pull REF`` means an OCI image
or a banger bundle (a catalog name, a URL, a ``.tar.zst`` file).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from banger.errors import BadRequest

DOCKER_HUB = "docker.io"  # how references name Docker Hub
DOCKER_HUB_API = "registry-1.docker.io"  # where its registry API answers
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

DEFAULT_TAG = "latest"

# Bounds. NAME_MAX is the distribution project's limit on a repository name
# (NameTotalLengthMax, host included); a tag is at most 128 characters by the tag
# grammar; a DNS name at most 253; the whole text is refused above REF_MAX before any
# regular expression looks at it.
NAME_MAX = 255
TAG_MAX = 128
HOST_MAX = 253
REF_MAX = NAME_MAX + 1 + TAG_MAX + 1 + len("sha256:") + 64

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DOMAIN_COMPONENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_URL_SCHEME = re.compile(r"(?i)(?:https?|file)://")

_HINT = ("an image reference is [HOST[:PORT]/]REPO[:TAG][@sha256:HEX], e.g. "
         "debian:bookworm or 127.0.0.1:5000/team/dev:1.2; repository names are "
         "lower-case a-z, 0-9 and the separators '.', '_', '__', '-'")


@dataclass(frozen=True)
class Reference:
    """A parsed, validated image reference.

    Attributes:
        registry: ``host[:port]`` as written (lower-case host), ``docker.io`` for Docker Hub.
        repository: The repository path, with ``library/`` added for Docker Hub.
        tag: The tag; ``latest`` when neither tag nor digest was given, None when only a
            digest was.
        digest: ``sha256:<hex>`` when the reference pins one.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` whose ``/v2/`` API serves this repository."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What to ask the manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def is_oci_reference(text: str) -> bool:
    """Whether ``banger image pull`` should treat ``text`` as an OCI image reference.

    A bundle is a bare catalog name, an ``http(s)://`` or ``file://`` URL, or a local
    ``.tar.zst`` file. An OCI reference names a registry host or a path (``/``), a digest
    (``@``) or a tag (``:``; catalog names are DNS labels, which never hold one). This
    only classifies: :func:`parse` still validates.
    """
    text = text.strip()
    if _URL_SCHEME.match(text) or text.endswith(".tar.zst"):
        return False
    return any(c in text for c in "/@:")


def parse(text: str) -> Reference:
    """Parse and validate an image reference.

    Raises:
        BadRequest: ``text`` is not a valid reference (the message says which part,
            the hint shows the grammar).
    """
    if not text or len(text) > REF_MAX:
        raise _bad(text, f"must be 1-{REF_MAX} characters")
    if text != text.strip() or any(c.isspace() or not c.isprintable() for c in text):
        raise _bad(text, "must not contain spaces or control characters")

    name, digest = text, None
    if "@" in text:
        name, digest = text.rsplit("@", 1)
        _check_digest(text, digest)
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise _bad(text, f"tag {tag!r} is not valid (1-{TAG_MAX} characters of "
                             "A-Z, a-z, 0-9, '_', '.', '-', not starting with '.' or '-')")
    if tag is None and digest is None:
        tag = DEFAULT_TAG

    if not name:
        raise _bad(text, "has no repository name")
    if len(name) > NAME_MAX:
        raise _bad(text, f"its name is longer than {NAME_MAX} characters")
    registry, _, path = name.partition("/")
    if not path or not _looks_like_host(registry):
        registry, path = DOCKER_HUB, name
    else:
        registry = _check_host(text, registry)
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise _bad(text, f"repository component {component!r} is not valid")
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 lower-case hex>``, the only algorithm supported.

    Raises:
        BadRequest: Any other algorithm or a malformed digest.
    """
    _check_digest(digest, digest)
    return digest


def _check_digest(text: str, digest: str) -> None:
    algorithm, sep, hex_ = digest.partition(":")
    if not sep:
        raise _bad(text, f"digest {digest!r} has no algorithm (sha256:<hex>)")
    if algorithm != "sha256":
        raise _bad(text, f"digest algorithm {algorithm!r} is not supported (only sha256)")
    if not _SHA256_HEX.fullmatch(hex_):
        raise _bad(text, "a sha256 digest is 64 lower-case hex digits")


def _looks_like_host(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost"
            or component.startswith("["))


def _check_host(text: str, hostport: str) -> str:
    """The validated ``host[:port]`` (host lower-cased)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end] if end > 0 else "", hostport[end + 1:]
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError(host)
        except ValueError:
            raise _bad(text, f"registry host {hostport!r} is not a valid [IPv6] literal") \
                from None
        host = f"[{ipaddress.ip_address(host).compressed}]"
    else:
        host, colon, port = hostport.partition(":")
        rest = colon + port
        if not host or len(host) > HOST_MAX or not all(
                _DOMAIN_COMPONENT.fullmatch(c) for c in host.split(".")):
            raise _bad(text, f"registry host {host!r} is not a valid host name")
        host = host.lower()
    if rest:
        port = rest[1:] if rest.startswith(":") else ""
        if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise _bad(text, f"registry port in {hostport!r} is not 1-65535")
        return f"{host}:{int(port)}"
    return host


def _bad(text: str, why: str) -> BadRequest:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return BadRequest(f"image reference {shown!r} {why}", hint=_HINT)
