"""The SQLite store: images, kernels, VMs, sessions and snapshots.

Versioned migrations recorded in ``schema_migrations``, each applied in its own
transaction; WAL journal and a busy timeout. A VM row keeps the spec (what was
asked, JSON) apart from its state and ``runtime`` record (JSON: last error,
stop reason, and the mirrored teardown identity used when ``handles.json`` is
gone). All access goes through one connection guarded by ``_mu``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from banger.api import VMSpec, VMState
from banger.daemon.vmruntime import VMRuntime
from banger.errors import AlreadyExists, BadRequest, HostError, InvalidState, NotFound

BUSY_TIMEOUT_MS = 5000  # another process (a CLI debugging session) may briefly hold the db

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "images and vms",
        """
        CREATE TABLE images (
            name        TEXT PRIMARY KEY,
            source      TEXT NOT NULL,
            rootfs      TEXT NOT NULL,
            kernel      TEXT NOT NULL,
            initrd      TEXT,
            workseed    TEXT,
            size_bytes  INTEGER NOT NULL,
            recipe_hash TEXT,
            created_at  TEXT NOT NULL
        );
        CREATE TABLE vms (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            image       TEXT NOT NULL,
            spec        TEXT NOT NULL,
            vmm         TEXT NOT NULL,
            state       TEXT NOT NULL,
            ip          TEXT NOT NULL UNIQUE,
            mac         TEXT NOT NULL UNIQUE,
            runtime     TEXT NOT NULL DEFAULT '{}',
            created_at  TEXT NOT NULL,
            updated_at  TEXT NOT NULL
        );
        CREATE INDEX vms_image ON vms(image);
        """,
    ),
    (
        2,
        "vm workspaces",
        """
        ALTER TABLE vms ADD COLUMN workspace TEXT;
        """,
    ),
    (
        3,
        "kernels",
        """
        CREATE TABLE kernels (
            name        TEXT PRIMARY KEY,
            vmlinux     TEXT,
            bzimage     TEXT,
            initrd      TEXT,
            vmms        TEXT NOT NULL,
            version     TEXT,
            source      TEXT NOT NULL,
            size_bytes  INTEGER NOT NULL,
            created_at  TEXT NOT NULL
        );
        ALTER TABLE images ADD COLUMN kernel_name TEXT;
        """,
    ),
    (
        4,
        "pulled images",
        """
        ALTER TABLE images ADD COLUMN origin TEXT;
        ALTER TABLE images ADD COLUMN blobs TEXT NOT NULL DEFAULT '[]';
        """,
    ),
    (
        5,
        "guest sessions",
        """
        CREATE TABLE sessions (
            vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
            name        TEXT NOT NULL,
            argv        TEXT NOT NULL,
            cwd         TEXT NOT NULL,
            env_keys    TEXT NOT NULL DEFAULT '[]',
            tty         INTEGER NOT NULL,
            state       TEXT NOT NULL,
            pid         INTEGER,
            exit_code   INTEGER,
            end_reason  TEXT,
            started_at  TEXT NOT NULL,
            ended_at    TEXT,
            PRIMARY KEY (vm_id, name)
        );
        """,
    ),
    (
        6,
        "snapshots",
        """
        CREATE TABLE snapshots (
            id          TEXT PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            image       TEXT NOT NULL,
            source_vm   TEXT NOT NULL,
            vmm         TEXT NOT NULL,
            spec        TEXT NOT NULL,
            vmm_version TEXT NOT NULL,
            size_bytes  INTEGER NOT NULL,
            created_at  TEXT NOT NULL
        );
        """,
    ),
    (
        7,
        "boot snapshots",
        """
        ALTER TABLE snapshots ADD COLUMN boot_key TEXT;
        """,
    ),
    (
        8,
        "snapshots with the guest agent",
        """
        ALTER TABLE snapshots ADD COLUMN agent TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        9,
        "pulled kernels' origin",
        """
        ALTER TABLE kernels ADD COLUMN origin TEXT;
        """,
    ),
]


