"""Remote hosts: ``ssh://`` addresses, contexts, which daemon a command talks to, and
the SSH link's errors, with a stand-in ``ssh`` at the seam. The real ssh, sshd and a
remote bangerd in a second network namespace are tests/e2e/test_remote.py's."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from banger import remotecopy
from banger.cli import bundleout, exits
from banger.cli.quick import remote_chosen
from banger.contexts import Contexts, chosen_host
from banger.errors import (
    AlreadyExists,
    BadName,
    BadRequest,
    BangerError,
    DaemonUnavailable,
    NotFound,
)
from banger.protocol import PROTOCOL_VERSION, __version__
from banger.remote import MAX_ANSWER, OutputTooLarge, SSHLink, SSHTarget, run_bounded

# ----------------------------------------------------------------- addresses


@pytest.mark.parametrize(("url", "want"), [
    ("ssh://box", SSHTarget("box")),
    ("ssh://dev@box.example.com:2222", SSHTarget("box.example.com", "dev", 2222)),
    ("ssh://root@10.0.0.1", SSHTarget("10.0.0.1", "root")),
    ("ssh://[fd00::1]:22", SSHTarget("fd00::1", None, 22)),
    ("ssh://box/", SSHTarget("box")),
])
def test_ssh_addresses_are_read_word_by_word(url: str, want: SSHTarget) -> None:
    got = SSHTarget.parse(url)
    assert got == want
    assert SSHTarget.parse(str(got)) == got


@pytest.mark.parametrize(("url", "why"), [
    ("box", "not an ssh:// address"),
    ("tcp://box", "not an ssh:// address"),
    ("ssh://", "not a host name"),
    ("ssh://-oProxyCommand=x", "not a host name"),  # never an ssh option
    ("ssh://box;rm", "not a host name"),
    ("ssh://Root Admin@box", "not a user name"),
    ("ssh://-l@box", "not a user name"),
    ("ssh://box:0", "not 1-65535"),
    ("ssh://box:http", "not 1-65535"),
    ("ssh://box:99999", "not 1-65535"),
])
def test_bad_addresses_are_refused_with_the_form(url: str, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as exc:
        SSHTarget.parse(url)
    assert "ssh://[user@]host[:port]" in exc.value.hint


# ----------------------------------------------------------------- contexts


def test_contexts_are_stored_chosen_and_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "banger" / "contexts.json"
    ctx = Contexts.load(path)
    assert (ctx.current, ctx.hosts) == (None, {})
    ctx.add("box", "ssh://dev@box:2222")
    with pytest.raises(AlreadyExists):
        ctx.add("box", "ssh://other")
    with pytest.raises(BadName):
        ctx.add("Box_1", "ssh://other")
    with pytest.raises(BadRequest, match="this machine's context"):
        ctx.add("local", "ssh://other")
    with pytest.raises(BadRequest):
        ctx.add("bad", "box")
    ctx.use("box")
    with pytest.raises(NotFound):
        ctx.use("nope")
    ctx.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Contexts.load(path)
    assert (again.current, again.hosts) == ("box", {"box": "ssh://dev@box:2222"})
    assert chosen_host(None, {}, path) == SSHTarget("box", "dev", 2222)
    again.remove("box")
    assert again.current is None
    again.save()
    assert chosen_host(None, {}, path) is None
    path.write_text("{not json")
    with pytest.raises(BadRequest, match="not a contexts file"):
        Contexts.load(path)


def test_the_flag_then_the_environment_then_the_context(tmp_path: Path) -> None:
    path = tmp_path / "contexts.json"
    ctx = Contexts.load(path)
    ctx.add("box", "ssh://box")
    ctx.use("box")
    ctx.save()
    env = {"BANGER_HOST": "ssh://env-host"}
    assert chosen_host("ssh://flag-host", env, path) == SSHTarget("flag-host")
    assert chosen_host("", env, path) is None  # --host '': this machine's
    assert chosen_host(None, env, path) == SSHTarget("env-host")
    assert chosen_host(None, {"BANGER_HOST": ""}, path) is None
    assert chosen_host(None, {}, path) == SSHTarget("box")


def test_the_fast_exec_path_steps_aside_for_a_remote_host(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert not remote_chosen(home)
    assert remote_chosen({**home, "BANGER_HOST": "ssh://box"})
    assert not remote_chosen({**home, "BANGER_HOST": ""})
    ctx = Contexts.load(tmp_path / ".config" / "banger" / "contexts.json")
    ctx.add("box", "ssh://box")
    ctx.save()
    assert not remote_chosen(home)
    ctx.use("box")
    ctx.save()
    assert remote_chosen(home)


def test_context_commands(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "BANGER_CONFIG": str(tmp_path / "none.toml")}
    env.pop("BANGER_HOST", None)
    env.pop("XDG_CONFIG_HOME", None)

    def banger(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "banger", *args], env=env, text=True,
                              capture_output=True, timeout=60, check=False)

    assert banger("context", "add", "box", "ssh://dev@box:2222").returncode == 0
    bad = banger("context", "add", "other", "box")
    assert bad.returncode == 125 and "not an ssh:// address" in bad.stderr
    assert "hint: give ssh://" in bad.stderr
    assert banger("context", "use", "box").returncode == 0
    rows = json.loads(banger("context", "ls", "--json").stdout)
    assert [(r["name"], r["current"]) for r in rows] == [("local", False), ("box", True)]
    assert "* box" in banger("context", "ls").stdout
    flag = json.loads(banger("--host", "", "context", "ls", "--json").stdout)
    assert [r["current"] for r in flag] == [True, False]
    bad_host = banger("--host", "ssh://-oProxyCommand=x", "vm", "list")
    assert bad_host.returncode == 125 and "not a host name" in bad_host.stderr
    assert "Traceback" not in bad_host.stderr
    for args in (["daemon", "start"], ["daemon", "restart"], ["system", "status"]):
        here = banger("--host", "ssh://box", *args)
        assert here.returncode == 125 and "acts on this machine" in here.stderr, here.stderr
        assert "ssh box" in here.stderr
    assert banger("context", "use", "local").returncode == 0
    assert banger("context", "rm", "box").returncode == 0
    gone = banger("context", "rm", "box")
    assert gone.returncode == 125 and "no context 'box'" in gone.stderr


# ----------------------------------------------------------------- the link's errors

FAKE_SSH = """\
#!{python}
# A stand-in for ssh: a control master that is a socket file, and `daemon where`
# answered as the test says (FAKE_SSH_WHERE: exit status and output).
import os, socket, sys, time
args = sys.argv[1:]
control = next(a.split("=", 1)[1] for a in args if a.startswith("ControlPath="))
if "ControlMaster=yes" in args:
    if os.environ.get("FAKE_SSH_MASTER") == "refused":
        print("ssh: connect to host box port 22: Connection refused", file=sys.stderr)
        sys.exit(255)
    s = socket.socket(socket.AF_UNIX)
    s.bind(control)
    time.sleep(30)
    sys.exit(0)
