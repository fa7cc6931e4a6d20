"""Export against a hostile guest: output is bounded, and anything malformed is a GuestError.

The guest channel here ignores the export script and runs a canned ``sh -c`` instead,
so each test controls exactly what the "guest" prints.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from banger.daemon.workspace import export
from banger.daemon.workspace.exporter import parse_name_status
from banger.errors import GuestError
from banger.runner import Result

SHA = "a" * 40


class CannedGuest:
    """Answers every script with ``answer`` (a shell command run locally)."""

    ip = "canned"

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def run(self, script: str, *, timeout: float = 60.0, input: bytes | None = None,
            check: bool = True, desc: str = "") -> Result:
        p = subprocess.run(["sh", "-c", self.answer], input=input, capture_output=True,
                           timeout=timeout)
        return Result(["sh"], p.returncode, p.stdout, p.stderr)

    def popen(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sh", "-c", self.answer], **kwargs)


def printing(data: bytes) -> CannedGuest:
    """A guest that prints ``data`` (as octal escapes, so any byte survives the shell)."""
    escaped = "".join(f"\\{b:03o}" for b in data)
    return CannedGuest(f"printf '{escaped}'")


def section(names: bytes, patch: bytes = b"", prefix: bytes = b"", base: str = SHA) -> bytes:
    return (f"{base} {len(names)} {len(patch)} {len(prefix)}\n".encode()
            + prefix + names + patch)


def test_a_well_formed_answer_parses() -> None:
    out = export(printing(section(b"M\0a.txt\0R100\0old\0new\0", b"PATCH")), "/root/proj")
    assert out.patch == b"PATCH" and out.base == SHA
    assert [(c.status, c.path, c.old_path) for c in out.changes] == [
        ("M", "a.txt", None), ("R", "new", "old")]


def test_output_beyond_the_cap_is_refused_not_held() -> None:
    endless = CannedGuest("exec cat /dev/zero")  # never ends by itself
    with pytest.raises(GuestError, match="larger than 1 MiB") as info:
        export(endless, "/root/proj", max_bytes=1 << 20, timeout=60)
    assert "workspace_export_max_mib" in info.value.hint


def test_output_just_under_the_cap_is_fine() -> None:
    patch = b"x" * 4000
    data = section(b"M\0a\0", patch)
    out = export(printing(data), "/root/proj", max_bytes=len(data))
    assert out.patch == patch


@pytest.mark.parametrize("data", [
    b"garbage\n",
    b"",
    section(b"M\0a\0", base="not-a-commit"),
    f"{SHA} -5 0 0\n".encode(),
    f"{SHA} 1 2\n".encode(),
    f"{SHA} 99 0 0\nM\0a\0".encode(),  # cut short
    section(b"M\0\xff\xfe\0"),  # a file name that is not UTF-8
    section(b"R100\0only-one-path\0"),  # a rename without its new name
    section(b"M\0"),  # a status without a path
    section(b"Q\0a\0"),  # not a git status letter
    section(b"M\0\0"),  # an empty path
    section(b"M\0../escape\0"),
    section(b"M\0.git/config\0"),
    section(b"M\0a\0", prefix=b"sub/"),  # the first section must be the workspace itself
    section(b"M\0a\0") + section(b"M\0b\0", prefix=b"\xff/"),
    section(b"M\0a\0") + section(b"M\0b\0", prefix=b"../"),
    section(b"M\0a\0") + section(b"M\0b\0"),  # the workspace twice
    b"\xff" * 300,
])
def test_malformed_answers_are_guest_errors(data: bytes) -> None:
    with pytest.raises(GuestError):
        export(printing(data), "/root/proj")


def test_name_status_parser_never_raises_anything_else() -> None:
    for raw in (b"R\0x", b"\xff\0a\0", b"M\0\xc3\0", b"C050\0a\0", b"M1234\0a\0"):
        with pytest.raises(GuestError):
            parse_name_status(raw)
