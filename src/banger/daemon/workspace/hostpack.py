"""The git history a workspace gets, packed and indexed on the host.

``git pack-objects --stdout`` runs as the repository's owner and writes into a file
of bangerd's own (a directory only root can enter, so the owner cannot swap what
root reads back); ``git index-pack`` then writes the pack's index next to it,
natively, on the host. Both files travel into the guest as plain files in the
copy's tar stream, straight into ``.git/objects/pack``: the guest stores them
without indexing or hashing anything (under TCG, indexing a 400 MB pack in the guest
took longer than copying the files), and reads blobs out of them only to write the
work tree's unchanged files (:mod:`.checkout`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.drain import Drain, close
from banger.errors import HostError
from banger.runner import CancelToken, Runner, shell_line

from .repo import GIT_CONFIG, GIT_ENV
from .transfer import POLL_S, kill_group

# A clean environment for root's own git: no user or system configuration.
_ROOT_GIT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent",
                 "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", **GIT_ENV}


@dataclass(frozen=True)
class HostPack:
    """A pack and its index, ready to copy into a guest's ``objects/pack``."""

    pack: Path
    idx: Path
    name: str  # ``pack-<checksum>``, the name git expects for both files


def pack_argv(runner: Runner, root: str, compression: int = 1) -> list[str]:
    """``git pack-objects --revs --stdout`` in ``root``, run as the runner's user.

    No new delta search, and objects already packed are reused as they are. Loose
    objects are compressed at ``compression``: 1 where the pack crosses ssh into a
    TCG guest (6-10 MB/s), 0 (stored) where it goes over a plain connection (90 MB/s),
    which saves the host a deflate pass and costs the guest nothing: writing the
    files out takes the same time either way.
    """
    return runner.wrap(["git", "-C", root, *GIT_CONFIG, "-c",
                        f"pack.compression={compression}", "pack-objects", "--revs",
                        "--stdout", "-q", "--delta-base-offset", "--window=0"])


def build_pack(argv: Sequence[str], revs: bytes, dest: Path, *, object_format: str,
               timeout: float, cancel: CancelToken | None = None) -> HostPack:
    """Run ``argv`` (see :func:`pack_argv`) fed ``revs``, store its pack in ``dest``
    (a new file in a root-only directory) and index it.

    Raises:
        HostError: packing or indexing failed, or ran past ``timeout``.
        Cancelled: ``cancel`` fired.
    """
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        _run(list(argv), revs, out.fileno(), env={**os.environ, **GIT_ENV},
             what="packing history", timeout=timeout, cancel=cancel)
    idx = dest.with_suffix(".idx")
    fmt = [f"--object-format={object_format}"] if object_format != "sha1" else []
    res = _run(["git", "index-pack", *fmt, "-o", str(idx), str(dest)], b"",
               subprocess.PIPE, env=_ROOT_GIT_ENV, what="indexing the history pack",
               timeout=timeout, cancel=cancel)
    checksum = res.decode(errors="replace").split()[-1] if res.split() else ""
    if not checksum or not all(c in "0123456789abcdef" for c in checksum):
        raise HostError(f"git index-pack printed no pack checksum: {res[:200]!r}")
    return HostPack(dest, idx, f"pack-{checksum}")


def _run(argv: list[str], stdin: bytes, stdout: int, *, env: dict[str, str], what: str,
         timeout: float, cancel: CancelToken | None) -> bytes:
    """Run ``argv`` with ``stdin`` fed and stdout to ``stdout`` (a descriptor, or PIPE:
    then returned, at most 1 MiB), cancellable and bounded by ``timeout``."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise HostError(f"cannot run {argv[0]!r}: {exc.strerror}") from exc
    err = Drain(proc.stderr)
    out = Drain(proc.stdout) if proc.stdout is not None else None
    assert proc.stdin is not None
    try:
        with contextlib.suppress(OSError):
            proc.stdin.write(stdin)  # revision lines: far below a pipe's buffer
            proc.stdin.close()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if cancel is not None:
                cancel.check()
            if time.monotonic() > deadline:
                raise HostError(f"{what} timed out after {timeout:g}s")
            time.sleep(POLL_S)
    finally:
        kill_group(proc)
        proc.wait()
        errors = err.join()
        output = out.join() if out is not None else b""
        close(proc.stdout, proc.stderr)
    if proc.returncode != 0:
        tail = errors.decode(errors="replace").strip()[-2000:]
        raise HostError(f"{what} failed (exit {proc.returncode}): {shell_line(argv)}\n{tail}")
    return output
