"""The content-addressed blob cache: ``<root>/sha256/<hex>``, one file per blob.

The daemon passes ``cache_dir / "oci" / "blobs"``. A blob appears under its digest only
once its bytes were hashed and matched: it is written to a temp file in the same
directory (``.partial-<hex>-<random>``, created with ``O_EXCL`` so two processes never
share one), fsynced, renamed to its name and the directory fsynced. A crash leaves at
most a partial file, never a half-written blob under a digest.

:meth:`BlobCache.get` trusts a blob whose size matches and does not hash it again:
only this root-owned daemon writes the directory, and only after verifying, so re-hashing
every layer at every use would double the I/O of a pull for no defence the directory's
permissions do not already give. :meth:`BlobCache.verify` re-hashes on request.

Pulls of the same digest in this process coalesce: :meth:`BlobCache.ensure` holds a
lock per digest across "is it cached? else download", so the second caller waits and
then finds the blob. Two processes sharing the directory can both download; each
writes its own partial file and the second rename replaces identical bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from banger.errors import BadRequest, RegistryError
from banger.fsutil import fsync_path
from banger.runner import CancelToken

from .reference import check_digest

# (done bytes, total bytes) of one blob; called after every chunk and once on a cache hit.
BlobProgress = Callable[[int, int], None]

PARTIAL_PREFIX = ".partial-"
# A partial file untouched this long belongs to no live download (writers touch it at
# every chunk; a stalled one gives up on the HTTP read timeout, far shorter).
STALE_PARTIAL_S = 3600.0
# While waiting for another thread's download of the same digest, look at the cancel
# token this often.
WAIT_POLL_S = 0.25
_READ_CHUNK = 1 << 20


class BlobCache:
    """Blobs by sha256 digest under ``root``; see the module docstring for the rules."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dir = root / "sha256"
        # _mu guards only _claims; it is a leaf, never held while a digest lock is
        # waited for or during I/O.
        self._mu = threading.Lock()
        self._claims: dict[str, _Claim] = {}

    def path_of(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it is there)."""
        return self._dir / check_digest(digest).removeprefix("sha256:")

    def get(self, digest: str, size: int | None = None) -> Path | None:
        """The blob's path if it is cached (and ``size`` bytes long, when given)."""
        path = self.path_of(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            return None
        return path

    def verify(self, digest: str) -> bool:
        """Hash the cached blob again; True when present and matching its digest."""
        path = self.path_of(digest)
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return f"sha256:{h.hexdigest()}" == digest

    def ensure(self, digest: str, size: int,
               open_stream: Callable[[], AbstractContextManager[Iterable[bytes]]], *,
               progress: BlobProgress | None = None,
               cancel: CancelToken | None = None) -> tuple[Path, bool]:
        """The cached blob, downloading it through ``open_stream`` when missing.

        Callers in this process asking for the same digest wait for one download
        (checking ``cancel`` while they wait) and then get the cached file.

        Args:
            digest: The blob's ``sha256:<hex>``.
            size: Its declared size; the download is refused past it or short of it.
            open_stream: Opens the download; entered only on a cache miss.
            progress: Told ``(done, size)`` per chunk (once, complete, on a hit).
            cancel: Checked between chunks and while waiting.

        Returns:
            The blob's path and whether it was downloaded (False: a cache hit).

        Raises:
            RegistryError: The stream's bytes do not match ``digest`` or ``size``.
            Cancelled: ``cancel`` fired.
        """
        with self._claim(digest, cancel):
            path = self.get(digest, size)
            if path is not None:
                if progress is not None:
                    progress(size, size)
                return path, False
            with open_stream() as chunks:
                return self.put_stream(digest, size, chunks, progress=progress,
                                       cancel=cancel), True

    def put_stream(self, digest: str, size: int | None, chunks: Iterable[bytes], *,
                   progress: BlobProgress | None = None,
                   cancel: CancelToken | None = None) -> Path:
        """Write ``chunks`` as blob ``digest``, verified before it gets its name.

        Args:
            digest: The expected ``sha256:<hex>``.
            size: The expected size; more bytes are refused as soon as they arrive.
                None: unknown (only the digest is checked).
            chunks: The content.
            progress: Told ``(done, size or 0)`` after every chunk.
            cancel: Checked between chunks.

        Raises:
            RegistryError: Too many or too few bytes, or a digest mismatch; nothing is
                left under ``digest``'s name.
            Cancelled: ``cancel`` fired; the partial file is removed.
        """
        final = self.path_of(digest)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        h = hashlib.sha256()
        done = 0
        tmp = self._dir / f"{PARTIAL_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    if cancel is not None:
                        cancel.check()
                    done += len(chunk)
                    if size is not None and done > size:
                        raise RegistryError(
                            f"blob {digest} is longer than the {size} bytes its manifest "
                            "declares; refused",
                            hint="the registry or a proxy in between is broken or hostile")
                    h.update(chunk)
                    f.write(chunk)
                    if progress is not None:
                        progress(done, size or 0)
                if cancel is not None:
                    cancel.check()
                if size is not None and done != size:
                    raise RegistryError(
                        f"blob {digest} ended after {done} of its {size} bytes",
                        hint="the connection was cut; pull again")
                got = f"sha256:{h.hexdigest()}"
                if got != digest:
                    raise RegistryError(
                        f"blob {digest} does not match its digest (its content hashes "
                        f"to {got}); refused",
                        hint="the registry or a proxy in between is broken or hostile")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_path(self._dir)
        return final

    def digests(self) -> Iterator[tuple[str, int]]:
        """Every complete blob in the cache: ``(digest, size)``."""
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(PARTIAL_PREFIX) or not entry.is_file(
                    follow_symlinks=False):
                continue
            digest = f"sha256:{entry.name}"
            try:
                check_digest(digest)
                yield digest, entry.stat(follow_symlinks=False).st_size
            except (BadRequest, FileNotFoundError):
                continue

    def prune(self, keep: set[str], *, dry_run: bool = False) -> list[tuple[str, int]]:
        """Remove every complete blob whose digest is not in ``keep``.

        A digest a pull of this process is fetching right now is kept too; the caller
        still has to put into ``keep`` every digest an image or an unfinished pull
        references (a pull's blobs are cached before an image records them). Partial
        files older than :data:`STALE_PARTIAL_S` are removed as well (not listed).

        Returns:
            ``(digest, size)`` of every blob removed (``dry_run``: that would be),
            sorted by digest.
        """
        gone: list[tuple[str, int]] = []
        for digest, size in sorted(self.digests()):
            if digest in keep:
                continue
            with self._mu:
                if digest in self._claims:
                    continue
            if not dry_run:
                try:
                    self.path_of(digest).unlink()
                except FileNotFoundError:
                    continue
            gone.append((digest, size))
        if not dry_run:
            self.sweep_partial()
        return gone

    def sweep_partial(self, older_than_s: float = STALE_PARTIAL_S) -> int:
        """Remove partial downloads untouched for ``older_than_s``, or whose writer
        (the pid in the name) is no longer running; how many were removed."""
        removed = 0
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            return 0
        cutoff = time.time() - older_than_s
        for entry in entries:
            if not entry.name.startswith(PARTIAL_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                if (not _writer_alive(entry.name)
                        or entry.stat(follow_symlinks=False).st_mtime < cutoff):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    @contextlib.contextmanager
    def _claim(self, digest: str, cancel: CancelToken | None) -> Iterator[None]:
        """Hold ``digest``'s lock: one download per digest in this process.

        The lock's entry lives while anyone holds or waits for it, so :meth:`prune`
        can see a digest in flight.
        """
        with self._mu:
            claim = self._claims.setdefault(digest, _Claim())
            claim.holders += 1
        try:
            while not claim.lock.acquire(timeout=WAIT_POLL_S):
                if cancel is not None:
                    cancel.check()
            try:
                yield
            finally:
                claim.lock.release()
        finally:
            with self._mu:
                claim.holders -= 1
                if claim.holders == 0:
                    del self._claims[digest]


@dataclass
class _Claim:
    """One digest's download lock and how many threads hold or wait for it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: int = 0


def _writer_alive(partial_name: str) -> bool:
    """Whether the process named in ``.partial-<hex>-<pid>-<random>`` still runs (True
    when the name holds no pid: only its age can tell then)."""
    parts = partial_name[len(PARTIAL_PREFIX):].split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    pid = int(parts[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

