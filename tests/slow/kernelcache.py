"""banger's guest kernel, built once per input hash and kept in a cache directory.

The build takes the better part of an hour on a 2-core host, so the slow tests (and
anyone who wants the kernel) reuse ``$BANGER_KERNEL_CACHE/<cache_key>/`` (default
/var/cache/banger-kernel): ``vmlinux``, ``bzImage``, ``config``, ``build.log`` and
``build-time.txt``. Run ``python -m tests.slow.kernelcache`` to build it by hand.

The base config here is Firecracker's CI guest config from the shared specs beside the
checkout (``../shared/specs``), read as reference data: the kernel these tests boot is
the one Firecracker itself tests with, plus banger's fragment. That is a test choice;
``banger kernel build`` itself starts from the source's own defconfig and never reads
``../shared``. Tests that need this file skip, naming its path, when it is absent.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from banger.daemon.imagemgr.kernel import (
    DEFAULT_SOURCE_TARBALL,
    BuiltKernel,
    build_kernel,
    cache_key,
    inspect_kernel_file,
)
from banger.runner import SubprocessRunner

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BANGER_KERNEL_CACHE", "/var/cache/banger-kernel"))
BASE_CONFIG = REPO.parent / "shared" / "specs" / "firecracker-guest-kernel-x86_64-6.1.config"
SOURCE = DEFAULT_SOURCE_TARBALL


def key() -> str:
    """The cache key for the current fragment, base config and source."""
    return cache_key(BASE_CONFIG, SOURCE)


def cached(k: str | None = None) -> BuiltKernel | None:
    """The cached build for the current inputs, or None."""
    d = CACHE / (k or key())
    if not (d / "bzImage").is_file() or not (d / "vmlinux").is_file():
        return None
    version = inspect_kernel_file(d / "bzImage").version
    assert version is not None, f"cached bzImage in {d} names no version"
    return BuiltKernel(vmlinux=d / "vmlinux", bzimage=d / "bzImage", version=version,
                       config=d / "config", log=d / "build.log")


def build_or_reuse(echo: bool = False) -> BuiltKernel:
    """The kernel for the current inputs: from the cache, or built now under a lock."""
    k = key()
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build only once
        hit = cached(k)
        if hit is not None:
            return hit
        work = CACHE / f"build-{k}"
        if work.exists():
            import shutil

            shutil.rmtree(work)
        last = [0.0]

        def progress(stage: str, line: str) -> None:
            now = time.monotonic()
            if echo and (now - last[0] > 10 or not line[:1].isdigit()):
                last[0] = now
                print(f"[{time.strftime('%H:%M:%S')}] {stage}: {line}", flush=True)

        started = time.monotonic()
        built = build_kernel(SubprocessRunner(), workdir=work, source_tarball=SOURCE,
                             base_config=BASE_CONFIG, jobs=os.cpu_count(),
                             on_progress=progress)
        wall = time.monotonic() - started
        (work / "build-time.txt").write_text(
            f"wall_s={wall:.0f}\nnproc={os.cpu_count()}\nversion={built.version}\n")
        os.rename(work, CACHE / k)
        return cached(k) or built


if __name__ == "__main__":
    kernel = build_or_reuse(echo=True)
    print(kernel, file=sys.stdout)
