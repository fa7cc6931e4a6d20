"""Start QEMU confined and detached; run as root as a script, never imported.

Usage::

    python -I _spawn.py < SPEC.json

The spec (built by ``QemuDriver``) names:

- ``cgroup_procs``: the VM's ``cgroup.procs`` files. The launcher writes its own
  pid to each first, so QEMU (its grandchild) is in the VM's cgroup from its
  first instruction;
- ``files``: ``{name: [path, "r"|"rw"]}`` opened here, as root, and handed to
  QEMU as ``/proc/self/fd/N``. The VMM user cannot reach banger's state or
  runtime directories by path; re-opening a descriptor through /proc checks
  only the file's own permissions (the driver makes the disks and the serial
  log the VMM user's);
- ``tap``: a TAP name, attached here (``TUNSETIFF`` needs CAP_NET_ADMIN) and
  given to QEMU as ``-netdev tap,fd=N``;
- ``listen``: ``{name: socket path}``, Unix sockets bound and listening here
  (QEMU's QMP, ``-chardev socket,fd=N``);
- ``stderr``: the file QEMU's stdout and stderr append to;
- ``command``: the argv (``setpriv ... -- qemu ...``) where ``{fd:NAME}`` is
  replaced by the descriptor number of ``NAME``.

Then, like ``fcproc/_spawn.py``, it detaches QEMU with :func:`banger.detach.run`
(fork, ``setsid()``, fork again, exec in the grandchild), so QEMU is re-parented
to init and outlives bangerd. QEMU cannot ``-daemonize`` itself under ``-sandbox
spawn=deny``. Prints ``<pid>`` and exits 0 once the command is exec'd; prints the
reason on stderr and exits 127 if exec fails, 1 if the set-up fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import sys
from typing import Any

from banger.detach import run

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_PLACEHOLDER = re.compile(r"\{fd:([a-z_][a-z0-9_]*)\}")


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


def _listen(path: str) -> int:
    if os.path.lexists(path):  # a stale socket from an earlier run: bind() would fail
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file: root's only (bangerd connects as root)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(8)
    return sock.detach()


def _open_all(spec: dict[str, Any]) -> dict[str, int]:
    fds: dict[str, int] = {}
    for name, (path, mode) in spec.get("files", {}).items():
        fds[name] = os.open(path, os.O_RDONLY if mode == "r" else os.O_RDWR)
    if spec.get("tap"):
        fds["tap"] = _open_tap(spec["tap"])
    for name, path in spec.get("listen", {}).items():
        fds[name] = _listen(path)
    return fds


def main() -> int:
    """Read the spec on stdin, set up, detach QEMU; print its pid. Returns the exit status."""
    spec = json.load(sys.stdin)
    try:
        for procs in spec.get("cgroup_procs", []):
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
        fds = _open_all(spec)
        out_fd = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"cannot set up QEMU: {exc.strerror or exc}{where}\n")
        return 1
    for fd in fds.values():
        os.set_inheritable(fd, True)
    try:
        command = [_PLACEHOLDER.sub(lambda m: str(fds[m.group(1)]), a) for a in spec["command"]]
    except KeyError as exc:
        sys.stderr.write(f"the command names an unknown descriptor {exc}\n")
        return 1
    return run(command, out_fd)


if __name__ == "__main__":
    sys.exit(main())
