"""Store migrations, the runner, process identity, COW strategies, networking helpers."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.api import VMSpec, VMState
from banger.daemon import store as store_mod
from banger.daemon.dmsnap import CopyCow, sparse_copy
from banger.daemon.network import TapPool, allocate_ip, mac_for_ip
from banger.daemon.opstate import Operation, Registry
from banger.daemon.store import ImageRecord, KernelRecord, Store, VMRecord, now
from banger.daemon.vmruntime import VMRuntime
from banger.errors import (
    AlreadyExists,
    Cancelled,
    CommandFailed,
    CommandTimeout,
    HostError,
    InvalidState,
    NotFound,
)
from banger.fsutil import remove_tree
from banger.proc import ProcessIdentity, identify, matches, send_signal, wait_gone
from banger.runner import CancelToken, Hidden, SubprocessRunner
from tests.childsignals import with_default_signals
from tests.fakes import FakeNet

# ----------------------------------------------------------------- store


def spec() -> VMSpec:
    return VMSpec(image="img", vcpu=1, memory_mib=256, disk_size=1 << 30, work_disk_size=1 << 29)


def test_store_migrates_once_and_records_versions(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    s = Store(db)
    assert s.schema_version() == max(v for v, _, _ in store_mod.MIGRATIONS)
    assert s.migrate() == []  # idempotent
    s.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == [v for v, _, _ in store_mod.MIGRATIONS]


def test_kernels_of_an_older_store_gain_an_empty_origin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "b.db"
    with monkeypatch.context() as m:
        m.setattr(store_mod, "MIGRATIONS", [x for x in store_mod.MIGRATIONS if x[0] < 9])
        old = Store(db)
        old.close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO kernels VALUES ('k', NULL, '/k/bzImage', NULL, '[\"qemu\"]', "
                 "'6.1', 'imported', 10, ?)", (now().isoformat(),))
    conn.commit()
    conn.close()
    s = Store(db)  # migration 9 runs
    assert s.get_kernel("k").origin is None
    s.add_kernel(KernelRecord(name="p", vmlinux=None, bzimage="/p/bzImage", initrd=None,
                              vmms=("qemu",), version="6.1", source="bundle", size_bytes=1,
                              created_at=now(), origin="https://x/k.tar.zst#sha256:ab"))
    assert s.get_kernel("p").origin == "https://x/k.tar.zst#sha256:ab"
    s.close()


def test_failed_migration_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_sql = "CREATE TABLE t (x); INSERT INTO nope VALUES (1)"
    broken = [*store_mod.MIGRATIONS, (99, "broken", bad_sql)]
    monkeypatch.setattr(store_mod, "MIGRATIONS", broken)
    with pytest.raises(HostError) as exc:
        Store(tmp_path / "b.db")
    assert "migration 99" in exc.value.message
    conn = sqlite3.connect(tmp_path / "b.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "t" not in tables  # the half-applied migration was rolled back
    assert 99 not in {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}


def test_store_refuses_newer_schema(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db")
    s.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'now')")
    conn.commit()
    with pytest.raises(HostError) as exc:
        Store(tmp_path / "b.db")
    assert "newer" in exc.value.message


def test_store_vms_and_images(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.db")
    img = ImageRecord("img", "built", "/r", "/k", None, None, 1, None, now())
    s.add_image(img)
    with pytest.raises(AlreadyExists):
        s.add_image(img)
    vm = VMRecord(id="a" * 12, name="one", image="img", spec=spec(), vmm="qemu",
                  state=VMState.CREATING, ip="10.0.0.2", mac="06:00:0a:00:00:02")
    s.add_vm(vm)
    with pytest.raises(AlreadyExists):
        s.add_vm(VMRecord(id="b" * 12, name="one", image="img", spec=spec(), vmm="qemu",
                          state=VMState.CREATING, ip="10.0.0.3", mac="06:00:0a:00:00:03"))
    got = s.find_vm("one")
    assert got is not None and got.spec == vm.spec
    runtime = VMRuntime(last_error="x", forwards=[{"host_port": 1}])
    updated = s.update_vm(got, state=VMState.STOPPED, runtime=runtime)
    assert s.get_vm(vm.id).state == VMState.STOPPED and s.get_vm(vm.id).runtime == runtime
    assert updated.updated_at >= got.updated_at
    with pytest.raises(InvalidState):
        s.delete_image("img")  # still used
    s.delete_vm(vm.id)
    s.delete_image("img")
    with pytest.raises(NotFound):
        s.get_image("img")


# ----------------------------------------------------------------- runner


def test_runner_success_and_failure() -> None:
    r = SubprocessRunner()
    assert r.run(["sh", "-c", "echo hi"], desc="echo").out == "hi\n"
    with pytest.raises(CommandFailed) as exc:
        r.run(["sh", "-c", "echo boom >&2; exit 3", Hidden("secret-token")], desc="fail")
    assert "exit 3" in exc.value.message and "boom" in exc.value.message
    assert "secret-token" not in exc.value.message  # redacted
    assert r.run(["sh", "-c", "exit 4"], desc="x", check=False).returncode == 4


def test_runner_timeout_and_missing_tool() -> None:
    r = SubprocessRunner()
    with pytest.raises(CommandTimeout):
        r.run(["sleep", "5"], desc="sleep", timeout=0.2)
    with pytest.raises(HostError) as exc:
        r.run(["/nonexistent/tool"], desc="tool")
    assert "install" in exc.value.hint


def test_runner_stream_lines_and_cancel() -> None:
    r = SubprocessRunner()
    lines: list[str] = []
    r.stream(["sh", "-c", "echo a; echo b"], desc="s", on_line=lines.append)
    assert lines == ["a", "b"]
    token = CancelToken()
    threading.Timer(0.3, token.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        r.stream(["sleep", "30"], desc="s", on_line=lines.append, cancel=token)
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------- process identity


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    # Signalled with SIGTERM below: it must not inherit SIGTERM ignored.
    p = subprocess.Popen(with_default_signals(
        [sys.executable, "-c", "import time; time.sleep(60)", "banger-test"]))
    time.sleep(0.1)
    yield p
    p.kill()
    p.wait()


def test_identity_matches_and_refuses_recycled(sleeper: subprocess.Popen[bytes]) -> None:
    ident = identify(sleeper.pid, "banger-test")
    assert ident is not None and matches(ident)
    assert identify(sleeper.pid, "banger-other") is None
    recycled = ProcessIdentity(sleeper.pid, ident.start_time + 1, "banger-test")
    assert not matches(recycled)
    assert send_signal(recycled, 15) is False  # never signals a different process
    assert sleeper.poll() is None
    assert send_signal(ident, 15) is True
    assert wait_gone(ident, 5)


# ----------------------------------------------------------------- COW


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as fh:
        fh.write(b"head")
        fh.seek(50 << 20)
        fh.write(b"tail")
    dst = tmp_path / "dst"
    sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 1 << 20  # not 50 MiB of zeros


def test_copy_cow_create_remove(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.write_bytes(b"x" * 4096)
    cow = CopyCow()
    h = cow.create(origin, tmp_path / "vm" / "root")
    assert Path(h.path).read_bytes() == origin.read_bytes()
    assert cow.activate(h, origin, "id").disk == h.path
    cow.remove(h)
    assert not Path(h.path).exists()


# ----------------------------------------------------------------- network


def test_allocate_ip_skips_gateway_and_used() -> None:
    assert allocate_ip("172.29.0.1/24", []) == "172.29.0.2"
    assert allocate_ip("172.29.0.1/24", ["172.29.0.2"]) == "172.29.0.3"
    assert allocate_ip("10.0.0.5/29", []) == "10.0.0.1"
    with pytest.raises(HostError):
        allocate_ip("10.0.0.1/30", ["10.0.0.2"])
    assert mac_for_ip("172.29.0.2") == "06:00:ac:1d:00:02"


def test_tap_pool_warm_and_refill() -> None:
    net = FakeNet()
    net.ensure_bridge("br0", "10.0.0.1/24")
    pool = TapPool(net, "br0", 2, "bgt0a1b2c")
    pool.fill()
    warm = pool.owned()
    assert len(warm) == 2 and all(t.startswith("bgt0a1b2c") for t in warm)
    tap = pool.acquire()
    assert tap in warm
    for _ in range(100):
        if len(pool.owned()) == 2:
            break
        time.sleep(0.01)
    assert len(pool.owned()) == 2 and tap not in pool.owned()
    pool.release(tap)
    assert tap not in net.links()
    pool.drain()
    assert net.taps() == []


# ----------------------------------------------------------------- opstate


def test_registry_runs_and_records_errors() -> None:
    reg: Registry[Operation] = Registry()
    op = reg.run(Operation("k", "t", ["a", "b"]), lambda o: (o.enter("a"), 42)[1], name="t")
    assert op.wait(5) and op.result == 42 and op.stage == "done"

    def boom(o: Operation) -> None:
        o.enter("a")
        raise NotFound("gone")

    bad = reg.run(Operation("k", "t", ["a"]), boom, name="t")
    assert bad.wait(5) and isinstance(bad.error, NotFound)
    assert reg.get(bad.id) is bad
    with pytest.raises(NotFound):
        reg.get("missing")


def test_operation_cancel_stops_at_next_stage() -> None:
    reg: Registry[Operation] = Registry()
    started = threading.Event()

    def work(o: Operation) -> None:
        o.enter("a")
        started.set()
        while not o.cancel.wait(0.01):
            pass
        o.enter("b")

    op = reg.run(Operation("k", "t", ["a", "b"]), work, name="t")
    assert started.wait(5)
    op.cancel.cancel()
    assert op.wait(5) and isinstance(op.error, Cancelled) and op.stage == "cancelled"


def test_clone_or_copy_falls_back_across_file_systems(tmp_path: Path) -> None:
    from banger.daemon.dmsnap import clone_or_copy

    src = Path("/dev/shm") / f"banger-test-{tmp_path.name}"  # tmpfs: never reflinks to /tmp
    src.write_bytes(b"data" * 1000)
    try:
        dst = tmp_path / "dst"
        assert clone_or_copy(src, dst) == "copy"
        assert dst.read_bytes() == src.read_bytes()
    finally:
        src.unlink()


class _RefusingGuest:
    """A guest whose sshd answers TCP but refuses the login with ``stderr``."""

    def __init__(self, stderr: str) -> None:
        import socket

        self.stderr = stderr
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.ip = "127.0.0.1"
        self.calls = 0

    def run(self, script: str, **kw: object) -> object:
        from banger.errors import GuestError

        self.calls += 1
        raise GuestError("ssh failed", stderr=self.stderr)


def test_wait_for_ssh_stops_at_a_changed_host_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.daemon import guest as guest_mod
    from banger.errors import GuestError

    g = _RefusingGuest("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@")
    monkeypatch.setattr(guest_mod, "SSH_PORT", g.listener.getsockname()[1])
    with pytest.raises(GuestError) as exc:
        guest_mod.wait_for_ssh(g, budget_s=30, alive=lambda: True)  # type: ignore[arg-type]
    assert "host key" in exc.value.message and g.calls == 1  # no retrying into a timeout
    other = _RefusingGuest("Permission denied (publickey).")
    monkeypatch.setattr(guest_mod, "SSH_PORT", other.listener.getsockname()[1])
    with pytest.raises(GuestError) as exc:
        guest_mod.wait_for_ssh(other, budget_s=0.5, alive=lambda: True)  # type: ignore[arg-type]
    assert "Permission denied" in exc.value.message  # the timeout names the last ssh error
    g.listener.close()
    other.listener.close()


def test_remove_tree_removes_any_node_and_never_follows_links(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    (kept / "sub").mkdir(parents=True)
    (kept / "sub" / "f").write_text("x")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "link-out").symlink_to(kept)  # inside the tree: removed as a link only
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(kept)
    for path in (tree, fifo, link, tmp_path / "missing"):
        remove_tree(path)
        assert not path.exists() and not path.is_symlink()
    assert (kept / "sub" / "f").read_text() == "x"
