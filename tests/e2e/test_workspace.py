"""Workspaces on real VMs: a repository in, a patch out, applied on the host byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.checker import assert_consistent
from tests.e2e.conftest import Host

pytestmark = pytest.mark.e2e

OWNER = 65534  # nobody: the repository belongs to a user, not to root (bangerd runs git as them)

# Prints {path: [kind, mode, sha256-or-link-target]} for a tree, skipping .git and ignored
# files (the guest runs it with python3 from the image; the host imports it as manifest()).
MANIFEST = r"""
import hashlib, json, os, stat, subprocess, sys
root = sys.argv[1]
ignored = set(subprocess.run(
    ["git", "-c", "safe.directory=*", "-C", root, "ls-files", "-z", "--others", "--ignored",
     "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0"))
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d != ".git"]
    for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
        full = os.path.join(dirpath, name)
        rel = os.path.relpath(full, root)
        if rel.encode() in ignored:
            continue
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ["link", 0, os.readlink(full)]
        else:
            with open(full, "rb") as fh:
                out[rel] = ["file", st.st_mode & 0o111 != 0, hashlib.sha256(fh.read()).hexdigest()]
print(json.dumps(out, sort_keys=True))
"""


def git(repo: Path, *args: str, user: int | None = OWNER) -> str:
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    env = {**os.environ, "HOME": str(repo.parent), "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run([*pre, "git", "-C", str(repo), *args], check=True, text=True,
                          capture_output=True, env=env).stdout


def manifest(root: Path) -> dict[str, list[object]]:
    res = subprocess.run(["python3", "-c", MANIFEST, str(root)], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def make_repo(base: Path, *, large: bool = False) -> Path:
    """Tracked, modified, staged, untracked, ignored, executable, symlinked, binary, odd names.

    ``large`` adds a committed 9 MiB file: the tree is then big enough to be sent over
    the TCP data connection rather than ssh."""
    repo = base / "proj"
    repo.mkdir(parents=True)
    os.chown(base, OWNER, OWNER)
    os.chown(repo, OWNER, OWNER)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Ada Host")
    git(repo, "config", "user.email", "ada@example.invalid")
    files: dict[str, bytes] = {
        "README": b"hello\n",
        "src/main.py": b"print('hi')\n",
        "src/util.py": b"def f():\n    return 1\n",
        "data/blob.bin": bytes(range(256)) * 64,
        "weird name with spaces.txt": b"spaces\n",
        "-leading-dash": b"dash\n",
        "unicodé/ñ.txt": "ü\n".encode(),
        "quote'\"s.txt": b"quotes\n",
        ".gitignore": b"*.log\nbuild/\n",
        "run.sh": b"#!/bin/sh\necho run\n",
        "to-delete.txt": b"bye\n",
        "to-rename.txt": b"rename me\n",
    }
    if large:
        files["data/large.bin"] = os.urandom(9 << 20)
    for rel, data in files.items():
        p = repo / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (repo / "run.sh").chmod(0o755)
    (repo / "link-inside").symlink_to("src/main.py")
    (repo / "link-outside").symlink_to("/etc/hostname")
    subprocess.run(["chown", "-R", "-h", f"{OWNER}:{OWNER}", str(repo)], check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    (repo / "src/util.py").write_bytes(b"def f():\n    return 2\n")  # modified, unstaged
    (repo / "README").write_bytes(b"hello, staged\n")
    git(repo, "add", "README")  # staged
    (repo / "notes.txt").write_bytes(b"untracked\n")  # untracked
    (repo / "debug.log").write_bytes(b"ignored\n")  # ignored
    (repo / "build").mkdir()
    (repo / "build/out.o").write_bytes(b"\x00ignored")
    subprocess.run(["chown", "-R", "-h", f"{OWNER}:{OWNER}", str(repo)], check=True)
    return repo


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the repository's owner can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="banger-ws-", dir="/tmp"))
    d.chmod(0o755)
    yield d / "home"
    shutil.rmtree(d, ignore_errors=True)


def test_prepare_edit_export_apply_roundtrip(host: Host, running_vm: str, tmp_path: Path,
                                             home: Path) -> None:
    repo = make_repo(home, large=True)
    base = git(repo, "rev-parse", "HEAD").strip()
    host_status = git(repo, "status", "--porcelain=v1", "-z")
    res = host.json("vm", "workspace", "prepare", running_vm, str(repo))
    assert res["guest_path"] == "/root/proj" and res["base_commit"] == base
    # over the TCP data connection, and the unchanged large file only once (in the pack)
    assert res["transport"] == "tcp"
    assert (9 << 20) < res["bytes"] < (13 << 20)

    shown = host.json("vm", "show", running_vm)["workspace"]
    assert shown["prepared"] and shown["host_path"] == str(repo)

    def guest(script: str) -> str:
        return host.ok("vm", "exec", running_vm, "--", "sh", "-c", script)

    assert guest("git rev-parse HEAD").strip() == base
    assert guest("git status --porcelain=v1 -z") == host_status
    assert guest("git config user.email").strip() == "ada@example.invalid"
    assert guest("readlink link-outside").strip() == "/etc/hostname"  # copied, not followed
    assert guest("test -x run.sh && echo x").strip() == "x"
    assert guest("ls debug.log build 2>&1 || true").count("No such file") == 2

    # `vm exec` runs in the workspace
    assert guest("pwd").strip() == "/root/proj"
    guest("echo changed >> src/main.py; printf 'new\\0bin' > data/new.bin; rm to-delete.txt; "
          "git mv -f to-rename.txt renamed.txt 2>/dev/null || mv to-rename.txt renamed.txt; "
          "chmod +x src/util.py; ln -sfn README link-inside; "
          "printf '\\001\\002' >> data/blob.bin; echo more > 'weird name with spaces.txt'; "
          "mkdir -p deep/er && echo d > deep/er/file")
    guest_tree = json.loads(host.ok("vm", "exec", running_vm, "--", "python3", "-c", MANIFEST,
                                    "/root/proj"))
    index_before = guest("git ls-files -s | sha256sum")

    patch = tmp_path / "out.patch"
    exported = host.cli("vm", "workspace", "export", running_vm, "-o", str(patch))
    assert exported.returncode == 0, exported.stderr
    assert "R\tto-rename.txt -> renamed.txt" in exported.stderr
    assert "D\tto-delete.txt" in exported.stderr
    assert guest("git ls-files -s | sha256sum") == index_before  # export never touches the index
    assert guest("git rev-parse HEAD").strip() == base

    # a fresh clone at the base commit plus the host's uncommitted changes, then the patch
    fresh = tmp_path / "fresh"
    # root reads the user's repository here. git honours safe.directory only from protected
    # (global/system) config in the upload-pack that `clone` spawns: give it a global one.
    gitconfig_home = tmp_path / "root-home"
    gitconfig_home.mkdir()
    (gitconfig_home / ".gitconfig").write_text("[safe]\n\tdirectory = *\n")
    env = {**os.environ, "HOME": str(gitconfig_home)}
    subprocess.run(["git", "clone", "-q", str(repo), str(fresh)], check=True, env=env)
    subprocess.run(["git", "-C", str(fresh), "checkout", "-q", base], check=True)
    uncommitted = subprocess.run(["git", "-C", str(repo), "diff", "--binary", "HEAD"],
                                 capture_output=True, check=True, env=env).stdout
    subprocess.run(["git", "-C", str(fresh), "apply"], input=uncommitted, check=True)
    (fresh / "notes.txt").write_bytes((repo / "notes.txt").read_bytes())  # untracked
    apply = subprocess.run(["git", "-C", str(fresh), "apply", str(patch)], capture_output=True,
                           text=True)
    assert apply.returncode == 0, apply.stderr
    assert manifest(fresh) == guest_tree


def test_run_repo_command_exit_status(host: Host, home: Path) -> None:
    repo = make_repo(home)
    res = host.cli("vm", "run", "--rm", str(repo), "--", "sh", "-c",
                   "test -f README && test -f notes.txt && exit 3")
    assert res.returncode == 3, res.stderr
    assert host.json("vm", "list") == []


def test_exec_auto_prepare_resyncs_changed_host_tree(host: Host, running_vm: str,
                                                     home: Path) -> None:
    repo = make_repo(home)
    host.ok("vm", "workspace", "prepare", running_vm, str(repo))
    (repo / "notes.txt").write_text("edited on the host\n")
    stale = host.ok("vm", "exec", running_vm, "--", "cat", "notes.txt")
    assert stale == "untracked\n"
    fresh = host.ok("vm", "exec", "--auto-prepare", running_vm, "--", "cat", "notes.txt")
    assert fresh == "edited on the host\n"


def test_reprepare_keeps_guest_edits(host: Host, running_vm: str, home: Path) -> None:
    """Guest edits survive a re-prepare: re-applied when they apply, else refused with the
    workspace untouched; saved every time, and discarded only when asked."""
    repo = make_repo(home)
    first_copy = host.json("vm", "workspace", "prepare", running_vm, str(repo))
    assert first_copy["transport"] == "ssh"  # a small tree: not worth the receiver's start

    def guest(script: str) -> str:
        return host.ok("vm", "exec", running_vm, "--", "sh", "-c", script)

    def backups() -> list[str]:
        listed: list[str] = host.json("vm", "show", running_vm)["workspace_backups"]
        return listed

    # 1. The host changed another file: the guest's edits are re-applied on the new copy.
    guest("echo 'guest line' >> README; echo 'made in the guest' > guest-new.txt")
    (repo / "src/main.py").write_bytes(b"print('host edit')\n")
    res = host.json("vm", "workspace", "prepare", running_vm, str(repo))
    assert res["guest_changes"]["outcome"] == "reapplied"
    assert res["guest_changes"]["files"] == 2
    assert guest("cat README guest-new.txt src/main.py") == (
        "hello, staged\nguest line\nmade in the guest\nprint('host edit')\n")
    [first] = backups()
    assert first == res["guest_changes"]["backup"]
    saved = Path(first).read_bytes()
    assert b"guest-new.txt" in saved and b"+guest line" in saved

    # 2. A conflicting edit: refused before anything is replaced, the patch saved.
    guest("echo 'guest version' > src/util.py")
    (repo / "src/util.py").write_bytes(b"def f():\n    return 'host version'\n")
    refused = host.cli("vm", "workspace", "prepare", running_vm, str(repo))
    assert refused.returncode == 125, refused.stderr
    assert "--discard-guest-changes" in refused.stderr
    first_again, second = backups()
    assert first_again == first and second in refused.stderr
    assert b"+guest version" in Path(second).read_bytes()
    assert guest("cat src/util.py guest-new.txt") == "guest version\nmade in the guest\n"
    assert host.json("vm", "show", running_vm)["workspace"]["prepared"] is True
    exported = host.cli("vm", "workspace", "export", running_vm)  # still exportable
    assert exported.returncode == 0 and "src/util.py" in exported.stderr

    # 3. Discarding on request: still saved first, then replaced by the host's tree.
    res = host.json("vm", "workspace", "prepare", running_vm, str(repo),
                    "--discard-guest-changes")
    assert res["guest_changes"]["outcome"] == "discarded"
    assert len(backups()) == 3
    assert guest("cat src/util.py; test -e guest-new.txt || echo gone") == (
        "def f():\n    return 'host version'\ngone\n")
    human = host.ok("vm", "show", running_vm)
    assert f"workspace backup: {backups()[-1]}" in human


def test_prepare_removes_what_a_crashed_prepare_left(host: Host, running_vm: str,
                                                     home: Path) -> None:
    """A daemon killed mid-prepare leaves a staging directory, and its guest step still
    running in it (an ssh session outlives its client): git, writing objects, would
    recreate the directory right after the next prepare removed it."""
    repo = make_repo(home)
    stale = "/root/.proj.banger-partial-0badf00d"
    host.ok("vm", "exec", running_vm, "--", "sh", "-c",
            f"mkdir -p {stale}/.git/objects && cd {stale} && "
            f"setsid sh -c 'while :; do mkdir -p {stale}/.git/objects/ab; sleep 0.2; done' "
            "</dev/null >/dev/null 2>&1 &")
    host.ok("vm", "workspace", "prepare", running_vm, str(repo))
    listing = host.ok("vm", "exec", running_vm, "--", "sh", "-c", "sleep 2; ls -a /root")
    assert [n for n in listing.split() if "banger-" in n] == []
    assert "proj" in listing.split()


def test_refusals(host: Host, running_vm: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    res = host.cli("vm", "workspace", "prepare", running_vm, str(plain))
    assert res.returncode == 125 and "not in a git repository" in res.stderr
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    res = host.cli("vm", "workspace", "prepare", running_vm, str(bare))
    assert res.returncode == 125 and "bare" in res.stderr
    res = host.cli("vm", "workspace", "export", running_vm)
    assert res.returncode == 125 and "no prepared workspace" in res.stderr


def test_stop_during_long_prepare_returns_first(host: Host, running_vm: str,
                                                tmp_path: Path) -> None:
    repo = tmp_path / "big"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for i in range(12):  # 12 x 24 MiB of incompressible data: a long copy under TCG
        (repo / f"blob{i}.bin").write_bytes(os.urandom(24 << 20))
    prep = host.popen("vm", "workspace", "prepare", running_vm, str(repo))
    for _ in range(600):  # the copy has begun once the VM records an unprepared workspace
        ws = host.json("vm", "show", running_vm)["workspace"]
        if ws is not None and not ws["prepared"]:
            break
        subprocess.run(["sleep", "0.2"], check=True)
    else:
        pytest.fail("prepare never started copying")
    host.ok("vm", "stop", running_vm)
    # the stop did not queue behind the copy: the copy had not completed when stop returned
    finished_first = prep.poll() is not None and prep.returncode == 0
    out, err = prep.communicate(timeout=300)
    assert not finished_first
    assert prep.returncode == 125, (out, err)
    ws = host.json("vm", "show", running_vm)["workspace"]
    assert ws["prepared"] is False
    host.ok("vm", "start", running_vm)
    listing = host.ok("vm", "exec", running_vm, "--", "ls", "-a", "/root")
    assert "big" not in listing.split()  # no complete-looking directory
    assert_consistent(host)


def test_file_sync_at_start(host: Host, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    host.write_config(f'[[file_sync]]\nhost = "{secret}"\nguest = "/root/.config/tool/token"\n'
                      f'mode = "0600"\n\n[[file_sync]]\nhost = "{tmp_path}/missing"\n'
                      'guest = "/root/missing"\n')
    host.stop_daemon()
    host.start_daemon()
    host.ok("vm", "create", "--name", "synced")
    got = host.ok("vm", "exec", "synced", "--", "sh", "-c",
                  "stat -c %a /root/.config/tool/token; cat /root/.config/tool/token; "
                  "test -e /root/missing || echo absent")
    assert got == "600\ns3cret\nabsent\n"
    assert "does not exist on the host" in (host.state / "bangerd.log").read_text()


def test_manifest_helper_sees_modes_and_links(tmp_path: Path) -> None:
    """The byte-for-byte comparison above is only as good as this helper."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"x")
    (tmp_path / "b").chmod(0o755)
    (tmp_path / "l").symlink_to("a")
    m = manifest(tmp_path)
    assert m["a"] != m["b"] and m["l"] == ["link", 0, "a"]
    assert m["a"][2] == hashlib.sha256(b"x").hexdigest()
    assert not stat.S_ISDIR(os.lstat(tmp_path / "l").st_mode)
