"""bangerd as an unprivileged user, with banger-helper as root: the split an installed
banger runs as (`banger system install --owner USER`). The daemon, the CLI and git run
as a user of the test's own; only the helper is root. A VM boots, a repository goes in,
a command's status and the guest's edits come back. In the test's own network
namespace, like every end-to-end test.

The test's venv lives under root's home (0700), so the owner runs banger from a copy
of the package and its dependencies under Debian's own python3 (same minor version).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.config import Config
from banger.hostops import userns
from tests.copyruntime import SYSTEM_PYTHON, copy_runtime
from tests.e2e.conftest import (
    ARTIFACTS,
    BIN,
    CACHE,
    IMAGE,
    MEMORY_MIB,
    VCPU,
    CachedImage,
    firecracker_kernel,
    firecracker_skip_reason,
    qemu_pids_under,
)
from tests.e2e.pulled import PROBE, check_pulled, top_layers
from tests.mirrorrelay import MirrorProxy, Relay
from tests.ocilayout import Layer, Registry, write_layout

OWNER = "banger-e2e-owner"
RELAY_PORT = 18081  # the Debian mirror, on loopback in the test's namespace


def owner_account() -> pwd.struct_passwd:
    """The test's unprivileged user, made once per host."""
    try:
        return pwd.getpwnam(OWNER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--create-home",
                        "--home-dir", f"/var/lib/{OWNER}", "--shell", "/usr/sbin/nologin",
                        OWNER], check=True)
        return pwd.getpwnam(OWNER)


