"""Finalize with apt: what a Debian or Ubuntu image lacks, installed in a helper VM.

A pulled image's ``apt-get``, ``dpkg`` and maintainer scripts are programs from an
untrusted image: they never run on the host, not even in a chroot there. The pulled
root file system (already an ext4) is attached as a third disk (``/dev/vdc``) to a
throwaway helper VM of the default image; inside it the disk is mounted and the
image's own apt installs :data:`rootfs.APT_PACKAGES` in a chroot.

The helper has no route out (a VM's default guest network). apt reaches its mirror
through an SSH remote forward that the daemon's own ``ssh`` opens to exactly the
mirror's host and port: the guest's ``127.0.0.1:<port>`` leads there and nowhere
else, and a mirror named by host name is mapped to ``127.0.0.1`` in the chroot's
``/etc/hosts`` for the run (so HTTP ``Host`` and TLS names stay right). Debian images
use ``debian_mirror``, Ubuntu images ``ubuntu_mirror``; the image's own sources,
lists and caches are left as they were.

The helper VM is an ordinary VM named ``finalize-<operation id>`` (visible in ``vm
list`` while it runs), destroyed when the install ends, fails or is cancelled; one
left by a daemon that died is destroyed at start-up (``reconcile``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from banger.api.params import CreateParams
from banger.daemon.guest import SSH_PORT
from banger.daemon.oci.rootfs import APT_PACKAGES, RootInfo
from banger.daemon.opstate import Operation
from banger.daemon.vmcreate import begin_create
from banger.daemon.vmdelete import destroy
from banger.daemon.vms import wait_op
from banger.errors import BadRequest, BangerError, CommandFailed, GuestError
from banger.names import is_dns_label

if TYPE_CHECKING:
    from banger.config import Config
    from banger.daemon.core import Daemon

log = logging.getLogger("banger.imagefinalize")

HELPER_PREFIX = "finalize-"
HELPER_MEMORY_MIB = 1024
# Room the packages need on the pulled disk beyond the image's own files (a sparse file).
APT_HEADROOM = 1 << 30
APT_TIMEOUT_S = 1800.0
_CODENAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# Where the disk is mounted in the helper, and the chroot-side scratch names.
TARGET = "/run/banger-finalize"
SCRATCH = "/tmp/banger-apt"


@dataclass(frozen=True)
class Mirror:
    """An apt mirror as the chroot names it, and the forward that reaches it."""

    url: str  # written into the chroot's temporary sources list
    host: str
    port: int
    by_name: bool  # the chroot's /etc/hosts maps ``host`` to 127.0.0.1 for the run

    @property
    def forward(self) -> str:
        """The ``ssh -R`` spec: the guest's 127.0.0.1:port to host:port from the daemon."""
        return f"127.0.0.1:{self.port}:{self.host}:{self.port}"


@dataclass(frozen=True)
class AptJob:
    """What a helper VM installs into a pulled Debian or Ubuntu root."""

    os_id: str  # "debian" or "ubuntu"
    codename: str
    mirror: Mirror
    packages: tuple[str, ...] = APT_PACKAGES


def mirror_for(url: str, setting: str) -> Mirror:
    """Check the mirror URL from config ``setting`` and say how the chroot reaches it.

    Raises:
        BadRequest: not ``http(s)://host[:port]/path``, a user name in it, an IPv6
            literal, or port 22 (the guest's sshd holds it).
    """
    hint = f"set {setting} to a URL like http://deb.debian.org/debian"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{setting} {url!r} is not an http(s) URL", hint=hint)
    if parts.username or parts.password:
        raise BadRequest(f"{setting} must not carry a user name or password", hint=hint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BadRequest(f"{setting} {url!r} has a bad port", hint=hint) from None
    if port == SSH_PORT:
        raise BadRequest(f"{setting} uses port {SSH_PORT}, which the helper VM's sshd holds",
                         hint="serve the mirror on another port")
    host = parts.hostname
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        # urlsplit lower-cases the host name: each label must be a DNS label.
        if len(host) > 253 or not all(is_dns_label(label) for label in host.split(".")):
            raise BadRequest(f"{setting} host {host!r} is not a host name", hint=hint) from None
        return Mirror(url=url, host=host, port=port, by_name=True)
    if addr.version != 4:
        raise BadRequest(f"{setting}: IPv6 mirror addresses are not supported",
                         hint="name the mirror by host name or IPv4 address")
    # The chroot reaches an address mirror at its own 127.0.0.1 (same port).
    local = urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, "", ""))
    return Mirror(url=local, host=host, port=port, by_name=False)


def plan(cfg: Config, info: RootInfo, has_apt: bool, ref: str) -> AptJob | None:
    """The install that makes a tree lacking :meth:`RootInfo.missing` pieces bootable,
    or None when apt cannot (not Debian-like, or no apt-get in the image).

    Raises:
        BadRequest: a Debian-like image without a usable ``VERSION_CODENAME``, or a bad
            mirror setting.
    """
    if not info.debian_like or not has_apt:
        return None
    if not _CODENAME.match(info.version_codename):
        raise BadRequest(f"{ref} has apt but no release codename in its os-release, so "
                         "banger cannot tell which packages to install",
                         hint="build an image FROM it that installs "
                              f"{' '.join(APT_PACKAGES)}")
    ubuntu = info.os_id == "ubuntu" or ("ubuntu" in info.os_like and info.os_id != "debian")
    if ubuntu:
        return AptJob("ubuntu", info.version_codename,
                      mirror_for(cfg.ubuntu_mirror, "ubuntu_mirror"))
    return AptJob("debian", info.version_codename,
                  mirror_for(cfg.debian_mirror, "debian_mirror"))