if "-O" in args:
    sys.exit(0)
rc, out, err = os.environ["FAKE_SSH_WHERE"].split("|", 2)
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(int(rc))
"""


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable))
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return ssh


def where(monkeypatch: pytest.MonkeyPatch, rc: int, out: str = "", err: str = "") -> None:
    monkeypatch.setenv("FAKE_SSH_WHERE", f"{rc}|{out}|{err}")


def open_link() -> SSHLink:
    link = SSHLink(SSHTarget("box", "dev"))
    try:
        link.open()
    finally:
        link.close()
    return link


def test_another_version_on_the_remote_host_names_both(fake_ssh: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    where(monkeypatch, 0, json.dumps({"version": "0.0.9", "protocol": PROTOCOL_VERSION,
                                      "socket": "/run/banger/bangerd.sock"}))
    with pytest.raises(BadRequest) as exc:
        open_link()
    assert "0.0.9" in exc.value.message and __version__ in exc.value.message
    assert "same version" in exc.value.hint


def test_a_remote_host_without_banger_says_so(fake_ssh: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    where(monkeypatch, 127, "", "bash: line 1: banger: command not found\n")
    with pytest.raises(DaemonUnavailable, match="has no banger") as exc:
        open_link()
    assert __version__ in exc.value.hint


def test_an_older_banger_without_daemon_where_says_so(fake_ssh: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    where(monkeypatch, 2, "", "error: No such command 'where'.\n")
    with pytest.raises(DaemonUnavailable, match="No such command 'where'") as exc:
        open_link()
    assert "older" in exc.value.hint


def test_an_unreachable_host_is_a_clear_error(fake_ssh: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SSH_MASTER", "refused")
    where(monkeypatch, 0)
    with pytest.raises(DaemonUnavailable, match="Connection refused") as exc:
        open_link()
    assert "ssh dev@box" in exc.value.hint
    link = SSHLink(SSHTarget("box"))
    link.close()
    assert not link.control.parent.exists()  # its private directory went with it


def test_what_the_remote_end_prints_is_held_only_up_to_a_bound() -> None:
    def printing(out: int, err: int = 0) -> list[str]:
        return [sys.executable, "-c", f"import sys; sys.stdout.write('o' * {out}); "
                f"sys.stderr.write('e' * {err} + 'END')"]

    res = run_bounded(printing(1000, 3 * MAX_ANSWER), timeout=30, limit=1000)
    assert res.stdout == b"o" * 1000 and res.returncode == 0
    assert len(res.stderr) == MAX_ANSWER and res.stderr.endswith(b"END")  # its tail
    with pytest.raises(OutputTooLarge):
        run_bounded(printing(1001), timeout=30, limit=1000)
    with pytest.raises(OutputTooLarge):  # a stream that never ends is cut off, not read
        run_bounded(["yes"], timeout=30, limit=1 << 20)
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded(["sleep", "30"], timeout=0.5, limit=10)
    echoed = run_bounded(["cat"], timeout=30, input=b"repo", limit=10)
    assert echoed.stdout == b"repo"
    # A writer instead of bytes (a stream too large to hold): its errors come back.
    written = run_bounded(["cat"], timeout=30, input=lambda f: f.write(b"tar"), limit=10)
    assert written.stdout == b"tar"

    def unreadable(f: Any) -> None:
        raise PermissionError(13, "Permission denied", "/some/file")

    with pytest.raises(PermissionError):
        run_bounded(["cat"], timeout=30, input=unreadable, limit=10)


def test_an_oversized_answer_from_the_remote_banger_is_refused(
        fake_ssh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where(monkeypatch, 0, " " * MAX_ANSWER + json.dumps({
        "version": __version__, "protocol": PROTOCOL_VERSION, "socket": "/run/b.sock"}))
    with pytest.raises(DaemonUnavailable, match="more than"):
        open_link()


def test_the_link_never_passes_the_host_as_an_option() -> None:
    link = SSHLink(SSHTarget("box", "dev", 2222))
    try:
        argv = link.ssh("-O", "exit", link.target.destination)
        assert argv[:2] == ["ssh", "-o"] and "BatchMode=yes" in argv
        assert argv[argv.index("-p") + 1] == "2222" and argv[-1] == "dev@box"
    finally:
        link.close()


# ----------------------------------------------------------------- a repository sent over


def _tar(members: list[tuple[str, bytes]], link: tuple[str, str] | None = None
         ) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tar.addfile(info)
        tar.addfile(tarfile.TarInfo(remotecopy.COMPLETE), io.BytesIO(b""))  # the sender's end
    buf.seek(0)
    return buf


def test_a_received_repository_is_unpacked_as_untrusted_data(tmp_path: Path) -> None:
    root = tmp_path / "received"
    got = remotecopy.unpack("repo", _tar([("README", b"hi"), (".git/HEAD", b"ref")]), root)
    assert got.name == "repo" and got.parent.parent == root
    assert (got / "README").read_bytes() == b"hi"
    escape = _tar([], link=("escape", str(tmp_path)))
    escape.seek(0)
    through = io.BytesIO()
    with tarfile.open(fileobj=through, mode="w") as tar:  # a link, then a file through it
        with tarfile.open(fileobj=escape) as links:
            for member in links.getmembers():
                tar.addfile(member)
        info = tarfile.TarInfo("escape/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        tar.addfile(tarfile.TarInfo(remotecopy.COMPLETE), io.BytesIO(b""))
    through.seek(0)
    for bad in (_tar([("../evil", b"x")]), through):
        with pytest.raises(BadRequest, match="could not be unpacked"):
            remotecopy.unpack("repo", bad, root)
    assert not (tmp_path / "evil").exists()
    assert [p for p in root.iterdir()] == [got.parent]  # the refused ones left nothing
    inside = remotecopy.unpack("abs", _tar([("/etc/evil", b"x")]), root)
    assert (inside / "etc" / "evil").read_bytes() == b"x"  # made relative: stays inside
    remotecopy.remove(str(inside), root)
    # A repository's own symlinks may point anywhere: they are kept as they are.
    linked = remotecopy.unpack("links", _tar([], link=("bin", "/usr/bin")), root)
    assert os.readlink(linked / "bin") == "/usr/bin"
    remotecopy.remove(str(linked), root)
    for name in ("..", "a/b", "", "x" * 101):
        with pytest.raises(BadRequest, match="not a repository directory name"):
            remotecopy.unpack(name, _tar([]), root)
    with pytest.raises(BadRequest, match="not a repository banger received"):
        remotecopy.remove(str(tmp_path), root)
    with pytest.raises(BadRequest):
        remotecopy.remove(str(root / "repo-x" / "repo"), root)  # no such holder
    remotecopy.remove(str(got), root)
    assert list(root.iterdir()) == []


def test_a_repository_is_not_sent_to_a_daemon_of_another_unprivileged_user() -> None:
    """A received repository is the login user's; a service daemon running as another
    user copies only its own user's: refused before anything is sent."""
    link = SSHLink(SSHTarget("box", "root", 2222))
    for daemon_uid, login_uid in ((0, 1000), (1000, 1000), (None, 1000)):  # root, the same
        link.remote = {"daemon_uid": daemon_uid, "daemon_user": "x", "login_uid": login_uid}
        link.check_sends_to_own_daemon()  # a root daemon copies anyone's; None: not running
    link.remote = {"daemon_uid": 1001, "daemon_user": "alice", "login_uid": 0}
    with pytest.raises(BadRequest, match="runs as alice and copies only alice's") as exc:
        link.check_sends_to_own_daemon()
    assert exc.value.hint == "log in as alice: ssh://alice@box:2222"
    link.remote = {"daemon_uid": 1001, "daemon_user": "-oProxyCommand=x", "login_uid": 0}
    with pytest.raises(BadRequest, match="runs as uid 1001") as exc:  # never echoed as a name
        link.check_sends_to_own_daemon()
    assert exc.value.hint == "log in as the daemon's user"


