"""Image subsystem helpers: the built-in recipe, guest agent files, validators, staging.

Pure functions and data only; the daemon runs the commands. The built-in
image is a debootstrapped Debian with systemd and sshd, a Debian kernel and
initrd for QEMU, and ``banger-init``, a tiny boot unit that configures the
network, host name, resolver and SSH host key from ``banger.*`` kernel
arguments. Keeping all per-VM settings on the kernel command line means a
VM's root disk never has to be opened on the host.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from banger.errors import BadRequest, NotFound

RECIPE_VERSION = 4  # bump when the build procedure changes in a way the recipe text does not show

ROOT_LABEL = "banger-root"
WORK_LABEL = "banger-work"

GUEST_INIT = r"""#!/bin/sh
# banger-init: per-boot guest set-up from banger.* kernel arguments (written by banger).
set -u
ip=""; gw=""; dns=""; host=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    banger.ip=*) ip=${arg#banger.ip=} ;;
    banger.gw=*) gw=${arg#banger.gw=} ;;
    banger.dns=*) dns=${arg#banger.dns=} ;;
    banger.hostname=*) host=${arg#banger.hostname=} ;;
  esac
done
if [ -n "$host" ]; then
  hostname "$host"
  echo "$host" > /etc/hostname
  grep -q "[[:space:]]$host\$" /etc/hosts || printf '127.0.1.1\t%s\n' "$host" >> /etc/hosts
fi
ip link set lo up
# This runs before udev's coldplug (sshd waits for it, so it goes first): load the NIC's
# driver here rather than wait for udev to, then wait for the NIC, at most 10 s.
first_nic() {
  for d in /sys/class/net/*; do
    n=${d##*/}
    if [ "$n" != lo ]; then echo "$n"; return; fi
  done
}
dev=$(first_nic)
[ -n "$dev" ] || modprobe -q virtio_net 2>/dev/null || true
i=0
while [ -z "$dev" ] && [ "$i" -lt 100 ]; do
  sleep 0.1; i=$((i + 1))
  dev=$(first_nic)
done
if [ -n "$dev" ] && [ -n "$ip" ]; then
  ip addr flush dev "$dev"
  ip addr add "$ip" dev "$dev"
  ip link set "$dev" up
  if [ -n "$gw" ]; then ip route replace default via "$gw"; fi
fi
if [ -n "$dns" ]; then
  rm -f /etc/resolv.conf
  printf 'nameserver %s\nsearch vm\n' "$dns" > /etc/resolv.conf
fi
# The work disk (label banger-work) is the guest's /root and holds authorized_keys, so it
# must be mounted before sshd starts. Wait for its device at most 10 s (100 x 0.1 s).
if ! mountpoint -q /root; then
  i=0
  while [ "$i" -lt 100 ] && ! blkid -L banger-work >/dev/null 2>&1; do
    sleep 0.1; i=$((i + 1))
  done
  mount -o noatime LABEL=banger-work /root || echo "banger-init: no work disk" >&2
fi
chmod 700 /root
# One ed25519 host key per VM, made on its first boot (RSA keygen takes ~10 s under TCG).
# Synced at once: a VM killed seconds later must not come back with a different key,
# which banger's known_hosts would (rightly) refuse.
if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then
  rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub
  ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
  sync /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh
fi
exit 0
"""

GUEST_INIT_UNIT = """[Unit]
Description=banger guest set-up (network, host name, SSH host key)
# First thing after PID 1 is up: the root is mounted read-write by the kernel (rw on the
# command line), the disks and the NIC's driver need no udev. sshd waits only for this.
DefaultDependencies=no
Conflicts=shutdown.target
Before=network.target ssh.service shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/banger-init
# Ahead of the two dozen units starting beside it: sshd (and so the VM) waits for this.
Nice=-10

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = """# Written by banger: key-only root login, one ed25519 host key made at first boot.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
HostKey /etc/ssh/ssh_host_ed25519_key
UseDNS no
"""

FSTAB = """# Written by banger. The root disk is always the first virtio disk; banger-init
# mounts the work disk on /root.
/dev/vda / ext4 defaults,noatime,errors=remount-ro 0 1
"""

# sshd answers as soon as banger-init has set up the network, the work disk (its
# authorized_keys) and the host key, instead of after all of sysinit.target and
# basic.target (udev coldplug, logind, dbus: over ten seconds of a TCG guest's boot).
SSH_DROPIN = """# Written by banger: start sshd right after banger-init, not after basic.target.
[Unit]
DefaultDependencies=no
Wants=banger-init.service
After=banger-init.service
Conflicts=shutdown.target
Before=shutdown.target

[Service]
# No `sshd -t` first: one more sshd start under emulation; a bad config fails the start
# just the same.
ExecStartPre=
# sshd answers while the rest of the boot still runs: serve connections first (sessions
# move to their own slice once logind is up).
CPUWeight=1000
"""

