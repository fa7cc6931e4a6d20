"""The CLI without a daemon: usage errors, `vm run`'s argument split, the remote command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from banger.cli.vm import split_run_args
from banger.sshopts import remote_command


def banger(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with a config whose state dir shows whether anything was created."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    env = {**os.environ, "BANGER_CONFIG": str(cfg), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "banger", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["vm", "lisst"], "No such command 'lisst'"),
    (["vm", "run", "--rm", "-d"], "--rm and --detach cannot be combined"),
    (["vm", "run", "./typo", "--", "true"], "repository './typo' does not exist"),
    (["vm", "run", "./typo"], "put it after --: banger vm run -- ./typo"),
    (["vm", "run", "~/no/such/dir", "--", "true"], "does not exist"),
    (["vm", "run", "a", "b", "--", "true"], "only the repository goes before --"),
    (["vm", "run", "--export", "x.patch", "--", "true"], "--export needs a repository"),
    (["vm", "exec", "--discard-guest-changes", "web", "--", "true"], "--auto-prepare"),
])
def test_usage_errors_are_banger_lines_and_create_nothing(tmp_path: Path, args: list[str],
                                                          message: str) -> None:
    res = banger(tmp_path, *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert lines[1].startswith("hint: ") and "--help" in lines[1]
    assert "Usage:" not in res.stderr and "Error:" not in res.stderr
    assert not (tmp_path / "state").exists()  # no daemon, no VM: refused before anything


def test_usage_error_as_json(tmp_path: Path) -> None:
    res = banger(tmp_path, "vm", "run", "--json", "./typo")
    assert res.returncode == 2
    assert '"code": "usage"' in res.stdout
    res = banger(tmp_path, "vm", "logs", "-f", "--json", "web")
    assert res.returncode == 2
    assert "cannot be combined" in res.stdout


def test_a_file_first_word_is_the_guest_command(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    script = tmp_path / "script.sh"
    script.write_text("true\n")
    assert split_run_args([str(repo), "make"], None) == (repo, ["make"])
    assert split_run_args([str(repo), "make"], ["make"]) == (repo, ["make"])
    assert split_run_args(["make", "test"], None) == (None, ["make", "test"])
    assert split_run_args(["./typo"], ["./typo"]) == (None, ["./typo"])  # after --: a command
    assert split_run_args([str(script), "x"], None) == (None, [str(script), "x"])
    assert split_run_args([], None) == (None, [])
    with pytest.raises(click.UsageError, match="is not a directory"):
        split_run_args([str(script), "true"], ["true"])


def run_remote(remote: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """What the guest's sshd does with the remote command: ``$SHELL -c``."""
    return subprocess.run(["bash", "-c", remote], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)


def test_exec_keeps_argv_and_ssh_is_a_shell_string(tmp_path: Path) -> None:
    exec_cmd = remote_command(["printf", "%s|", "a; b", "$HOME", "it's"], workdir=None,
                              shell_string=False)
    assert run_remote(exec_cmd, tmp_path).stdout == "a; b|$HOME|it's|"
    ssh_cmd = remote_command(["echo one;", "echo", "two"], workdir=None, shell_string=True)
    assert run_remote(ssh_cmd, tmp_path).stdout == "one\ntwo\n"


def test_workdir_is_entered_first(tmp_path: Path) -> None:
    (tmp_path / "odd dir").mkdir()
    for shell_string in (False, True):
        cmd = remote_command(["pwd"], workdir=str(tmp_path / "odd dir"),
                             shell_string=shell_string)
        assert run_remote(cmd, tmp_path).stdout.strip() == str(tmp_path / "odd dir")
    assert remote_command([], workdir=None, shell_string=True) == ""
    assert "exec \"$SHELL\" -l" in remote_command([], workdir="/w", shell_string=False)


@pytest.mark.parametrize("shell_string", [False, True])
def test_a_command_killed_by_a_signal_gives_128_plus_n(tmp_path: Path,
                                                       shell_string: bool) -> None:
    # A lone command: without care, bash execs it and the shell itself dies by the
    # signal (ssh then reports 255).
    cmd = remote_command(["sh", "-c", "kill -TERM $$"], workdir=None,
                         shell_string=False) if not shell_string else \
        remote_command(["sh -c 'kill -KILL $$'"], workdir=None, shell_string=True)
    res = run_remote(cmd, tmp_path)
    assert res.returncode == (128 + 15 if not shell_string else 128 + 9)
    plain = remote_command(["sh", "-c", "exit 7"], workdir=str(tmp_path), shell_string=False)
    assert run_remote(plain, tmp_path).returncode == 7


def test_daemon_status_names_the_config_it_runs_with() -> None:
    from banger.cli.output import daemon_status

    st = {"pid": 1, "version": "0", "socket": "/s", "log": "/l", "state_dir": "/d",
          "uptime_s": 3.0, "vms": 0, "vms_running": 0,
          "config": {"path": "/etc/banger.toml", "hash": "ab" * 32, "values": {}}}
    assert "config:    /etc/banger.toml (hash abababababab)" in daemon_status(st)


@pytest.mark.parametrize(("args", "expected"), [
    (["image", "pull", "--help"], ["bundle", "catalog", "FILE.tar.zst", "--insecure",
                                   "image list --available"]),
    (["image", "export", "--help"], ["-o, --output", "sha256", "image pull FILE.tar.zst"]),
    (["image", "list", "--help"], ["--available", "catalog_url"]),
    (["kernel", "pull", "--help"], ["catalog_url", "kernel list", "--available", "--name"]),
    (["kernel", "list", "--help"], ["--available"]),
])
def test_bundle_commands_help(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    res = banger(tmp_path, *args)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # click wraps lines
    for phrase in expected:
        assert phrase in text, (phrase, res.stdout)


def test_export_without_output_is_a_usage_error(tmp_path: Path) -> None:
    res = banger(tmp_path, "image", "export", "web")
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and "--output" in lines[0]
    assert lines[1].startswith("hint: ") and "image export --help" in lines[1]
    assert not (tmp_path / "state").exists()


def test_a_bad_catalog_url_is_refused_with_a_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ncatalog_url = "ftp://host/c.json"\n')
    env = {**os.environ, "BANGER_CONFIG": str(cfg), "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "banger", "image", "list", "--available"],
                         env=env, text=True, capture_output=True, timeout=60, check=False)
    assert res.returncode == 125
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and "catalog_url" in lines[0]
    assert lines[1].startswith("hint: ")
    assert not (tmp_path / "state").exists()


def test_a_local_bundle_path_is_made_absolute(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.sdk.images import bundle_ref

    monkeypatch.chdir(tmp_path)
    assert bundle_ref("dev.tar.zst") == str(tmp_path / "dev.tar.zst")
    assert bundle_ref("./sub/dev") == str(tmp_path / "sub" / "dev")
    for unchanged in ("dev", "https://h/dev.tar.zst", "127.0.0.1:5000/team/dev:1",
                      "file:///b/dev.tar.zst"):
        assert bundle_ref(unchanged) == unchanged