@dataclass
class OwnerHost:
    ns: str
    root: Path
    run_dir: Path
    helper_socket: Path
    user: pwd.struct_passwd
    helper: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def as_owner(self, *argv: str) -> list[str]:
        """``argv`` as the owner (no capabilities, its own groups), in the namespace."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--",
                "setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}",
                "--init-groups", "--inh-caps=-all", "--",
                "env", f"HOME={self.user.pw_dir}", f"PYTHONPATH={self.root / 'site'}",
                f"BANGER_CONFIG={self.config}", "PYTHONDONTWRITEBYTECODE=1", *argv]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.as_owner(str(SYSTEM_PYTHON), "-m", "banger", *args),
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.root)

    def ok(self, *args: str, timeout: float = 600) -> str:
        res = self.cli(*args, timeout=timeout)
        assert res.returncode == 0, f"banger {' '.join(args)} -> {res.returncode}\n" \
                                    f"{res.stdout}\n{res.stderr}"
        return res.stdout

    def restart_daemon(self, extra_config: str) -> None:
        """Stop bangerd, add top-level ``extra_config`` to its config, start it again."""
        self.ok("daemon", "stop", timeout=120)
        assert self.daemon is not None
        self.daemon.wait(30)
        # First: the file ends in a table ([vm_defaults]).
        self.config.write_text(extra_config + "\n" + self.config.read_text())
        self._start_daemon()

    def start(self) -> None:
        with (self.root / "helper.log").open("ab") as out:
            self.helper = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns}", "--", str(BIN / "banger-helper"),
                 "--config", str(self.config), "--owner", OWNER],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        _wait(lambda: self.helper_socket.exists(), self.helper, "banger-helper")
        self._start_daemon()

    def _start_daemon(self) -> None:
        with (self.root / "bangerd.out").open("ab") as out:
            self.daemon = subprocess.Popen(
                self.as_owner(str(SYSTEM_PYTHON), "-m", "banger.cli.bangerd"),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        _wait(lambda: self.cli("daemon", "status").returncode == 0, self.daemon, "bangerd")


def _wait(ready: object, proc: subprocess.Popen[bytes] | None, what: str) -> None:
    deadline = time.monotonic() + 30
    while not ready():  # type: ignore[operator]
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not start")
        time.sleep(0.1)


@pytest.fixture
def owner_host(request: pytest.FixtureRequest, test_image: CachedImage
               ) -> Iterator[OwnerHost]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"the owner runs banger with {SYSTEM_PYTHON}, which is missing")
    user = owner_account()
    userns.reserve(OWNER, user.pw_uid)  # its image builds' ids, as `system install` does
    tag = secrets.token_hex(3)
    ns = f"banger-e2e-{tag}"
    root = Path(f"/var/tmp/banger-owner-{tag}")
    run_dir = Path(f"/run/banger-e2e-{tag}")
    h = OwnerHost(ns, root, run_dir, Path(f"/run/banger-e2e-{tag}-helper.sock"), user)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    try:
        for d in (root, run_dir):
            d.mkdir(mode=0o700)
        copy_runtime(root / "site")
        h.config.write_text(
            f'state_dir = "{root / "state"}"\ncache_dir = "{root / "cache"}"\n'
            f'runtime_dir = "{run_dir}"\nlog_level = "debug"\nboot_timeout_s = 240\n'
            f'boot_snapshots = false\nvmm = "qemu"\nhelper_socket = "{h.helper_socket}"\n'
            f"[vm_defaults]\nvcpu = {VCPU}\nmemory_mib = {MEMORY_MIB}\n")
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(root),
                        str(run_dir)], check=True)
        h.start()
        h.ok("image", "register", "--name", IMAGE, "--rootfs", str(test_image.rootfs),
             "--kernel", str(test_image.kernel), "--initrd", str(test_image.initrd))
        yield h
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            dest = ARTIFACTS / request.node.nodeid.replace("/", "_")
            dest.mkdir(parents=True, exist_ok=True)
            for f in (root / "helper.log", root / "bangerd.out", root / "state/bangerd.log"):
                if f.exists():
                    shutil.copy2(f, dest / f.name)
            print(f"\nkept the helper and daemon logs in {dest}")
        if h.daemon is not None:
            listed = h.cli("vm", "list", "--json")
            for vm in json.loads(listed.stdout) if listed.returncode == 0 else []:
                h.cli("vm", "delete", vm["name"], timeout=120)
            h.cli("daemon", "stop", timeout=120)
            try:
                h.daemon.wait(30)
            except subprocess.TimeoutExpired:
                h.daemon.kill()
        if h.helper is not None:
            h.helper.terminate()
            h.helper.wait(30)
        for pid in qemu_pids_under(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        h.helper_socket.unlink(missing_ok=True)


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in
                Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def test_an_unprivileged_daemon_boots_a_vm_and_round_trips_a_workspace(
        owner_host: OwnerHost) -> None:
    h = owner_host
    assert h.daemon is not None
    daemon = _status(h.daemon.pid)
    # setpriv execs bangerd in place: the pid is the daemon's, and it holds no root
    assert daemon["Uid"].split()[0] == str(h.user.pw_uid)
    assert int(daemon["CapEff"], 16) == 0

    repo = h.root / "repo"
    repo.mkdir()
    (repo / "README").write_text("host\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run(["chown", "-R", f"{h.user.pw_uid}:{h.user.pw_gid}", str(repo)], check=True)

    res = h.cli("vm", "run", "--rm", "--name", "w", "--export", str(h.root / "edits.patch"),
                str(repo), "--", "sh", "-c",
                # w.vm resolves through the DNS server whose port 53 the helper bound
                "getent hosts w.vm >/dev/null && echo guest >> README && cat README && exit 3",
                timeout=900)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout == "host\nguest\n", res.stdout + res.stderr
    patch = (h.root / "edits.patch").read_text()
    assert "+guest" in patch and "README" in patch
    assert h.cli("vm", "list", "--json").stdout.strip() == "[]"

    # What ran as root was the helper's: it launched QEMU, as the VMM user.
    log = (h.root / "helper.log").read_text()
    for op in ("tap.create done", "nft.admit done", "qemu.launch done", "vmm.signal done",
               "dns.sockets done"):
        assert op in log, f"the helper did not log {op!r}"
    # The daemon could not have done it itself: it may not even open a TAP.
    probe = subprocess.run(h.as_owner(str(SYSTEM_PYTHON), "-c",
                                      "import os; os.open('/dev/net/tun', os.O_RDWR); "
                                      "import fcntl, struct; fcntl.ioctl(os.open("
                                      "'/dev/net/tun', os.O_RDWR), 0x400454CA, struct.pack("
                                      "'16sH22x', b'bgtprobe', 2))"),
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0, probe
    assert "PermissionError" in probe.stderr or "Operation not permitted" in probe.stderr, probe


def test_an_unprivileged_daemon_pulls_an_image_with_its_owners_and_devices(
        owner_host: OwnerHost, base_layer: Layer, tmp_path: Path) -> None:
    """The daemon writes the layers as its own and gives the ext4 the image's owners,
    setuid bits and device node (oci.fixups): the guest sees what a root pull gives."""
    h = owner_host
    reg = Registry(tmp_path / "registry",
                   wrap=lambda argv: ["nsenter", f"--net=/run/netns/{h.ns}", "--", *argv])
    reg.start()
    try:
        layers = [base_layer, *top_layers(tmp_path)]
        write_layout(tmp_path / "layout", layers, "1")
        ref = reg.push(tmp_path / "layout", "1", "team/owned")
        img = json.loads(h.ok("image", "pull", ref, "--json", timeout=900))
    finally:
        reg.stop()
    assert img["name"] == "owned-1" and img["source"] == "pulled"
    assert Path(img["rootfs"]).stat().st_uid == h.user.pw_uid  # the daemon's file
    h.ok("vm", "create", "--image", "owned-1", "--name", "pulled", timeout=900)
    seen = json.loads(h.ok("vm", "exec", "pulled", "--", "python3", "-c", PROBE))
    check_pulled(seen, "pulled")
    h.ok("vm", "delete", "pulled", timeout=300)
    h.ok("image", "delete", "owned-1")


def test_an_unprivileged_daemon_builds_the_default_image(owner_host: OwnerHost,
                                                        tmp_path: Path) -> None:
    """debootstrap runs in a namespace of the daemon's own whose ids the helper mapped:
    the image's files keep the owners its packages gave them, and it boots. The daemon
    reaches the Debian mirror through a relay into the test's namespace."""
    h = owner_host
    cached = CACHE / "debootstrap"  # the test image's packages: not fetched again
    if cached.is_dir():
        shutil.copytree(cached, h.root / "cache" / "debootstrap")
        subprocess.run(["chown", "-R", f"{h.user.pw_uid}:{h.user.pw_gid}",
                        str(h.root / "cache")], check=True)
    proxy = MirrorProxy(Config().debian_mirror, tmp_path / "mirror.sock")
    proxy.start()
    relay = Relay(RELAY_PORT, tmp_path / "mirror.sock",
                  lambda argv: ["nsenter", f"--net=/run/netns/{h.ns}", "--", *argv])
    try:
        relay.start()
        h.restart_daemon(f'debian_mirror = "http://127.0.0.1:{RELAY_PORT}/debian"')
        h.ok("image", "delete", IMAGE)  # the fixture registered the test's copy
        h.ok("image", "build", IMAGE, timeout=3000)
    finally:
        relay.stop()
        proxy.stop()
    assert proxy.refused == []
    img = json.loads(h.ok("image", "show", IMAGE, "--json"))
    assert img["source"] == "built"
    rootfs = Path(img["rootfs"])
    assert rootfs.stat().st_uid == h.user.pw_uid  # the daemon's file on the host
    shadow = subprocess.run(["debugfs", "-R", "stat /etc/shadow", str(rootfs)],
                            capture_output=True, text=True, check=True).stdout
    assert re.search(r"User:\s+0\s+Group:\s+42\b", shadow), shadow  # root:shadow (dpkg's)
    assert not list((h.root / "state" / "staging").iterdir())  # the tree went with it
    res = h.cli("vm", "run", "--rm", "--name", "built", "--", "stat", "-c", "%U:%G %a",
                "/etc/shadow", "/usr/bin/chage", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.split("\n")[:2] == ["root:shadow 640", "root:shadow 2755"], res.stdout



def test_an_unprivileged_daemon_runs_firecracker_through_the_helpers_jail(
        request: pytest.FixtureRequest, test_image: CachedImage) -> None:
    """The helper builds the jail and starts the jailer; the daemon reaches Firecracker's
    API and vsock only through connections the helper hands over."""
    reason = firecracker_skip_reason()
    if reason:
        pytest.skip(reason)  # before the owner's daemon and helper are started
    kernel = firecracker_kernel()
    assert kernel is not None
    h: OwnerHost = request.getfixturevalue("owner_host")
    h.ok("image", "register", "--name", "fc", "--rootfs", str(test_image.rootfs),
         "--kernel", str(kernel))
    res = h.cli("vm", "run", "--rm", "--vmm", "firecracker", "--image", "fc", "--name", "fc",
                "--", "sh", "-c", "cat /proc/cmdline; exit 4", timeout=900)
    assert res.returncode == 4, res.stdout + res.stderr
    log = (h.root / "helper.log").read_text()
    for op in ("fc.launch done", "fc.connect done", "fc.cleanup done"):
        assert op in log, f"the helper did not log {op!r}"
    assert h.cli("vm", "list", "--json").stdout.strip() == "[]"
