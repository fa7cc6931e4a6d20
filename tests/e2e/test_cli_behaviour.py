"""What a user sees from the CLI on real VMs: ssh vs exec semantics, exit statuses, logs,
and `vm run` keeping or naming the guest's edits and the VMs it leaves behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, IMAGE, Host
from tests.e2e.test_workspace import git, home, make_repo  # noqa: F401 (home: a fixture)

pytestmark = pytest.mark.e2e


def test_ssh_is_a_shell_string_exec_is_argv_and_signals_give_128_plus_n(
        host: Host, running_vm: str) -> None:
    # OpenSSH semantics: words joined by spaces, run by the guest's shell.
    assert host.ok("vm", "ssh", running_vm, "--", "echo a;", "echo b") == "a\nb\n"
    # vm exec: argv arrives unchanged, no shell in between.
    assert host.ok("vm", "exec", running_vm, "--", "printf", "%s|", "a; b", "$HOME") \
        == "a; b|$HOME|"
    killed = host.cli("vm", "exec", running_vm, "--", "sh", "-c", "kill -KILL $$")
    assert killed.returncode == 128 + 9, killed.stderr
    killed = host.cli("vm", "ssh", running_vm, "--", "sh -c 'kill -TERM $$'")
    assert killed.returncode == 128 + 15, killed.stderr
    assert host.cli("vm", "exec", running_vm, "--", "sh", "-c", "exit 42").returncode == 42

    logs = host.json("vm", "logs", running_vm)
    # The console shows the boot. Not one unit's status line: under a slow boot systemd's
    # status output can interleave with the kernel's, and sshd may answer before getty.
    assert Path(logs["path"]).name == "serial.log"
    assert "Debian GNU/Linux" in logs["content"]  # systemd's "Welcome to ..." line

    # Shell completion (click's protocol, as `banger completion bash` sends it) names the
    # real daemon's VMs and images.
    def completed(words: str) -> list[str]:
        env = {**host.env, "_BANGER_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split(" ")) - 1)}
        res = subprocess.run(host.netns(str(BIN / "banger")), env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        return [ln.split(",", 1)[1] for ln in res.stdout.splitlines() if ln]

    assert completed(f"banger vm exec {running_vm[:2]}") == [running_vm]
    assert completed("banger vm create --image ") == [IMAGE]


def test_run_rm_exports_the_guest_edits_or_says_they_were_not(host: Host, home: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    repo = make_repo(home)
    edit = ["--", "sh", "-c", "echo guest >> README && echo new > added.txt"]
    out = tmp_path / "edits.patch"
    res = host.cli("vm", "run", "--rm", "--export", str(out), str(repo), *edit)
    assert res.returncode == 0, res.stderr
    assert "2 changed file(s) exported" in res.stderr
    assert host.json("vm", "list") == []
    patch = out.read_text()
    assert "+guest" in patch and "added.txt" in patch
    clone = home / "clone"
    subprocess.run(["cp", "-a", str(repo), str(clone)], check=True)
    git(clone, "apply", "--check", str(out), user=None)

    res = host.cli("vm", "run", "--rm", "--export", "-", str(repo), *edit)
    assert res.returncode == 0 and "+guest" in res.stdout

    res = host.cli("vm", "run", "--rm", str(repo), *edit)
    assert res.returncode == 0, res.stderr
    assert "2 file(s) changed in the guest were not exported" in res.stderr
    assert host.json("vm", "list") == []


def test_a_failure_after_create_deletes_an_rm_vm_and_names_a_kept_one(
        host: Host, tmp_path: Path) -> None:
    not_git = tmp_path / "plain"
    not_git.mkdir()
    res = host.cli("vm", "run", "--rm", str(not_git), "--", "true")
    assert res.returncode == 125 and "not in a git repository" in res.stderr
    assert host.json("vm", "list") == []

    res = host.cli("vm", "run", "--name", "kept", str(not_git), "--", "true")
    assert res.returncode == 125
    assert "`banger vm delete kept` removes it" in res.stderr
    assert [v["name"] for v in json.loads(host.ok("vm", "list", "--json"))] == ["kept"]
