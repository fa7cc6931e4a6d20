"""Start a VMM (QEMU, or Firecracker's jailer) detached; run as root as a script,
never imported.

Usage (by :mod:`banger.hostops.executor`, with the descriptors inherited)::

    python -I vmm_spawn.py < SPEC.json

The spec names:

- ``cgroup_procs``: the VM's ``cgroup.procs`` files (QEMU's; the jailer makes and
  joins its own). The launcher writes its own pid to each first, so QEMU (its
  grandchild) is in the VM's cgroup from its first instruction;
- ``fds``: ``{name: descriptor}``, inherited from the executor, which opened the
  VM's files (never through a symlink), attached the TAP and bound the QMP socket;
- ``stderr_fd``: the descriptor the VMM's stdout and stderr go to (QEMU's log,
  Firecracker's serial console);
- ``command``: the argv (``setpriv ... -- qemu ...``, or ``jailer ...``) where
  ``{fd:NAME}`` is replaced by the descriptor number of ``NAME``;
- ``own_netns``: true for QEMU, which then runs in a new network namespace holding
  nothing but a loopback that is down. QEMU reaches the guest's network through the
  TAP descriptor it inherits (opened in the host's namespace) and everything else
  through descriptors and paths, so it needs no network of its own; a VMM the guest
  took over can open no connection to the host's services, loopback included.

Then it detaches the VMM with :func:`banger.detach.run` (fork, ``setsid()``, fork
again, exec in the grandchild), so it is re-parented to init and outlives the
daemon and the helper. QEMU cannot ``-daemonize`` itself under ``-sandbox
spawn=deny``. Prints ``<pid>`` and exits 0 once the command is exec'd; prints the
reason on stderr and exits 127 if exec fails, 1 if the set-up fails.
"""

from __future__ import annotations

import json
import os
import re
import sys

from banger.detach import run
from banger.netns import unshare_network

_PLACEHOLDER = re.compile(r"\{fd:([a-z_][a-z0-9_]*)\}")


def main() -> int:
    """Read the spec on stdin, join the cgroup, detach QEMU; print its pid."""
    spec = json.load(sys.stdin)
    try:
        for procs in spec.get("cgroup_procs", []):
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
    except OSError as exc:
        sys.stderr.write(f"cannot join the VM's cgroup: {exc.strerror or exc} "
                         f"({exc.filename})\n")
        return 1
    if spec.get("own_netns"):
        try:
            unshare_network()
        except OSError as exc:
            sys.stderr.write("cannot give the VMM a network namespace of its own: "
                             f"{exc.strerror or exc}\n")
            return 1
    fds: dict[str, int] = {str(k): int(v) for k, v in spec["fds"].items()}
    for fd in fds.values():
        os.set_inheritable(fd, True)
    try:
        command = [_PLACEHOLDER.sub(lambda m: str(fds[m.group(1)]), a) for a in spec["command"]]
    except KeyError as exc:
        sys.stderr.write(f"the command names an unknown descriptor {exc}\n")
        return 1
    return run(command, int(spec["stderr_fd"]))


if __name__ == "__main__":
    sys.exit(main())
