"""The root helper (`banger-helper`) as a process of its own: a daemon configured with
``helper_socket`` does its bridge, TAPs, nftables, forwarding, QEMU launches, signals
and cgroups through it, boots a VM on them, and says so clearly when the helper is
gone. Inside the test's own network
namespace, like every end-to-end test."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BIN,
    CachedImage,
    Host,
    destroy_host,
    make_host,
)
from tests.e2e.test_daemon_host import has_bridge, has_nft_table, ip_forward


class HelperHost:
    def __init__(self, host: Host, socket: Path) -> None:
        self.host = host
        self.socket = socket
        self.log = host.root / "helper.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.host.netns(str(BIN / "banger-helper"), "--config", str(self.host.config),
                                "--owner", "root"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"banger-helper did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture
def helper_host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage
                ) -> Iterator[HelperHost]:
    probe = make_host(tmp_path)  # for its namespace's tag only
    sock = Path(f"{probe.run_dir}-helper.sock")
    probe.extra_config = f'vmm = "qemu"\nhelper_socket = "{sock}"\n'
    probe.write_config()
    h = HelperHost(probe, sock)
    h.start()
    probe.start_daemon()
    probe.register_image(test_image)
    yield h
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        where = probe.save_artifacts(request.node.nodeid)
        (where / "helper.log").write_bytes(h.log.read_bytes())
    if h.proc is None:
        h.start()  # the daemon needs it to delete what is left
    destroy_host(probe)
    h.stop()


def test_a_vm_boots_on_a_network_the_helper_made(helper_host: HelperHost) -> None:
    host = helper_host.host
    host.sh("sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    out = host.json("vm", "create", "--name", "box", "--nat")
    assert out["state"] == "running"
    res = host.cli("vm", "exec", "box", "--", "cat", "/etc/hostname")
    assert res.returncode == 0 and res.stdout.strip() == "box", res.stderr
    resolved = host.ok("vm", "exec", "box", "--", "getent", "hosts", "box.vm").split()
    assert resolved[0] == out["ip"]  # the DNS server on sockets the helper bound
    assert has_bridge(host) and has_nft_table(host) and out["tap"] in host.taps()
    assert ip_forward(host) == "1"
    log = helper_host.log.read_text()
    for op in ("bridge.ensure done", "tap.create done", "nft.load done", "nft.admit done",
               "ip_forward done", "qemu.launch done", "dns.sockets done"):
        assert op in log, f"the helper did not log {op!r}"

    # The helper gone: a new VM fails with what to do, and nothing is left half made.
    helper_host.stop()
    res = host.cli("vm", "create", "--name", "second")
    assert res.returncode != 0
    assert "root helper" in res.stderr and "banger system status" in res.stderr, res.stderr
    # Its teardown needed the helper too: the VM stays, in error, for `vm delete` later.
    second = host.json("vm", "show", "second")
    assert second["state"] == "error", second
    helper_host.start()
    host.ok("vm", "delete", "second")

    # Deleting the last VM and stopping the daemon undoes the host changes, through it.
    host.ok("vm", "delete", "box")
    stop = host.cli("daemon", "stop")
    assert stop.returncode == 0, stop.stderr
    assert host.daemon is not None
    host.daemon.wait(30)
    host.daemon = None
    assert not has_bridge(host) and not has_nft_table(host) and host.taps() == []
    assert ip_forward(host) == "0"
    log = helper_host.log.read_text()
    for op in ("vmm.signal done", "cgroup.remove done", "nft.delete done"):
        assert op in log, f"the helper did not log {op!r}"
