"""Firecracker process primitives and API client (full driver: see issue 5)."""

from __future__ import annotations

from banger.config import Config
from banger.errors import HostError
from banger.layout import VMPaths
from banger.proc import ProcessIdentity
from banger.runner import Runner
from banger.vmm import LaunchPlan


class FirecrackerDriver:
    name = "firecracker"

    def __init__(self, runner: Runner, binary: str) -> None:
        self.runner = runner
        self.binary = binary

    @classmethod
    def from_config(cls, cfg: Config, runner: Runner) -> FirecrackerDriver:
        raise HostError("the Firecracker driver is not available in this build",
                        hint="use vmm = qemu")

    def launch(self, plan: LaunchPlan) -> ProcessIdentity:
        raise HostError("the Firecracker driver is not available in this build")

    def request_shutdown(self, plan_paths: VMPaths, ident: ProcessIdentity) -> bool:
        return False

    def cleanup(self, plan_paths: VMPaths) -> None:
        return None


MIN_VERSION = (1, 4, 0)


def check_version(runner: Runner, binary: str) -> tuple[bool, str]:
    """(supported, description) from ``firecracker --version``."""
    import re

    res = runner.run([binary, "--version"], desc="firecracker version", timeout=10, check=False)
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", res.out)
    if not m:
        return False, f"{binary}: cannot read a version from {res.out.strip()[:60]!r}"
    version = tuple(int(x) for x in m.groups())
    want = ".".join(map(str, MIN_VERSION))
    ok = version >= MIN_VERSION
    return ok, f"{binary}: v{'.'.join(map(str, version))} (minimum {want})"
