"""What the daemon knows about a VM beyond its spec and state: the ``runtime`` record.

One typed model, stored as JSON in the VM's row (``store.VMRecord.runtime``) and
changed only through :meth:`VMRuntime.merged` (``vms.transition``/``update_runtime``
pass their keyword arguments to it): a misspelt field is an error, not a key nobody
reads. A None passed for a field clears it. Rows written by another banger version
may hold fields this one does not know: they are dropped when read (:meth:`from_row`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from banger.api import VMState

log = logging.getLogger("banger.vms")


class VMRuntime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Why the VM last failed or stopped, as `vm show` says it.
    last_error: str | None = None
    stop_reason: str | None = None
    # When the guest's current boot began (epoch seconds; kept across suspend/resume).
    booted_at: float | None = None
    # How the running VMM is confined (user, seccomp, cgroup and limits).
    confinement: dict[str, Any] | None = None
    # What tearing the VM down needs (TAP, COW handle, ...: handles.Handles'
    # teardown_identity), mirrored from handles.json while the VM holds them.
    teardown: dict[str, Any] | None = None
    # The root disk's copy-on-write handle (dmsnap.CowHandle.to_json).
    cow: dict[str, Any] | None = None
    # Port forwards added while it runs (`vm forward`; forwarder.ForwardSpec.to_json).
    forwards: list[dict[str, Any]] | None = None
    # A suspended guest's saved state (savedstate.record).
    suspended: dict[str, Any] | None = None
    # The VMM gave the guest banger's identity channel (a clone can be re-identified).
    ident_channel: bool | None = None
    # The VMM gave the guest the agent's port (banger.agent), and whether the guest's
    # agent answered on it (the CLI then runs commands through it: vms.ssh_info).
    agent_channel: bool | None = None
    agent: bool | None = None
    # The snapshot a clone was restored from; taken ready-made from the pool.
    from_snapshot: str | None = None
    from_pool: bool = False
    # A clone being made for the pool, or kept in it (vmpool): no user's VM yet.
    pool: bool = False
    # The guest's vCPUs are stopped (`vm pause`), to be restored so after a restart.
    paused: bool | None = None
    # The state a suspend or snapshot started from, to return to when it fails.
    suspend_from: VMState | None = None
    snapshot_from: VMState | None = None

    def merged(self, **changes: Any) -> VMRuntime:
        """This record with ``changes`` applied (None clears a field).

        Raises:
            pydantic.ValidationError: a field that does not exist, or a value of the
                wrong type (a bug in the caller).
        """
        fields = self.model_dump(exclude_defaults=True)
        for key, value in changes.items():
            if value is None:
                fields.pop(key, None)
                if key not in VMRuntime.model_fields:
                    fields[key] = None  # refused below: no such field
            else:
                fields[key] = value
        return VMRuntime.model_validate(fields)

    def to_json(self) -> str:
        """The row's JSON: only fields that differ from their defaults."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True))

    @classmethod
    def from_row(cls, text: str) -> VMRuntime:
        """The record in a row's JSON; fields this version does not know are dropped."""
        data = json.loads(text) if text else {}
        if not isinstance(data, dict):
            return cls()
        unknown = sorted(k for k in data if k not in cls.model_fields)
        if unknown:
            log.debug("runtime record: dropping fields this banger does not use: %s",
                      ", ".join(unknown))
        known = {k: v for k, v in data.items() if k in cls.model_fields}
        try:
            return cls.model_validate(known)
        except ValidationError as exc:
            bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
            log.warning("runtime record: dropping fields of an unexpected shape: %s",
                        ", ".join(sorted(bad)))
            return cls.model_validate({k: v for k, v in known.items() if k not in bad})
