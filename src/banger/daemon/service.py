"""``Bangerd``: opens, serves and closes bangerd.

The composition root's life cycle: :meth:`Bangerd.open` makes the directories,
takes the one-daemon-per-state-dir lock, opens the store, reconciles VMs and
fills the RPC table; :meth:`Bangerd.serve` runs the socket server and the exit
watcher; :meth:`Bangerd.close` releases everything (and, with no VM left, puts
the host network back). It sits above every module that receives the daemon's
state (:class:`banger.daemon.core.Daemon`), so nothing imports back up to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from pathlib import Path

from banger.config import Config
from banger.daemon import caps, reconcile, rpc
from banger.daemon.core import Daemon, Seams, setup_logging
from banger.daemon.dmsnap import choose_strategy
from banger.daemon.network import HostChanges, restore_host
from banger.daemon.server import RPCServer
from banger.daemon.store import Store
from banger.daemon.vmpoolfill import PoolFiller
from banger.errors import BangerError, HostError
from banger.fsutil import atomic_write
from banger.protocol import __version__

log = logging.getLogger("banger.daemon")


class Bangerd(Daemon):
    """bangerd. Public surface: :meth:`open`, :meth:`serve`, :meth:`close`
    (the target shape's ``Daemon.open/serve/close``)."""

    _pool: PoolFiller  # keeps the pool of ready clones full while serving (vmpool)

    @classmethod
    def open(cls, cfg: Config, seams: Seams | None = None, *, log_to_stderr: bool = False,
             network: bool = True, config_file: Path | None = None,
             config_sha256: str | None = None) -> Bangerd:
        """Create directories, open the store, set up the bridge, reconcile VMs.

        ``config_file`` is where ``cfg`` came from and ``config_sha256`` the digest of its
        bytes (both reported by ``daemon.status``).
        """
        d = cls(cfg, seams, log_to_stderr=log_to_stderr, config_file=config_file,
                config_sha256=config_sha256)
        d._pool = PoolFiller(d)
        lay = d.layout
        for directory in (lay.state_dir, lay.vms_dir, lay.images_dir, lay.kernels_dir,
                          lay.ssh_dir, lay.runtime_dir, lay.vms_run_dir, lay.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        os.chmod(lay.runtime_dir, 0o700)
        os.chmod(lay.state_dir, 0o700)
        # Before anything touches the store or the host: a second daemon on the same
        # state would reconcile and sweep away the first one's VMs in flight.
        d._instance_lock = single_instance(lay.state_dir / "bangerd.lock")
        setup_logging(None if log_to_stderr else lay.daemon_log, cfg.log_level)
        log.info("bangerd %s starting (pid %d, state %s)", __version__, os.getpid(),
                 lay.state_dir)
        d.store = Store(lay.db)
        if d.cow is None:
            d.cow = choose_strategy(cfg.cow_strategy, lay.vms_dir, d.host, d.dm_prefix)
        log.info("cow strategy: %s", d.cow.name)
        d.spares.keep = cfg.spare_root_disks if d.cow.name == "copy" else 0
        d.spares.sweep()
        if d.spares.keep == 0:
            d.spares.drop()
        d._network_enabled = network
        d.vm_caps = caps.default_caps(d)
        if d.db.list_vms():
            d.ensure_network()
        reconcile.reconcile(d)
        rpc.register(d)
        return d



    def serve(self) -> None:
        """Serve RPC on the Unix socket until :meth:`shutdown` or a signal."""
        self._write_pid()
        with self._net_mu:
            self._serving = True
            if self._net_ready and self.cfg.dns_enabled:
                self._start_dns()
        self._server = RPCServer(self, self.layout.socket)
        self._watcher = threading.Thread(target=self._watch, name="vm-watcher", daemon=True)
        self._watcher.start()
        self._pool.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.shutdown())
        log.info("serving on %s", self.layout.socket)
        self._server.serve_until(self._stop)



    def close(self) -> None:
        """Stop serving and release DNS, the TAP pool and the store; VMs keep running.

        When no VM is left running (:meth:`host_idle`), the host network is also put
        back as banger found it (:meth:`_restore_host_network`); otherwise the bridge
        and NAT stay for the running VMs. The pid file is removed only if it still
        names this process. A second call does nothing.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._server is not None:
            self._server.close()
        self._pool.stop()  # a stopped daemon keeps no pool
        if self.vm_dns is not None:
            self.vm_dns.close()
        self.forwards.close_all()  # re-opened when the next daemon re-adopts the VMs
        self.sessions.close()  # attachments end; the sessions run on in their guests
        self.tap_pool.drain()
        if self.store is not None:
            self._restore_host_network()
            self.store.close()
        with contextlib.suppress(OSError):
            if self.layout.pid_file.read_text().strip() == str(os.getpid()):
                self.layout.pid_file.unlink()
        log.info("bangerd stopped")
        if self._instance_lock is not None:
            os.close(self._instance_lock)  # releases the flock
            self._instance_lock = None



    def _restore_host_network(self) -> None:
        """At shutdown with no VM left: remove the bridge and the nftables table banger
        made and restore ``ip_forward`` (what ``HostChanges`` recorded, also by earlier
        daemons). Problems are logged; what was not undone stays recorded for next time.
        """
        with self._net_mu:
            if not self._network_enabled:
                return
            try:
                if not self.host_idle():
                    log.info("VMs are still running: keeping the bridge and NAT for them")
                    return
                # Under _net_mu and with networking disabled: a request still being
                # served cannot set the network up again behind this teardown.
                self._network_enabled = False
                self._net_ready = False
                problems = self._delete_own_taps()
                changes = HostChanges.load(self.layout.host_network_state)
                if not changes.empty:
                    problems += restore_host(self.host, changes)
            except BangerError as exc:
                log.warning("host network not restored: %s (%s)", exc.message, exc.hint)
                return
        if problems:
            log.warning("host network partly restored; still recorded in %s: %s",
                        self.layout.host_network_state, "; ".join(problems))
        else:
            log.info("no VM is running: removed this install's TAPs and the bridge and NAT "
                     "rules banger made, and restored ip_forward")

    def _delete_own_taps(self) -> list[str]:
        """Delete every TAP with this install's prefix (no VM holds one when idle): the
        drained pool's, and any a failed release left. Returns the failures."""
        try:
            links = self.host.links()
        except BangerError as exc:  # say, and go on
            return [f"cannot list links: {exc}"]
        problems = []
        for link in links:
            if link.startswith(self.tap_pool.prefix):
                try:
                    self.host.delete_link(link)
                except BangerError as exc:
                    problems.append(exc.message)
        return problems

    def _write_pid(self) -> None:
        atomic_write(self.layout.pid_file, f"{os.getpid()}\n".encode(), 0o644)



    def _watch(self) -> None:
        """Notice VMs whose guest powered off or whose VMM died, every 2 s."""
        while not self._stop.wait(2.0):
            try:
                reconcile.reap_exited(self)
            except Exception:
                log.exception("vm watcher failed")


def single_instance(lock_path: Path) -> int:
    """Hold an exclusive ``flock`` on ``lock_path`` for the process's life; returns its fd.

    Raises:
        HostError: another bangerd holds it (its pid is in the file).
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HostError(f"another bangerd (pid {holder}) is already using {lock_path.parent}",
                        hint="`banger daemon status` shows it; stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
