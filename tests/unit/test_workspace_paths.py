"""Path rules for repository paths (untrusted) and guest workspace paths."""

from __future__ import annotations

import pytest

from banger.daemon.workspace.paths import (
    check_guest_path,
    check_repo_path,
    decode_path,
    default_guest_path,
)
from banger.errors import BadRequest


@pytest.mark.parametrize("path", [
    "a.txt", "dir/sub/file", "with space.txt", "ünïcödé.txt", "-leading-dash", "--", "quote'd",
    'quote"d', "glob*?[x]", "$dollar", "back\\slash", ".gitignore", ".github/workflows/x.yml",
    "a/.gitkeep", "..hidden", "x..y", ". leading-dot-space", "a/.git-thing",
])
def test_repo_paths_copied_verbatim(path: str) -> None:
    check_repo_path(path)


@pytest.mark.parametrize(("path", "reason"), [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("../escape", "'..'"),
    ("a/../../escape", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty"),
    ("a/", "empty"),
    (".git/config", "'.git'"),
    ("sub/.git/hooks/pre-commit", "'.git'"),
    ("sub/.GIT/x", "'.git'"),
    ("new\nline", "control character '\\n'"),
    ("tab\there", "control character '\\t'"),
    ("esc\x1b[31m", "control character '\\x1b'"),
    ("del\x7f", "control character"),
    ("c1\x85", "control character"),
])
def test_repo_paths_refused_with_the_name(path: str, reason: str) -> None:
    with pytest.raises(BadRequest) as exc:
        check_repo_path(path)
    assert repr(path) in exc.value.message
    assert reason in exc.value.message
    assert exc.value.details["path"] == path


def test_decode_path() -> None:
    assert decode_path("ünï".encode()) == "ünï"
    with pytest.raises(BadRequest, match="not valid UTF-8") as exc:
        decode_path(b"bad\xff.txt")
    assert "bad\\xff.txt" in exc.value.message


def test_default_guest_path() -> None:
    assert default_guest_path("proj") == "/root/proj"
    assert default_guest_path(".dotfiles") == "/root/dotfiles"
    assert default_guest_path("...") == "/root/workspace"
    assert default_guest_path("proj", "/home/x") == "/home/x/proj"


@pytest.mark.parametrize("path", ["/root/proj", "/root/work/proj", "/root/with space",
                                  "/root/ünï", "/root/a.b"])
def test_guest_paths_accepted(path: str) -> None:
    assert check_guest_path(path) == path


@pytest.mark.parametrize(("path", "reason"), [
    ("root/proj", "not absolute"),
    ("/root", "not below"),
    ("/root/", "not normalised"),
    ("/root/proj/", "not normalised"),
    ("/root//proj", "not normalised"),
    ("//root/proj", "not normalised"),
    ("/root/a/../b", "not normalised"),
    ("/root/./b", "not normalised"),
    ("/root/../etc", "not normalised"),
    ("/etc/proj", "not below"),
    ("/rootkit/proj", "not below"),
    ("/root/.ssh", "hidden"),
    ("/root/work/.config", "hidden"),
    ("/root/a\nb", "control character"),
    ("/root/" + "x" * 5000, "too long"),
])
def test_guest_paths_refused(path: str, reason: str) -> None:
    with pytest.raises(BadRequest, match="invalid guest path") as exc:
        check_guest_path(path)
    assert reason in exc.value.message


def test_guest_path_home_is_configurable() -> None:
    assert check_guest_path("/srv/home/proj", "/srv/home") == "/srv/home/proj"
    with pytest.raises(BadRequest):
        check_guest_path("/root/proj", "/srv/home")