def now() -> datetime:
    """The current time, timezone-aware UTC (every stored timestamp uses it)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class ImageRecord:
    name: str
    source: str
    rootfs: str
    kernel: str
    initrd: str | None
    workseed: str | None
    size_bytes: int
    recipe_hash: str | None
    created_at: datetime
    # A kernel from the kernel registry that overrides the image's own kernel/initrd.
    kernel_name: str | None = None
    # Where a pulled image came from: "REFERENCE@MANIFEST-DIGEST".
    origin: str | None = None
    # The cached OCI blobs it was made from (`image cache prune` keeps them).
    blobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelRecord:
    name: str
    vmlinux: str | None  # ELF, for Firecracker (and QEMU when it has a PVH entry)
    bzimage: str | None  # for QEMU
    initrd: str | None
    vmms: tuple[str, ...]
    version: str | None
    source: str
    size_bytes: int
    created_at: datetime
    # Where a pulled kernel's bundle was read: "URL-OR-PATH#sha256:DIGEST".
    origin: str | None = None


@dataclass(frozen=True)
class VMRecord:
    id: str
    name: str
    image: str
    spec: VMSpec
    vmm: str
    state: VMState
    ip: str
    mac: str
    runtime: VMRuntime = field(default_factory=VMRuntime)
    created_at: datetime = field(default_factory=now)
    updated_at: datetime = field(default_factory=now)
    # The last workspace prepared into the VM (host path, guest path, base commit, ...).
    workspace: dict[str, Any] | None = None

    @property
    def in_pool(self) -> bool:
        """A clone being made for the pool, or kept in it (``vmpool``): no user's VM yet."""
        return self.runtime.pool


@dataclass(frozen=True)
class SessionRecord:
    """A guest session as the daemon last saw it (the guest's own files are the truth
    while its VM runs; this row is what is known once it stops)."""

    vm_id: str
    name: str
    argv: tuple[str, ...]
    cwd: str
    tty: bool
    state: str  # "starting", "running" or "ended"
    started_at: datetime = field(default_factory=now)
    env_keys: tuple[str, ...] = ()  # the values are never stored
    pid: int | None = None
    exit_code: int | None = None
    end_reason: str | None = None
    ended_at: datetime | None = None


@dataclass(frozen=True)
class SnapshotRecord:
    """A running guest's memory, device state and disks at one instant
    (``banger.daemon.snapshots``); its files are ``Layout.snapshot(id)``."""

    id: str
    name: str
    image: str  # the source VM's image: its clones are VMs of that image
    source_vm: str  # the source VM's name when the snapshot was taken
    vmm: str
    spec: VMSpec  # the source's: a clone has its size (the saved machine's)
    vmm_version: str  # a restore needs the VMM that saved it
    size_bytes: int
    created_at: datetime = field(default_factory=now)
    # A boot snapshot's key (banger.daemon.bootsnap): what it was booted from; None for a
    # snapshot taken with `vm snapshot`.
    boot_key: str | None = None
    # The guest agent's port (banger.agent): "" none (a clone is restored without it),
    # "port" (with it; nothing answered on it), "ready" (the agent answered: clones are
    # found ready through it).
    agent: str = ""


