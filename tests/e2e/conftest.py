"""End-to-end fixtures: real bangerd, real QEMU guests, inside a network namespace per test.

Layers (each fixture hands out a later stage):

* ``test_image``  - the built-in image, built once per recipe hash and cached on disk
  (``$BANGER_TEST_CACHE``, default /var/cache/banger-test). The build runs with a
  build-only daemon in the host namespace: debootstrap needs the Debian mirror, and a
  daemon that only builds images never creates a bridge or boots a VM.
* ``host``        - a fresh network namespace with its own bangerd and state dir, the
  test image registered. Every VM network lives inside that namespace.
* ``running_vm``  - a booted VM on that host.

When a test fails, the daemon log and every serial log are copied to
``test-artifacts/<test>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from banger.daemon.imagemgr import Recipe
from banger.proc import open_files
from tests.childsignals import with_default_signals
from tests.e2e.pulled import AGENT
from tests.ocilayout import Layer, cached_tree_layer, registry_tools_missing

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/cache/banger-test"))
BIN = Path(sys.executable).parent
IMAGE = "debian-bookworm"
DAEMON_START_S = 30
# One vCPU per test VM: the suite runs two VMs at once on a 2-core host, and under TCG a
# second vCPU per guest oversubscribes the cores. A guest vCPU preempted while holding a
# spinlock leaves the other spinning: a CI boot hit 127 s soft lockups that way (1 vCPU
# guests also booted faster in parallel here: 52-55 s against 59-64 s).
VCPU = 1
MEMORY_MIB = 1024


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, TAPs, loop devices)"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "ip", "ssh"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"end-to-end tests need {tool} (run .ci/run or scripts/install-deps)"
    return None


@pytest.fixture(autouse=True)
def _e2e_requirements() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@dataclass(frozen=True)
class CachedImage:
    dir: Path

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.ext4"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"


def build_test_image() -> CachedImage:
    """The built-in image for this recipe, from the cache or built now (once, under a lock)."""
    digest = Recipe().digest()
    final = CACHE / "images" / digest
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers and parallel runs build only once
        if (final / "rootfs.ext4").exists():
            return CachedImage(final)
        work = CACHE / f"build-{digest}"
        shutil.rmtree(work, ignore_errors=True)
        run_dir = Path(f"/run/banger-tb-{secrets.token_hex(3)}")
        cfg = work / "config.toml"
        work.mkdir(parents=True)
        cfg.write_text(f'state_dir = "{work}/state"\ncache_dir = "{CACHE}"\n'
                       f'runtime_dir = "{run_dir}"\n')
        env = {**os.environ, "BANGER_CONFIG": str(cfg)}
        try:
            res = subprocess.run([str(BIN / "banger"), "image", "build", IMAGE], env=env,
                                 capture_output=True, text=True, timeout=3600)
            if res.returncode != 0:
                pytest.fail(f"test image build failed:\n{res.stdout}\n{res.stderr}")
            built = work / "state" / "images" / IMAGE
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(built, final)
        finally:
            subprocess.run([str(BIN / "banger"), "daemon", "stop"], env=env,
                           capture_output=True, timeout=60)
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        return CachedImage(final)


@pytest.fixture(scope="session")
def test_image() -> CachedImage:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return build_test_image()


@dataclass
class Host:
    """One test's world: a network namespace, a state dir and a bangerd inside."""

    ns: str
    root: Path
    run_dir: Path
    config: Path
    daemon: subprocess.Popen[bytes] | None = None
    extra_config: str = ""
    cache_dir: Path = CACHE
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.root / "bangerd.out"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "BANGER_CONFIG": str(self.config)}

    def write_config(self, extra: str = "") -> None:
        # Every VM boots unless a test asks for boot snapshots (tests/e2e/test_snapshots.py
        # tests them): a test of booting, the serial console or a first boot's identity
        # gets what it tests, and no test pays for a snapshot it does not use.
        # (A top-level key: before the extra text, which may open a table of its own.)
        more = f"{self.extra_config}\n{extra}\n"
        if "boot_snapshots" not in more:
            more = "boot_snapshots = false\n" + more
        self.config.write_text(
            f'state_dir = "{self.state}"\ncache_dir = "{self.cache_dir}"\n'
            f'runtime_dir = "{self.run_dir}"\nlog_level = "debug"\n'
            f"boot_timeout_s = 240\n{more}"
            f"[vm_defaults]\nvcpu = {VCPU}\nmemory_mib = {MEMORY_MIB}\n")

    def netns(self, *argv: str) -> list[str]:
        """``argv`` in the test's network namespace, and only there: nsenter, not `ip netns
        exec`, which also remounts /sys and so hides the host's cgroup mounts from a daemon
        the CLI starts (`daemon restart`, autostart)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}", "--", *argv]

    def start_daemon(self, pause_at: str | None = None) -> None:
        """Start bangerd in the namespace; ``pause_at`` arms the fault-injection hook."""
        env = self.env
        if pause_at:
            env = {**env, "BANGER_TEST_PAUSE_AT": pause_at}
        with self.log_file.open("ab") as out:
            # kill_daemon may send any signal: the daemon must not inherit it ignored.
            # nsenter, not `ip netns exec`: that also remounts /sys for the namespace,
            # which hides the host's cgroup mounts the daemon puts each VM's VMM in.
            self.daemon = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.ns}", "--",
                 *with_default_signals([str(BIN / "bangerd")])], env=env,
                stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + DAEMON_START_S
        while time.monotonic() < deadline:
            if self.cli("daemon", "status").returncode == 0:
                return
            if self.daemon.poll() is not None:
                pytest.fail(f"bangerd exited: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.1)
        pytest.fail("bangerd did not start")

    def popen(self, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
        """A CLI command running in the background, with default SIGINT/SIGTERM handling
        (tests signal it; see :mod:`tests.childsignals`)."""
        return subprocess.Popen(self.netns(*with_default_signals([str(BIN / "banger"), *args])),
                                env=self.env, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_paused(self, stage: str, timeout: float = 300) -> None:
        marker = self.run_dir / f"paused-at-{stage}"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if time.monotonic() > deadline:
                pytest.fail(f"daemon never reached stage {stage}")
            time.sleep(0.1)
        marker.unlink()

    def wait_settled(self, timeout: float = 300) -> list[dict[str, Any]]:
        """Poll until no VM is in a busy state (reconcile may finish boots in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            vms: list[dict[str, Any]] = self.json("vm", "list")
            busy = [v for v in vms if v["state"] in ("creating", "starting", "stopping",
                                                      "deleting", "suspending")]
            if not busy:
                return vms
            if time.monotonic() > deadline:
                pytest.fail(f"VMs still busy: {busy}")
            time.sleep(1)

    def kill_daemon(self, sig: int = 9) -> None:
        assert self.daemon is not None
        os.kill(self.daemon.pid, sig)
        self.daemon.wait(30)
        self.daemon = None

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.cli("daemon", "stop", timeout=60)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
            self.daemon = None

    def cli(self, *args: str, timeout: float = 600, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.netns(str(BIN / "banger"), *args), env=self.env,
                              capture_output=True, text=True, timeout=timeout, input=input)

    def ok(self, *args: str, timeout: float = 600) -> str:
        res = self.cli(*args, timeout=timeout)
        assert res.returncode == 0, f"banger {' '.join(args)} -> {res.returncode}\n" \
                                    f"{res.stdout}\n{res.stderr}"
        return res.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def sh(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (never outside: VM traffic stays in here)."""
        return subprocess.run(self.netns(*argv), capture_output=True, text=True, timeout=120,
                              check=check)

    def taps(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.ns, "-o", "link"], capture_output=True,
                             text=True, check=True).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        return [n for n in names if n.startswith("bgt")]

    def vmm_pids(self) -> list[int]:
        """QEMU processes of this host (see :func:`qemu_pids_under`)."""
        return qemu_pids_under(self.state)

    def loops(self) -> list[str]:
        out = subprocess.run(["losetup", "--json", "--list"], capture_output=True,
                             text=True).stdout
        devs = json.loads(out).get("loopdevices", []) if out.strip() else []
        return [d["name"] for d in devs if str(self.state) in str(d.get("back-file") or "")]

    def ssh_master_pids(self) -> list[int]:
        """This host's OpenSSH masters: each names itself ``ssh: <ControlPath> [mux]``, and
        bangerd's live under ``<runtime_dir>/vms/``."""
        prefix = f"ssh: {self.run_dir}/vms/".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    title = (p / "cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    continue
                if title.startswith(prefix) and title.rstrip().endswith(b"[mux]"):
                    pids.append(int(p.name))
        return pids

    def register_image(self, image: CachedImage, name: str = IMAGE) -> None:
        self.ok("image", "register", "--name", name, "--rootfs", str(image.rootfs),
                "--kernel", str(image.kernel), "--initrd", str(image.initrd))

    def save_artifacts(self, test_name: str) -> Path:
        dest = ARTIFACTS / test_name.replace("/", "_")
        dest.mkdir(parents=True, exist_ok=True)
        for f in [self.log_file, self.state / "bangerd.log", self.state / "bangerd.stderr"]:
            if f.exists():
                shutil.copy2(f, dest / f.name)
        vms = self.state / "vms"
        if vms.is_dir():
            for vm_dir in vms.iterdir():
                for log in ("serial.log", "vmm.log", "handles.json"):
                    if (vm_dir / log).exists():
                        shutil.copy2(vm_dir / log, dest / f"{vm_dir.name}-{log}")
        return dest


def qemu_pids_under(root: Path) -> list[int]:
    """QEMU processes whose command lines or (a confined QEMU gets its files as
    descriptors) open files name ``root``."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd and (
                    str(root).encode() in cmd
                    or any(f.startswith(str(root) + "/") for f in open_files(int(p.name)))):
                pids.append(int(p.name))
    return pids


def make_host(tmp_path: Path, extra_config: str = "", cache_dir: Path = CACHE) -> Host:
    tag = secrets.token_hex(3)
    ns = f"banger-e2e-{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    host = Host(ns=ns, root=tmp_path, run_dir=Path(f"/run/banger-e2e-{tag}"),
                config=tmp_path / "config.toml", extra_config=extra_config,
                cache_dir=cache_dir)
    host.write_config()
    return host


def destroy_host(host: Host) -> None:
    if host.daemon is not None:
        for vm in json.loads(host.cli("vm", "list", "--json").stdout or "[]"):
            host.cli("vm", "delete", vm["name"], timeout=120)
        host.stop_daemon()
    for pid in host.vmm_pids() + host.ssh_master_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for loop in host.loops():
        subprocess.run(["losetup", "--detach", loop], check=False)
    subprocess.run(["ip", "netns", "del", host.ns], check=False)
    shutil.rmtree(host.run_dir, ignore_errors=True)
    # The state dir holds a copy of the test image (~500 MB) and the VMs' disks; pytest
    # keeps the last three runs' temp dirs, so a suite would leave ~60 GB behind. A failed
    # test's logs were copied to test-artifacts/ before this runs.
    shutil.rmtree(host.state, ignore_errors=True)


def firecracker_kernel() -> Path | None:
    """A vmlinux Firecracker can boot: $BANGER_TEST_FC_KERNEL, else a cached `kernel build`."""
    if os.environ.get("BANGER_TEST_FC_KERNEL"):
        return Path(os.environ["BANGER_TEST_FC_KERNEL"])
    built = sorted(Path("/var/cache/banger-kernel").glob("*/vmlinux"))
    return built[-1] if built else None


def firecracker_skip_reason() -> str | None:
    from banger.config import parse_config
    from banger.daemon.vmmselect import firecracker_blockers

    blockers = firecracker_blockers(parse_config({}))
    if blockers:
        return "Firecracker cannot run here: " + "; ".join(blockers)
    if firecracker_kernel() is None:
        return "no Firecracker kernel: run `banger kernel build` or set BANGER_TEST_FC_KERNEL"
    return None


@pytest.fixture(params=["qemu", "firecracker"])
def vmm(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs once per VMM driver that can run on this host."""
    if request.param == "firecracker":
        reason = firecracker_skip_reason()
        if reason:
            pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage, vmm: str
         ) -> Iterator[Host]:
    yield from open_host(request, tmp_path, test_image, vmm)


def open_host(request: pytest.FixtureRequest, tmp_path: Path, test_image: CachedImage,
              vmm: str, *, cache_dir: Path = CACHE, extra_config: str = ""
              ) -> Iterator[Host]:
    """The ``host`` fixture's body: a started daemon with the test image registered (and
    for Firecracker, a kernel it boots); logs kept when the test failed."""
    h = make_host(tmp_path, extra_config=f'vmm = "{vmm}"\n{extra_config}', cache_dir=cache_dir)
    h.start_daemon()
    h.register_image(test_image)
    if vmm == "firecracker":
        kernel = firecracker_kernel()
        assert kernel is not None
        h.ok("kernel", "import", "--name", "fc", str(kernel))
        h.ok("image", "set-kernel", IMAGE, "fc")
    yield h
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        where = h.save_artifacts(request.node.nodeid)
        print(f"\nkept daemon and serial logs in {where}")
    destroy_host(h)


@pytest.fixture
def running_vm(host: Host) -> str:
    out = host.json("vm", "create", "--name", "box")
    assert out["state"] == "running"
    return "box"


@pytest.fixture(scope="session")
def base_layer(test_image: CachedImage) -> Layer:
    """The test image's tree as one zstd layer, made once per recipe and cached."""
    reason = registry_tools_missing()
    if reason:
        pytest.skip(reason)
    return cached_tree_layer(test_image.rootfs, CACHE / "oci-layers" / Recipe().digest(),
                             exclude=["usr/lib/modules", "boot", *AGENT])
