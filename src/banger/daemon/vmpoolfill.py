"""Filling the pool (:mod:`banger.daemon.vmpool`): one background thread per daemon.

The thread wakes when asked (``Daemon.pool_wanted``: at start-up, after a create took a
member, after a boot snapshot was kept or forgotten) and every ``CHECK_S``. Each pass
first removes members that can no longer be taken (their VMM died, their boot snapshot
is gone or no longer the image's current one, their image's pool was turned off), then
makes clones, one at a time, until each configured image has ``pool_size`` of them or
their guest memory would pass ``pool_memory_mib``. An image is filled only once a
create has booted it and kept its boot snapshot: the pool never boots anything itself.

A clone that fails to launch is rolled back like a failed create, the reason is logged,
and that image is left alone for ``RETRY_S``. :func:`stop` ends the thread and removes
every ready member: a pool holds memory, and a stopped daemon keeps no pool.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from banger.api import VMState
from banger.api.params import CreateParams
from banger.daemon import bootsnap, vmboot, vmcreate, vmpool
from banger.daemon.core import new_id
from banger.daemon.network import allocate_ip, mac_for_ip
from banger.daemon.store import SnapshotRecord, VMRecord
from banger.daemon.vmruntime import VMRuntime
from banger.daemon.vms import transition
from banger.errors import BangerError
from banger.runner import CancelToken

if TYPE_CHECKING:
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.pool")

CHECK_S = 30.0
RETRY_S = 60.0
STOP_WAIT_S = 60.0


class PoolFiller:
    """The thread that keeps the pool full."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_at: dict[str, float] = {}  # image -> when its last clone failed

    def start(self) -> None:
        """Start filling (a no-op when no image has a pool)."""
        if not any(self.d.cfg.pool_size.values()):
            return
        self._thread = threading.Thread(target=self._run, name="vm-pool", daemon=True)
        self._thread.start()
        self.d.pool_wanted.set()

    def stop(self) -> None:
        """End the thread (after the clone it is making, if any), then remove the pool."""
        self._stop.set()
        self.d.pool_wanted.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
        vmpool.drain(self.d, lambda vm: True, "the daemon is stopping")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.d.pool_wanted.wait(CHECK_S)
            self.d.pool_wanted.clear()
            if self._stop.is_set():
                return
            try:
                self.fill()
            except Exception:
                log.exception("pool: a pass failed")

    def fill(self) -> None:
        """One pass: prune, then make clones until full (or stopped)."""
        d = self.d
        wanted = self._sources()
        keep = {snap.name for snap, _ in wanted.values()}
        prune(d, keep)
        for image, (snap, size) in wanted.items():
            failed = self._failed_at.get(image)
            if failed is not None and time.monotonic() - failed < RETRY_S:
                continue
            while not self._stop.is_set():
                have = sum(1 for vm in vmpool.members(d)
                           if vm.runtime.from_snapshot == snap.name)
                if have >= size or not _fits(d, snap):
                    break
                try:
                    make_clone(d, snap)
                    self._failed_at.pop(image, None)
                except BangerError as exc:
                    log.warning("pool: cannot make a clone of %s: %s", snap.name, exc.message)
                    self._failed_at[image] = time.monotonic()
                    break

    def _sources(self) -> dict[str, tuple[SnapshotRecord, int]]:
        """Per image with a pool: the boot snapshot its clones come from, and how many."""
        d = self.d
        out = {}
        for image, size in d.cfg.pool_size.items():
            if size <= 0 or d.db.find_image(image) is None:
                continue
            try:
                vmm, spec = vmcreate.plan_boot(d, CreateParams(image=image))
                img = d.db.get_image(image)
                key = bootsnap.key(d, img, vmm, spec)
            except BangerError as exc:
                log.warning("pool: image %s: %s", image, exc.message)
                continue
            snap = bootsnap.find(d, key) if key is not None else None
            if snap is not None:
                out[image] = (snap, size)
        return out


def prune(d: Daemon, keep: set[str]) -> None:
    """Remove ready members not cloned from a snapshot in ``keep``, or whose VMM died."""
    def stale(vm: VMRecord) -> bool:
        return vm.runtime.from_snapshot not in keep or not vmpool.vmm_alive(d, vm)
    vmpool.drain(d, stale, "its boot snapshot changed, or its VMM exited")


def _fits(d: Daemon, snap: SnapshotRecord) -> bool:
    held = sum(vm.spec.memory_mib for vm in vmpool.members(d))
    return held + snap.spec.memory_mib <= d.cfg.pool_memory_mib


def make_clone(d: Daemon, snap: SnapshotRecord) -> VMRecord:
    """One clone of ``snap`` for the pool, ready (``pooled``) when this returns.

    Raises:
        BangerError: it could not be made (nothing of it is left).
    """
    vm_id = new_id()
    with d.create_vm_mu:
        ip = allocate_ip(d.cfg.bridge_cidr, d.db.used_ips())
        vm = VMRecord(id=vm_id, name=vmpool.NAME_PREFIX + vm_id, image=snap.image,
                      spec=snap.spec.model_copy(update={
                          "nat": False, "allow_private": False, "allow_out": [],
                          "forwards": [], "extra_disks": []}),
                      vmm=snap.vmm, state=VMState.CREATING, ip=ip, mac=mac_for_ip(ip),
                      runtime=VMRuntime(pool=True, from_snapshot=snap.name))
        d.db.add_vm(vm)
    try:
        vmcreate.copy_snapshot_disks(d, vm, snap, CancelToken())
        vmboot.prepare_pooled(d, d.db.get_vm(vm.id), d.db.get_image(snap.image), snap)
        vm = transition(d, vm.id, VMState.POOLED, expect={VMState.CREATING})
    except BaseException as exc:
        vmcreate.roll_back(d, vm, exc)
        raise
    log.info("pool: %s ready (clone of %s at %s)", vm.name, snap.name, vm.ip)
    return vm
