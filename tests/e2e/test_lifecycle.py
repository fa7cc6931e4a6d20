"""Real QEMU guests driven through the real CLI and daemon, inside a test network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from banger.daemon.dmsnap import dm_snapshot_supported
from tests.childsignals import with_default_signals
from tests.e2e.checker import ssh_master_vms
from tests.e2e.conftest import CACHE, Host

pytestmark = pytest.mark.e2e


def test_run_rm_propagates_exit_status_and_cleans_up(host: Host) -> None:
    res = host.cli("vm", "run", "--rm", "--name", "seven", "--", "sh", "-c",
                   "test \"$(hostname)\" = seven && exit 7")
    assert res.returncode == 7, res.stderr
    assert host.json("vm", "list") == []
    assert host.vmm_pids() == []
    assert not list((host.state / "vms").iterdir())


def test_work_disk_survives_stop_start_and_delete_leaves_nothing(host: Host,
                                                                 running_vm: str) -> None:
    host.ok("vm", "exec", running_vm, "--", "sh", "-c",
            "echo kept > /root/keep && echo promoted > /etc/banger-promoted && sync")
    host_key = host.ok("vm", "exec", running_vm, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
    # The host key banger made with the work disk, installed by banger-init; /root private.
    made_here = host.ok("vm", "exec", running_vm, "--", "sh", "-c",
                        "cmp /etc/ssh/ssh_host_ed25519_key /root/.ssh/banger_host_ed25519_key"
                        " && stat -c %a /root")
    assert made_here == "700\n"
    # (vm exec went through the guest agent; the first SSH connection records the key)
    assert host.ok("vm", "ssh", running_vm, "--", "true") == ""
    assert host_key.split()[1] in (host.state / "ssh" / "known_hosts").read_text()
    shown = host.json("vm", "show", running_vm)
    vm_id, tap, pid = shown["id"], shown["tap"], shown["pid"]
    assert tap in host.taps() and pid in host.vmm_pids()

    stop = host.cli("vm", "stop", running_vm)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout == f"stopped {running_vm}\n"
    # Without a TTY the stages print as plain lines on stderr. Only the stages that
    # last long enough for a status poll to see them are asserted (a fast one may be
    # passed between two polls).
    assert "[2/3] wait-poweroff" in stop.stderr, stop.stderr
    stopped = host.json("vm", "show", running_vm)
    assert stopped["state"] == "stopped" and stopped["pid"] is None
    assert pid not in host.vmm_pids() and tap not in host.taps()
    # A stopped VM can become an image (its root disk and /root, not its identity).
    promoted = host.json("image", "promote", running_vm, "gold")
    assert promoted["source"] == "promoted" and promoted["origin"].startswith(f"vm {running_vm}")

    start = host.cli("vm", "start", running_vm)
    assert start.returncode == 0, start.stderr
    assert start.stdout == f"started {running_vm}\n"
    assert "[3/3] wait-ssh" in start.stderr, start.stderr
    assert host.ok("vm", "exec", running_vm, "--", "cat", "/root/keep") == "kept\n"
    # the guest's /root is the work disk, and authorized_keys lives there
    mounts = host.ok("vm", "exec", running_vm, "--", "findmnt", "-n", "-o", "SOURCE", "/root")
    assert mounts.strip() == "/dev/vdb"

    host.ok("vm", "delete", running_vm)
    assert host.json("vm", "list") == []
    assert host.vmm_pids() == []
    assert [t for t in host.taps() if t == tap] == []
    assert not (host.state / "vms" / vm_id).exists()
    assert not (host.run_dir / "vms" / vm_id).exists()
    assert host.loops() == []
    # the address lease is free again
    again = host.json("vm", "create", "--name", "again", "--no-start")
    assert again["ip"] == shown["ip"]

    # A VM of the promoted image boots with the promoted VM's edits, as itself.
    host.ok("vm", "create", "--image", "gold", "--name", "heir")
    seen = host.ok("vm", "exec", "heir", "--", "sh", "-c",
                   "cat /etc/banger-promoted /root/keep; hostname")
    assert seen == "promoted\nkept\nheir\n"
    assert host.ok("vm", "exec", "heir", "--", "cat",
                   "/etc/ssh/ssh_host_ed25519_key.pub") != host_key


def test_two_vms_get_distinct_addresses_and_resolve_but_cannot_reach_each_other(
        host: Host) -> None:
    a = host.json("vm", "run", "-d", "--name", "a")
    copies = host.json("daemon", "status")["cow_strategy"] == "copy"
    if copies:  # a's create asked for a spare root disk (spare_root_disks): wait for it
        wait_for_spare(host)
    b = host.json("vm", "run", "-d", "--name", "b")
    assert a["ip"] != b["ip"]
    if copies:  # b's root disk is that copy, and b boots from it (below)
        log = (host.state / "bangerd.log").read_text()
        assert f"vms/{b['id']}/rootfs.ext4: a spare copy of" in log
    for vm in (a, b):
        assert host.ok("vm", "exec", vm["name"], "--", "hostname").strip() == vm["name"]
    # guest to guest over the bridge: closed (config vm_to_vm), b's sshd does not answer a
    probe = f"import socket; socket.create_connection(('{b['ip']}', 22), 5); print('ok')"
    res = host.cli("vm", "exec", "a", "--", "python3", "-c", probe)
    assert res.returncode != 0 and "ok" not in res.stdout
    # banger's DNS answers <name>.vm inside the guests (real DNS packets via the gateway)
    resolved = host.ok("vm", "exec", "a", "--", "getent", "hosts", "b.vm").split()
    assert resolved[0] == b["ip"]
    # ... and for the host, straight to the server on the bridge address
    query = host.sh(sys.executable, "-c",
                    "from dnslib import DNSRecord; "
                    "r = DNSRecord.parse(DNSRecord.question('a.vm').send('172.29.0.1', 53, "
                    "timeout=5)); print(r.short())")
    assert query.stdout.strip() == a["ip"]


def wait_for_spare(host: Host, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not [p for p in (host.state / "spares").glob("*.ext4")
               if not p.name.startswith(".")]:
        assert time.monotonic() < deadline, "no spare root disk was made"
        time.sleep(0.5)


def test_bad_and_duplicate_names_are_refused_cleanly(host: Host) -> None:
    bad = host.cli("vm", "create", "--name", "Not_A_Label")
    assert bad.returncode == 2 and "invalid VM name" in bad.stderr
    assert "Traceback" not in bad.stderr
    host.ok("vm", "create", "--name", "taken", "--no-start")
    dup = host.cli("vm", "create", "--name", "taken")
    assert dup.returncode == 125
    assert dup.stderr.startswith("error: a VM named 'taken' already exists")
    assert "hint:" in dup.stderr
    names = [v["name"] for v in host.json("vm", "list")]
    assert names == ["taken"]
    assert host.vmm_pids() == []
    assert len(list((host.state / "vms").iterdir())) == 1


def test_vmm_that_fails_to_start_leaves_nothing(host: Host) -> None:
    # 256 GiB of guest RAM on a host that cannot back it: QEMU refuses at start-up
    # ("cannot set up guest memory"), before the guest runs a single instruction.
    taps_before = set(host.taps())
    res = host.cli("vm", "create", "--name", "doomed", "--memory", "262144")
    assert res.returncode == 125
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert errors[0].startswith("error: QEMU failed to start doomed: ")
    assert "cannot set up guest memory" in errors[0]
    assert errors[1].startswith("hint:") and len(errors) == 2
    assert host.json("vm", "list") == []
    assert host.vmm_pids() == []
    assert set(host.taps()) <= taps_before | set(host.json("daemon", "status")["tap_pool"])
    assert not list((host.state / "vms").iterdir())


def test_state_errors_logs_list_and_ports(host: Host, running_vm: str) -> None:
    again = host.cli("vm", "start", running_vm)
    assert again.returncode == 125 and "already running" in again.stderr
    missing = host.cli("vm", "stop", "ghost")
    assert missing.returncode == 125 and "no VM named 'ghost'" in missing.stderr
    logs = host.ok("vm", "logs", running_vm)
    assert "Linux version" in logs or "systemd" in logs
    listed = host.ok("vm", "list")
    assert running_vm in listed and "running" in listed

    # vm ports: two guest HTTP servers, one on every address, one on loopback only.
    host.ok("vm", "exec", running_vm, "--", "sh", "-c",
            "for a in 0.0.0.0:8080 127.0.0.1:8081; do "
            "nohup python3 -m http.server ${a#*:} --bind ${a%:*} "
            "</dev/null >/dev/null 2>&1 & done")
    for _ in range(60):
        answer = host.json("vm", "ports")  # no VM named: every running VM
        found = {(x["proto"], x["port"]): x for x in answer[0]["listeners"]}
        if ("tcp", 8080) in found and ("tcp", 8081) in found:
            break
        time.sleep(0.5)
    assert [a["name"] for a in answer] == [running_vm] and answer[0]["error"] is None
    assert found[("tcp", 8080)]["process"] == "python3"
    assert found[("tcp", 8080)]["endpoint"] == f"{running_vm}.vm:8080"
    assert found[("tcp", 8081)]["endpoint"] is None
    assert found[("tcp", 22)]["process"] == "sshd"
    served = host.sh("curl", "-sf", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://{answer[0]['ip']}:8080/")
    assert served.stdout == "200"
    table = host.ok("vm", "ports", running_vm)
    assert f"{running_vm}.vm:8080" in table and "(guest loopback only)" in table
    host.ok("vm", "create", "--name", "cold", "--no-start")
    cold = host.cli("vm", "ports", running_vm, "cold")
    assert cold.returncode != 0 and "not running" in cold.stderr
    assert "banger vm start cold" in cold.stderr


def test_kill_and_restart(host: Host, running_vm: str) -> None:
    shown = host.json("vm", "show", running_vm)
    pid, vm_id = shown["pid"], shown["id"]
    # SSH commands share one ssh master per boot, which ends with the VM.
    assert host.ok("vm", "ssh", running_vm, "--", "true") == ""
    assert ssh_master_vms(host) == [vm_id]
    killed = host.json("vm", "kill", running_vm)
    assert killed["state"] == "stopped" and "SIGKILL" in killed["stop_reason"]
    assert pid not in host.vmm_pids()
    assert ssh_master_vms(host) == []
    host.ok("vm", "start", running_vm)
    assert host.ok("vm", "ssh", running_vm, "--", "true") == ""
    first = host.json("vm", "show", running_vm)["pid"]
    first_sockets = sorted(p.name for p in (host.run_dir / "vms" / vm_id / "ssh").iterdir())
    restarted = host.cli("vm", "restart", running_vm)
    assert restarted.returncode == 0, restarted.stderr
    assert "[2/6] wait-poweroff" in restarted.stderr and "[6/6] wait-ssh" in restarted.stderr
    second = host.json("vm", "show", running_vm)
    assert second["state"] == "running" and second["pid"] != first
    assert host.ok("vm", "ssh", running_vm, "--", "true") == ""
    # The new boot has a master of its own, under another name.
    sockets = sorted(p.name for p in (host.run_dir / "vms" / vm_id / "ssh").iterdir())
    assert len(sockets) == 1 and sockets != first_sockets
    assert ssh_master_vms(host) == [vm_id]
    host.ok("vm", "stop", running_vm)
    assert ssh_master_vms(host) == []


def test_guest_poweroff_is_noticed(host: Host, running_vm: str) -> None:
    host.cli("vm", "exec", running_vm, "--", "sh", "-c", "poweroff")
    for _ in range(120):
        state = host.json("vm", "show", running_vm)
        if state["state"] == "stopped":
            break
        subprocess.run(["sleep", "0.5"], check=True)
    assert state["state"] == "stopped"
    assert "powered off" in state["stop_reason"]
    assert host.vmm_pids() == []


def test_vm_list_json_is_parseable(host: Host) -> None:
    host.ok("vm", "create", "--name", "cold", "--no-start")
    data = json.loads(host.ok("vm", "list", "--json"))
    assert data[0]["name"] == "cold" and data[0]["state"] == "stopped"


def test_kernel_build_and_boot_a_registry_kernel(host: Host, vmm: str) -> None:
    """`kernel build` (reusing a cached build of the same inputs) then a VM boots it."""
    from banger.daemon.imagemgr.kernel import DEFAULT_SOURCE_TARBALL, cache_key
    from tests.slow import kernelcache

    base = kernelcache.BASE_CONFIG
    # The cached build the slow tests make starts from Firecracker's CI config, so
    # this build names it too (the default base is the source's own defconfig).
    if not base.is_file() or not DEFAULT_SOURCE_TARBALL.is_file():
        pytest.skip(f"kernel build inputs missing ({base}, {DEFAULT_SOURCE_TARBALL})")
    key = cache_key(base, DEFAULT_SOURCE_TARBALL)
    prebuilt = Path("/var/cache/banger-kernel") / key
    if not (prebuilt / "vmlinux").is_file():
        pytest.skip("no cached kernel build for these inputs (`pytest -m slow tests/slow` "
                    "makes one); a fresh build takes ~20 min, too slow for this suite")
    # seed the daemon's build cache (its cache_dir is CACHE; hard links: no copy)
    dest = CACHE / "kernels" / key
    if not (dest / "vmlinux").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("vmlinux", "bzImage", "config", "build.log"):
            if not (dest / f).exists():
                os.link(prebuilt / f, dest / f)
    built = host.json("kernel", "build", "--name", "k61", "--base-config", str(base))
    assert set(built["vmms"]) == {"firecracker", "qemu"} and built["version"]
    host.ok("image", "set-kernel", "debian-bookworm", "k61")
    res = host.cli("vm", "run", "--rm", "--vmm", vmm, "--", "uname", "-r")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == built["version"]


def test_guests_reach_an_upstream_through_nat(host: Host) -> None:
    """A second namespace plays "the internet": an HTTP server behind a veth uplink, on a
    benchmark-range address (198.18.0.0/15): private ranges stay closed even with NAT."""
    up = host.ns + "-up"
    subprocess.run(["ip", "netns", "add", up], check=True)
    server = None
    try:
        subprocess.run(["ip", "link", "add", "bgup0", "netns", host.ns, "type", "veth",
                        "peer", "name", "bgup1", "netns", up], check=True)
        host.sh("ip", "addr", "add", "198.18.77.1/24", "dev", "bgup0")
        host.sh("ip", "link", "set", "bgup0", "up")
        host.sh("ip", "route", "add", "default", "via", "198.18.77.2")
        for cmd in (["ip", "addr", "add", "198.18.77.2/24", "dev", "bgup1"],
                    ["ip", "link", "set", "bgup1", "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", up, *cmd], check=True)
        www = host.root / "www"
        www.mkdir()
        (www / "marker").write_text("through the uplink\n")
        # terminate() below must end it even when the suite's shell ignores SIGTERM.
        server = subprocess.Popen(
            ["ip", "netns", "exec", up, *with_default_signals([
                sys.executable, "-m", "http.server", "8080", "--bind", "198.18.77.2",
                "--directory", str(www)])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = host.ok("vm", "run", "--rm", "--nat", "--", "curl", "-sS", "--max-time", "20",
                      "http://198.18.77.2:8080/marker")
        assert out == "through the uplink\n"
    finally:
        if server is not None:
            server.terminate()
            _, log = server.communicate(timeout=30)
            # the server saw the host's uplink address: the guest's was masqueraded
            assert "198.18.77.1 - -" in log and "172.29.0." not in log
        subprocess.run(["ip", "netns", "del", up], check=False)


def test_interactive_run_on_a_terminal(host: Host) -> None:
    """`vm run` with no command on a TTY: live stage display, then an interactive shell."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(host.netns(str(Path(sys.executable).parent / "banger"), "vm",
                                       "run", "--rm", "--name", "tty"),
                            env=host.env, stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    os.close(follower)
    seen = b""
    sent = False
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(leader, 65536)
                except OSError:
                    break
            if not sent and b"root@tty" in seen:  # the guest's shell prompt
                os.write(leader, b"echo hi-$(hostname)\nexit 5\n")
                sent = True
        proc.wait(timeout=120)
    finally:
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "✓" in text and "wait-ssh" in text  # the live stage display ran on the TTY
    assert "hi-tty" in text
    assert proc.returncode == 5
    assert host.json("vm", "list") == []


@pytest.mark.skipif(not dm_snapshot_supported(),
                    reason="this kernel has no device-mapper snapshot target (dm-snapshot)")
def test_promote_reads_a_dm_snapshot_disk(host: Host) -> None:
    """``cow_strategy = dmsnap``: the promoted image is the snapshot's merged view."""
    host.stop_daemon()
    host.write_config('cow_strategy = "dmsnap"')
    host.start_daemon()
    host.ok("vm", "create", "--name", "snap")
    host.ok("vm", "exec", "snap", "--", "sh", "-c", "echo merged > /etc/banger-snap && sync")
    host.ok("vm", "stop", "snap")
    host.json("image", "promote", "snap", "snapgold")
    assert host.loops() == []  # the snapshot was taken down after the read
    host.ok("vm", "create", "--image", "snapgold", "--name", "snapheir")
    assert host.ok("vm", "exec", "snapheir", "--", "cat", "/etc/banger-snap") == "merged\n"
