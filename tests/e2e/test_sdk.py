"""The Python SDK's agent loop on a real VM: create, copy a repository in, run, read the
patch, delete. The agent is a Python program of its own (as a user's would be), run in
the test's network namespace: the guest's address is only reachable there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Host
from tests.e2e.test_workspace import OWNER, git

pytestmark = pytest.mark.e2e

AGENT = r"""
import json, sys, threading
from banger import Client
from banger.errors import BangerError

repo = sys.argv[1]
bg = Client()
stages = []
vm = bg.vms.create(name="agent", on_progress=lambda op: stages.append(op.stage))
bg.workspace.prepare(vm.name, repo)
edit = bg.vms.exec(vm.name, ["sh", "-c", "echo agent-was-here >> README && echo done"])
failed = bg.vms.exec(vm.name, ["sh", "-c", "echo oops >&2; exit 3"])
patch = bg.workspace.export(vm.name)
ran = bg.vms.run(["sh", "-c", "pwd; echo more > NEW.txt"], repo, name="agent-run")
try:
    bg.vms.show("agent-run")
    removed = False
except BangerError as exc:
    removed = exc.code == "not_found"
bg.vms.delete(vm.name)
print(json.dumps({
    "stages": stages, "vm": vm.name, "state": str(vm.state),
    "edit": [edit.status, edit.stdout.decode()],
    "failed": [failed.status, failed.stderr.decode()],
    "changes": patch.changes, "patch": patch.data.decode(),
    "run": [ran.result.status, ran.result.stdout.decode(), ran.patch.data.decode()],
    "run_removed": removed, "left": [v.name for v in bg.vms.list()],
}))
"""


def committed_repo() -> Path:
    """A clean repository with one commit, owned by a user (root-only tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix="banger-sdk-", dir="/tmp"))
    base.chmod(0o755)
    repo = base / "proj"
    repo.mkdir()
    shutil.chown(repo, OWNER, OWNER)
    git(repo, "init", "-q", "-b", "main")
    (repo / "README").write_text("hello\n")
    shutil.chown(repo / "README", OWNER, OWNER)
    git(repo, "add", "README")
    git(repo, "-c", "user.name=Ada", "-c", "user.email=ada@example.invalid", "commit", "-q",
        "-m", "one")
    return repo


def test_an_agent_loop_creates_copies_runs_reads_the_patch_and_deletes(host: Host) -> None:
    repo = committed_repo()
    try:
        res = subprocess.run(host.netns(sys.executable, "-c", AGENT, str(repo)),
                             env=host.env, capture_output=True, text=True, timeout=900,
                             check=False)
        check(res, repo)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def check(res: subprocess.CompletedProcess[str], repo: Path) -> None:
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["state"] == "running" and out["stages"] and out["left"] == []
    assert out["edit"] == [0, "done\n"]
    assert out["failed"] == [3, "oops\n"]
    assert [c["path"] for c in out["changes"]] == ["README"]
    assert "+agent-was-here" in out["patch"]
    status, stdout, run_patch = out["run"]
    assert status == 0 and stdout.strip().endswith("proj")  # ran in the workspace
    assert "+more" in run_patch and out["run_removed"]
    # The patch applies to the host repository as git would.
    patch = repo.parent / "agent.patch"
    patch.write_text(out["patch"])
    shutil.chown(patch, OWNER, OWNER)
    git(repo, "apply", str(patch))
    assert (repo / "README").read_text().endswith("agent-was-here\n")
