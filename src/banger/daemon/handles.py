"""The handle cache: per-VM transient kernel/process handles.

VMM process identity, TAP name and the COW disk's teardown identity live in
memory and in ``handles.json`` in the VM's state directory. The file is written
crash-safely *before* the in-memory entry changes, so after a daemon crash the
file is never behind what was actually created. At start-up the cache is
rebuilt from these files and every process is re-verified against ``/proc``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from banger.daemon.dmsnap import CowHandle
from banger.fsutil import atomic_write
from banger.layout import Layout
from banger.proc import ProcessIdentity

log = logging.getLogger("banger.handles")


@dataclass(frozen=True)
class VMHandles:
    vmm: str  # driver name: "qemu" or "firecracker"
    process: ProcessIdentity | None = None
    tap: str | None = None
    cow: CowHandle | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The handles as the JSON object stored in ``handles.json``."""
        return {
            "vmm": self.vmm,
            "process": self.process.to_json() if self.process else None,
            "tap": self.tap,
            "cow": self.cow.to_json() if self.cow else None,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMHandles:
        """Rebuild handles from :meth:`to_json` output (``handles.json``)."""
        return cls(
            vmm=str(data["vmm"]),
            process=ProcessIdentity.from_json(data["process"]) if data.get("process") else None,
            tap=data.get("tap"),
            cow=CowHandle.from_json(data["cow"]) if data.get("cow") else None,
            extra=dict(data.get("extra") or {}),
        )

    def teardown_identity(self) -> dict[str, Any]:
        """What is mirrored onto the VM's runtime record (no pid: that is not teardown)."""
        return {"vmm": self.vmm, "tap": self.tap,
                "cow": self.cow.to_json() if self.cow else None,
                "process": self.process.to_json() if self.process else None}

    def with_(self, **changes: Any) -> VMHandles:
        """A copy with ``changes`` applied (the dataclass is frozen)."""
        return replace(self, **changes)


class HandleCache:
    """In-memory map VM id -> :class:`VMHandles`, backed by ``handles.json`` files."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # Guards _cache; file writes happen before taking it, never under it.
        self._mu = threading.Lock()
        self._cache: dict[str, VMHandles] = {}

    def get(self, vm_id: str) -> VMHandles | None:
        """The cached handles of ``vm_id``; None when not cached (no file read)."""
        with self._mu:
            return self._cache.get(vm_id)

    def put(self, vm_id: str, handles: VMHandles) -> None:
        """Write ``handles.json`` crash-safely, then cache ``handles`` for ``vm_id``."""
        path = self.layout.vm(vm_id).handles
        atomic_write(path, json.dumps(handles.to_json(), indent=1).encode())
        with self._mu:
            self._cache[vm_id] = handles

    def drop(self, vm_id: str) -> None:
        """Delete ``vm_id``'s ``handles.json`` and forget its cached entry."""
        self.layout.vm(vm_id).handles.unlink(missing_ok=True)
        with self._mu:
            self._cache.pop(vm_id, None)

    def load(self, vm_id: str) -> VMHandles | None:
        """Read ``handles.json`` (start-up); None when missing or unreadable."""
        path = self.layout.vm(vm_id).handles
        try:
            data = json.loads(path.read_text())
            handles = VMHandles.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("handles: %s is unreadable (%s); using the runtime record", path, exc)
            return None
        with self._mu:
            self._cache[vm_id] = handles
        return handles

    def all(self) -> dict[str, VMHandles]:
        """A snapshot copy of every cached entry, keyed by VM id."""
        with self._mu:
            return dict(self._cache)
