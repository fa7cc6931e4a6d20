"""Egress allowlists: what ``vm create/run --allow-out`` accepts and what it means.

An entry is an IPv4 address or network (``203.0.113.7``, ``198.51.100.0/24``) or a
domain: ``example.com`` (that name only) or ``*.example.com`` (every name below it,
not the name itself). A VM with any entry reaches only those: the networks directly,
the domains through the addresses banger's DNS server gave it for them
(:mod:`banger.daemon.dns` answers, :mod:`banger.daemon.firewall` pins).

The entries come from users and travel in VM rows, so everything here is bounded:
at most :data:`MAX_ENTRIES` entries of at most 253 characters.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from banger.errors import BadRequest

MAX_ENTRIES = 64
MAX_NAME = 253  # RFC 1035: a name in text form, without the trailing dot
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_HINT = ("give an IPv4 address, an IPv4 network (198.51.100.0/24), a domain (example.com) "
         "or every name below one (*.example.com)")


@dataclass(frozen=True)
class Allowlist:
    """A VM's egress allowlist, split by kind; empty when the VM has none."""

    networks: tuple[ipaddress.IPv4Network, ...] = ()
    domains: tuple[str, ...] = ()  # "example.com" or "*.example.com", lower case

    def __bool__(self) -> bool:
        return bool(self.networks or self.domains)

    def allows_name(self, qname: str) -> bool:
        """Whether a DNS question for ``qname`` is one this allowlist names."""
        name = qname.rstrip(".").lower()
        for pattern in self.domains:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                    return True
            elif name == pattern:
                return True
        return False


def normalize(entry: str) -> str:
    """``entry`` in canonical form (``10.0.0.0/8``, ``example.com``, ``*.example.com``).

    Raises:
        BadRequest: not an IPv4 address or network and not a domain name.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise BadRequest("an --allow-out entry is empty", hint=_HINT)
    text = entry.strip().lower().rstrip(".")
    shown = entry if len(entry) <= 80 and entry.isprintable() else repr(entry[:80])
    if len(text) > MAX_NAME:
        raise BadRequest(f"--allow-out entry {shown} is longer than {MAX_NAME} characters",
                         hint=_HINT)
    if re.fullmatch(r"[0-9./]+", text):
        try:
            return str(ipaddress.IPv4Network(text, strict=False))
        except ValueError as exc:
            raise BadRequest(f"--allow-out {shown}: {exc}", hint=_HINT) from exc
    if ":" in text:
        raise BadRequest(f"--allow-out {shown}: guests have IPv4 only", hint=_HINT)
    labels = text[2:].split(".") if text.startswith("*.") else text.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadRequest(f"--allow-out {shown} is not an address, a network or a domain",
                         hint=_HINT)
    if labels[-1] == "vm":
        raise BadRequest(f"--allow-out {shown}: .vm names are banger's own VMs",
                         hint="guests reach each other only with vm_to_vm = true")
    return text


def normalize_all(entries: Iterable[str]) -> list[str]:
    """Every entry normalised, duplicates dropped, order kept.

    Raises:
        BadRequest: an entry is refused, or there are more than :data:`MAX_ENTRIES`.
    """
    out: list[str] = []
    for entry in entries:
        if len(out) >= MAX_ENTRIES:
            raise BadRequest(f"more than {MAX_ENTRIES} --allow-out entries",
                             hint="allow a network (CIDR) or *.domain instead of many entries")
        canon = normalize(entry)
        if canon not in out:
            out.append(canon)
    return out


def parse(entries: Iterable[str]) -> Allowlist:
    """The allowlist of already-normalised ``entries`` (a VM spec's ``allow_out``)."""
    networks: list[ipaddress.IPv4Network] = []
    domains: list[str] = []
    for canon in normalize_all(entries):
        if canon[0].isdigit() and "/" in canon:
            networks.append(ipaddress.IPv4Network(canon))
        else:
            domains.append(canon)
    return Allowlist(tuple(networks), tuple(domains))