class Store:
    """Typed access to banger.db."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Guards the single connection; a leaf lock, never held across I/O other than SQLite.
        self._mu = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise HostError(f"cannot open the store {path}: {exc}") from exc
        self.migrate()

    def close(self) -> None:
        """Close the SQLite connection; the store is unusable afterwards."""
        with self._mu:
            self._db.close()

    # ------------------------------------------------------------ migrations

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        applied: list[int] = []
        with self._mu:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = {r[0] for r in self._db.execute("SELECT version FROM schema_migrations")}
            newest = max((v for v, _, _ in MIGRATIONS), default=0)
            if done and max(done) > newest:
                raise HostError(
                    f"{self.path} has schema version {max(done)}, newer than this banger "
                    f"({newest})",
                    hint="upgrade banger, or point state_dir elsewhere",
                )
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    for stmt in _statements(sql):
                        self._db.execute(stmt)
                    self._db.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        (version, name, now().isoformat()),
                    )
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._db.execute("ROLLBACK")
                    raise HostError(f"store migration {version} ({name}) failed: {exc}") from exc
                applied.append(version)
        return applied

    def schema_version(self) -> int:
        """The newest applied migration version (0 on an empty database)."""
        with self._mu:
            row = self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._mu:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full, I/O error): SQLite leaves the
                # transaction open then, and the next BEGIN would fail.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._mu:
            return list(self._db.execute(sql, args))

    # ------------------------------------------------------------ images

    def add_image(self, img: ImageRecord) -> None:
        """Insert ``img``.

        Raises:
            AlreadyExists: an image with that name is already registered.
            NotFound: its ``kernel_name`` is not a registered kernel.
        """
        try:
            with self._tx() as db:
                if img.kernel_name is not None:
                    _require_kernel(db, img.kernel_name)  # a `kernel rm` may have won the race
                db.execute(
                    "INSERT INTO images (name, source, rootfs, kernel, initrd, workseed,"
                    " size_bytes, recipe_hash, created_at, kernel_name, origin, blobs)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (img.name, img.source, img.rootfs, img.kernel, img.initrd, img.workseed,
                     img.size_bytes, img.recipe_hash, img.created_at.isoformat(),
                     img.kernel_name, img.origin, json.dumps(list(img.blobs))),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(
                f"image {img.name!r} already exists",
                hint=f"delete it first with `banger image delete {img.name}`",
            ) from exc

    def get_image(self, name: str) -> ImageRecord:
        """The image called ``name``.

        Raises:
            NotFound: there is none.
        """
        rows = self._query("SELECT * FROM images WHERE name = ?", (name,))
        if not rows:
            raise NotFound(f"no image named {name!r}", hint="see `banger image list`")
        return _image(rows[0])

    def find_image(self, name: str) -> ImageRecord | None:
        """The image called ``name``, or None."""
        rows = self._query("SELECT * FROM images WHERE name = ?", (name,))
        return _image(rows[0]) if rows else None

    def list_images(self) -> list[ImageRecord]:
        """Every registered image, sorted by name."""
        return [_image(r) for r in self._query("SELECT * FROM images ORDER BY name")]

    def set_image_kernel(self, name: str, kernel_name: str | None) -> ImageRecord:
        """Point image ``name`` at registry kernel ``kernel_name`` (None: its own).

        Returns:
            The updated image.

        Raises:
            NotFound: the image or the kernel does not exist.
            BadRequest: ``kernel_name`` is None and the image bundles no kernel.
        """
        with self._tx() as db:
            if kernel_name is not None:
                _require_kernel(db, kernel_name)
            else:
                row = db.execute("SELECT kernel FROM images WHERE name = ?", (name,)).fetchone()
                if row is not None and not row[0]:
                    raise BadRequest(f"image {name!r} has no kernel of its own to go back to",
                                     hint="name a registry kernel (see `banger kernel list`)")
            if db.execute("UPDATE images SET kernel_name = ? WHERE name = ?",
                          (kernel_name, name)).rowcount == 0:
                raise NotFound(f"no image named {name!r}", hint="see `banger image list`")
        return self.get_image(name)

    # ------------------------------------------------------------ kernels

    def add_kernel(self, k: KernelRecord) -> None:
        """Insert ``k``.

        Raises:
            AlreadyExists: a kernel with that name is already registered.
        """
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (k.name, k.vmlinux, k.bzimage, k.initrd, json.dumps(list(k.vmms)),
                     k.version, k.source, k.size_bytes, k.created_at.isoformat(), k.origin),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"kernel {k.name!r} already exists",
                                hint=f"remove it first with `banger kernel rm {k.name}`") from exc

    def find_kernel(self, name: str) -> KernelRecord | None:
        """The kernel called ``name``, or None."""
        rows = self._query("SELECT * FROM kernels WHERE name = ?", (name,))
        return _kernel(rows[0]) if rows else None

    def get_kernel(self, name: str) -> KernelRecord:
        """The kernel called ``name``.

        Raises:
            NotFound: there is none.
        """
        k = self.find_kernel(name)
        if k is None:
            raise NotFound(f"no kernel named {name!r}", hint="see `banger kernel list`")
        return k

    def list_kernels(self) -> list[KernelRecord]:
        """Every registered kernel, sorted by name."""
        return [_kernel(r) for r in self._query("SELECT * FROM kernels ORDER BY name")]

    def delete_kernel(self, name: str) -> None:
        """Delete the kernel row ``name`` (its files are the caller's job).

        Raises:
            InvalidState: an image still uses the kernel.
            NotFound: there is no such kernel.
        """
        with self._tx() as db:
            users = [r[0] for r in db.execute("SELECT name FROM images WHERE kernel_name = ?",
                                              (name,))]
            if users:
                raise InvalidState(
                    f"kernel {name!r} is used by image(s): {', '.join(sorted(users))}",
                    hint="point them elsewhere with `banger image set-kernel` or delete them")
            if db.execute("DELETE FROM kernels WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no kernel named {name!r}", hint="see `banger kernel list`")

    def delete_image(self, name: str) -> None:
        """Delete the image row ``name`` (its files are the caller's job).

        Raises:
            InvalidState: a VM still uses the image.
            NotFound: there is no such image.
        """
        with self._tx() as db:
            users = [r[0] for r in db.execute("SELECT name FROM vms WHERE image = ?", (name,))]
            if users:
                raise InvalidState(
                    f"image {name!r} is used by VM(s): {', '.join(sorted(users))}",
                    hint="delete those VMs first",
                )
            snaps = [r[0] for r in db.execute(
                "SELECT name FROM snapshots WHERE image = ? AND boot_key IS NULL", (name,))]
            if snaps:
                raise InvalidState(
                    f"image {name!r} is used by snapshot(s): {', '.join(sorted(snaps))}",
                    hint="remove them first with `banger snapshot rm`",
                )
            # Its boot snapshots go with it (their files: the caller, or the next sweep).
            db.execute("DELETE FROM snapshots WHERE image = ? AND boot_key IS NOT NULL",
                       (name,))
            if db.execute("DELETE FROM images WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no image named {name!r}", hint="see `banger image list`")

    # ------------------------------------------------------------ vms

    def add_vm(self, vm: VMRecord) -> None:
        """Insert ``vm`` (its workspace column starts empty).

        Raises:
            AlreadyExists: the name, IP or MAC is taken (reported as a name clash).
        """
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO vms (id, name, image, spec, vmm, state, ip, mac, runtime,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (vm.id, vm.name, vm.image, vm.spec.model_dump_json(), vm.vmm, vm.state.value,
                     vm.ip, vm.mac, vm.runtime.to_json(), vm.created_at.isoformat(),
                     vm.updated_at.isoformat()),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(
                f"a VM named {vm.name!r} already exists",
                hint="pick another --name, or delete it with `banger vm delete`",
            ) from exc

    def get_vm(self, vm_id: str) -> VMRecord:
        """The VM with id ``vm_id``.

        Raises:
            NotFound: there is none.
        """
        rows = self._query("SELECT * FROM vms WHERE id = ?", (vm_id,))
        if not rows:
            raise NotFound(f"no VM with id {vm_id!r}", hint="see `banger vm list`")
        return _vm(rows[0])

    def find_vm(self, ref: str) -> VMRecord | None:
        """A VM by name, else by id, else None."""
        rows = self._query("SELECT * FROM vms WHERE name = ? OR id = ? ORDER BY name = ? DESC",
                           (ref, ref, ref))
        return _vm(rows[0]) if rows else None

    def list_vms(self) -> list[VMRecord]:
        """Every VM, oldest first (ties by name)."""
        return [_vm(r) for r in self._query("SELECT * FROM vms ORDER BY created_at, name")]

    def used_ips(self) -> set[str]:
        """Guest IPs held by existing VMs, for address allocation."""
        return {r[0] for r in self._query("SELECT ip FROM vms")}

    def used_names(self) -> set[str]:
        """Names of existing VMs, for generating a free name."""
        return {r[0] for r in self._query("SELECT name FROM vms")}

    def update_vm(self, vm: VMRecord, **changes: Any) -> VMRecord:
        """Persist ``changes`` (state, runtime, ...) and return the updated record."""
        new = replace(vm, updated_at=now(), **changes)
        with self._tx() as db:
            # The workspace column is deliberately not written here: it has its own
            # writer (set_workspace), so a lifecycle update holding an older copy of the
            # row can never undo a workspace change made meanwhile.
            cur = db.execute(
                "UPDATE vms SET state = ?, runtime = ?, vmm = ?, updated_at = ? WHERE id = ?",
                (new.state.value, new.runtime.to_json(), new.vmm, new.updated_at.isoformat(),
                 vm.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm.name!r} no longer exists")
        return new

    def adopt_pooled(self, vm: VMRecord, name: str, spec: VMSpec,
                     runtime: VMRuntime) -> VMRecord | None:
        """Make pooled ``vm`` a user's VM being created: its name, spec and runtime
        replaced, its creation time now, in one update that succeeds only while it is
        still pooled. None when it no longer is (removed or taken meanwhile).

        Raises:
            AlreadyExists: ``name`` is taken.
        """
        new = replace(vm, name=name, spec=spec, runtime=runtime, state=VMState.CREATING,
                      created_at=now(), updated_at=now())
        try:
            with self._tx() as db:
                cur = db.execute(
                    "UPDATE vms SET name = ?, spec = ?, runtime = ?, state = ?, created_at = ?,"
                    " updated_at = ? WHERE id = ? AND state = ?",
                    (name, spec.model_dump_json(), runtime.to_json(), new.state.value,
                     new.created_at.isoformat(), new.updated_at.isoformat(), vm.id,
                     VMState.POOLED.value))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"a VM named {name!r} already exists",
                                hint="pick another --name, or delete it with `banger vm delete`"
                                ) from exc
        return new if cur.rowcount == 1 else None

    def set_vm_spec(self, vm: VMRecord, spec: VMSpec) -> VMRecord:
        """Persist a user's change to ``vm``'s spec (``vm set-egress``)."""
        new = replace(vm, spec=spec, updated_at=now())
        with self._tx() as db:
            cur = db.execute("UPDATE vms SET spec = ?, updated_at = ? WHERE id = ?",
                             (spec.model_dump_json(), new.updated_at.isoformat(), vm.id))
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm.name!r} no longer exists")
        return new

    def set_workspace(self, vm_id: str, workspace: dict[str, Any] | None) -> None:
        """Replace a VM's workspace record (JSON) and nothing else.

        Raises:
            NotFound: the VM no longer exists.
        """
        with self._tx() as db:
            cur = db.execute("UPDATE vms SET workspace = ?, updated_at = ? WHERE id = ?",
                             (json.dumps(workspace) if workspace is not None else None,
                              now().isoformat(), vm_id))
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm_id!r} no longer exists")

    def delete_vm(self, vm_id: str) -> None:
        """Delete the VM row ``vm_id``; a missing row is not an error."""
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))


    # ------------------------------------------------------------ sessions

    def add_session(self, rec: SessionRecord) -> None:
        """Insert ``rec``.

        Raises:
            AlreadyExists: the VM already has a session of that name.
            NotFound: the VM is gone.
        """
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO sessions (vm_id, name, argv, cwd, env_keys, tty, state, pid,"
                    " exit_code, end_reason, started_at, ended_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.vm_id, rec.name, json.dumps(list(rec.argv)), rec.cwd,
                     json.dumps(list(rec.env_keys)), int(rec.tty), rec.state, rec.pid,
                     rec.exit_code, rec.end_reason, rec.started_at.isoformat(),
                     rec.ended_at.isoformat() if rec.ended_at else None),
                )
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise NotFound("the VM no longer exists") from exc
            raise AlreadyExists(
                f"a session named {rec.name!r} already exists",
                hint="pick another --name, or remove the ended one with "
                     "`banger vm session rm VM/NAME`") from exc

    def find_session(self, vm_id: str, name: str) -> SessionRecord | None:
        """VM ``vm_id``'s session ``name``, or None."""
        rows = self._query("SELECT * FROM sessions WHERE vm_id = ? AND name = ?", (vm_id, name))
        return _session(rows[0]) if rows else None

    def list_sessions(self, vm_id: str | None = None) -> list[SessionRecord]:
        """Sessions of one VM (or all), oldest first."""
        if vm_id is None:
            rows = self._query("SELECT * FROM sessions ORDER BY started_at, name")
        else:
            rows = self._query("SELECT * FROM sessions WHERE vm_id = ? ORDER BY started_at,"
                               " name", (vm_id,))
        return [_session(r) for r in rows]

    def update_session(self, rec: SessionRecord, **changes: Any) -> SessionRecord:
        """Persist ``changes`` to the session's state fields; returns the new record.

        Raises:
            NotFound: the session (or its VM) was removed meanwhile.
        """
        new = replace(rec, **changes)
        with self._tx() as db:
            cur = db.execute(
                "UPDATE sessions SET state = ?, pid = ?, exit_code = ?, end_reason = ?,"
                " started_at = ?, ended_at = ? WHERE vm_id = ? AND name = ?",
                (new.state, new.pid, new.exit_code, new.end_reason, new.started_at.isoformat(),
                 new.ended_at.isoformat() if new.ended_at else None, rec.vm_id, rec.name))
            if cur.rowcount == 0:
                raise NotFound(f"session {rec.name!r} no longer exists")
        return new

    def delete_session(self, vm_id: str, name: str) -> None:
        """Delete a session row; a missing one is not an error."""
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE vm_id = ? AND name = ?", (vm_id, name))


    # ------------------------------------------------------------ snapshots

    def add_snapshot(self, snap: SnapshotRecord) -> None:
        """Insert ``snap``.

        Raises:
            AlreadyExists: a snapshot of that name exists.
        """
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO snapshots (id, name, image, source_vm, vmm, spec, vmm_version,"
                    " size_bytes, created_at, boot_key, agent)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (snap.id, snap.name, snap.image, snap.source_vm, snap.vmm,
                     snap.spec.model_dump_json(), snap.vmm_version, snap.size_bytes,
                     snap.created_at.isoformat(), snap.boot_key, snap.agent))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"a snapshot named {snap.name!r} already exists",
                                hint="pick another name, or remove it with "
                                     f"`banger snapshot rm {snap.name}`") from exc

    def find_snapshot(self, ref: str) -> SnapshotRecord | None:
        """The snapshot named (or with id) ``ref``, or None."""
        rows = self._query("SELECT * FROM snapshots WHERE name = ? OR id = ?", (ref, ref))
        return _snapshot(rows[0]) if rows else None

    def get_snapshot(self, ref: str) -> SnapshotRecord:
        """The snapshot named (or with id) ``ref``.

        Raises:
            NotFound: there is none.
        """
        snap = self.find_snapshot(ref)
        if snap is None:
            raise NotFound(f"no snapshot named {ref!r}", hint="see `banger snapshot list`")
        return snap

    def list_snapshots(self) -> list[SnapshotRecord]:
        """Every snapshot, oldest first."""
        return [_snapshot(r) for r in self._query(
            "SELECT * FROM snapshots ORDER BY created_at, name")]

    def delete_snapshot(self, snap_id: str) -> None:
        """Delete the snapshot row ``snap_id``; a missing row is not an error."""
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap_id,))


