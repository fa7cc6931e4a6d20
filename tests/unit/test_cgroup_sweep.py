"""The start-up sweep's leaked VM cgroups: on fake cgroup trees (v2 and v1), and once on
this host's real cgroup filesystem with a throwaway cgroup of a test install."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.api.params import CreateParams
from banger.config import Config
from banger.daemon import reconcile, vmcreate
from banger.daemon.core import Daemon
from banger.daemon.service import Bangerd
from banger.errors import HostError
from banger.hostops.cgroups import CgroupHost, CgroupVersion, detect, in_vm_group, install_group
from banger.layout import Layout
from banger.proc import cmdline
from tests.conftest import FakeWorld, add_fake_image

ORPHAN = "0123456789ab"       # a VM id no row has
MARKED = "banger-ba9876543210"  # a cgroup named after a VM marker, of no VM either
BUSY = "00000000aaaa"


def v2_host(tmp_path: Path) -> CgroupHost:
    root = tmp_path / "cg2"
    root.mkdir()
    return CgroupHost(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})


def v1_host(tmp_path: Path) -> CgroupHost:
    roots = {c: tmp_path / "cg1" / c for c in ("memory", "pids", "cpu")}
    for r in roots.values():
        r.mkdir(parents=True)
    return CgroupHost(CgroupVersion.V1, roots)


def make(host: CgroupHost, rel: str, procs: str | None = None,
         controllers: tuple[str, ...] = ("memory", "pids", "cpu")) -> None:
    """A cgroup's directories in a fake tree; ``procs`` fills ``cgroup.procs`` (kernfs
    removes a cgroup's files with it; in a fake tree an empty cgroup is an empty dir)."""
    for c in controllers:
        d = host.roots[c] / rel
        d.mkdir(parents=True, exist_ok=True)
        if procs is not None:
            (d / "cgroup.procs").write_text(procs)


def open_daemon(cfg: Config, world: FakeWorld, host: CgroupHost | None) -> Daemon:
    key = cfg.key_path
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("PRIVATE")
    key.with_name(key.name + ".pub").write_text("ssh-ed25519 AAAA test\n")
    seams = world.seams()
    if host is not None:
        seams.cgroups = lambda: host
    d = Bangerd.open(cfg, seams, log_to_stderr=True)
    add_fake_image(d)
    return d


@pytest.fixture
def opened(cfg: Config, world: FakeWorld) -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    world.vmm.reap_all()
    for d in daemons:
        d.close()


@pytest.mark.parametrize("make_host", [v2_host, v1_host], ids=["v2", "v1"])
def test_sweep_removes_empty_cgroups_of_no_vm_and_leaves_the_rest(
        make_host: Callable[[Path], CgroupHost], cfg: Config, world: FakeWorld,
        opened: list[Daemon], capfd: pytest.CaptureFixture[str]) -> None:
    host = make_host(cfg.state_dir.parent)  # the test's tmp_path
    mine = install_group(Layout.from_config(cfg).install_tag)
    make(host, f"{mine}/{ORPHAN}")                    # leaked by a crash: empty
    make(host, f"{mine}/{MARKED}")                    # the VM-marker form: empty
    make(host, f"{mine}/{BUSY}", procs="4242\n")      # still holds a process
    make(host, f"{mine}/not-a-vm")                    # not a name banger gives
    make(host, f"banger-ffffff/{ORPHAN}")             # another install's
    make(host, f"{mine}/fedcba987654", controllers=("pids",))  # v1: half removed

    d = open_daemon(cfg, world, host)  # its start-up sweep
    opened.append(d)
    log = capfd.readouterr().err  # bangerd logs to stderr here
    for rel in (f"{mine}/{ORPHAN}", f"{mine}/{MARKED}", f"{mine}/fedcba987654"):
        assert not any((r / rel).exists() for r in host.roots.values()), rel
    assert host.group(f"{mine}/{BUSY}").exists()
    assert f"{mine}/{BUSY} belongs to no VM but holds pids 4242: left in place" in log
    assert host.group(f"{mine}/not-a-vm").exists()
    assert host.group(f"banger-ffffff/{ORPHAN}").exists()

    # A VM's own cgroup stays; one leaked since is swept and reported like the others.
    vm = vmcreate.create_sync(d, CreateParams(name="web"))
    make(host, f"{mine}/{vm['id']}")
    make(host, f"{mine}/{ORPHAN}")
    removed = reconcile.sweep(d)
    assert removed["cgroups"] == [host.group(f"{mine}/{ORPHAN}").describe()]
    assert host.group(f"{mine}/{vm['id']}").exists()
    assert host.group(f"{mine}/{BUSY}").exists()


