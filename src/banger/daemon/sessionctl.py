"""Live guest-session controllers: who is attached to a session, and who may write to it.

``Daemon.sessions`` is a :class:`SessionRegistry`: one :class:`Controller` per session
someone attached to, made on first use and dropped with its VM (stop or delete) or
with the session (``session rm``). A controller tracks its attachments: any number of
readers and at most one writer. An attachment is a lease: it ends when the client
detaches or after :data:`LEASE_S` without a call from it (a client that died); a call
in progress (a long-polled read, however slow the guest) holds it.

Locks: the registry's ``_mu`` and each controller's ``_attach_mu`` (readers) and
``_write_mu`` (the writer) are leaves; they guard these fields only and are never
held across guest I/O. A writer's bytes go through a bounded queue to a thread that
feeds the ssh process, so a guest that stops reading never blocks an RPC handler.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from banger.errors import Busy, NotFound

log = logging.getLogger("banger.sessions")

# An attachment not heard from for this long is gone (the CLI calls every 5 s or so, but a
# loaded TCG guest can take a minute to answer one ssh).
LEASE_S = 120.0
QUEUE_CHUNKS = 256  # pending writes per writer before `write` refuses (the guest stalls)


class Writer:
    """An attachment's write side: one long-lived guest process copying its stdin into
    the session's input FIFO."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._feed, daemon=True, name="session-writer")
        self._thread.start()

    def _feed(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while (chunk := self._queue.get()) is not None:
                stdin.write(chunk)
                stdin.flush()
        except OSError as exc:  # the guest side went away
            log.info("session writer ended: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    @property
    def alive(self) -> bool:
        """The guest process still runs and takes input."""
        return self.proc.poll() is None and self._thread.is_alive()

    def put(self, data: bytes) -> None:
        """Queue ``data`` for the guest.

        Raises:
            Busy: the queue is full: the session has not read its input for a while.
        """
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            raise Busy("the session is not reading its input",
                       hint="wait for it to catch up, or check it with `banger vm session "
                            "logs`") from None

    def close(self) -> None:
        """End the guest process (its queued bytes are sent first, bounded)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
            return
        self.proc.kill()
        self.proc.wait()


@dataclass
class Attachment:
    """One client attached to a session."""

    id: str
    vm_id: str
    name: str
    writer: bool
    last_seen: float
    calls: int = 0  # calls in progress on its behalf (it does not expire during one)


class Controller:
    """The attachments of one session (readers, and the one writer)."""

    def __init__(self, vm_id: str, name: str) -> None:
        self.vm_id, self.name = vm_id, name
        # Guards _readers: attachments that only read.
        self._attach_mu = threading.Lock()
        self._readers: dict[str, Attachment] = {}
        # Guards _writer and _write_stream: one writer at a time, so two clients never
        # interleave keystrokes.
        self._write_mu = threading.Lock()
        self._writer: Attachment | None = None
        self._write_stream: Writer | None = None

    def attach(self, *, writer: bool) -> Attachment:
        """A new attachment; a writer only if none holds the write side now.

        Raises:
            Busy: ``writer`` was asked for and another attachment holds it.
        """
        att = Attachment(secrets.token_hex(8), self.vm_id, self.name, writer, time.monotonic())
        if writer:
            stale = None
            with self._write_mu:
                holder = self._writer
                if holder is not None and _expired(holder):
                    stale, self._writer, self._write_stream = self._write_stream, None, None
                    holder = None
                if holder is not None:
                    raise Busy(f"session {self.name!r} already has a writer attached",
                               hint="attach with --read-only to watch it, or detach the "
                                    "other client (Ctrl-P Ctrl-Q)")
                self._writer = att
            if stale is not None:
                stale.close()
        else:
            with self._attach_mu:
                self._readers[att.id] = att
        return att

    def set_stream(self, att: Attachment, stream: Writer) -> bool:
        """Give writer ``att`` its guest stream; False (stream not kept) if ``att`` no
        longer holds the write side."""
        with self._write_mu:
            if self._writer is not att:
                keep = False
            else:
                self._write_stream, keep = stream, True
        if not keep:
            stream.close()
        return keep

    def touch(self, att_id: str) -> Attachment:
        """Renew attachment ``att_id``'s lease and return it.

        Raises:
            NotFound: no such attachment (detached, or its lease ran out).
        """
        with self._write_mu:
            w = self._writer
            if w is not None and w.id == att_id and not _expired(w):
                w.last_seen = time.monotonic()
                return w
        with self._attach_mu:
            r = self._readers.get(att_id)
            if r is not None and not _expired(r):
                r.last_seen = time.monotonic()
                return r
            self._readers.pop(att_id, None)
        raise NotFound("this attachment has ended", hint="attach again")

    @contextlib.contextmanager
    def held(self, att_id: str) -> Iterator[Attachment]:
        """Attachment ``att_id``, kept alive for the ``with`` block (a read in progress).

        Raises:
            NotFound: no such attachment.
        """
        att = self.touch(att_id)
        mu = self._write_mu if att.writer else self._attach_mu  # the one guarding att
        with mu:
            att.calls += 1
        try:
            yield att
        finally:
            with mu:
                att.calls -= 1
                att.last_seen = time.monotonic()

    def stream_for(self, att_id: str) -> Writer:
        """The guest stream of writer ``att_id``.

        Raises:
            NotFound: ``att_id`` is not the writer (or its lease ran out).
            Busy: the stream is not ready yet or has ended.
        """
        att = self.touch(att_id)
        with self._write_mu:
            stream = self._write_stream if self._writer is att else None
        if not att.writer:
            raise NotFound("this attachment is read-only", hint="attach without --read-only")
        if stream is None or not stream.alive:
            raise Busy("the session's input is not open", hint="the session may have ended")
        return stream

    def detach(self, att_id: str) -> None:
        """End attachment ``att_id`` (and its writer stream); unknown ids are ignored."""
        stream = None
        with self._write_mu:
            if self._writer is not None and self._writer.id == att_id:
                stream, self._writer, self._write_stream = self._write_stream, None, None
        with self._attach_mu:
            self._readers.pop(att_id, None)
        if stream is not None:
            stream.close()

    def close(self) -> None:
        """Drop every attachment (the session or its VM is gone)."""
        with self._write_mu:
            stream, self._writer, self._write_stream = self._write_stream, None, None
        with self._attach_mu:
            self._readers.clear()
        if stream is not None:
            stream.close()

    def counts(self) -> tuple[int, bool]:
        """(readers, whether a writer is attached), counting live leases only."""
        with self._attach_mu:
            readers = sum(1 for r in self._readers.values() if not _expired(r))
        with self._write_mu:
            writer = self._writer is not None and not _expired(self._writer)
        return readers, writer


def _expired(att: Attachment) -> bool:
    return att.calls == 0 and time.monotonic() - att.last_seen > LEASE_S


class SessionRegistry:
    """The controllers of sessions someone attached to, by (VM id, session name)."""

    def __init__(self) -> None:
        # Guards _controllers and _by_attachment only (a leaf).
        self._mu = threading.Lock()
        self._controllers: dict[tuple[str, str], Controller] = {}
        self._by_attachment: dict[str, tuple[str, str]] = {}
        # Per VM: bumped by every session start and removal (sessions.refresh).
        self._generation: dict[str, int] = {}

    def generation(self, vm_id: str) -> int:
        """How many session starts and removals VM ``vm_id`` has seen."""
        with self._mu:
            return self._generation.get(vm_id, 0)

    def bump(self, vm_id: str) -> None:
        """Record a session start or removal on VM ``vm_id``."""
        with self._mu:
            self._generation[vm_id] = self._generation.get(vm_id, 0) + 1

    def controller(self, vm_id: str, name: str) -> Controller:
        """Session ``name`` of VM ``vm_id``'s controller, made on first use."""
        with self._mu:
            ctl = self._controllers.get((vm_id, name))
            if ctl is None:
                ctl = self._controllers[(vm_id, name)] = Controller(vm_id, name)
            return ctl

    def peek(self, vm_id: str, name: str) -> Controller | None:
        """The controller if one exists (never makes one)."""
        with self._mu:
            return self._controllers.get((vm_id, name))

    def remember(self, att: Attachment) -> None:
        """Index ``att`` so calls that carry only its id find its controller."""
        with self._mu:
            self._by_attachment[att.id] = (att.vm_id, att.name)

    def by_attachment(self, att_id: str) -> Controller:
        """The controller attachment ``att_id`` belongs to.

        Raises:
            NotFound: unknown attachment.
        """
        with self._mu:
            key = self._by_attachment.get(att_id)
            ctl = self._controllers.get(key) if key is not None else None
        if ctl is None:
            raise NotFound("this attachment has ended", hint="attach again")
        return ctl

    def forget_attachment(self, att_id: str) -> None:
        """Drop ``att_id`` from the index."""
        with self._mu:
            self._by_attachment.pop(att_id, None)

    def drop(self, match: Callable[[str, str], bool]) -> int:
        """Close and remove the controllers whose (VM id, name) ``match``; returns how many."""
        with self._mu:
            gone = [k for k in self._controllers if match(*k)]
            closing = [self._controllers.pop(k) for k in gone]
            for att_id in [a for a, k in self._by_attachment.items() if k in gone]:
                del self._by_attachment[att_id]
        for ctl in closing:
            ctl.close()
        return len(closing)

    def close(self) -> None:
        """Close every controller (daemon shutdown)."""
        self.drop(lambda _vm, _name: True)
