"""Validation of user-chosen names and generation of missing ones.

VM names become DNS labels (``<name>.vm``), host names and ssh aliases, so
they follow RFC 1123 labels, lower case only.
"""

from __future__ import annotations

import re
import secrets

from banger.errors import BadName

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_LABEL = 63  # RFC 1035 section 2.3.4

_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "crisp", "dusty", "eager", "fuzzy", "gentle",
    "happy", "jolly", "keen", "lucky", "mellow", "nimble", "proud", "quiet", "rapid",
    "shy", "sunny", "swift", "tidy", "vivid", "witty", "zesty",
)
_NOUNS = (
    "badger", "beaver", "bison", "crane", "falcon", "ferret", "gecko", "heron", "ibis",
    "koala", "lemur", "lynx", "marten", "newt", "otter", "panda", "puffin", "quail",
    "raven", "seal", "stoat", "tapir", "walrus", "wombat", "yak",
)


def is_dns_label(name: str) -> bool:
    """True when ``name`` is a lower-case DNS label (1-63 of a-z0-9-, no edge hyphen)."""
    return len(name) <= MAX_LABEL and _LABEL.fullmatch(name) is not None


def check_name(name: str, what: str = "VM") -> str:
    """Return ``name`` unchanged or raise :class:`BadName` explaining why it is refused."""
    if not isinstance(name, str) or not name:
        raise BadName(f"{what} name must not be empty")
    if len(name) > MAX_LABEL:
        raise BadName(f"{what} name {name[:20]!r}... is {len(name)} characters; the limit is 63")
    if not is_dns_label(name):
        printable = name if name.isprintable() else repr(name)
        raise BadName(f"invalid {what} name {printable!r}")
    return name


def generate_name(taken: set[str]) -> str:
    """A friendly unused name such as ``swift-otter-3f2a``."""
    for _ in range(64):
        candidate = (
            f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.token_hex(2)}"
        )
        if candidate not in taken:
            return candidate
    # 25*25*65536 names: reaching this means something is badly wrong with `taken`.
    return f"vm-{secrets.token_hex(6)}"
