"""Contract-test fixtures: the Firecracker API spec, fake binaries, launch plans.

Every test here needs ``../shared/specs/firecracker-api.yaml`` (beside the
repository). When it is absent every test in this directory is skipped with a reason
naming that path, whether or not it asks for the spec (see
:func:`pytest_collection_modifyitems`), and a module that reads the spec at import
is skipped whole (:func:`tests.contract.fcspec.spec_path_or_skip`).
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from banger.layout import Layout
from banger.proc import find_by_marker, identify, send_signal, wait_gone
from banger.vmm import LaunchPlan, vm_marker
from tests.contract.fcspec import REPO, FirecrackerSpec, missing_spec_reason, spec_path_or_skip

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every contract test, naming the spec's path, when the spec is absent."""
    reason = missing_spec_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        # This hook sees the whole session's items: touch only the ones in this directory.
        if item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def spec_path() -> Path:
    return spec_path_or_skip()


@pytest.fixture(scope="session")
def spec(spec_path: Path) -> FirecrackerSpec:
    return FirecrackerSpec.load(spec_path)


@dataclass
class JournalView:
    """What one fake instance (all processes with one --id) recorded."""

    entries: list[dict[str, Any]]

    def requests(self, pid: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.entries
                if "method" in e and (pid is None or e["pid"] == pid)]

    def calls(self, pid: int | None = None, *, skip_probes: bool = True) -> list[tuple[str, str]]:
        """(method, path) in order; the driver's readiness probes (GET /) dropped."""
        return [(e["method"], e["path"]) for e in self.requests(pid)
                if not (skip_probes and (e["method"], e["path"]) == ("GET", "/"))]

    def errors(self) -> list[str]:
        return [err for e in self.requests() for err in e["errors"]]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("event") == kind]


@dataclass
class FakeInstall:
    firecracker: Path
    jailer: Path
    journal_dir: Path

    def journal(self, marker: str) -> JournalView:
        path = self.journal_dir / f"{marker}.jsonl"
        if not path.exists():
            return JournalView([])
        return JournalView([json.loads(line) for line in path.read_text().splitlines()])


def write_fakes(directory: Path, spec_path: Path, *,
                fail_on: tuple[str, str, str] | None = None,
                crash: str | None = None,
                cgroup_roots: dict[str, str] | None = None) -> FakeInstall:
    """Executables named ``firecracker`` and ``jailer`` backed by fake_firecracker.

    ``cgroup_roots`` (controller -> directory) is the fake cgroup hierarchy the
    jailer makes the VM's cgroup directories in; without it, it makes none.
    """
    directory.mkdir(parents=True, exist_ok=True)
    journal_dir = directory / "journal"
    journal_dir.mkdir(exist_ok=True)
    prologue = (f"#!{sys.executable}\n"
                "import sys\n"
                f"sys.path.insert(0, {str(REPO)!r})\n")
    fc = directory / "firecracker"
    fc.write_text(prologue + (
        "from tests.contract.fake_firecracker import firecracker_main\n"
        f"sys.exit(firecracker_main(sys.argv[1:], spec={str(spec_path)!r}, "
        f"journal_dir={str(journal_dir)!r}, fail_on={fail_on!r}, crash={crash!r}))\n"))
    jailer = directory / "jailer"
    jailer.write_text(prologue + (
        "from tests.contract.fake_firecracker import jailer_main\n"
        f"sys.exit(jailer_main(sys.argv[1:], journal_dir={str(journal_dir)!r}, "
        f"cgroup_roots={cgroup_roots!r}))\n"))
    for exe in (fc, jailer):
        exe.chmod(0o755)
    return FakeInstall(fc, jailer, journal_dir)


@pytest.fixture
def fakes(tmp_path: Path, spec_path: Path) -> FakeInstall:
    return write_fakes(tmp_path / "bin", spec_path)


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A directory with a short path: VM sockets under it stay within 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="bfc-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class VMs:
    """Builds launch plans and kills, at teardown, whatever a test left running."""

    layout: Layout
    markers: list[str] = field(default_factory=list)

    def plan(self, *, tap: str = "tap-bgr0", initrd: bool = True, vcpu: int = 2) -> LaunchPlan:
        vm_id = secrets.token_hex(6)  # unique across xdist workers: teardown kills by marker
        self.markers.append(vm_marker(vm_id))
        paths = self.layout.vm(vm_id)
        paths.state.mkdir(parents=True)
        images = self.layout.images_dir / "img"
        images.mkdir(parents=True, exist_ok=True)
        kernel = images / "vmlinux"
        kernel.write_bytes(b"\x7fELF fake kernel")
        initrd_path = images / "initrd.img"
        initrd_path.write_bytes(b"fake initrd")
        rootfs = paths.state / "rootfs.ext4"
        rootfs.write_bytes(b"fake rootfs")
        paths.work_disk.write_bytes(b"fake work disk")
        return LaunchPlan(
            vm_id=vm_id, name=f"vm-{vm_id[:4]}", vcpu=vcpu, memory_mib=256,
            kernel=kernel, initrd=initrd_path if initrd else None,
            cmdline="console=ttyS0 root=/dev/vda rw reboot=k panic=1",
            rootfs=str(rootfs), work_disk=str(paths.work_disk),
            tap=tap, mac="06:00:ac:1d:00:02", paths=paths,
        )

    def kill_leftovers(self) -> list[int]:
        killed = []
        for marker in self.markers:
            for pid in find_by_marker(marker):
                ident = identify(pid, marker)
                if ident is not None and send_signal(ident, signal.SIGKILL):
                    wait_gone(ident, 5)
                    killed.append(pid)
        return killed


@pytest.fixture
def vms(short_root: Path) -> Iterator[VMs]:
    layout = Layout(short_root / "s", short_root / "c", short_root / "r", short_root / "key")
    v = VMs(layout)
    yield v
    v.kill_leftovers()