# ----------------------------------------------------------- a bundle back from the host


def test_copy_out_writes_what_the_remote_banger_prints_bounded(tmp_path: Path) -> None:
    link = SSHLink(SSHTarget("box"))
    script = "printf 'bundle bytes'; echo 'a warning' >&2; exit 0"
    link.ssh = lambda *args, **kw: ["sh", "-c", script]  # type: ignore[method-assign]
    out = io.BytesIO()
    seen: list[bytes] = []
    res = link.copy_out(["image", "export", "x", "-o", "-"], out, limit=100,
                        chunk=seen.append)
    assert (res.returncode, out.getvalue(), b"".join(seen)) == (0, b"bundle bytes",
                                                                 b"bundle bytes")
    assert res.stderr == b"a warning\n"
    with pytest.raises(OutputTooLarge):
        link.copy_out(["image", "export", "x", "-o", "-"], io.BytesIO(), limit=5)


class _Link:
    """What bundleout asks of the SSH link: the remote banger's export, played."""

    def __init__(self, data: bytes, rc: int = 0, err: bytes | None = None) -> None:
        if err is None:  # what the remote banger says of a whole export
            err = b"exporting...\n" + json.dumps(
                {"name": "img", "path": "-", "size_bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(),
                 "members": {"rootfs.ext4": {"size": 1, "sha256": "ab"}},
                 "kernel": {"name": None}}, indent=2).encode()
        self.data, self.rc, self.err = data, rc, err

    def check_sends_to_own_daemon(self) -> None:
        pass

    def copy_out(self, argv: list[str], out: Any, *, limit: int,
                 chunk: Any = None) -> subprocess.CompletedProcess[bytes]:
        assert argv == ["image", "export", "img", "-o", "-", "--json"]
        if len(self.data) > limit:
            raise OutputTooLarge("too much")
        out.write(self.data[:7])  # a failure half-way still wrote some
        if chunk is not None:
            chunk(self.data)
        out.write(self.data[7:])
        return subprocess.CompletedProcess(argv, self.rc, b"", self.err)


