"""An image build's namespace for a daemon without root (daemon.buildns) and the root
helper's ``userns.map`` that gives it its ids: a real helper socket, a real process
running as ``nobody`` that makes files for other users, mounts and removes them in
its namespace; and the maps the helper refuses to write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.errors import Refused
from banger.hostops import ops
from banger.hostops.executor import Executor
from banger.hostops.nft import FirewallSettings
from banger.hostops.policy import Policy
from banger.hostops.server import HelperServer
from banger.hostops.userns import SUBID_COUNT, IdRange, reserve, subordinate
from tests.copyruntime import SYSTEM_PYTHON, copy_runtime
from tests.fakes import FakeRunner

NOBODY = 65534
SUB = IdRange(400000, SUBID_COUNT)
SETTINGS = FirewallSettings(table="banger_t1", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtt1", dns_port=53)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
    reason="mapping another user's namespace needs root, unshare and nsenter")


def executor(subids: IdRange | None = SUB) -> Executor:
    return Executor(Policy(SETTINGS, daemon_uid=NOBODY, daemon_gid=NOBODY, subuids=subids,
                           subgids=subids), FakeRunner())


def as_nobody(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", *argv]


@pytest.fixture
def fresh_ns() -> Iterator[subprocess.Popen[bytes]]:
    """A process of nobody's in a new user namespace with no map yet."""
    proc = subprocess.Popen(as_nobody("unshare", "--user", "--", "sleep", "60"))
    try:
        for _ in range(500):
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                    break
            except OSError:
                pass
            threading.Event().wait(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_fresh_namespace_of_the_daemons_is_mapped_once(
        fresh_ns: subprocess.Popen[bytes]) -> None:
    ex = executor()
    ex.handle(ops.UsernsMap(pid=fresh_ns.pid))
    uid_map = Path(f"/proc/{fresh_ns.pid}/uid_map").read_text().split()
    assert uid_map == ["0", str(NOBODY), "1", "1", str(SUB.start), str(SUBID_COUNT - 1)]
    assert Path(f"/proc/{fresh_ns.pid}/gid_map").read_text().split()[3:5] == ["1", str(SUB.start)]
    with pytest.raises(Refused, match="without a map"):
        ex.handle(ops.UsernsMap(pid=fresh_ns.pid))


def test_maps_the_helper_will_not_write(fresh_ns: subprocess.Popen[bytes]) -> None:
    with pytest.raises(Refused, match="subordinate ids"):
        executor(None).handle(ops.UsernsMap(pid=fresh_ns.pid))
    mine = subprocess.Popen(["sleep", "60"])  # root's, in the helper's own namespace
    theirs = subprocess.Popen(as_nobody("sleep", "60"))  # nobody's, but the host namespace
    try:
        with pytest.raises(Refused, match="not the daemon's"):
            executor().handle(ops.UsernsMap(pid=mine.pid))
        while f"\t{NOBODY}\t" not in Path(f"/proc/{theirs.pid}/status").read_text():
            threading.Event().wait(0.01)  # setpriv has not dropped to nobody yet
        with pytest.raises(Refused, match="without a map"):
            executor().handle(ops.UsernsMap(pid=theirs.pid))
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()
    assert Path(f"/proc/{fresh_ns.pid}/uid_map").read_text() == ""  # nothing was written


def test_subordinate_ids_are_read_and_reserved(tmp_path: Path) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\nbob:165536:1000\n")
    subgid.write_text("alice:100000:65536\n")
    assert subordinate(subuid, "alice", 1000) == IdRange(100000, 65536)
    assert subordinate(subuid, "bob", 1001) is None  # too few
    assert reserve("alice", 1000, subuid, subgid) == (IdRange(100000, 65536),) * 2
    got = reserve("bob", 1001, subuid, subgid)
    assert got == (IdRange(166536, SUBID_COUNT),) * 2  # past every range either file has
    assert subuid.read_text().endswith("bob:166536:65536\n")
    assert reserve("bob", 1001, subuid, subgid) == got  # once


_IN_NS = """
import json, subprocess, sys
from pathlib import Path
from banger.daemon.buildns import BuildNamespace
from banger.hostops.client import HostOps
from banger.runner import SubprocessRunner
work = Path(sys.argv[2])
with BuildNamespace(HostOps.connect(Path(sys.argv[1]))) as ns:
    r = ns.runner(SubprocessRunner())
    out = r.run(["sh", "-c", f'''set -e; cd {work}
        mkdir tree tree/proc tree/dev; echo x > tree/a; chown 42:43 tree/a
        mount -t proc proc tree/proc; test -e tree/proc/1/status
        mount -t tmpfs dev tree/dev; touch tree/dev/null; mount --bind /dev/null tree/dev/null
        chroot tree /bin/true 2>/dev/null || true
        id -u; stat -c %u:%g tree/a'''], desc="in the namespace").out.split()
    host = Path(work / "tree" / "a").stat()
    ns.remove(r, work / "tree")
    print(json.dumps({"inside": out, "host": [host.st_uid, host.st_gid],
                      "gone": not (work / "tree").exists(), "target": ns.target}))
"""


def test_a_build_namespace_of_a_daemon_without_root(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"nobody runs banger with {SYSTEM_PYTHON}, which is missing")
    top = Path(tempfile.mkdtemp(prefix="banger-buildns-", dir="/var/tmp"))
    server = None
    stop = threading.Event()
    try:
        copy_runtime(top / "site")
        os.chmod(top, 0o755)
        work = top / "work"
        work.mkdir()
        os.chown(work, NOBODY, NOBODY)
        sock = top / "helper.sock"
        server = HelperServer(executor(), sock, NOBODY, NOBODY)
        thread = threading.Thread(target=server.serve_until, args=(stop,), daemon=True)
        thread.start()
        res = subprocess.run(as_nobody(str(SYSTEM_PYTHON), "-c", _IN_NS, str(sock), str(work)),
                             capture_output=True, text=True, timeout=120, cwd=top,
                             env={"PYTHONPATH": str(top / "site"), "PATH": os.environ["PATH"]})
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["inside"] == ["0", "42:43"]  # root of its namespace, other owners too
        assert got["host"] == [SUB.start + 41, SUB.start + 42]  # its subordinate ids
        assert got["gone"]
        deadline = time.monotonic() + 10  # killed with its holder; reaped by init
        while Path(f"/proc/{got['target']}/status").exists() and "zombie" not in \
                Path(f"/proc/{got['target']}/status").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the namespace outlived its build"
            time.sleep(0.05)
    finally:
        if server is not None:
            stop.set()
            thread.join(10)
            server.close()
        shutil.rmtree(top, ignore_errors=True)
