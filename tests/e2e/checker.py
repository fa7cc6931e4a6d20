"""Compares what the store says with what the host has: /proc, ip link, losetup, files."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Host

BUSY = {"creating", "starting", "stopping", "deleting", "suspending", "snapshotting"}
LIVE = {"running", "paused"}  # states with a VMM holding the guest


def problems(host: Host) -> list[str]:
    out: list[str] = []
    vms: list[dict[str, Any]] = host.json("vm", "list")
    status = host.json("daemon", "status")
    by_name = {v["name"]: v for v in vms}
    for vm in vms:
        if vm["state"] in BUSY:
            out.append(f"{vm['name']} is still {vm['state']}")
    # The pool's clones (vmpool) hold a VMM, a TAP and a VM directory of their own.
    pool = status.get("vm_pool", {}).get("members", [])
    for m in pool:
        if m["state"] != "pooled":
            out.append(f"pool clone {m['id']} is still {m['state']}")
        elif m["pid"] is None or m["tap"] is None:
            out.append(f"pool clone {m['id']} has no VMM or TAP")
    running = [v for v in vms if v["state"] in LIVE] + [
        {**m, "name": m["id"]} for m in pool if m["state"] == "pooled"]
    want_pids = {v["pid"] for v in running}
    have_pids = set(host.vmm_pids())
    if have_pids != want_pids:
        out.append(f"VMM processes {sorted(have_pids)} != running VMs' {sorted(want_pids)}")
    want_taps = {v["tap"] for v in running} | set(status["tap_pool"])
    have_taps = set(host.taps())
    if have_taps != want_taps:
        out.append(f"taps {sorted(have_taps)} != owned {sorted(want_taps)}")
    if host.loops():
        out.append(f"loop devices left: {host.loops()}")
    ips = [v["ip"] for v in [*vms, *pool]]
    if len(ips) != len(set(ips)):
        out.append(f"duplicate IP leases: {ips}")
    ids = {v["id"] for v in [*vms, *pool]}
    vm_dirs = {p.name for p in (host.state / "vms").iterdir()}
    if vm_dirs != ids:
        out.append(f"VM dirs {sorted(vm_dirs)} != VMs {sorted(ids)}")
    run_vms = host.run_dir / "vms"
    run_dirs = {p.name for p in run_vms.iterdir()} if run_vms.exists() else set()
    stray = run_dirs - {v["id"] for v in running}
    if stray:
        out.append(f"runtime dirs of non-running VMs: {sorted(stray)}")
    leaked = {vm_id for vm_id in ssh_master_vms(host) if vm_id not in {v["id"] for v in running}}
    if leaked:
        out.append(f"ssh masters of non-running VMs: {sorted(leaked)}")
    for vm in running:
        if vm["name"] in by_name and by_name[vm["name"]]["pid"] is None:
            out.append(f"{vm['name']} runs without a pid")
    snaps = host.state / "snapshots"
    snap_dirs = {p.name for p in snaps.iterdir()} if snaps.exists() else set()
    snap_ids = {s["id"] for s in host.json("snapshot", "list")}
    if snap_dirs != snap_ids:
        out.append(f"snapshot dirs {sorted(snap_dirs)} != snapshots {sorted(snap_ids)}")
    for vm in vms:
        vm_dir = host.state / "vms" / vm["id"]
        if (vm_dir / "saved.partial").exists():
            out.append(f"{vm['name']} has a half-written saved state")
        if (vm["state"] == "suspended") != (vm_dir / "saved").is_dir():
            out.append(f"{vm['name']} is {vm['state']} with"
                       f"{'' if (vm_dir / 'saved').is_dir() else 'out'} a saved state")
    return out


def ssh_master_vms(host: Host) -> list[str]:
    """The VM ids of this host's live OpenSSH masters (``ssh: <runtime_dir>/vms/<id>/ssh/<boot>
    [mux]``)."""
    prefix = f"ssh: {host.run_dir}/vms/"
    ids = []
    for pid in host.ssh_master_pids():
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        ids.append(title.decode(errors="replace").removeprefix(prefix).split("/")[0])
    return ids


def assert_consistent(host: Host, settle_s: float = 30.0) -> None:
    """Retry for a bounded time: the TAP pool refills and reconciles finish in the background."""
    deadline = time.monotonic() + settle_s
    found = problems(host)
    while found and time.monotonic() < deadline:
        time.sleep(1)
        found = problems(host)
    assert not found, "store and host disagree:\n  " + "\n  ".join(found)