class _RemoteApp:
    remote = SSHTarget("box")

    def __init__(self, link: _Link) -> None:
        self._link = link

    def link(self) -> _Link:
        return self._link


def test_a_remote_export_lands_whole_or_not_at_all(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "img.tar.zst"
    res = bundleout.from_remote(_RemoteApp(_Link(b"zstd bundle data")),  # type: ignore[arg-type]
                                "img", target)
    assert target.read_bytes() == b"zstd bundle data"
    assert res == {"name": "img", "path": str(target), "size_bytes": 16,
                   "sha256": hashlib.sha256(b"zstd bundle data").hexdigest(),
                   "members": {"rootfs.ext4": {"size": 1, "sha256": "ab"}},
                   "kernel": {"name": None}}  # the remote daemon's answer, path here
    # Each failure leaves the FILE that was there as it was, and no partial file.
    failing = _Link(b"partial bundle", rc=4, err=b"error: image 'img' is in use\nhint: wait\n")
    with pytest.raises(BangerError, match="image 'img' is in use") as exc:
        bundleout.from_remote(_RemoteApp(failing), "img", target)  # type: ignore[arg-type]
    assert exc.value.hint == "wait"
    as_json = _Link(b"", rc=125, err=json.dumps(
        {"error": {"code": "busy", "message": "image 'img' is in use", "hint": "wait"}},
        indent=2).encode())
    with pytest.raises(BangerError, match="image 'img' is in use") as exc:
        bundleout.from_remote(_RemoteApp(as_json), "img", target)  # type: ignore[arg-type]
    assert exc.value.hint == "wait"
    other = _Link(b"zstd bundle data")
    other.data = b"zstd bundle dat4"  # not what the remote said it sent
    with pytest.raises(DaemonUnavailable, match="not what its banger exported"):
        bundleout.from_remote(_RemoteApp(other), "img", target)  # type: ignore[arg-type]
    mute = _Link(b"zstd bundle data", err=b"done\n")
    with pytest.raises(DaemonUnavailable, match="did not say what it exported"):
        bundleout.from_remote(_RemoteApp(mute), "img", target)  # type: ignore[arg-type]
    silent = _Link(b"partial bundle", rc=1, err=b"Killed\n")
    with pytest.raises(DaemonUnavailable, match="did not export: Killed"):
        bundleout.from_remote(_RemoteApp(silent), "img", target)  # type: ignore[arg-type]
    monkeypatch.setattr(bundleout, "BUNDLE_MAX", 3)
    with pytest.raises(DaemonUnavailable, match="more than 3 bytes"):
        bundleout.from_remote(_RemoteApp(_Link(b"too big")), "img", target)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tar.zst"]  # no partial left
    assert target.read_bytes() == b"zstd bundle data"


def test_a_json_error_goes_to_stderr_when_stdout_is_the_data(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    err = BangerError("image 'img' is in use", hint="wait")
    monkeypatch.setattr(exits._Stdout, "is_data", False)
    exits.print_error(err, True)
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["message"] == "image 'img' is in use"
    assert out.err == ""
    exits.claim_stdout()
    exits.print_error(err, True)
    out = capsys.readouterr()
    assert out.out == "" and json.loads(out.err)["error"]["hint"] == "wait"
