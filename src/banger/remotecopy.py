"""Files and repositories carried to a remote host over a command's own SSH connection.

The sending end (:func:`stream`) runs ``banger vm workspace receive NAME`` on the remote
host with one tar stream as its input; the receiving end (:func:`unpack`) unpacks it
below that user's cache dir (:func:`receive_root`), into a fresh directory of its own,
and names it. The command that sent it drops it there (:func:`drop`, ``receive
--drop``) when done; :func:`sweep` removes what a killed send left. What goes in the
stream is the sender's business: a repository (:mod:`banger.repoship`) or files for
the remote daemon to read (:func:`send_files`, sparse files with only their data).

A stream is the user's own, but it is still unpacked as untrusted data (``tarfile``'s
``data`` filter: no absolute paths, no ``..``, no links out, no device nodes), and one
cut short is refused: its last member (:data:`COMPLETE`) says it is whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from banger.errors import BadRequest, BangerError, DaemonUnavailable, HostError
from banger.remote import SSHLink
from banger.sdk.base import DaemonPath

RECEIVE_TIMEOUT_S = 3600.0
DROP_TIMEOUT_S = 120.0
MAX_ANSWER = 4096
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
PREFIX = "repo-"


def receive_root(env: dict[str, str] | None = None) -> Path:
    """Where received repositories are unpacked: ``$XDG_CACHE_HOME/banger/received``
    (default ``~/.cache``), which a daemon of this user can read."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "/root")) / ".cache")
    return Path(base) / "banger" / "received"


COMPLETE = ".banger-complete"  # the last member of every stream: one without it was cut


def add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    """Add ``data`` to ``tar`` as the regular file ``arcname`` (mode 0644, now)."""
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def stream(link: SSHLink, name: str, write: Callable[[IO[bytes]], None], *, what: str) -> str:
    """Run ``receive NAME`` on the remote host with what ``write`` writes as its input
    (a tar); the directory it unpacked it in.

    Raises:
        BadRequest: ``write`` could not read what it sends.
        HostError: the remote end failed to take it.
    """
    try:
        res = link.capture(["vm", "workspace", "receive", name], timeout=RECEIVE_TIMEOUT_S,
                           input=write, limit=MAX_ANSWER)
    except DaemonUnavailable as exc:  # it did not end in time, or answered too much
        raise HostError(f"{link.target} did not take {what}: {exc.message}") from exc
    except OSError as exc:  # a file went away or became unreadable meanwhile
        raise BadRequest(f"cannot send {what}: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else ""),
                         hint="try again once nothing is changing it") from exc
    try:
        path = json.loads(res.stdout)["path"]
    except (ValueError, KeyError, TypeError):
        path = None
    if res.returncode != 0 or not isinstance(path, str):
        raise HostError(f"{link.target} did not take {what}: "
                        f"{res.stderr.decode(errors='replace').strip()[-300:] or res.returncode}")
    return path


FILES = "files"  # the directory ``receive`` makes for files sent with :func:`send_files`
_KEY = re.compile(r"[a-z0-9_]{1,32}")
PROGRESS_STEP = 256 << 20  # bytes between two progress lines (files sent, a bundle received)


