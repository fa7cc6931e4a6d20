"""The git history a workspace gets, packed and indexed on the host.

``git rev-list --objects | git pack-objects --stdout`` runs as the repository's
owner and writes into a file of bangerd's own (a directory only root can enter, so
the owner cannot swap what root reads back); ``git index-pack`` then writes the
pack's index next to it, natively, on the host. Blobs the guest already has as
files are left out (it hashes them itself): the pack holds commits, trees, older
versions and staged content only. Both files travel to the guest as plain files
into ``.git/objects/pack``, which it stores without inflating or hashing them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.errors import HostError
from banger.runner import CancelToken, Runner, shell_line

from .repo import GIT_CONFIG, GIT_ENV
from .transfer import POLL_S, Drain, close, kill_group

# A clean environment for root's own git: no user or system configuration.
_ROOT_GIT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent",
                 "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", **GIT_ENV}


@dataclass(frozen=True)
class HostPack:
    """A pack and its index, ready to copy into a guest's ``objects/pack``."""

    pack: Path
    idx: Path
    name: str  # ``pack-<checksum>``, the name git expects for both files


def build_pack(runner: Runner, root: str, dest: Path, *, commits: Sequence[str],
               no_walk: bool, blobs: Sequence[str] = (), exclude: Container[str] = (),
               object_format: str, timeout: float,
               cancel: CancelToken | None = None) -> HostPack | None:
    """Pack history objects of ``root`` into ``dest`` (a new file in a root-only
    directory) and index it; None when no object is left to send.

    The objects are what ``git rev-list --objects`` lists for ``commits`` (with
    ``no_walk``: those commits' own trees and blobs, no ancestors), plus ``blobs``,
    minus the blob ids in ``exclude`` (the guest makes those itself, from the files
    it received). Host git runs through ``runner`` (as the repository's owner), the
    listing streamed into ``git pack-objects``; no delta search and light
    compression, because the pack crosses a local link.

    Raises:
        HostError: listing, packing or indexing failed, or ran past ``timeout``.
        Cancelled: ``cancel`` fired.
    """
    git = ["git", "-C", root, *GIT_CONFIG]
    walk = ["--no-walk=unsorted"] if no_walk else []
    lister = runner.wrap([*git, "rev-list", "--objects", "--no-object-names", *walk,
                          "--stdin"])
    packer = runner.wrap([*git, "-c", "pack.compression=1", "pack-objects", "--stdout", "-q",
                          "--delta-base-offset", "--window=0"])
    env = {**os.environ, **GIT_ENV}
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        procs = [_start(lister, subprocess.PIPE, env), _start(packer, fd, env)]
    finally:
        os.close(fd)
    listing, packing = procs
    errors = [Drain(p.stderr) for p in procs]

    def feed() -> None:
        assert listing.stdin is not None
        with contextlib.suppress(OSError):
            listing.stdin.write("".join(f"{c}\n" for c in commits).encode())
            listing.stdin.close()

    def pipe_objects() -> None:
        assert listing.stdout is not None and packing.stdin is not None
        with contextlib.suppress(OSError, ValueError):
            for line in listing.stdout:
                if line.strip().decode() not in exclude:
                    packing.stdin.write(line)
            for oid in blobs:
                if oid not in exclude:
                    packing.stdin.write(f"{oid}\n".encode())
        close(packing.stdin)

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, pipe_objects)]
    for t in threads:
        t.start()
    try:
        _wait(procs, what="packing history", timeout=timeout, cancel=cancel)
    finally:
        for p in procs:
            kill_group(p)
            p.wait()
        for t in threads:
            t.join(5)
        tails = [e.join().decode(errors="replace").strip()[-2000:] for e in errors]
        for p in procs:
            close(p.stdin, p.stdout, p.stderr)
    for argv, p, tail in zip((lister, packer), procs, tails, strict=True):
        if p.returncode != 0:
            raise HostError(f"packing history failed (exit {p.returncode}): "
                            f"{shell_line(argv)}\n{tail}")
    with open(dest, "rb") as fh:
        header = fh.read(12)
    if len(header) < 12 or header[:4] != b"PACK":
        raise HostError(f"git pack-objects wrote no pack into {dest}")
    if int.from_bytes(header[8:12], "big") == 0:
        return None
    idx = dest.with_suffix(".idx")
    fmt = [f"--object-format={object_format}"] if object_format != "sha1" else []
    out = _run(["git", "index-pack", *fmt, "-o", str(idx), str(dest)], env=_ROOT_GIT_ENV,
               what="indexing the history pack", timeout=timeout, cancel=cancel)
    checksum = out.decode(errors="replace").split()[-1] if out.split() else ""
    if not checksum or not all(c in "0123456789abcdef" for c in checksum):
        raise HostError(f"git index-pack printed no pack checksum: {out[:200]!r}")
    return HostPack(dest, idx, f"pack-{checksum}")


def _start(argv: list[str], stdout: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise HostError(f"cannot run {argv[0]!r}: {exc.strerror}") from exc


def _wait(procs: list[subprocess.Popen[bytes]], *, what: str, timeout: float,
          cancel: CancelToken | None) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if cancel is not None:
            cancel.check()
        if time.monotonic() > deadline:
            raise HostError(f"{what} timed out after {timeout:g}s")
        time.sleep(POLL_S)


def _run(argv: list[str], *, env: dict[str, str], what: str, timeout: float,
         cancel: CancelToken | None) -> bytes:
    """Run ``argv`` (no input) and return its stdout (at most 1 MiB kept)."""
    proc = _start(argv, subprocess.PIPE, env)
    close(proc.stdin)
    out, err = Drain(proc.stdout), Drain(proc.stderr)
    try:
        _wait([proc], what=what, timeout=timeout, cancel=cancel)
    finally:
        kill_group(proc)
        proc.wait()
        output, errors = out.join(), err.join()
        close(proc.stdout, proc.stderr)
    if proc.returncode != 0:
        tail = errors.decode(errors="replace").strip()[-2000:]
        raise HostError(f"{what} failed (exit {proc.returncode}): {shell_line(argv)}\n{tail}")
    return output
