"""``image export`` where the daemon cannot write the file itself: to standard output
(``-o -``), and from a daemon on another machine (``banger --host``), whose bundle
comes back over the command's SSH connection.

A daemon writes a bundle as a file on its own machine. For ``-o -`` it writes one into
a private directory of this user's (the one received repositories use) and the CLI
copies it out. For a remote daemon, that host's banger does exactly that, and its
standard output is written here to a temp file beside the target, hashed as it
arrives, and renamed over the target only once all of it came and matches the size
and sha256 in the remote banger's ``--json`` answer (on its stderr, since its stdout is
the bundle's): an export that fails or is interrupted leaves no file, as a local one
does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from banger import remotecopy
from banger.cli import exits
from banger.cli.app import App, follow, wire
from banger.errors import BadRequest, BangerError, DaemonUnavailable, HostError
from banger.fsutil import fsync_path
from banger.remote import OutputTooLarge

BUNDLE_MAX = 1 << 40  # bytes of a bundle from a remote host: more than any image, a bound


def to_stdout(app: App, name: str) -> dict[str, Any]:
    """Export image ``name`` to standard output; the daemon's answer (path ``-``).

    Raises:
        BadRequest: standard output is a terminal.
        HostError: standard output was closed before the bundle was all written.
    """
    if sys.stdout.isatty():
        raise BadRequest("`image export -o -` writes a binary bundle, and standard output "
                         "is a terminal", hint="redirect it (> FILE, | ssh ...), or use -o FILE")
    exits.claim_stdout()
    if app.remote is not None:
        return from_remote(app, name, None)
    root = remotecopy.receive_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix="export-", dir=root) as tmp:
        path = Path(tmp) / f"{name}.tar.zst"
        res = wire(follow(app, app.client().images.export, name, path))
        try:
            with path.open("rb") as fh:
                shutil.copyfileobj(fh, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        except BrokenPipeError as exc:
            raise HostError("standard output was closed before the bundle was all "
                            "written") from exc
    return {**res, "path": "-"}


def from_remote(app: App, name: str, out_file: Path | None) -> dict[str, Any]:
    """Export image ``name`` on the remote host into ``out_file`` here (None: standard
    output); the remote daemon's answer (its manifest's members and kernel too), with
    the path here. The remote's size and sha256 must be what arrived.

    Raises:
        BangerError: the remote banger's error, as it said it.
        DaemonUnavailable: it failed without saying why, sent more than
            :data:`BUNDLE_MAX` bytes, or did not say what it sent or sent something
            else (nothing of it is kept).
    """
    link = app.link()
    link.check_sends_to_own_daemon()  # it writes into this login's directory first
    digest = hashlib.sha256()
    progress = remotecopy.ByteProgress("received")

    def arrived(data: bytes) -> None:
        digest.update(data)
        progress(len(data))

    tmp = (out_file.with_name(f".{out_file.name}.{secrets.token_hex(4)}.partial")
           if out_file is not None else None)
    try:
        with _target(tmp) as out:
            try:
                res = link.copy_out(["image", "export", name, "-o", "-", "--json"], out,
                                    limit=BUNDLE_MAX, chunk=arrived)
                if res.returncode == 0 and tmp is not None:
                    out.flush()
                    os.fsync(out.fileno())  # whole on disk before it takes FILE's name
            except OSError as exc:  # a full disk, or standard output closed
                raise HostError(f"cannot write the bundle to {out_file or 'standard output'}"
                                f": {exc.strerror or exc}") from exc
        if res.returncode != 0:
            raise _remote_error(app, res.stderr)
        said = _last_json(res.stderr)
        if said is None or "sha256" not in said:
            raise DaemonUnavailable(f"the banger on {app.remote} did not say what it "
                                    "exported; nothing of it was kept")
        if (said.get("sha256"), said.get("size_bytes")) != (digest.hexdigest(),
                                                           progress.done):
            raise DaemonUnavailable(
                f"the bundle from {app.remote} is not what its banger exported "
                f"({progress.done} bytes, sha256 {digest.hexdigest()}; it said "
                f"{said.get('size_bytes')} bytes, sha256 {said.get('sha256')}); "
                "nothing of it was kept", hint="export it again")
        if tmp is not None and out_file is not None:
            os.replace(tmp, out_file)
            with contextlib.suppress(OSError):  # the bundle is in place: the rest is care
                fsync_path(out_file.parent)
    except OutputTooLarge as exc:
        raise DaemonUnavailable(f"the banger on {app.remote} sent more than {BUNDLE_MAX} "
                                "bytes for one bundle; nothing of it was kept") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return {**said, "name": name, "path": str(out_file) if out_file is not None else "-",
            "size_bytes": progress.done, "sha256": digest.hexdigest()}


@contextlib.contextmanager
def _target(tmp: Path | None) -> Iterator[IO[bytes]]:
    """A file to write to: ``tmp`` (made new, 0644 as a file the user writes), or
    standard output."""
    if tmp is None:
        yield sys.stdout.buffer
        try:
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise HostError(f"cannot write the bundle to standard output: "
                            f"{exc.strerror or exc}") from exc
        return
    try:
        fh: IO[bytes] = tmp.open("xb")
    except OSError as exc:
        raise HostError(f"cannot write {tmp.parent}: {exc.strerror or exc}") from exc
    with fh:
        yield fh


def _last_json(stderr: bytes) -> dict[str, Any] | None:
    """The last JSON object the remote banger printed on stderr (an indented one, its
    ``{`` alone on a line), or None. ``stderr`` is bounded by the link."""
    lines = stderr.decode(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if not starts:
        return None
    try:
        doc = json.loads("\n".join(lines[starts[-1]:]))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _remote_error(app: App, stderr: bytes) -> BangerError:
    """The remote banger's error (JSON, or ``error:``/``hint:`` lines) as an error, or
    a plain one when it said none."""
    said = _last_json(stderr)
    error = said.get("error") if said is not None else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        hint = error.get("hint")
        return BangerError(error["message"][:1000],
                           hint=hint[:500] if isinstance(hint, str) else "")
    lines = stderr.decode(errors="replace").splitlines()
    message = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), None)
    hint = next((ln[len("hint: "):] for ln in lines if ln.startswith("hint: ")), "")
    if message is None:
        tail = "\n".join(lines[-3:])[-300:] or "no reason given"
        return DaemonUnavailable(f"the banger on {app.remote} did not export: {tail}")
    return BangerError(message[:1000], hint=hint[:500])
