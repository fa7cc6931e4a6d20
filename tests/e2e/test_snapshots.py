"""vm snapshot and vm create --from-snapshot on real QEMU guests.

A clone is a restore, not a boot: it carries the source's processes and memory-only
files. And it is a machine of its own: its address, MAC, host name, machine-id, SSH
host key and random state differ from the source's and from every other clone's, its
clock is right, and what it writes stays its own. A daemon killed mid-snapshot or
mid-restore leaves no half snapshot and no half clone.

Clones run under both VMMs: the identity channel is a virtio-serial port under QEMU and
a vsock port under (jailed) Firecracker. The clone test runs once per VMM this host can
run (Firecracker's skips, with its reason, where it cannot); the rest run under QEMU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.checker import assert_consistent
from tests.e2e.conftest import IMAGE, MEMORY_MIB, CachedImage, Host, open_host
from tests.e2e.test_agent import readiness
from tests.e2e.test_faults import crash_at
from tests.e2e.test_suspend import TICKER, guest

pytestmark = pytest.mark.e2e

IDENTITY = ("hostname; cat /etc/hostname; cat /etc/machine-id; "
            "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; cat /sys/class/net/eth0/address; "
            "ip -4 -o addr show dev eth0 | awk '{print $4}'; "
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
            "cat /proc/sys/kernel/random/boot_id; date +%s")
KEYS = ["hostname", "etc_hostname", "machine_id", "host_key", "mac", "ip", "random",
        "boot_id", "clock"]


@pytest.fixture
def qhost(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage
          ) -> Iterator[Host]:
    yield from open_host(request, tmp_path, test_image, "qemu")


@pytest.fixture
def warm_host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage
              ) -> Iterator[Host]:
    yield from open_host(request, tmp_path, test_image, "qemu",
                         extra_config="boot_snapshots = true")


def identity_of(host: Host, vm: str) -> dict[str, str]:
    values = guest(host, vm, IDENTITY).splitlines()
    assert len(values) == len(KEYS), values
    return dict(zip(KEYS, values, strict=True))


def test_clones_are_restores_and_machines_of_their_own(host: Host) -> None:
    host.ok("vm", "create", "--name", "src")
    pid = guest(host, "src", TICKER)
    guest(host, "src", "echo only-in-memory > /dev/shm/secret; echo on-work > /root/before; "
                       "echo on-root > /etc/before; sync")
    src = identity_of(host, "src")

    snap = host.json("vm", "snapshot", "src", "base")
    assert snap["name"] == "base" and snap["source_vm"] == "src" and snap["size_bytes"] > 1 << 20
    assert [s["name"] for s in host.json("snapshot", "list")] == ["base"]
    assert host.json("vm", "show", "src")["state"] == "running"
    assert guest(host, "src", f"kill -0 {pid} && echo alive") == "alive"  # runs on

    # a clone is the saved machine: its size and image, nothing else
    refused = host.cli("vm", "create", "--from-snapshot", "base", "--vcpu", "4")
    assert refused.returncode != 0 and "contradicts snapshot 'base'" in refused.stderr

    # two clones restored at once
    procs = [host.popen("vm", "create", "--from-snapshot", "base", "--name", n, "--json")
             for n in ("c1", "c2")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    clones = {n: host.json("vm", "show", n) for n in ("c1", "c2")}
    ids = {n: identity_of(host, n) for n in clones}
    now = time.time()
    for name, shown in clones.items():
        assert shown["state"] == "running" and shown["from_snapshot"] == "base"
        got = ids[name]
        # a restore: the source's boot, processes and memory-only files
        assert got["boot_id"] == src["boot_id"]
        assert guest(host, name, f"kill -0 {pid} && echo alive") == "alive"
        assert guest(host, name, "cat /dev/shm/secret /root/before /etc/before").split() == [
            "only-in-memory", "on-work", "on-root"]
        # its own identity, applied before anything reached it
        assert got["hostname"] == got["etc_hostname"] == name
        assert got["mac"] == shown["mac"] and got["ip"].split("/")[0] == shown["ip"]
        assert abs(int(got["clock"]) - now) < 120
        status = guest(host, name, "cat /run/banger-ident")
        assert "rng=reseeded" in status.split(), status
        known = (host.state / "ssh" / "known_hosts").read_text().splitlines()
        assert any(line.startswith(f"{shown['ip']} ") and got["host_key"] in line
                   for line in known)
    for key in ("hostname", "machine_id", "host_key", "mac", "ip", "random"):
        values = {src[key], ids["c1"][key], ids["c2"][key]}
        assert len(values) == 3, (key, values)
    # DNS knows each clone by its own name
    assert guest(host, "c2", "getent hosts c1.vm").split()[0] == clones["c1"]["ip"]

    # what a clone writes is its own
    guest(host, "c1", "echo c1 > /root/mine; echo c1 > /etc/mine; echo c1 > /dev/shm/mine")
    for other in ("c2", "src"):
        assert guest(host, other, "cat /root/mine /etc/mine /dev/shm/mine 2>/dev/null; true"
                     ) == ""

    # removing the snapshot leaves its clones running; the source is untouched
    host.ok("snapshot", "rm", "base")
    assert host.json("snapshot", "list") == []
    assert guest(host, "c2", "echo ok") == "ok"
    assert identity_of(host, "src")["machine_id"] == src["machine_id"]
    assert_consistent(host)


def test_a_daemon_killed_mid_snapshot_or_mid_restore_leaves_nothing_half_made(
        qhost: Host) -> None:
    host = qhost
    host.ok("vm", "create", "--name", "src")
    pid = guest(host, "src", TICKER)

    crash_at(host, "snapshot.saved", "vm", "snapshot", "src", "half")
    (shown,) = host.wait_settled()
    assert shown["state"] == "running", shown
    assert host.json("snapshot", "list") == []
    snaps = host.state / "snapshots"
    assert not snaps.exists() or not any(snaps.iterdir())
    assert guest(host, "src", f"kill -0 {pid} && echo alive") == "alive"
    assert_consistent(host)

    host.ok("vm", "snapshot", "src", "whole")
    crash_at(host, "create.restored", "vm", "create", "--from-snapshot", "whole",
             "--name", "half")
    settled = host.wait_settled()
    assert [v["name"] for v in settled] == ["src"]
    assert [s["name"] for s in host.json("snapshot", "list")] == ["whole"]
    assert_consistent(host)
    host.ok("vm", "create", "--from-snapshot", "whole", "--name", "clone")
    assert guest(host, "clone", "hostname") == "clone"
    assert_consistent(host)


def test_snapshot_cli_refusals(qhost: Host) -> None:
    host = qhost
    host.ok("vm", "create", "--name", "off", "--no-start")
    res = host.cli("vm", "snapshot", "off", "s")
    assert res.returncode != 0 and "vm start off" in res.stderr
    res = host.cli("vm", "create", "--from-snapshot", "missing")
    assert res.returncode != 0 and "no snapshot named 'missing'" in res.stderr
    res = host.cli("snapshot", "rm", "missing")
    assert res.returncode != 0 and "snapshot list" in res.stderr
    assert "no snapshots" in host.ok("snapshot", "list")


def test_the_first_boot_is_kept_and_later_vms_are_its_clones(warm_host: Host) -> None:
    host = warm_host
    res = host.cli("vm", "create", "--name", "first")
    assert res.returncode == 0, res.stderr
    assert "snapshot" in res.stderr and "restore" not in res.stderr, res.stderr
    (boot,) = host.json("snapshot", "list")
    assert boot["kind"] == "boot" and boot["source_vm"] == "first"
    first = identity_of(host, "first")

    res = host.cli("vm", "create", "--name", "second")
    assert res.returncode == 0, res.stderr
    assert "restore" in res.stderr and "snapshot" not in res.stderr, res.stderr
    shown = host.json("vm", "show", "second")
    assert shown["from_snapshot"] == boot["name"]
    second = identity_of(host, "second")
    assert second["boot_id"] == first["boot_id"]  # restored, not booted
    assert second["hostname"] == "second" and second["ip"].split("/")[0] == shown["ip"]
    for key in ("machine_id", "host_key", "mac", "ip"):
        assert second[key] != first[key], key
    # found ready by its agent, and SSH (strict about the host key) takes its new one
    assert readiness(host, "second") == "agent"
    assert host.ok("vm", "ssh", "second", "--", "hostname").strip() == "second"

    # vm run is warm too; --cold boots and keeps nothing
    assert host.ok("vm", "run", "--rm", "--name", "quick", "--", "hostname").strip() == "quick"
    cold = host.json("vm", "create", "--name", "cold", "--cold")
    assert cold["from_snapshot"] is None
    assert identity_of(host, "cold")["boot_id"] != first["boot_id"]
    assert len(host.json("snapshot", "list")) == 1

    # another size is another start: its first boot is kept as well
    host.json("vm", "create", "--name", "big", "--memory", "768")
    kinds = sorted((s["kind"], s["memory_mib"]) for s in host.json("snapshot", "list"))
    assert [k for k, _ in kinds] == ["boot", "boot"] and len({m for _, m in kinds}) == 2

    # a removed boot snapshot is made again by the next boot
    host.ok("snapshot", "rm", boot["name"])
    res = host.cli("vm", "create", "--name", "again")
    assert res.returncode == 0 and "snapshot" in res.stderr, res.stderr
    assert boot["name"] in {s["name"] for s in host.json("snapshot", "list")}

    # a clone at the address its snapshot's VM had (that VM deleted, its address free
    # again): it answers there with the snapshot's host key until it has its own
    first_ip = host.json("vm", "show", "again")["ip"]
    host.ok("vm", "delete", "again")
    reuse = host.json("vm", "create", "--name", "reuse")
    assert reuse["ip"] == first_ip and reuse["from_snapshot"] == boot["name"]
    assert guest(host, "reuse", "hostname") == "reuse"
    assert host.ok("vm", "ssh", "reuse", "--", "hostname").strip() == "reuse"
    assert_consistent(host)


# ------------------------------------------------------------------ the pool


@pytest.fixture
def pool_host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage
              ) -> Iterator[Host]:
    # Two wanted, memory for one: the budget holds the pool at one clone.
    yield from open_host(request, tmp_path, test_image, "qemu", extra_config=(
        f"boot_snapshots = true\npool_memory_mib = {MEMORY_MIB}\n"
        f'[pool_size]\n"{IMAGE}" = 2\n'))


def pool_of(host: Host) -> dict[str, Any]:
    status: dict[str, Any] = host.json("daemon", "status")["vm_pool"]
    return status


def wait_pool(host: Host, ready: int, timeout: float = 240) -> dict[str, Any]:
    """The pool once it holds ``ready`` clones and makes none."""
    deadline = time.monotonic() + timeout
    while True:
        pool = pool_of(host)
        counts = pool["images"].get(IMAGE, {})
        if counts.get("ready") == ready and counts.get("filling") == 0:
            return pool
        if time.monotonic() > deadline:
            pytest.fail(f"the pool did not reach {ready} ready clones: {pool}")
        time.sleep(0.5)


def test_the_pool_keeps_clones_ready_and_creates_take_them(pool_host: Host) -> None:
    host = pool_host
    # No boot snapshot yet: the pool never boots anything itself.
    assert pool_of(host)["images"][IMAGE] == {"size": 2, "ready": 0, "filling": 0}
    host.ok("vm", "create", "--name", "first")
    first = identity_of(host, "first")
    (member,) = wait_pool(host, ready=1)["members"]  # the memory budget stops it at one
    time.sleep(8)  # ... for good; and its guest sleeps, paused, its clock left behind
    assert pool_of(host)["images"][IMAGE]["ready"] == 1
    # Not a user's VM: not listed, not named, not in the SSH config.
    assert [v["name"] for v in host.json("vm", "list")] == ["first"]
    res = host.cli("vm", "delete", f"_pool-{member['id']}")
    assert res.returncode != 0 and "no VM named" in res.stderr, res.stderr
    assert member["ip"] not in (host.state / "ssh" / "config").read_text()
    assert_consistent(host)

    # A create of that image and size takes it: restored, and a machine of its own.
    res = host.cli("vm", "create", "--name", "taken", "--nat")
    assert res.returncode == 0, res.stderr
    assert "disk" not in res.stderr, res.stderr  # no disk copied: the pool had done it
    shown = host.json("vm", "show", "taken")
    assert shown["from_pool"] and shown["id"] == member["id"] and shown["ip"] == member["ip"]
    assert shown["spec"]["nat"] is True
    taken = identity_of(host, "taken")
    assert taken["hostname"] == "taken" and taken["etc_hostname"] == "taken"
    assert taken["boot_id"] == first["boot_id"]  # restored, not booted
    assert taken["ip"].split("/")[0] == shown["ip"]
    assert abs(int(taken["clock"]) - time.time()) < 4  # set when it was taken
    assert "127.0.1.1\ttaken" in guest(host, "taken", "cat /etc/hosts")
    for key in ("machine_id", "host_key", "mac", "ip", "random"):
        assert taken[key] != first[key], key
    host.ok("vm", "delete", "taken")

    # Refilled behind it; vm run takes the next one.
    (refill,) = wait_pool(host, ready=1)["members"]
    assert refill["id"] != member["id"]
    assert host.ok("vm", "run", "--rm", "--name", "quick", "--", "hostname").strip() == "quick"
    # Another size is another boot snapshot, with no pool.
    big = host.json("vm", "create", "--name", "big", "--memory", "768")
    assert not big["from_pool"] and big["id"] != refill["id"]
    host.ok("vm", "delete", "big")
    (ready,) = wait_pool(host, ready=1)["members"]
    assert_consistent(host)

    # A daemon killed with a pool: the next one removes the dead one's and fills anew.
    host.kill_daemon()
    host.start_daemon()
    (again,) = wait_pool(host, ready=1)["members"]
    assert again["id"] != ready["id"] and ready["pid"] not in host.vmm_pids()
    assert_consistent(host)
    # A stopped daemon keeps no pool; "first" runs on.
    host.stop_daemon()
    assert again["pid"] not in host.vmm_pids()
    assert len(host.vmm_pids()) == 1
    host.start_daemon()
    wait_pool(host, ready=1)
    assert guest(host, "first", "hostname") == "first"
    assert_consistent(host)
