"""``Daemon``: the state of bangerd, handed to every daemon module as ``d``.

It owns the infrastructure handles (config, layout, store, runner, logger,
pid file), the locks, the subsystem registries and the injectable seams. The
work lives in ``vms``, ``vmcreate``, ``vmpower``, ``images``, ``reconcile`` and the
leaf subpackages; :mod:`banger.daemon.service` opens, serves and closes it.

Lock order (see ARCHITECTURE.md in this directory): ::

    vm_locks[id] -> workspace_locks[id] -> {create_vm_mu, image_ops_mu} -> leaf locks

``vm_locks[id]`` and ``workspace_locks[id]`` are never held together, and no
lock is held across guest I/O or a VMM boot.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from banger.api import VMState, config_hash, config_values
from banger.config import Config
from banger.daemon import vmmselect
from banger.daemon.dmsnap import (
    CowHandle,
    CowStrategy,
    sparse_copy,
    strategy_for,
)
from banger.daemon.dns import VMDNS, upstream_from_resolv_conf
from banger.daemon.firewall import GuestFirewall
from banger.daemon.forwarder import ForwardTable
from banger.daemon.guest import Guest, GuestDialer, SSHGuest, boot_key, wait_for_ssh
from banger.daemon.handles import HandleCache
from banger.daemon.network import HostChanges, TapPool, ensure_bridge
from banger.daemon.oci.blobs import BlobCache
from banger.daemon.opstate import Operation, Registry
from banger.daemon.sessionctl import SessionRegistry
from banger.daemon.spares import Spares
from banger.daemon.store import Store, VMRecord
from banger.errors import BangerError, InternalError, from_foreign
from banger.hostops.cgroups import CgroupHost, detect
from banger.hostops.client import HostOps
from banger.hostops.executor import Executor
from banger.hostops.netlink import HostNetwork, IPNetwork
from banger.hostops.policy import Policy
from banger.layout import Layout, dm_prefix_for
from banger.protocol import PROTOCOL_VERSION, __version__
from banger.runner import CancelToken, Runner, SubprocessRunner
from banger.vmm import VMMDriver

log = logging.getLogger("banger.daemon")

# The request/operation id stamped on every log line written while serving it.
current_op: contextvars.ContextVar[str] = contextvars.ContextVar("current_op", default="-")


class _OpFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.op = current_op.get()
        return True


def setup_logging(path: Path | None, level: str) -> None:
    """Log to ``path`` (or stderr) with the op id on every line."""
    handler: logging.Handler
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s [%(op)s] %(name)s: %(message)s"))
    handler.addFilter(_OpFilter())
    root = logging.getLogger("banger")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class LockSet:
    """One ``threading.Lock`` per key (VM id), made on first use.

    ``_mu`` guards only the dict; it is never held while a member lock is.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._mu = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def get(self, key: str) -> threading.Lock:
        """The lock for ``key``, created on first use."""
        with self._mu:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Hold the lock for ``key`` for the duration of the ``with`` block."""
        with self.get(key):
            yield



@dataclass
class Seams:
    """Side effects the tests replace. Real implementations by default."""

    runner: Runner = field(default_factory=SubprocessRunner)
    # The links the in-process host operations change (unused with a root helper).
    net: HostNetwork = field(default_factory=IPNetwork)
    vmm_factory: Callable[[str], VMMDriver] | None = None
    cow: CowStrategy | None = None
    dial: GuestDialer | None = None
    wait_for_ssh: Callable[..., float] = wait_for_ssh
    # The host's cgroup hierarchy, where the start-up sweep looks for leaked VM cgroups.
    cgroups: Callable[[], CgroupHost] = detect
    # Builds an image by name into a staging dir; replaced in unit tests.
    image_build: Callable[..., Any] | None = None
    # Waits until a guest says a session's command runs: (guest, name, timeout) ->
    # GuestSession; None: sessions.wait_ready, which polls the guest.
    wait_session_ready: Callable[..., Any] | None = None


class VMCap(Protocol):
    """An optional per-VM feature that follows the lifecycle (implementations: ``caps``)."""

    name: str

    def started(self, vm: VMRecord) -> None:
        """The VM is running (also called on re-adoption after a daemon restart)."""
        ...

    def stopped(self, vm: VMRecord) -> None:
        """The VM stopped."""
        ...

    def deleted(self, vm: VMRecord) -> None:
        """The VM was removed for good."""
        ...

    def suspended(self, vm: VMRecord) -> None:
        """The VM is about to be saved to disk (``vm suspend``): what the guest runs
        carries on after the restore, what the host holds for it pauses; ``started``
        follows the restore."""
        ...


class Daemon:
    """bangerd's state: what every daemon module is handed as ``d``.

    Opening, serving and closing (which need reconcile, the RPC table and the
    socket server, all of which use this class) are :class:`banger.daemon.service.Bangerd`'s.
    """

    def __init__(self, cfg: Config, seams: Seams | None = None, *,
                 log_to_stderr: bool = False, config_file: Path | None = None,
                 config_sha256: str | None = None) -> None:
        self.cfg = cfg
        # The config is read once: a changed file takes effect at `banger daemon restart`.
        # daemon.status reports these so a CLI with other values can say so.
        self.config_file = config_file
        # The digest of the file's bytes: the CLI's fast path (banger.cli.quick) compares
        # it with its own instead of validating the whole config.
        self.config_sha256 = config_sha256
        self.config_values = config_values(cfg)
        self.config_hash = config_hash(self.config_values)
        self.layout = Layout.from_config(cfg)
        self.seams = seams or Seams()
        self.runner = self.seams.runner
        self.started_at = time.time()
        self.log_to_stderr = log_to_stderr

        # vm_locks[id]: held only across short state validation + store mutation for one VM.
        self.vm_locks = LockSet("vm")
        # workspace_locks[id]: serialises workspace prepare/export on one VM (guest I/O phase).
        self.workspace_locks = LockSet("workspace")
        # create_vm_mu: makes "name is free + next free IP" atomic with inserting the VM row.
        self.create_vm_mu = threading.Lock()
        # image_ops_mu: serialises image registry mutations (build publish, register, delete).
        self.image_ops_mu = threading.Lock()
        self.create_ops: Registry[Operation] = Registry(self.log_location)
        self.image_ops: Registry[Operation] = Registry(self.log_location)
        self.workspace_ops: Registry[Operation] = Registry(self.log_location)
        self.kernel_ops: Registry[Operation] = Registry(self.log_location)
        self.power_ops: Registry[Operation] = Registry(self.log_location)  # start/stop/restart
        self.op_registries = (self.create_ops, self.image_ops, self.workspace_ops,
                              self.kernel_ops, self.power_ops)
        # Cancel tokens of in-flight boots, so stop/delete can interrupt a slow start.
        # _inflight_mu is a leaf lock guarding only the dict.
        self._inflight_mu = threading.Lock()
        self._inflight: dict[str, CancelToken] = {}

        self.store: Store | None = None
        # Registry blobs by digest, shared by every image pull (oci.blobs).
        self.blobs = BlobCache(self.layout.oci_blobs)
        self.handles = HandleCache(self.layout)
        # Host-wide names (TAPs, dm targets) carry this install's tag, so sweeps of two
        # installs on one host never touch each other's.
        policy = Policy.from_config(cfg)
        # Everything that needs root: through the helper's socket when one is configured,
        # else done here, with the same requests checked against the same policy.
        self.host = (HostOps.connect(cfg.helper_socket) if cfg.helper_socket is not None
                     else HostOps.local(Executor(policy, self.runner, self.seams.net,
                                                cgroups=self.seams.cgroups)))
        self.tap_pool = TapPool(self.host, cfg.bridge_name, cfg.tap_pool_size,
                                policy.firewall.tap_prefix)
        self.dm_prefix = dm_prefix_for(self.layout.install_tag)
        # The guests' nftables policy (loaded with the first VM, which is admitted
        # before its VMM runs; deleted when the last VM's TAP goes).
        self.firewall = GuestFirewall(self.host, policy.firewall,
                                      self.layout.host_network_state)
        self.vm_dns: VMDNS | None = None
        self.forwards = ForwardTable()  # vm forward: open host listeners by VM
        self.sessions = SessionRegistry()  # vm session attach: readers and the writer
        self.vm_caps: list[VMCap] = []
        self.cow: CowStrategy | None = self.seams.cow
        # Root disks copied ahead of creates: off until the daemon knows the strategy is
        # plain copies (banger.daemon.service.Bangerd.open).
        self.spares = Spares(self.layout.spares_dir, 0, sparse_copy)
        self._drivers: dict[str, VMMDriver] = {}
        # _drivers_mu: a leaf lock guarding only _drivers; _driver_builds[name] serialises
        # building one driver (I/O), never held with another lock (see driver()).
        self._drivers_mu = threading.Lock()
        self._driver_builds = LockSet("driver")
        self._net_mu = threading.Lock()
        self._net_ready = False
        self._network_enabled = True
        self._serving = False
        self._server: Any = None
        self._instance_lock: int | None = None
        self._stop = threading.Event()
        self._closed = False
        self._watcher: threading.Thread | None = None
        # Set to have the pool filler (vmpoolfill) look again: a member was taken, a
        # boot snapshot kept or forgotten.
        self.pool_wanted = threading.Event()
        self.methods: dict[str, Callable[[dict[str, Any]], Any]] = {}

    # ----------------------------------------------------------------- lifecycle

    def ensure_network(self) -> None:
        """Bridge, TAP pool and DNS, made on first need (idempotent).

        Lazy so that a daemon that only builds images never touches host networking.
        ``_net_mu`` is a leaf lock; the netlink calls under it take milliseconds. What is
        changed on the host is recorded first (``HostChanges``) so that a stop with no VM
        left can undo it (:meth:`close`).
        """
        with self._net_mu:
            if self._net_ready or not self._network_enabled:
                return
            changes = HostChanges.load(self.layout.host_network_state)
            ensure_bridge(self.host, self.cfg.bridge_name, self.cfg.bridge_cidr, changes)
            # The guest policy is loaded with the first admitted VM, before its VMM
            # runs (GuestFirewall.admit): a pool TAP carries no frame until then.
            self.tap_pool.fill()
            if self.cfg.dns_enabled and self._serving:
                self._start_dns()
            self._net_ready = True

    def shutdown(self) -> None:
        """Stop serving; running VMs keep running (they are re-adopted on the next start)."""
        self._stop.set()

    def in_background(self, name: str, body: Callable[[], None]) -> None:
        """Run ``body`` on a daemon thread that no error escapes.

        A closing daemon does not wait for such work (a guest may take its whole ssh
        timeout to answer): what fails once :meth:`shutdown` or ``close`` has begun
        (the store is closed under it) is noted at debug level; the next daemon redoes
        it when it re-adopts the VMs. Anything else that escapes ``body`` is logged.
        """
        def run() -> None:
            try:
                body()
            except Exception:
                if self._stop.is_set():
                    log.debug("%s: stopped by the daemon's shutdown", name, exc_info=True)
                else:
                    log.exception("%s failed", name)

        threading.Thread(target=run, name=name, daemon=True).start()

    def host_idle(self) -> bool:
        """True when no VM needs the host network: every VM in the store is stopped (or
        suspended) and no boot, create or workspace copy is in flight.

        A VM in ``error`` counts as not idle: it may still hold a VMM and a TAP; a
        suspended one holds neither.
        """
        with self._inflight_mu:
            if self._inflight:
                return False
        if self.create_ops.active() or self.workspace_ops.active():
            return False
        return all(vm.state in (VMState.STOPPED, VMState.SUSPENDED)
                   for vm in self.db.list_vms())

    def _start_dns(self) -> None:
        upstream = (upstream_from_resolv_conf() if self.cfg.dns_upstream == ""
                    else self.cfg.dns_upstream_address)
        self.vm_dns = VMDNS(upstream, policy=self.firewall)
        try:
            # Bound by the host operations: port 53 is privileged, and a daemon
            # running as its owner holds no capability.
            self.vm_dns.serve(*self.host.dns_sockets())
        except (OSError, BangerError) as exc:
            log.warning("dns: cannot listen on the bridge: %s", exc)
        for vm in self.db.list_vms():
            if vm.state in (VMState.RUNNING, VMState.PAUSED):
                self.vm_dns.register(vm.name, vm.ip)

    # ----------------------------------------------------------------- helpers

    @property
    def db(self) -> Store:
        """The open store; asserts that :meth:`open` was called."""
        assert self.store is not None, "Daemon.open() was not called"
        return self.store

    def driver(self, name: str) -> VMMDriver:
        """The VMM driver called ``name``, built once.

        Building one does I/O (the QEMU driver may run ``useradd`` for the VMM user,
        and reads the cgroup mounts), so it happens outside ``_drivers_mu``, the leaf
        lock that guards only the dict: a slow build never holds up a caller of a
        driver already built. ``_driver_builds[name]`` makes two callers that both
        find ``name`` missing build it once (two concurrent ``useradd`` of one user
        would fail the second); it is taken with no other lock held.
        """
        with self._drivers_mu:
            drv = self._drivers.get(name)
        if drv is not None:
            return drv
        with self._driver_builds.held(name):
            with self._drivers_mu:  # built by the caller we waited for?
                drv = self._drivers.get(name)
            if drv is None:
                if self.seams.vmm_factory is not None:
                    drv = self.seams.vmm_factory(name)
                else:
                    drv = vmmselect.make_driver(self.cfg, self.runner, name, self.host)
                with self._drivers_mu:
                    self._drivers[name] = drv
            return drv

    def cow_for(self, handle: CowHandle) -> CowStrategy:
        """The strategy that made ``handle`` (it may differ from today's ``cow_strategy``)."""
        return strategy_for(handle, self.host, self.dm_prefix)

    @property
    def log_location(self) -> str:
        """Where this daemon's log goes, as an error message names it."""
        return "bangerd's standard error" if self.log_to_stderr else str(self.layout.daemon_log)

    def error_of(self, exc: BaseException, doing: str) -> BangerError:
        """``exc`` as the error to report for ``doing`` (e.g. ``vm.start``).

        banger's own errors pass unchanged; host failures (``OSError``, SQLite,
        subprocess) become ``HostError`` with a hint; anything else is a bug, logged here
        with its traceback and reported as ``InternalError`` naming the log.
        """
        err = from_foreign(exc, doing, self.log_location)
        if isinstance(err, InternalError):
            log.error("%s: bug: %s", doing, err.message, exc_info=exc)
        elif err is not exc:
            log.warning("%s failed: %s", doing, err.message, exc_info=exc)
        return err

    def dial(self, vm_id: str, ip: str, *, held: bool = False) -> Guest:
        """A :class:`Guest` for VM ``vm_id`` at ``ip``: the test seam's, else SSH with
        banger's key over the master of the VM's current boot (:meth:`ssh_control`;
        ``held``: one that lasts as long as the boot, see ``sshopts.HELD_MASTER``)."""
        if self.seams.dial is not None:
            return self.seams.dial(ip)
        return SSHGuest(self.runner, self.layout.key_path, self.layout.known_hosts, ip,
                        control_path=self.ssh_control(vm_id), held=held)

    def ssh_control(self, vm_id: str) -> Path | None:
        """Where the shared OpenSSH master of ``vm_id``'s current boot listens (it need not
        run yet: the next guest command starts it); None when no VMM runs, or the path
        would be too long for a socket.

        The directory (``VMPaths.ssh_dir``, 0700) is made here, never its parents: a VM
        torn down meanwhile has no runtime directory, and gets none back.
        """
        h = self.handles.get(vm_id)
        if h is None or h.process is None:
            return None
        paths = self.layout.vm(vm_id)
        control = paths.ssh_control(boot_key(h.process))
        if control is None:
            return None
        try:
            paths.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        except FileNotFoundError:
            return None
        return control

    def begin_inflight(self, vm_id: str) -> CancelToken:
        """Register and return a new cancel token for a boot of ``vm_id``."""
        token = CancelToken()
        self.register_inflight(vm_id, token)
        return token

    def register_inflight(self, vm_id: str, token: CancelToken) -> None:
        """Record ``token`` so stop/delete can cancel ``vm_id``'s boot."""
        with self._inflight_mu:
            self._inflight[vm_id] = token

    def end_inflight(self, vm_id: str, token: CancelToken) -> None:
        """Forget ``vm_id``'s token, unless another boot has replaced it since."""
        with self._inflight_mu:
            if self._inflight.get(vm_id) is token:
                del self._inflight[vm_id]

    def cancel_inflight(self, vm_id: str, reason: str) -> bool:
        """Cancel ``vm_id``'s in-flight boot with ``reason``; False if none runs."""
        with self._inflight_mu:
            token = self._inflight.get(vm_id)
        if token is None:
            return False
        token.cancel(reason)
        return True

    def wait_inflight_gone(self, vm_id: str, timeout: float) -> bool:
        """Poll until ``vm_id``'s boot has unwound or ``timeout`` passes; True if gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._inflight_mu:
                if vm_id not in self._inflight:
                    return True
            time.sleep(0.05)
        return False

    def checkpoint(self, name: str) -> None:
        """Test hook: pause forever at stage ``name`` when ``BANGER_TEST_PAUSE_AT`` names it.

        The fault-injection tests kill -9 the daemon while it sits here. The marker
        file tells the test the daemon reached the stage.
        """
        wanted = os.environ.get("BANGER_TEST_PAUSE_AT", "")
        if wanted and name in wanted.split(","):
            marker = self.layout.runtime_dir / f"paused-at-{name}"
            marker.write_text(str(os.getpid()))
            log.warning("test hook: paused at %s", name)
            while True:
                time.sleep(3600)

    def status(self) -> dict[str, Any]:
        """Daemon facts for ``daemon.ping``: pid, its user, version, paths, uptime, VM and
        op counts."""
        vms = self.db.list_vms()
        return {
            "pid": os.getpid(), "uid": os.getuid(), "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "socket": str(self.layout.socket), "log": str(self.layout.daemon_log),
            "state_dir": str(self.layout.state_dir),
            "uptime_s": round(time.time() - self.started_at, 1),
            "vms": sum(1 for v in vms if not v.in_pool),
            "vms_running": sum(1 for v in vms if v.state.value == "running"),
            "cow_strategy": self.cow.name if self.cow else None,
            "tap_pool": sorted(self.tap_pool.owned()),
            "operations": sum(len(r.active()) for r in self.op_registries),
            # What `daemon stop` would do now: True undoes the host network changes.
            "idle": self.host_idle(),
            "config": {"path": str(self.config_file) if self.config_file else None,
                       "hash": self.config_hash, "values": self.config_values,
                       "sha256": self.config_sha256},
        }


def new_id() -> str:
    """A VM id: 12 hex characters, short enough for socket paths and dm target names."""
    return secrets.token_hex(6)