def guest_script(job: AptJob) -> str:
    """The helper's shell script: mount ``/dev/vdc``, install in a chroot, put every
    temporary change back, unmount. It exits non-zero if anything fails or a piece
    banger needs is still missing afterwards."""
    t = TARGET
    q = shlex.quote
    sources = f"deb {job.mirror.url} {job.codename} main\n"
    apt_opts = " ".join([
        f"-o Dir::Etc::SourceList={SCRATCH}/sources.list",
        "-o Dir::Etc::SourceParts=/nonexistent",
        f"-o Dir::State::Lists={SCRATCH}/lists",
        f"-o Dir::Cache::Archives={SCRATCH}/archives",
        "-o Dpkg::Progress-Fancy=0",
        "-o APT::Sandbox::User=root",
        "-o Acquire::Retries=3",
        "-o Acquire::Languages=none",
        # No fsync per file: the helper syncs once at the end, and a failed install
        # discards the whole disk anyway.
        "-o Dpkg::Options::=--force-unsafe-io",
    ])
    hosts_line = f"127.0.0.1 {job.mirror.host}" if job.mirror.by_name else ""
    packages = " ".join(job.packages)
    return f"""set -eu
t={t}
mkdir -p $t
mount -t ext4 /dev/vdc $t
restore() {{
    set +e
    if [ -e /run/banger-hosts.saved ]; then cat /run/banger-hosts.saved > $t/etc/hosts
    elif [ -e /run/banger-hosts.none ]; then rm -f $t/etc/hosts; fi
    [ -e /run/banger-policy.ours ] && rm -f $t/usr/sbin/policy-rc.d
    rm -rf $t{SCRATCH}
    for m in dev/pts dev sys proc; do mountpoint -q $t/$m && umount $t/$m; done
    sync
    umount $t
}}
trap restore EXIT
mkdir -p $t/proc $t/sys $t/dev $t/tmp $t/etc $t/usr/sbin
mount -t proc proc $t/proc
mount -t sysfs sysfs $t/sys
mount --bind /dev $t/dev
mkdir -p $t/dev/pts && mount -t devpts devpts $t/dev/pts || true
mkdir -p $t{SCRATCH}/lists/partial $t{SCRATCH}/archives/partial
printf %s {q(sources)} > $t{SCRATCH}/sources.list
if [ -n {q(hosts_line)} ]; then
    if [ -e $t/etc/hosts ]; then cp $t/etc/hosts /run/banger-hosts.saved
    else touch /run/banger-hosts.none; fi
    printf '%s\\n' {q(hosts_line)} >> $t/etc/hosts
fi
if [ ! -e $t/usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\\nexit 101\\n' > $t/usr/sbin/policy-rc.d
    chmod 755 $t/usr/sbin/policy-rc.d
    touch /run/banger-policy.ours
fi
export DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "apt-get update from {job.mirror.url} ({job.codename})"
chroot $t apt-get -q {apt_opts} update
chroot $t apt-get -q -y --no-install-recommends {apt_opts} install {packages}
rm -f $t/etc/ssh/ssh_host_*
rm -f $t/etc/machine-id && : > $t/etc/machine-id && chmod 444 $t/etc/machine-id
chroot $t /bin/sh -c 'test -x /usr/sbin/sshd && test -x /sbin/init && command -v ip \\
    && command -v ssh-keygen && command -v mount && command -v blkid' >/dev/null
echo "installed {packages}"
"""


def install(d: Daemon, disk: Path, job: AptJob, op: Operation) -> None:
    """Run :func:`guest_script` for ``disk`` in a helper VM of the default image.

    Raises:
        BadRequest: apt failed in the image (the tail of its output in the hint).
        Cancelled: the pull was cancelled; the helper is destroyed first.
    """
    name = f"{HELPER_PREFIX}{op.id}"
    op.report(f"starting helper VM {name} to run the image's apt")
    create = begin_create(d, CreateParams(name=name, image=d.cfg.default_image_name,
                                          memory_mib=HELPER_MEMORY_MIB, nat=False),
                          extra_disks=(str(disk),))
    try:
        while not create.wait(0.5):
            if op.cancel.cancelled:
                create.request_cancel(op.cancel.reason)
        vm = wait_op(create)
        guest = d.dial(vm["id"], vm["ip"])
        argv = guest.argv(guest_script(job), forwards=[job.mirror.forward])
        try:
            d.runner.stream(argv, desc=f"install {' '.join(job.packages)} with the image's apt",
                            on_line=lambda line: op.report(line[:200]), timeout=APT_TIMEOUT_S,
                            cancel=op.cancel)
        except (CommandFailed, GuestError) as exc:
            tail = str(exc.details.get("stderr") or exc.message)[-1500:]
            raise BadRequest(f"installing {' '.join(job.packages)} with the image's apt "
                             f"({job.os_id} {job.codename}, mirror {job.mirror.url}) failed",
                             hint=tail) from exc
    finally:
        vm_row = d.db.find_vm(name)
        if vm_row is not None:
            try:
                destroy(d, vm_row.id, reason="image finalize finished")
            except BangerError as exc:
                log.error("helper VM %s: destroy failed: %s", name, exc)
