"""Bookkeeping for asynchronous daemon operations (VM creates, image builds, ...).

An :class:`Operation` has an id, a kind, a target, an ordered list of stages,
a free-text progress line, and ends with a result or an error. The
:class:`Registry` owns its own lock (a leaf in the daemon's lock order) and
forgets finished operations after :data:`KEEP_FINISHED_S` so clients that poll
late still see the outcome.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from banger.errors import BangerError, Cancelled, InternalError, NotFound, from_foreign
from banger.runner import CancelToken

log = logging.getLogger("banger.opstate")

KEEP_FINISHED_S = 600.0  # how long a finished op stays visible to `status` polls


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Operation:
    """One in-flight or recently finished operation."""

    kind: str
    target: str
    stages: list[str]
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    stage: str = "queued"
    progress: str = ""
    done: bool = False
    error: BangerError | None = None
    result: Any = None
    cancel: CancelToken = field(default_factory=CancelToken)
    # False while the op does something that must run to its end once begun (a VM's
    # poweroff and teardown): a cancel request is then refused, not half-honoured.
    cancellable: bool = True
    started_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    finished_mono: float | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def enter(self, stage: str, progress: str = "") -> None:
        """Move to ``stage``; raises :class:`Cancelled` if the op was cancelled."""
        self.cancel.check()
        with self._changed:
            self.stage = stage
            self.progress = progress
            self.updated_at = _now()
            self._changed.notify_all()

    def report(self, progress: str) -> None:
        """Replace the progress text within the current stage and wake pollers."""
        with self._changed:
            self.progress = progress
            self.updated_at = _now()
            self._changed.notify_all()

    def request_cancel(self, reason: str) -> bool:
        """Cancel the op if it is :attr:`cancellable` now; True when it was.

        A refusal is reported in the op's progress so a client that asked sees why
        the op goes on.
        """
        if not self.cancellable:
            self.report(f"cannot be cancelled during {self.stage}; it goes on")
            return False
        self.cancel.cancel(reason)
        return True

    def finish(self, result: Any = None, error: BangerError | None = None) -> None:
        """Mark the op done with ``result`` or ``error`` and wake every waiter.

        The final stage is ``done``, ``failed``, or ``cancelled`` for a :class:`Cancelled` error.
        """
        with self._changed:
            self.result = result
            self.error = error
            self.done = True
            self.stage = "failed" if error else "done"
            if isinstance(error, Cancelled):
                self.stage = "cancelled"
            self.updated_at = _now()
            self.finished_mono = time.monotonic()
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (or ``timeout``); True when done."""
        with self._changed:
            return self._changed.wait_for(lambda: self.done, timeout)

    def wait_change(self, since: datetime, timeout: float) -> None:
        """Block until the op changes after ``since`` or ``timeout`` passes (long polling)."""
        with self._changed:
            self._changed.wait_for(lambda: self.updated_at > since or self.done, timeout)

    def view(self) -> dict[str, Any]:
        """The op as a plain dict for ``vms.op_view`` (error flattened to message + data)."""
        err = None
        if self.error is not None:
            err = {"message": self.error.message, **self.error.to_data()}
        return {
            "id": self.id, "kind": self.kind, "target": self.target, "stage": self.stage,
            "stages": list(self.stages), "progress": self.progress, "done": self.done,
            "error": err, "result": self.result, "started_at": self.started_at,
            "updated_at": self.updated_at,
        }


REPORT_EVERY_S = 0.25  # byte progress (downloads, copies) is reported at most this often


def mib(n: int) -> str:
    """``n`` bytes in MiB, one decimal (progress lines)."""
    return f"{n / (1 << 20):.1f}"


class ByteReport:
    """``what: X of Y MiB`` progress of ``op``, at most every :data:`REPORT_EVERY_S`
    (the last report, ``done == total``, always goes out)."""

    def __init__(self, op: Operation, total: int | None = None) -> None:
        self.op, self.total, self._last = op, total, 0.0

    def __call__(self, done: int, what: str, total: int | None = None) -> None:
        """Report ``done`` bytes of ``total`` (default: the one given at creation)."""
        total = self.total if total is None else total
        now = time.monotonic()
        if now - self._last < REPORT_EVERY_S and done != total:
            return
        self._last = now
        of = f" of {mib(total)}" if total else ""
        self.op.report(f"{what}: {mib(done)}{of} MiB")


T = TypeVar("T", bound=Operation)


class Registry(Generic[T]):
    """Thread-safe registry of operations of one family."""

    def __init__(self, log_location: str | None = None) -> None:
        # Where a crashed operation's traceback is logged, named in its InternalError.
        self.log_location = log_location
        # Guards _ops only; never held while an operation runs (leaf lock).
        self._mu = threading.Lock()
        self._ops: dict[str, T] = {}

    def add(self, op: T) -> T:
        """Register ``op`` (dropping long-finished ops first) and return it."""
        with self._mu:
            self._gc()
            self._ops[op.id] = op
        return op

    def get(self, op_id: str) -> T:
        """The op with id ``op_id``.

        Raises:
            NotFound: unknown id, or finished more than ``KEEP_FINISHED_S`` ago.
        """
        with self._mu:
            op = self._ops.get(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r}", hint="it may have finished long ago")
        return op

    def all(self) -> list[T]:
        """Every op still kept, oldest first; finished ones expire after ``KEEP_FINISHED_S``."""
        with self._mu:
            self._gc()
            return sorted(self._ops.values(), key=lambda o: o.started_at)

    def active(self) -> list[T]:
        """The ops that have not finished yet."""
        return [op for op in self.all() if not op.done]

    def run(self, op: T, work: Callable[[T], Any], *, name: str) -> T:
        """Run ``work(op)`` on a thread; its return value or error finishes the op."""
        self.add(op)

        def body() -> None:
            try:
                result = work(op)
            except BangerError as exc:
                op.finish(error=exc)
            except Exception as exc:
                err = from_foreign(exc, op.kind, self.log_location)
                if isinstance(err, InternalError):
                    log.exception("operation %s crashed", op.id)
                op.finish(error=err)
            else:
                op.finish(result=result)

        threading.Thread(target=body, name=name, daemon=True).start()
        return op

    def _gc(self) -> None:
        cutoff = time.monotonic() - KEEP_FINISHED_S
        for op_id in [i for i, o in self._ops.items()
                      if o.finished_mono is not None and o.finished_mono < cutoff]:
            del self._ops[op_id]