def test_sweep_without_a_cgroup_hierarchy_skips_cgroups(
        cfg: Config, world: FakeWorld, opened: list[Daemon]) -> None:
    d = open_daemon(cfg, world, None)
    opened.append(d)

    def no_hierarchy() -> CgroupHost:
        raise HostError("no cgroup hierarchy offers memory, pids, cpu")

    d.seams.cgroups = no_hierarchy
    assert reconcile.sweep(d)["cgroups"] == []


# ----------------------------------------------------------------- the real cgroup fs


def _rmdir_when_released(d: Path) -> None:
    """rmdir a cgroup, retrying while the kernel still counts an exited task in it."""
    deadline = time.monotonic() + 5  # an exited task leaves its cgroup within ms
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def real(cfg: Config, world: FakeWorld, opened: list[Daemon]) -> tuple[CgroupHost, Daemon]:
    """This host's cgroup hierarchy and a daemon on it (the real seam: detect())."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    try:
        host = detect()
    except HostError as exc:
        pytest.skip(f"no usable cgroup hierarchy here: {exc.message}")
    d = open_daemon(cfg, world, None)
    opened.append(d)
    return host, d


def test_sweep_on_the_real_cgroup_fs(real: tuple[CgroupHost, Daemon]) -> None:
    """A throwaway cgroup of this test's install (its tag is its tmp state dir's): swept
    when empty, left while a process is in it, and everything removed at the end."""
    host, d = real
    mine = install_group(d.layout.install_tag)
    empty, busy = host.group(f"{mine}/{ORPHAN}"), host.group(f"{mine}/{BUSY}")
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        try:
            for group in (empty, busy):
                for path in group.dirs:
                    path.mkdir(parents=True)
        except OSError as exc:
            pytest.skip(f"cannot make a cgroup here: {exc.strerror}")
        # Only the pids controller: this test's memory and CPU accounting stay as they are.
        sleeper = subprocess.Popen(["sleep", "60"])
        (host.roots["pids"] / busy.rel / "cgroup.procs").write_text(str(sleeper.pid))
        assert busy.members() == [sleeper.pid]

        removed = reconcile.sweep(d)
        assert removed["cgroups"] == [empty.describe()]
        assert not any(path.exists() for path in empty.dirs)
        assert busy.exists()  # nothing killed, nothing removed

        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        deadline = time.monotonic() + 5  # the kernel releases an exited task within ms
        while busy.members():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reconcile.sweep(d)["cgroups"] == [busy.describe()]
        assert not any((root / mine).exists() for root in host.roots.values())
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for group in (empty, busy):
            for path in group.dirs:
                _rmdir_when_released(path)
        for root in dict.fromkeys(host.roots.values()):
            with contextlib.suppress(FileNotFoundError):
                (root / mine).rmdir()


def test_a_leaked_vmm_is_known_by_its_cgroup(real: tuple[CgroupHost, Daemon]) -> None:
    """A confined VMM names no path of ours and a daemon that is not root cannot read its
    descriptors: in this install's cgroup for its VM, it is ours and the sweep ends it;
    the same marker outside that cgroup is another install's and is left alone."""
    host, d = real
    group = host.group(f"{install_group(d.layout.install_tag)}/{ORPHAN}")
    marker = f"banger-{ORPHAN}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        try:
            for path in group.dirs:
                path.mkdir(parents=True)
        except OSError as exc:
            pytest.skip(f"cannot make a cgroup here: {exc.strerror}")
        for _ in range(2):  # argv[0] carries the marker, as QEMU's -name does
            procs.append(subprocess.Popen([marker, "60"], executable="sleep"))
        mine, theirs = procs
        deadline = time.monotonic() + 5
        while not all(cmdline(p.pid)[:1] == [marker] for p in procs):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (host.roots["pids"] / group.rel / "cgroup.procs").write_text(str(mine.pid))
        assert in_vm_group(mine.pid, d.layout.install_tag, ORPHAN)

        removed = reconcile.sweep(d)
        assert str(mine.pid) in removed["processes"]
        assert str(theirs.pid) not in removed["processes"]
        assert mine.wait(10) is not None and theirs.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for path in group.dirs:
            _rmdir_when_released(path)
        for root in dict.fromkeys(host.roots.values()):
            with contextlib.suppress(FileNotFoundError, OSError):
                (root / install_group(d.layout.install_tag)).rmdir()