def send_files(link: SSHLink, files: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """Send ``files`` (a key, such as ``rootfs``, for each) to the remote host for its
    daemon to read; the directory they are in there (for :func:`drop`) and where each
    one is, by key. Each goes as ``<key>/<its name>``, so two files of one name never
    meet. Prints progress on standard error.

    Raises:
        BadRequest: a key is not a plain name, or a file could not be read.
        HostError: the remote end failed to take them.
    """
    for key in files:
        if not _KEY.fullmatch(key):
            raise BadRequest(f"{key!r} is not a file key")
    try:
        total = sum(sent_bytes(path) for path in files.values())
    except OSError as exc:
        raise BadRequest(f"cannot send {exc.filename}: {exc.strerror or exc}") from exc
    names = ", ".join(path.name for path in files.values())
    print(f"sending {names} ({total / 1e6:.1f} MB) to {link.target}", file=sys.stderr)
    report = ByteProgress("sent", total)
    there = stream(link, FILES, lambda out: write_files(files, out, report), what=names)
    return there, {key: DaemonPath(f"{there}/{key}/{path.name}") for key, path in files.items()}


def write_files(files: dict[str, Path], out: IO[bytes],
                report: Callable[[int], None] = lambda n: None) -> None:
    """Write ``files`` to ``out`` as one tar of ``<key>/<name>`` members (what ``receive``
    unpacks for :func:`send_files`), each byte counted to ``report``.

    Raises:
        BadRequest: one is not a regular file.
        OSError: one could not be read.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, path in files.items():
            if path.is_dir():
                raise BadRequest(f"{path} is not a regular file")
            with path.open("rb") as fh:  # through a symlink, as the daemon would read it
                info = tar.gettarinfo(arcname=f"{key}/{path.name}", fileobj=fh)
                if not info.isreg():
                    raise BadRequest(f"{path} is not a regular file")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                runs = data_runs(fh.fileno(), info.size)
                if runs is None:
                    tar.addfile(info, _Counting(fh, report))
                else:
                    _add_sparse(tar, info, fh, runs, report)
        add_bytes(tar, COMPLETE, b"")


SPARSE_MAX_RUNS = 1 << 16  # a file in more pieces than this goes whole (its map is large)
USTAR_MAX_SIZE = 8 ** 11 - 1  # past this a member needs pax's "size", which the map can't share


def data_runs(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The ``(offset, length)`` runs of data, in order, of the first ``size`` bytes of
    the file open on ``fd``, when it has holes to leave out (a sparse disk image);
    None when it has none, or they cannot be found (it then goes whole)."""
    if os.fstat(fd).st_blocks * 512 >= size:
        return None
    runs: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # a hole to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            runs.append((start, end - start))
            if len(runs) > SPARSE_MAX_RUNS:
                return None
            pos = end
    except OSError:  # no SEEK_DATA here (EINVAL): the file goes whole
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return runs


def sent_bytes(path: Path) -> int:
    """How many bytes of ``path``'s data :func:`write_files` sends (holes left out)."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        runs = data_runs(fh.fileno(), size)
    return size if runs is None else sum(n for _, n in runs)


def _add_sparse(tar: tarfile.TarFile, info: tarfile.TarInfo, fh: IO[bytes],
                runs: list[tuple[int, int]], report: Callable[[int], None]) -> None:
    """Add ``info`` to ``tar`` with only ``runs`` of ``fh``'s data, as a GNU sparse
    file (pax format 1.0: a map of the runs, then their data), which ``tarfile`` and
    GNU tar unpack with the holes in place. One too large for that goes whole."""
    if not runs or sum(runs[-1]) < info.size:
        runs = [*runs, (info.size, 0)]  # the map's last entry says where the file ends
    head = "".join(f"{v}\n" for v in (len(runs), *(x for run in runs for x in run))).encode()
    head += bytes(-len(head) % tarfile.BLOCKSIZE)
    stored = len(head) + sum(n for _, n in runs)
    if stored > USTAR_MAX_SIZE:
        tar.addfile(info, _Counting(fh, report))
        return
    parent, _, name = info.name.rpartition("/")
    held = info.replace(name=f"{parent}/GNUSparseFile.0/{name}", deep=False)
    held.size = stored
    # "path" first: the reader applies these in order, and the real name must win.
    held.pax_headers = {"path": held.name, "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                        "GNU.sparse.name": info.name, "GNU.sparse.realsize": str(info.size)}
    tar.addfile(held, _Runs(head, fh, runs, report))


class ByteProgress:
    """Progress lines on standard error, every :data:`PROGRESS_STEP` bytes, for bytes
    ``verb`` (sent, received) out of ``total`` (None: not known ahead)."""

    def __init__(self, verb: str, total: int | None = None) -> None:
        self.verb, self.total, self.done, self._next = verb, total, 0, PROGRESS_STEP

    def __call__(self, n: int) -> None:
        """Count ``n`` more bytes (a line when another step is passed)."""
        self.done += n
        if self.done >= self._next:
            self._next += PROGRESS_STEP
            of = f"/{self.total / 1e6:.0f}" if self.total is not None else ""
            print(f"  {self.done / 1e6:.0f}{of} MB {self.verb}", file=sys.stderr)


class _Counting(io.RawIOBase):
    """A file read through, its bytes counted to ``report``."""

    def __init__(self, fh: IO[bytes], report: Callable[[int], None]) -> None:
        self._fh, self._report = fh, report

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self._report(len(data))
        return data


class _Runs(io.RawIOBase):
    """``head``, then the data of ``runs`` of ``fh`` one after another; the data's bytes
    counted to ``report``. Every read is whole until the end (``tarfile`` wants that); a
    file that shrank meanwhile ends early, which ``tarfile`` refuses."""

    def __init__(self, head: bytes, fh: IO[bytes], runs: list[tuple[int, int]],
                 report: Callable[[int], None]) -> None:
        self._head, self._fh, self._runs, self._report = head, fh, iter(runs), report
        self._left = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = size if size > 0 else 1 << 20
        out = bytearray(self._head[:size])
        self._head = self._head[len(out):]
        while len(out) < size:
            if self._left == 0:
                run = next(self._runs, None)
                if run is None:
                    break
                self._fh.seek(run[0])
                self._left = run[1]
                continue
            data = self._fh.read(min(size - len(out), self._left))
            if not data:
                break
            self._left -= len(data)
            self._report(len(data))
            out += data
        return bytes(out)


def drop(link: SSHLink, path: str) -> None:
    """Remove a received repository on the remote host (failures are only reported)."""
    try:
        res = link.capture(["vm", "workspace", "receive", "--drop", path], timeout=DROP_TIMEOUT_S)
        why = res.stderr.decode(errors="replace").strip()[-200:] if res.returncode else ""
    except BangerError as exc:
        why = exc.message
    if why:
        print(f"warning: could not remove the copy {path} on {link.target}: {why}",
              file=sys.stderr)


def unpack(name: str, stream: IO[bytes], root: Path | None = None) -> Path:
    """``banger vm workspace receive NAME``: unpack the tar on ``stream`` into a fresh
    directory ``<root>/repo-XXXX/NAME``; that path.

    Raises:
        BadRequest: ``name`` is not a plain directory name, or the stream is not a tar
            whose members stay inside.
    """
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise BadRequest(f"{name!r} is not a repository directory name")
    root = root or receive_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    sweep(root)
    holder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    dest = holder / name
    # Held while the stream comes in, however long it takes: sweep leaves it alone.
    busy = os.open(holder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(busy, fcntl.LOCK_EX)
        dest.mkdir()
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter=_repo_filter)  # noqa: S202 (the filter checks each)
        # A stream cut at a member's boundary reads as a whole (shorter) tar: the sender's
        # last member says it is all there.
        end = dest / COMPLETE
        if end.is_symlink() or not end.is_file():
            raise BadRequest("the stream was cut short (its sender stopped)")
        end.unlink()
        os.utime(holder)  # STALE_S counts from the end of the send, not its start
    except (tarfile.TarError, OSError, BadRequest) as exc:
        shutil.rmtree(holder, ignore_errors=True)
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"the repository stream could not be unpacked: {exc}") from exc
    finally:
        os.close(busy)
    return dest


STALE_S = 24 * 3600.0  # a received directory older than this was left by a crash


def sweep(root: Path) -> None:
    """Remove what a crashed or killed send left in ``root``: received directories
    whose send ended more than :data:`STALE_S` ago (a live one is dropped within the
    command that sent it). One still being received (:func:`unpack` holds its lock)
    stays, however old."""
    cutoff = time.time() - STALE_S
    with contextlib.suppress(OSError):
        for holder in root.iterdir():
            with contextlib.suppress(OSError):
                st = holder.lstat()
                if holder.name.startswith(PREFIX) and stat.S_ISDIR(st.st_mode) \
                        and st.st_mtime < cutoff:
                    _remove_unless_busy(holder)


def _remove_unless_busy(holder: Path) -> None:
    """Remove the received directory ``holder`` unless a receive holds its lock."""
    fd = os.open(holder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        shutil.rmtree(holder, ignore_errors=True)
    finally:
        os.close(fd)


def _repo_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, except that a symlink may point anywhere (a repository
    may hold ``bin -> /usr/bin``): it is checked under a harmless target and keeps its
    own. Writing through one stays refused (the filter resolves what is already
    unpacked, and a member whose real path leaves ``dest`` is an error)."""
    if member.issym():
        checked = tarfile.data_filter(member.replace(linkname="x", deep=False), dest)
        return None if checked is None else checked.replace(linkname=member.linkname,
                                                            deep=False)
    return tarfile.data_filter(member, dest)


def remove(path: str, root: Path | None = None) -> None:
    """``receive --drop PATH``: remove a directory :func:`unpack` made, and nothing else.

    Raises:
        BadRequest: ``path`` is not one.
    """
    root = (root or receive_root()).resolve()
    p = Path(path)
    holder = p.parent
    if not (p.is_absolute() and holder.parent.resolve() == root
            and holder.name.startswith(PREFIX)
            and not holder.is_symlink() and holder.is_dir()):
        raise BadRequest(f"{path} is not a repository banger received")
    shutil.rmtree(holder)
