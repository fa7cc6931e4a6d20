"""bangerd and the host it runs on, with real VMs: what `daemon stop` leaves behind and
what `daemon restart` keeps. Each test runs its own bangerd inside its own network
namespace (the `host` fixture); every check below looks inside that namespace."""

from __future__ import annotations

import json
import subprocess

from tests.e2e.conftest import Host


def ip_forward(host: Host) -> str:
    return host.sh("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


def has_bridge(host: Host) -> bool:
    res = subprocess.run(["ip", "-n", host.ns, "link", "show", "br-banger"],
                         capture_output=True, text=True)
    return res.returncode == 0


def has_nft_table(host: Host) -> bool:
    tables = host.sh("nft", "list", "tables").stdout
    return "table inet banger_" in tables and "table bridge banger_" in tables


def test_daemon_stop_with_no_vm_left_restores_the_host_network(host: Host) -> None:
    # What banger finds in this namespace: no bridge, no table, forwarding off.
    host.sh("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    assert not has_bridge(host) and not has_nft_table(host) and host.taps() == []
    out = host.json("vm", "create", "--name", "box", "--nat")  # NAT turns forwarding on
    assert out["state"] == "running"
    assert has_bridge(host) and has_nft_table(host) and ip_forward(host) == "1"
    assert out["tap"] in host.taps()

    # With a VM running, stop keeps it and its network; the next daemon re-adopts it.
    stop = host.cli("daemon", "stop")
    assert stop.returncode == 0 and "keep running" in stop.stdout, stop.stdout + stop.stderr
    assert host.daemon is not None
    host.daemon.wait(30)
    assert has_bridge(host) and has_nft_table(host) and ip_forward(host) == "1"
    assert out["tap"] in host.taps()
    host.start_daemon()
    assert host.json("vm", "show", "box")["state"] == "running"

    host.ok("vm", "delete", "box")
    stop = host.cli("daemon", "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "bangerd stopped", stop.stdout
    host.daemon.wait(30)
    host.daemon = None  # nothing left for the fixture to stop
    assert not has_bridge(host), "the bridge banger made is still there"
    assert not has_nft_table(host), "the nftables table banger loaded is still there"
    assert host.taps() == []
    assert ip_forward(host) == "0"
    assert not (host.state / "host-network.json").exists()


def test_restart_keeps_a_running_vm_and_applies_the_edited_config(
        host: Host, running_vm: str) -> None:
    before = host.json("vm", "show", running_vm)
    assert before["state"] == "running" and before["pid"]
    old_status = json.loads(host.ok("daemon", "status", "--json"))

    host.write_config('tap_pool_size = 3\ndebian_mirror = "http://mirror.invalid/debian"')
    listed = host.cli("vm", "list")
    assert listed.returncode == 0, listed.stderr
    warnings = [ln for ln in listed.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, listed.stderr
    assert "debian_mirror, tap_pool_size" in warnings[0]
    assert "`banger daemon restart`" in warnings[0]

    res = host.cli("daemon", "restart")
    assert res.returncode == 0, res.stdout + res.stderr
    assert host.daemon is not None
    host.daemon.wait(30)  # the fixture's bangerd is gone; the CLI started the new one
    status = json.loads(host.ok("daemon", "status", "--json"))
    assert status["pid"] != old_status["pid"]
    assert status["config"]["values"]["tap_pool_size"] == 3

    after = host.json("vm", "show", running_vm)
    assert after["state"] == "running" and after["pid"] == before["pid"]  # re-adopted
    assert after["tap"] == before["tap"] and after["tap"] in host.taps()
    assert host.ok("vm", "exec", running_vm, "--", "echo", "alive").strip() == "alive"
    again = host.cli("vm", "list")
    assert again.returncode == 0 and "warning" not in again.stderr