UNIT_PATH = "etc/systemd/system/banger-init.service"
UNIT_WANTS = "etc/systemd/system/multi-user.target.wants/banger-init.service"


@dataclass(frozen=True)
class GuestFile:
    path: str  # relative to the guest root
    content: str
    mode: int = 0o644


def guest_agent_files() -> list[GuestFile]:
    """The files banger adds to every image (built or registered)."""
    return [
        GuestFile("usr/local/sbin/banger-init", GUEST_INIT, 0o755),
        GuestFile(UNIT_PATH, GUEST_INIT_UNIT),
        GuestFile("etc/ssh/sshd_config.d/banger.conf", SSHD_CONFIG),
        GuestFile("etc/systemd/system/ssh.service.d/banger.conf", SSH_DROPIN),
    ]


@dataclass(frozen=True)
class Recipe:
    """The built-in image recipe (``debian-bookworm``)."""

    name: str = "debian-bookworm"
    suite: str = "bookworm"
    variant: str = "minbase"
    kernel_package: str = "linux-image-cloud-amd64"
    packages: tuple[str, ...] = (
        "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "git",
        "ca-certificates", "iproute2", "procps", "less", "curl", "make", "python3",
        "xz-utils", "initramfs-tools",
    )
    # Units that cost boot time in a throwaway VM and do nothing useful there. The
    # modprobe@ ones preload modules a VM has no hardware for (drm, efi_pstore) or that
    # load on first use of their device node anyway (loop, fuse, dm_mod); hugetlbfs and
    # the debug/tracing mounts serve no dev sandbox by default (mount them by hand).
    # Each costs a second or more of a TCG guest's CPU while sshd is starting.
    masked_units: tuple[str, ...] = (
        "e2scrub_reap.service", "apt-daily.timer", "apt-daily-upgrade.timer",
        "systemd-timesyncd.service", "modprobe@drm.service", "modprobe@efi_pstore.service",
        "modprobe@loop.service", "modprobe@fuse.service", "modprobe@dm_mod.service",
        "dev-hugepages.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    )
    extra_files: tuple[GuestFile, ...] = field(default_factory=lambda: (
        GuestFile("etc/fstab", FSTAB),
        GuestFile("etc/hostname", "banger\n"),
        GuestFile("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"),
    ))

    def all_packages(self) -> list[str]:
        """The packages debootstrap installs: the recipe's list plus the kernel package."""
        return [*self.packages, self.kernel_package]

    def files(self) -> list[GuestFile]:
        """Every file written into the built root: banger's agent files, then the recipe's."""
        return [*guest_agent_files(), *self.extra_files]

    def digest(self) -> str:
        """A hash of everything that decides the image's content (not the mirror)."""
        doc = {
            "version": RECIPE_VERSION, "name": self.name, "suite": self.suite,
            "variant": self.variant, "packages": self.all_packages(),
            "masked": list(self.masked_units),
            "files": [[f.path, f.content, f.mode] for f in self.files()],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def debootstrap_argv(self, target: Path, mirror: str, cache_dir: Path) -> list[str]:
        """The debootstrap command that builds the base root into ``target``.

        Args:
            target: the empty root directory to fill.
            mirror: the Debian mirror URL (``debian_mirror`` in the config).
            cache_dir: debootstrap's package cache, kept between builds.
        """
        return [
            "debootstrap", f"--variant={self.variant}",
            f"--include={','.join(self.all_packages())}",
            f"--cache-dir={cache_dir}",
            self.suite, str(target), mirror,
        ]


BUILTIN_RECIPES = {r.name: r for r in (Recipe(),)}


def recipe_for(name: str) -> Recipe:
    """The built-in recipe called ``name``.

    Raises:
        NotFound: there is no such built-in recipe (the hint lists them).
    """
    try:
        return BUILTIN_RECIPES[name]
    except KeyError:
        raise NotFound(
            f"no built-in recipe named {name!r}",
            hint=f"built-in images: {', '.join(sorted(BUILTIN_RECIPES))}; "
                 "or bring your own with `banger image register`",
        ) from None


def install_files(root: Path, files: list[GuestFile], masked: tuple[str, ...] = ()) -> None:
    """Write guest files into an unpacked root tree and enable/mask units by symlink."""
    for f in files:
        dest = safe_join(root, f.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink():
            dest.unlink()
        dest.write_text(f.content)
        dest.chmod(f.mode)
    wants = safe_join(root, UNIT_WANTS)
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.unlink(missing_ok=True)
    wants.symlink_to("/" + UNIT_PATH)
    for unit in masked:
        link = safe_join(root, f"etc/systemd/system/{unit}")
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def finalize_tree(root: Path, workseed: Path) -> None:
    """Make a debootstrapped tree image-ready: no host keys, no caches, /root copied out.

    The image's ``/root`` becomes the work-seed: each VM's work disk is made from
    it and mounted over ``/root``. The root disk keeps its own copy underneath, so
    a registered copy of this image yields the same work-seed.
    """
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages",
                    "var/lib/apt/lists/*_Release*", "var/lib/apt/lists/*_InRelease"):
        for junk in root.glob(pattern):
            junk.unlink()
    machine_id = root / "etc/machine-id"
    if machine_id.exists():
        machine_id.write_text("")  # systemd makes a fresh one per VM on first boot
    workseed.mkdir(parents=True, exist_ok=True)
    home = root / "root"
    home.mkdir(mode=0o700, exist_ok=True)
    shutil.copytree(home, workseed, symlinks=True, dirs_exist_ok=True)
    workseed.chmod(0o700)


def find_boot_files(root: Path) -> tuple[Path, Path | None]:
    """The newest ``vmlinuz-*`` in ``root/boot`` and its matching initrd."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise NotFound(f"no kernel (vmlinuz-*) in {root / 'boot'}")
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{version}"
    return kernel, initrd if initrd.exists() else None


def _version_key(p: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"[.-]", p.name)]


def rootfs_size(tree_bytes: int) -> int:
    """Size of the image file for a tree: 40% headroom for ext4 metadata, 256 MiB granules."""
    granule = 256 << 20
    want = int(tree_bytes * 1.4) + granule
    return max(1 << 30, (want + granule - 1) // granule * granule)


def tree_size(root: Path) -> int:
    """Bytes used by a tree (regular files, not following symlinks)."""
    total = 0
    for p in root.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        total += st.st_blocks * 512 if not p.is_symlink() else 0
    return total


def safe_join(root: Path, rel: str) -> Path:
    """``root/rel`` refusing absolute paths and ``..`` that would leave ``root``."""
    if rel.startswith("/") or "\0" in rel:
        raise BadRequest(f"path {rel!r} must be relative to the image root")
    parts = Path(rel).parts
    if any(p == ".." for p in parts):
        raise BadRequest(f"path {rel!r} may not contain '..'")
    return root.joinpath(*parts)


def injected_dirs(files: list[GuestFile]) -> list[str]:
    """Every directory :func:`debugfs_script` needs, parents first."""
    dirs: list[str] = []
    for rel in [*(f.path for f in files), UNIT_WANTS]:
        for d in _ancestors(str(Path("/" + rel).parent)):
            if d not in dirs:
                dirs.append(d)
    return dirs


def debugfs_script(files: list[GuestFile], staging: Path, missing_dirs: set[str]
                   ) -> tuple[str, list[Path]]:
    """A ``debugfs -w -f`` script that injects ``files`` into an ext4 image.

    Used for registered images, whose root file system banger does not build:
    the guest agent is written straight into the ext4 image, no mount needed.
    Only ``missing_dirs`` are created: debugfs ``mkdir`` over an existing name
    corrupts the directory. Returns the script and the local files it reads.
    """
    lines = [f"mkdir {d}" for d in injected_dirs(files) if d in missing_dirs]
    temps: list[Path] = []
    for i, f in enumerate(files):
        local = staging / f"inject-{i}"
        local.write_text(f.content)
        local.chmod(f.mode)
        temps.append(local)
        lines += [
            f"rm /{f.path}",
            f"write {local} /{f.path}",
            f"set_inode_field /{f.path} mode 0{0o100000 | f.mode:o}",
            f"set_inode_field /{f.path} uid 0",
            f"set_inode_field /{f.path} gid 0",
        ]
    lines += [f"rm /{UNIT_WANTS}", f"symlink /{UNIT_WANTS} /{UNIT_PATH}"]
    return "\n".join(lines) + "\n", temps


def _ancestors(path: str) -> list[str]:
    out: list[str] = []
    p = Path(path)
    while str(p) != "/":
        out.append(str(p))
        p = p.parent
    return list(reversed(out))