def _statements(sql: str) -> Iterator[str]:
    for stmt in sql.split(";"):
        if stmt.strip():
            yield stmt


def _image(r: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        name=r["name"], source=r["source"], rootfs=r["rootfs"], kernel=r["kernel"],
        initrd=r["initrd"], workseed=r["workseed"], size_bytes=r["size_bytes"],
        recipe_hash=r["recipe_hash"], created_at=datetime.fromisoformat(r["created_at"]),
        kernel_name=r["kernel_name"], origin=r["origin"], blobs=tuple(json.loads(r["blobs"])),
    )


def _kernel(r: sqlite3.Row) -> KernelRecord:
    return KernelRecord(
        name=r["name"], vmlinux=r["vmlinux"], bzimage=r["bzimage"], initrd=r["initrd"],
        vmms=tuple(json.loads(r["vmms"])), version=r["version"], source=r["source"],
        size_bytes=r["size_bytes"], created_at=datetime.fromisoformat(r["created_at"]),
        origin=r["origin"],
    )


def _vm(r: sqlite3.Row) -> VMRecord:
    return VMRecord(
        id=r["id"], name=r["name"], image=r["image"],
        spec=VMSpec.model_validate_json(r["spec"]), vmm=r["vmm"], state=VMState(r["state"]),
        ip=r["ip"], mac=r["mac"], runtime=VMRuntime.from_row(r["runtime"]),
        created_at=datetime.fromisoformat(r["created_at"]),
        updated_at=datetime.fromisoformat(r["updated_at"]),
        workspace=json.loads(r["workspace"]) if r["workspace"] else None,
    )


def _require_kernel(db: sqlite3.Connection, name: str) -> None:
    """Inside a transaction: refuse a reference to a kernel that is not registered."""
    if not db.execute("SELECT 1 FROM kernels WHERE name = ?", (name,)).fetchone():
        raise NotFound(f"no kernel named {name!r}", hint="see `banger kernel list`")


def _snapshot(r: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        id=r["id"], name=r["name"], image=r["image"], source_vm=r["source_vm"], vmm=r["vmm"],
        spec=VMSpec.model_validate_json(r["spec"]), vmm_version=r["vmm_version"],
        size_bytes=r["size_bytes"], created_at=datetime.fromisoformat(r["created_at"]),
        boot_key=r["boot_key"], agent=r["agent"])


def _session(r: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        vm_id=r["vm_id"], name=r["name"], argv=tuple(json.loads(r["argv"])), cwd=r["cwd"],
        tty=bool(r["tty"]), state=r["state"], started_at=datetime.fromisoformat(r["started_at"]),
        env_keys=tuple(json.loads(r["env_keys"])), pid=r["pid"], exit_code=r["exit_code"],
        end_reason=r["end_reason"],
        ended_at=datetime.fromisoformat(r["ended_at"]) if r["ended_at"] else None,
    )
