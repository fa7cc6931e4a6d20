"""Loop devices and dm snapshots through the host operations (``cow_strategy = dmsnap``):
what the daemon's :class:`DmSnapshotCow` asks for, what the executor refuses, and
real loop devices attached, listed and detached. This kernel has no device-mapper, so
``dmsetup`` is answered by :class:`tests.fakes.FakeDM`; a host with dm-snapshot
runs the real thing in ``tests/e2e/test_lifecycle.py`` (a dm-snapshot VM promoted)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from banger.daemon.dmsnap import CowHandle, DmSnapshotCow
from banger.errors import BangerError, HostError, Refused
from banger.hostops import blockdev, ops
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.nft import FirewallSettings
from banger.hostops.policy import Policy
from banger.layout import dm_prefix_for
from banger.runner import SubprocessRunner
from tests.fakes import FakeDM, FakeRunner

SETTINGS = FirewallSettings(table="banger_t1", bridge="br-t", cidr="10.7.0.1/24",
                            tap_prefix="bgtt1", dns_port=53)
TAG = "0a1b2c"
VM = "0123456789ab"
OTHER = "fedcba987654"
PREFIX = dm_prefix_for(TAG)


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/loop-control").exists(),
    reason="attaching loop devices needs root and /dev/loop-control")


class Host:
    """An install's state dir with an image and a VM; real loop devices, dmsetup faked."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.origin = self.state / "images" / "base" / "rootfs.ext4"
        self.origin.parent.mkdir(parents=True)
        with self.origin.open("wb") as fh:
            fh.truncate(1 << 20)
        self.vm_dir = self.state / "vms" / VM
        self.vm_dir.mkdir(parents=True)
        self.runner = FakeRunner()
        self.dm = FakeDM(self.runner)
        policy = Policy(SETTINGS, state_dir=self.state, install_tag=TAG,
                        daemon_uid=os.getuid())
        self.executor = Executor(policy, self.runner)
        self.host = HostOps.local(self.executor)
        self.made: list[str] = []

    def loop_of(self, path: Path, *, read_only: bool = False) -> str:
        """A loop device attached to ``path`` outside the host operations."""
        out = subprocess.run(["losetup", "--find", "--show",
                              *(["--read-only"] if read_only else []), str(path)],
                             capture_output=True, text=True, check=True).stdout.strip()
        self.made.append(out)
        return out

    def attached(self) -> dict[str, str]:
        """Loops of this test's files: device -> file."""
        out = json.loads(subprocess.run(["losetup", "--json", "--list"], capture_output=True,
                                        text=True, check=True).stdout or "{}")
        return {d["name"]: d["back-file"] for d in out.get("loopdevices", [])
                if str(d.get("back-file") or "").startswith(str(self.tmp))}

    def released(self) -> dict[str, str]:
        """:meth:`attached` once the kernel has let go of what was detached: a loop
        detached while open (by the host operations, or udev's probe) goes at its last
        close, which the kernel may finish a moment later. Waits at most 10 s."""
        deadline = time.monotonic() + 10
        while (left := self.attached()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def close(self) -> None:
        for dev in self.attached():
            subprocess.run(["losetup", "--detach", dev], check=False)


def numbers(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Host]:
    host = Host(tmp_path)
    yield host
    host.close()


def test_a_snapshot_is_made_and_taken_down_through_the_host_operations(h: Host) -> None:
    dm = DmSnapshotCow(h.host, PREFIX)
    handle = dm.create(h.origin, h.vm_dir / "cow")
    assert Path(handle.path).stat().st_size == 1 << 20
    recorded: list[CowHandle] = []
    active = dm.activate(handle, h.origin, VM, recorded.append)
    assert active.dm_name == PREFIX + VM and active.device == f"/dev/mapper/{PREFIX}{VM}"
    # each kernel object is recorded before the next is made (crash-safe teardown)
    assert [r.loops for r in recorded] == [active.loops[:1], active.loops]
    assert recorded[-1].dm_name == PREFIX + VM
    base, cow = active.loops
    assert h.attached() == {base: str(h.origin), cow: str(h.vm_dir / "cow")}
    assert Path(f"/sys/block/{Path(base).name}/ro").read_text().strip() == "1"
    # the table is the executor's: the loops' numbers and sizes (1 MiB: 2048 sectors)
    assert h.dm.dm == {PREFIX + VM: f"0 2048 snapshot {numbers(base)} {numbers(cow)} P 8"}
    assert h.host.dm_vms() == [VM]

    dm.deactivate(CowHandle.from_json(active.to_json()))
    assert h.dm.dm == {} and h.released() == {}


def test_a_failed_snapshot_detaches_the_loops_it_made(h: Host) -> None:
    h.dm.fail_create = "device-mapper: reload ioctl failed: no snapshot target"
    dm = DmSnapshotCow(h.host, PREFIX)
    handle = dm.create(h.origin, h.vm_dir / "cow")
    with pytest.raises(BangerError, match="snapshot"):
        dm.activate(handle, h.origin, VM)
    assert h.released() == {}


def test_a_handle_of_another_install_is_not_removed(h: Host) -> None:
    dm = DmSnapshotCow(h.host, PREFIX)
    (h.vm_dir / "cow").write_bytes(b"\0" * 4096)
    foreign = CowHandle("dmsnap", str(h.vm_dir / "cow"), dm_name="banger-ffffff-" + VM)
    foreign.loops.append(h.loop_of(h.vm_dir / "cow"))
    with pytest.raises(HostError, match="not this install's") as err:
        dm.deactivate(foreign)
    assert "dmsetup remove" in err.value.hint
    assert not h.runner.ran("dmsetup", "remove")
    assert h.released() == {}  # its loops are freed all the same


def test_dm_list_names_only_this_installs_vms(h: Host) -> None:
    h.dm.dm.update({PREFIX + VM: "t", "banger-ffffff-" + VM: "t", "cryptroot": "t",
                      PREFIX + "not-a-vm-id": "t"})
    assert h.host.dm_vms() == [VM]
    h.host.dm_remove(VM)
    h.host.dm_remove(VM)  # gone already: not an error
    assert set(h.dm.dm) == {"banger-ffffff-" + VM, "cryptroot", PREFIX + "not-a-vm-id"}


def test_loop_list_holds_only_files_below_the_state_dir(h: Host, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.img"
    outside.write_bytes(b"\0" * 4096)
    mine = h.loop_of(h.origin, read_only=True)
    h.loop_of(outside)
    assert h.host.loops() == [(mine, str(h.origin))]


def _refusals(h: Host, tmp: Path) -> list[tuple[str, ops.Request]]:
    outside = tmp / "elsewhere.img"
    outside.write_bytes(b"\0" * 4096)
    foreign_loop = h.loop_of(outside)
    link = h.vm_dir / "link"
    link.symlink_to(outside)
    other_vm = h.state / "vms" / "ffffffffffff"
    other_vm.mkdir()
    (other_vm / "cow").write_bytes(b"\0" * 4096)
    nobody = h.state / "images" / "base" / "nobodys"
    nobody.write_bytes(b"\0" * 4096)
    os.chown(nobody, 65534, 65534)
    origin_ro = h.loop_of(h.origin, read_only=True)
    origin_rw = h.loop_of(h.origin)
    (h.vm_dir / "cow").write_bytes(b"\0" * 4096)
    cow = h.loop_of(h.vm_dir / "cow")
    other_cow = h.loop_of(other_vm / "cow")
    # The daemon owns vms/: a VM directory that is a symlink to a store elsewhere.
    evil = tmp / "evil"
    evil.mkdir()
    (evil / "cow").write_bytes(b"\0" * 4096)
    (h.state / "vms" / OTHER).symlink_to(evil)
    evil_cow = h.loop_of(evil / "cow")
    return [
        ("attach a file outside the state dir", ops.LoopAttach(path=str(outside),
                                                               read_only=True)),
        ("attach through a symlink", ops.LoopAttach(path=str(link), read_only=True)),
        ("attach a path with ..", ops.LoopAttach(
            path=str(h.vm_dir / ".." / ".." / ".." / "elsewhere.img"), read_only=True)),
        ("attach a file that is not the daemon's", ops.LoopAttach(path=str(nobody),
                                                                  read_only=True)),
        ("attach a directory", ops.LoopAttach(path=str(h.vm_dir), read_only=False)),
        ("detach a loop of someone else's file", ops.LoopDetach(device=foreign_loop)),
        ("a snapshot of a file outside the state dir", ops.DmSnapshot(
            vm_id=VM, origin=foreign_loop, cow=cow)),
        ("a snapshot whose store is another VM's", ops.DmSnapshot(
            vm_id=VM, origin=origin_ro, cow=other_cow)),
        ("a snapshot of a writable origin", ops.DmSnapshot(
            vm_id=VM, origin=origin_rw, cow=cow)),
        ("a snapshot over one loop twice", ops.DmSnapshot(vm_id=VM, origin=cow, cow=cow)),
        ("a store behind a symlinked VM directory", ops.DmSnapshot(
            vm_id=OTHER, origin=origin_ro, cow=evil_cow)),
        ("a loop number that is not a loop's", ops.LoopDetach(device="/dev/loop999999")),
    ]


def test_out_of_policy_loop_and_dm_requests_are_refused(h: Host, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to nobody needs root")
    for why, req in _refusals(h, tmp_path):
        before = (h.attached(), dict(h.dm.dm), len(h.runner.calls))
        try:
            h.executor.handle(req)
        except Refused:
            pass
        except HostError as exc:  # a directory cannot be opened for writing
            assert "Is a directory" in exc.message, why
        else:
            assert req.op == "loop.detach" and "999999" in str(req), why  # nothing there

        assert (h.attached(), h.dm.dm, len(h.runner.calls)) == before, why


def test_the_loops_and_targets_of_an_install_are_capped(
        h: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    h.loop_of(h.origin, read_only=True)
    monkeypatch.setattr(blockdev, "MAX_LOOPS", 1)
    with pytest.raises(Refused, match="1 loop devices"):
        h.host.loop_attach(h.origin, read_only=True)
    monkeypatch.setattr(blockdev, "MAX_LOOPS", 8)
    monkeypatch.setattr(blockdev, "MAX_TARGETS", 1)
    h.dm.dm["banger-ffffff-" + VM] = "t"  # another install's: not counted
    h.dm.dm["cryptroot"] = "t"
    dm = DmSnapshotCow(h.host, PREFIX)
    active = dm.activate(dm.create(h.origin, h.vm_dir / "cow"), h.origin, VM)
    dm.deactivate(active)
    h.dm.dm[PREFIX + "ffffffffffff"] = "t"
    with pytest.raises(Refused, match="1 dm targets"):
        dm.activate(dm.create(h.origin, h.vm_dir / "cow"), h.origin, VM)
    assert list(h.attached().values()) == [str(h.origin)]  # the two it made, freed again


@pytest.mark.parametrize("frame", [
    {"op": "loop.detach", "device": "/dev/sda"},
    {"op": "loop.detach", "device": "/dev/loop1 /dev/sda"},
    {"op": "dm.remove", "vm_id": "../../root"},
    {"op": "dm.snapshot", "vm_id": VM, "origin": "/dev/loop0", "cow": "/dev/mapper/x"},
    {"op": "dm.read", "vm_id": "cryptroot"},
])
def test_device_names_of_other_kinds_do_not_parse(frame: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(ops.Request).validate_python(frame)


# ----------------------------------------------------------------- real loop devices

def test_real_loop_devices_are_attached_listed_and_detached(tmp_path: Path) -> None:
    state = tmp_path / "state"
    image = state / "images" / "base" / "rootfs.ext4"
    image.parent.mkdir(parents=True)
    with image.open("wb") as fh:
        fh.truncate(2 << 20)
    policy = Policy(SETTINGS, state_dir=state, install_tag=TAG, daemon_uid=os.getuid())
    host = HostOps.local(Executor(policy, SubprocessRunner()))
    device = host.loop_attach(image, read_only=True)
    try:
        sys_dev = Path("/sys/block") / Path(device).name
        assert (sys_dev / "loop" / "backing_file").read_text().strip() == str(image.resolve())
        assert (sys_dev / "ro").read_text().strip() == "1"
        assert int((sys_dev / "size").read_text()) == (2 << 20) // 512
        assert (device, str(image.resolve())) in host.loops()
        with pytest.raises(Refused):  # the kernel's name for it is outside this state dir
            HostOps.local(Executor(Policy(SETTINGS, state_dir=tmp_path / "other",
                                          daemon_uid=os.getuid()),
                                   SubprocessRunner())).loop_detach(device)
    finally:
        host.loop_detach(device)
    assert device not in [d for d, _ in host.loops()]
    host.loop_detach(device)  # nothing attached any more: not an error
