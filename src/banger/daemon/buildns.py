"""A user, mount and pid namespace of the daemon's own, for an image build without root.

debootstrap makes files for many users and mounts ``/proc`` and ``/dev`` in its
target; a daemon running as its owner has one uid and no capability. So the build
runs where it is root of a namespace: :class:`BuildNamespace` starts a holder process
in a new user namespace, the root helper maps it (``userns.map``: 0 is the daemon's
own uid, 1..65535 its user's subordinate ids), and the holder then makes the mount and
pid namespaces the build's commands join (``nsenter``). Files debootstrap makes as
root stay the daemon's on the host; the others belong to its subordinate ids, so
whatever reads or removes the tree runs in the namespace too. Nothing the build mounts
is seen outside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from banger.errors import HostError
from banger.fsutil import mount_field
from banger.hostops.client import HostOps
from banger.runner import PrefixRunner, Runner

START_TIMEOUT_S = 10.0
# The holder: in its new user namespace it waits for the map (a line on stdin), then,
# as that namespace's root, makes the mount and pid namespaces and sleeps in them.
_HOLDER = ["unshare", "--user", "--", "sh", "-c",
           "read go && exec unshare --mount --propagation private --pid --fork "
           "--kill-child -- sleep infinity"]


class BuildNamespace:
    """``with BuildNamespace(host) as ns:`` run commands through ``ns.runner(...)``."""

    def __init__(self, host: HostOps) -> None:
        self.host = host
        self._holder: subprocess.Popen[bytes] | None = None
        self.target = 0  # the pid whose namespaces commands join

    def __enter__(self) -> BuildNamespace:
        self._holder = subprocess.Popen(_HOLDER, stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        try:
            pid = self._holder.pid
            self._wait(lambda: _userns(pid) not in (None, _userns(os.getpid())),
                       "the build's user namespace")
            self.host.userns_map(pid)
            assert self._holder.stdin is not None
            self._holder.stdin.write(b"go\n")
            self._holder.stdin.close()
            self._wait(lambda: _sleeper(pid) is not None, "the build's mount and pid namespaces")
            self.target = _sleeper(pid) or 0
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def runner(self, inner: Runner) -> Runner:
        """``inner`` with every command run in the namespaces, as their root."""
        return PrefixRunner(inner, ["nsenter", f"--target={self.target}", "--user",
                                    "--mount", "--pid", "--"])

    def remove(self, runner: Runner, path: Path) -> None:
        """Remove ``path`` from inside (the tree's files belong to subordinate ids), after
        unmounting what a build that failed half-way left mounted in it; ``rm`` never
        crosses into another file system."""
        for point in sorted(self.mounts_below(path), key=len, reverse=True):
            runner.run(["umount", "--lazy", point], desc=f"unmount {point}", timeout=60,
                       check=False)
        runner.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                   desc=f"remove {path}", timeout=900)

    def mounts_below(self, path: Path) -> list[str]:
        """Mount points in the namespace at or below ``path``."""
        try:
            lines = Path(f"/proc/{self.target}/mountinfo").read_text().splitlines()
        except OSError:
            return []
        top = str(path)
        points = [mount_field(line.split()[4]) for line in lines if len(line.split()) > 4]
        return [p for p in points if p == top or p.startswith(top + "/")]

    def close(self) -> None:
        """End the holder and with it the namespaces (idempotent)."""
        if self._holder is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._holder.pid, signal.SIGKILL)
        self._holder.wait()
        self._holder = None

    def _wait(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():  # type: ignore[operator]
            holder = self._holder
            if holder is not None and holder.poll() is not None:
                err = holder.stderr.read().decode(errors="replace").strip() \
                    if holder.stderr else ""
                raise HostError(f"cannot make {what}: {err or f'exit {holder.returncode}'}",
                                hint="unprivileged user namespaces must be enabled "
                                     "(sysctl kernel.unprivileged_userns_clone=1)")
            if time.monotonic() > deadline:
                raise HostError(f"{what} did not appear within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.01)


def _userns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None


def _sleeper(pid: int) -> int | None:
    """The holder's child once it sleeps in the new namespaces."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            return None
        child = int(children[0])
        return child if Path(f"/proc/{child}/comm").read_text().strip() == "sleep" else None
    except (OSError, ValueError):
        return None
