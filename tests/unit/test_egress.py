"""Egress allowlist entries: what is accepted, how it is normalised, which names match."""

from __future__ import annotations

import ipaddress

import pytest

from banger import egress
from banger.errors import BadRequest


@pytest.mark.parametrize(("entry", "canon"), [
    ("198.51.100.7", "198.51.100.7/32"),
    ("198.51.100.9/24", "198.51.100.0/24"),
    (" Example.COM. ", "example.com"),
    ("*.Example.com", "*.example.com"),
    ("_acme.example.com", "_acme.example.com"),
])
def test_entries_are_normalised(entry: str, canon: str) -> None:
    assert egress.normalize(entry) == canon


@pytest.mark.parametrize(("entry", "why"), [
    ("", "empty"),
    ("1.2.3", "1.2.3"),
    ("300.1.1.1", "300"),
    ("2001:db8::/32", "IPv4 only"),
    ("localhost", "not an address"),
    ("a..b", "not an address"),
    ("-x.example.com", "not an address"),
    ("ex ample.com", "not an address"),
    ("*.*.example.com", "not an address"),
    ("web.vm", ".vm names"),
    ("a" * 254 + ".com", "longer than 253"),
    ("x.exam\tple.com", "not an address"),
])
def test_bad_entries_are_refused_with_a_hint(entry: str, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as info:
        egress.normalize(entry)
    assert info.value.hint


def test_duplicates_go_and_the_count_is_bounded() -> None:
    assert egress.normalize_all(["a.example", "A.example", "10.0.0.0/8"]) == \
        ["a.example", "10.0.0.0/8"]
    with pytest.raises(BadRequest, match="more than 64"):
        egress.normalize_all(f"h{i}.example.com" for i in range(65))


def test_parse_splits_networks_from_domains_and_matches_names() -> None:
    allow = egress.parse(["10.1.0.0/16", "ok.test", "*.pkg.test"])
    assert allow.networks == (ipaddress.IPv4Network("10.1.0.0/16"),)
    assert allow.domains == ("ok.test", "*.pkg.test")
    assert allow.allows_name("ok.test.") and allow.allows_name("OK.Test")
    assert not allow.allows_name("sub.ok.test")  # the exact name only
    assert allow.allows_name("a.pkg.test") and allow.allows_name("a.b.pkg.test")
    assert not allow.allows_name("pkg.test")  # *. is strictly below
    assert not allow.allows_name("evilpkg.test") and not allow.allows_name("ok.test.evil")
    assert not egress.parse([]) and egress.parse(["1.2.3.4"])
