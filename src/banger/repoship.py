"""A repository on this machine, for a daemon on another (``--host ssh://...``).

A remote daemon copies a repository into a guest from a path on its own machine, so
the client sends it there first, through the command's SSH connection: the git
directory and the work tree's files (tracked and untracked, not ignored: what a
workspace copies) as one tar stream into ``banger vm workspace receive`` on the remote
host, which unpacks it below the remote user's cache dir and names the directory.
The workspace is then prepared from that directory as from any local repository, and
the directory is dropped (``receive --drop``) once the copy is in the guest.

The stream is the user's own repository, but it is still unpacked as untrusted data
(``tarfile``'s ``data`` filter: no absolute paths, no ``..``, no links out, no device
nodes), into a fresh directory of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO

from banger.errors import BadRequest, BangerError, HostError
from banger.remote import SSHLink

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


def files_of(top: Path) -> list[str]:
    """What is sent of the work tree at ``top``: its git directory, then the files git
    lists (tracked and untracked, not ignored) that exist.

    Raises:
        BadRequest: not a git work tree, or its ``.git`` is not a directory (a linked
            worktree or a submodule, whose git data lives elsewhere).
    """
    if not (top / ".git").is_dir() or (top / ".git").is_symlink():
        raise BadRequest(f"{top} has no .git directory of its own (a linked worktree or a "
                         "submodule?): it cannot be sent to a remote host yet",
                         hint="clone it to a plain repository first")
    res = subprocess.run(["git", "-C", str(top), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=False)
    if res.returncode != 0:
        raise BadRequest(f"{top} is not a git work tree: "
                         f"{res.stderr.decode(errors='replace').strip()[:200]}")
    names = sorted({n for n in res.stdout.decode(errors="surrogateescape").split("\0")
                    if n and os.path.lexists(top / n)})
    return [".git", *names]


def send(link: SSHLink, repo: Path) -> str:
    """Send the work tree ``repo`` to the remote host; the directory it is in there.

    Raises:
        BadRequest: ``repo`` is not a plain git work tree.
        HostError: the remote end failed to take it.
    """
    top = Path(subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"],
                              capture_output=True, text=True, check=False).stdout.strip()
               or repo)
    names = files_of(top)
    print(f"sending {top} ({len(names) - 1} files and its git data) to {link.target}",
          file=sys.stderr)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", top.name).strip(".") or "repo"
    receive = link.remote_command(["vm", "workspace", "receive", name[:100]])
    proc = subprocess.Popen(link.ssh("-T", link.target.destination, "--", receive),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                tar.add(top / name, arcname=name, recursive=name == ".git")
    except BrokenPipeError:
        pass  # the remote end stopped reading: its error is below
    except OSError as exc:  # a file went away or became unreadable meanwhile
        proc.kill()
        proc.wait()
        raise BadRequest(f"cannot send {top}: {exc.strerror or exc} ({exc.filename})",
                         hint="try again once nothing is changing the repository") from exc
    try:
        out, err = proc.communicate(timeout=RECEIVE_TIMEOUT_S)  # closes its stdin: the end
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.wait()
        raise HostError(f"{link.target} did not take the repository within "
                        f"{RECEIVE_TIMEOUT_S:g}s") from exc
    try:
        path = json.loads(out[:MAX_ANSWER])["path"]
    except (ValueError, KeyError, TypeError):
        path = None
    if proc.returncode != 0 or not isinstance(path, str):
        raise HostError(f"{link.target} did not take the repository: "
                        f"{err.decode(errors='replace').strip()[-300:] or proc.returncode}")
    return path


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
    holder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    dest = holder / name
    dest.mkdir()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            tar.extractall(dest, filter=_repo_filter)  # noqa: S202 (the filter checks each)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(holder, ignore_errors=True)
        raise BadRequest(f"the repository stream could not be unpacked: {exc}") from exc
    return dest


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
