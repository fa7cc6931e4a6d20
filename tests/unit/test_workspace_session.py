"""banger.daemon.session: quoting for the guest's sh and step-error messages."""

from __future__ import annotations

import subprocess

import pytest

from banger.daemon.session import (
    check_step,
    format_step_error,
    join_argv,
    quote,
    script,
    step_error,
)
from banger.errors import BadRequest, GuestError
from banger.runner import Result

NASTY = ["plain", "with space", "it's", 'say "hi"', "$HOME", "`id`", "-n", "a;b|c&d",
         "*", "ünï\tcödé", "back\\slash", "", "new\nline", "!bang"]


def run_sh(line: str) -> bytes:
    return subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout


def test_join_argv_passes_every_word_through_sh_unchanged() -> None:
    out = run_sh("printf '%s\\0' " + join_argv(NASTY))
    assert out.split(b"\0")[:-1] == [w.encode() for w in NASTY]


@pytest.mark.parametrize("word", NASTY)
def test_quote_is_one_word(word: str) -> None:
    assert run_sh(f"printf '%s' {quote(word)}") == word.encode()


def test_quote_refuses_nul() -> None:
    with pytest.raises(BadRequest, match="NUL"):
        quote("a\0b")


def test_script_stops_at_the_first_failure() -> None:
    proc = subprocess.run(["sh", "-c", script("echo one", "false", "echo two")],
                          capture_output=True)
    assert proc.returncode == 1
    assert proc.stdout == b"one\n"
    unset = subprocess.run(["sh", "-c", script('echo "$NOT_SET_ANYWHERE"')],
                           capture_output=True)
    assert unset.returncode != 0  # set -u


def result(rc: int, out: bytes = b"", err: bytes = b"") -> Result:
    return Result(["ssh", "x"], rc, out, err)


def test_format_step_error_names_step_exit_and_stderr() -> None:
    msg = format_step_error("extract files", result(2, b"ignored", b"tar: disk full\n"))
    assert msg == "guest step 'extract files' failed (exit 2)\ntar: disk full"


def test_format_step_error_falls_back_to_stdout_and_explains_exit_codes() -> None:
    assert format_step_error("x", result(127, b"sh: git: not found\n")) == (
        "guest step 'x' failed (exit 127): a command was not found in the guest\n"
        "sh: git: not found")
    assert "ssh connection failed" in format_step_error("x", result(255))
    assert format_step_error("x", result(1)) == "guest step 'x' failed (exit 1)"


def test_format_step_error_keeps_the_tail() -> None:
    msg = format_step_error("x", result(1, err=b"a" * 5000 + b"END"), limit=100)
    assert msg.endswith("a" * 97 + "END")
    assert len(msg.splitlines()[1]) == 103  # "..." + 100 characters


def test_step_error_and_check_step() -> None:
    err = step_error("copy", result(3, err=b"boom"), hint="try again")
    assert isinstance(err, GuestError)
    assert err.hint == "try again"
    assert err.details == {"step": "copy", "returncode": 3}
    ok = result(0, b"fine")
    assert check_step("copy", ok) is ok
    with pytest.raises(GuestError, match="boom"):
        check_step("copy", result(1, err=b"boom"))
