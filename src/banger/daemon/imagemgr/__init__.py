"""Image subsystem helpers: the built-in recipe, guest agent files, validators, staging.

Pure functions and data only; the daemon runs the commands. The built-in
image is a debootstrapped Debian with systemd and sshd, a Debian kernel with
banger's own small initramfs (:mod:`.initramfs`) for QEMU, and ``banger-init``, a
tiny boot unit that configures the network, host name, resolver and SSH host key
from ``banger.*`` kernel arguments. Keeping all per-VM settings on the kernel command line means a
VM's root disk never has to be opened on the host.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from banger.agent.guest import AGENT_PATH, AGENT_UNIT_PATH, GUEST_AGENT_UNIT, agent_script
from banger.daemon.imagemgr import initramfs
from banger.errors import BadRequest, NotFound
from banger.vmm import IDENT_VSOCK_PORT

RECIPE_VERSION = 6  # bump when the build procedure changes in a way the recipe text does not show

ROOT_LABEL = "banger-root"
WORK_LABEL = "banger-work"

GUEST_INIT = r"""#!/bin/sh
# banger-init: per-boot guest set-up from banger.* kernel arguments (written by banger).
# sshd waits for this script, and under emulation every program it runs costs a tenth of a
# second or more: it uses shell built-ins wherever one does the job.
set -u
ip=""; gw=""; dns=""; host=""
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
  case "$arg" in
    banger.ip=*) ip=${arg#banger.ip=} ;;
    banger.gw=*) gw=${arg#banger.gw=} ;;
    banger.dns=*) dns=${arg#banger.dns=} ;;
    banger.hostname=*) host=${arg#banger.hostname=} ;;
  esac
done
if [ -n "$host" ]; then
  echo "$host" > /proc/sys/kernel/hostname
  echo "$host" > /etc/hostname
  known=no
  while read -r addr names; do
    for n in $names; do [ "$n" = "$host" ] && known=yes; done
  done < /etc/hosts
  [ "$known" = yes ] || printf '127.0.1.1\t%s\n' "$host" >> /etc/hosts
fi
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
# One `ip` for the whole network set-up; one per command where `ip` has no -batch (BusyBox).
net_cmds() {
  echo "link set lo up"
  if [ -n "$dev" ] && [ -n "$ip" ]; then
    echo "addr flush dev $dev"
    echo "addr add $ip dev $dev"
    echo "link set $dev up"
    if [ -n "$gw" ]; then echo "route replace default via $gw"; fi
  fi
}
if ! net_cmds | ip -force -batch - 2>/dev/null; then
  net_cmds | while read -r c; do ip $c; done
fi
if [ -n "$dns" ]; then
  # Never written through a symlink (systemd-resolved's stub, say).
  [ ! -L /etc/resolv.conf ] || rm -f /etc/resolv.conf
  printf 'nameserver %s\nsearch vm\n' "$dns" > /etc/resolv.conf
fi
# The work disk (label banger-work) is the guest's /root and holds authorized_keys, so it
# must be mounted before sshd starts. Its device is there at once on every VMM banger
# drives; when it is not, wait for it at most 10 s (100 x 0.1 s).
mounted=no
while read -r _ mnt _; do
  if [ "$mnt" = /root ]; then mounted=yes; fi
done < /proc/mounts
if [ "$mounted" = no ] && ! mount -o noatime LABEL=banger-work /root 2>/dev/null; then
  i=0
  while [ "$i" -lt 100 ] && ! blkid -L banger-work >/dev/null 2>&1; do
    sleep 0.1; i=$((i + 1))
  done
  mount -o noatime LABEL=banger-work /root || echo "banger-init: no work disk" >&2
fi
# (banger makes the work disk's root directory, /root, mode 0700 on the host.)
# One ed25519 host key per VM, installed on its first boot. banger made it on the host
# with the work disk (/root/.ssh/banger_host_ed25519_key): copied with built-ins, and
# still there should this copy not reach the disk before a crash. A work disk without one
# (made by an older banger) gets one made here, synced at once: a VM killed seconds later
# must not come back with a different key, which banger's known_hosts would (rightly)
# refuse. (RSA keygen takes ~10 s under TCG.)
k=/etc/ssh/ssh_host_ed25519_key
given=/root/.ssh/banger_host_ed25519_key
if [ ! -s "$k" ]; then
  rm -f "$k" "$k.pub"
  if [ -s "$given" ] && [ -s "$given.pub" ]; then
    key=""
    while IFS= read -r l; do key="$key$l
"; done < "$given"
    umask 077
    printf '%s' "$key" > "$k"
    umask 022
    IFS= read -r pub < "$given.pub"
    printf '%s\n' "$pub" > "$k.pub"
  else
    ssh-keygen -q -t ed25519 -N '' -f "$k"
    sync "$k" "$k.pub" /etc/ssh
  fi
fi
exit 0
"""

GUEST_IDENT = r"""#!/bin/sh
# banger-ident: a restored clone's own identity, from the host (written by banger).
# A snapshot holds this script blocked in its read below. When banger restores a clone of
# it, it writes the clone's identity into the VMM's identity channel before the clone's
# vCPUs run: the read returns and the clone becomes itself (clock, RNG, machine-id, host
# name, SSH host key, then MAC and address) before anything on the network can reach it.
# The channel is a virtio-serial port under QEMU; under Firecracker, which has none, a
# vsock port the host connects to (through Firecracker's vsock socket).
set -u
has_virtio() {  # a virtio device of type $1 (3: console, 19: vsock)
  for d in /sys/bus/virtio/devices/*; do
    [ -r "$d/device" ] || continue
    read -r id < "$d/device" || continue
    [ "$((id))" = "$1" ] && return 0
  done
  return 1
}
find_port() {
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    read -r n < "$p/name" || continue
    if [ "$n" = org.banger.ident ]; then echo "/dev/${p##*/}"; return; fi
  done
}
# The vsock listener: the host's connections (from CID 2 only) each bring one message,
# copied whole into the FIFO this script reads; it says when it listens by making $3.
VSOCK_LISTEN='
  my ($port, $fifo, $ready) = @ARGV;
  socket(my $s, 40, 1, 0) or die "banger-ident: no vsock: $!\n";
  bind($s, pack("SSLLx4", 40, 0, $port, 0xFFFFFFFF)) or die "banger-ident: vsock bind: $!\n";
  listen($s, 4) or die "banger-ident: vsock listen: $!\n";
  open(my $r, ">", $ready) or die "banger-ident: $ready: $!\n";
  close($r);
  open(my $out, ">", $fifo) or die "banger-ident: $fifo: $!\n";
  while (1) {
    my $peer = accept(my $c, $s) or do { select(undef, undef, undef, 0.1); next };
    my (undef, undef, undef, $cid) = unpack("SSLL", $peer);
    my $msg = "";
    if ($cid == 2) {
      while (length($msg) < 8192) {
        my $n = sysread($c, $msg, 8192 - length($msg), length($msg));
        last if !$n;
      }
    }
    close($c);
    syswrite($out, $msg) if length($msg) <= 4096 && $msg =~ /\nend\n\z/;
  }'
port="" vsock_pid=""
if has_virtio 3; then
  port=$(find_port)
  if [ -z "$port" ]; then
    modprobe -q virtio_console 2>/dev/null || true
    i=0
    while [ -z "$port" ] && [ "$i" -lt 50 ]; do
      sleep 0.1; i=$((i + 1)); port=$(find_port)
    done
  fi
elif has_virtio 19; then
  modprobe -q vmw_vsock_virtio_transport 2>/dev/null || true
  port=/run/banger-ident.vsock
  rm -f "$port" "$port.ready"
  mkfifo -m 600 "$port" || exit 1
  perl -e "$VSOCK_LISTEN" @VSOCK_PORT@ "$port" "$port.ready" & vsock_pid=$!
  i=0
  while [ ! -e "$port.ready" ]; do
    kill -0 "$vsock_pid" 2>/dev/null && [ "$i" -lt 100 ] || exit 1
    sleep 0.1; i=$((i + 1))
  done
fi
# No channel (a VM started without one): nothing will come.
[ -n "$port" ] || exit 0

nl='
'
# Every program a just-restored guest starts costs half a second or more under emulation
# (its code is translated afresh), so the two the wake-up needs, perl (the clock and the
# RNG, before anything else runs) and `ip`, are started here, before any snapshot holds
# this script: each waits on a FIFO of its own, its start-up already done, and a clone
# only feeds them. Once used they are gone: a snapshot of a clone starts them on demand.
# The rest is shell built-ins; what can wait (the connections of the machine this one
# was cloned from, syncing) comes after the status.
RESEED='
  my ($now, $s) = split " ", ($ARGV[0] eq "-" ? "@ARGV[1,2]" : do {
    open(my $in, "<", $ARGV[0]) or exit 1; scalar <$in> });
  $s = pack("H*", $s // "");
  if (defined $now && $now ne "-") {
    my $sec = int($now);
    my $ts = pack("qq", $sec, int(($now - $sec) * 1e9));
    syscall(227, 0, $ts);
  }
  open(my $f, ">", "/dev/urandom") or exit 1;
  my $info = pack("ii", 8 * length($s), length($s)) . $s;
  ioctl($f, 0x40085203, $info) or exit 1;
  ioctl($f, 0x5207, 0) or exit 1;'
RNG_FIFO=/run/banger-ident.rng NET_FIFO=/run/banger-ident.net
rng_pid="" net_pid=""
arm() {
  rm -f "$RNG_FIFO" "$NET_FIFO"
  mkfifo -m 600 "$RNG_FIFO" "$NET_FIFO" 2>/dev/null || return 0
  if command -v perl >/dev/null 2>&1; then
    perl -e "$RESEED" "$RNG_FIFO" & rng_pid=$!
  fi
  ip -force -batch "$NET_FIFO" >/dev/null 2>&1 & net_pid=$!
}
# Wait (at most about 5 s) until helper $1 blocks opening its FIFO, its start-up done:
# only then is it worth keeping in a snapshot.
settled() {
  i=0
  while [ -n "$1" ] && [ "$i" -lt 50 ]; do
    w=""
    read -r w < "/proc/$1/wchan" 2>/dev/null
    [ -n "$w" ] || return 0
    [ "$w" = wait_for_partner ] && return 0
    sleep 0.1; i=$((i + 1))
  done
}
# Feed a waiting helper ($1: its pid, $2: its FIFO) the text $3 and wait for its status;
# 127 when there is none (not started, or already used).
feed() {
  if [ -z "$1" ] || ! kill -0 "$1" 2>/dev/null; then return 127; fi
  printf '%s' "$3" > "$2"
  wait "$1"
}
reseed_and_set_clock() {
  # clock_settime(CLOCK_REALTIME) (syscall 227 on x86_64), then RNDADDENTROPY and
  # RNDRESEEDCRNG: from here on the clone's random numbers no longer follow from the
  # snapshot's (clones of one snapshot would otherwise share them for up to a minute).
  feed "$rng_pid" "$RNG_FIFO" "${now:--} $seed$nl"
  r=$?
  rng_pid=""
  if [ "$r" = 127 ] && command -v perl >/dev/null 2>&1; then
    perl -e "$RESEED" - "${now:--}" "$seed"
    r=$?
  fi
  if [ "$r" = 0 ]; then
    rng=reseeded
  else
    # Without perl: the seed is mixed in, not a reseed.
    [ -z "$now" ] || date -u -s "@$now" >/dev/null
    printf '%s' "$seed" > /dev/urandom
    rng=mixed
  fi
}
old_connections() {
  # The per-connection sshd processes the snapshot held (children of listener $1): their
  # connections are not this machine's. Listed before the new address is up, so none of
  # the host's new connections is among them; ended once the status is written.
  for st in /proc/[0-9]*/status; do
    while read -r f v; do
      if [ "$f" = PPid: ]; then
        if [ "$v" = "$1" ]; then p=${st#/proc/}; echo "${p%/status}"; fi
        break
      fi
    done < "$st" 2>/dev/null
  done
}
# Seconds since boot at each step, for the status file: where a clone's wake-up goes.
mark() {
  read -r up _ < /proc/uptime
  steps="$steps $1=$up"
}
apply() {
  if [ -z "$ip" ] || [ -z "$mac" ] || [ -z "$host" ] || [ -z "$key" ] || [ -z "$seed" ]; then
    echo "banger-ident: incomplete identity, ignored" >&2
    return
  fi
  steps=""
  mark got
  reseed_and_set_clock
  mark rng
  k=/etc/ssh/ssh_host_ed25519_key
  umask 077
  printf '%s' "$key" > "$k"
  umask 022
  printf '%s\n' "$pub" > "$k.pub"
  [ -z "$machine_id" ] || printf '%s\n' "$machine_id" > /etc/machine-id
  echo "$host" > /proc/sys/kernel/hostname
  echo "$host" > /etc/hostname
  hosts=""
  while IFS= read -r l; do
    case "$l" in "127.0.1.1	"*|"127.0.1.1 "*) ;; *) hosts="$hosts$l$nl" ;; esac
  done < /etc/hosts
  printf '%s127.0.1.1\t%s\n' "$hosts" "$host" > /etc/hosts
  # Up to OpenSSH 9.7 every connection's sshd loads the host key itself: the new one is
  # used at once. From 9.8 (sshd-session) the listener holds it: re-executed on SIGHUP,
  # it loads the new one (and is deaf for a moment, a cost the older ones do not pay).
  listener=""
  [ -r /run/sshd.pid ] && read -r listener < /run/sshd.pid
  if [ -n "$listener" ] && [ -e /usr/lib/openssh/sshd-session ]; then
    kill -HUP "$listener" 2>/dev/null
  fi
  old=""
  [ -z "$listener" ] || old=$(old_connections "$listener")
  dev=""
  for d in /sys/class/net/*; do
    if [ "${d##*/}" != lo ]; then dev=${d##*/}; break; fi
  done
  if [ -n "$dev" ]; then
    # The MAC changes last, with the new address in place: arp_notify then announces
    # both (a gratuitous ARP), so the host need not wait to resolve the new address.
    echo 1 > "/proc/sys/net/ipv4/conf/$dev/arp_notify"
    route=""
    [ -z "$gw" ] || route="route replace default via $gw"
    cmds="addr flush dev $dev
neigh flush dev $dev
addr add $ip dev $dev
link set dev $dev address $mac
link set dev $dev up
$route
"
    feed "$net_pid" "$NET_FIFO" "$cmds"
    r=$?
    net_pid=""
    if [ "$r" = 127 ]; then printf '%s' "$cmds" | ip -force -batch - 2>/dev/null; fi
  fi
  mark net
  echo "gen=$gen rng=$rng$steps" > /run/banger-ident
  [ -z "$old" ] || kill $old 2>/dev/null
  # Said on the serial console too, which the host reads: it probes SSH at once instead
  # of polling an address that answers only from now on.
  echo "banger-ident: applied gen=$gen" > /dev/console 2>/dev/null
  sync "$k" "$k.pub" /etc/machine-id /etc/hostname /etc/hosts
}
arm
settled "$rng_pid"
settled "$net_pid"
# A snapshot is taken only once this is here (the daemon waits for it).
echo listening > /run/banger-ident.listening
while :; do
  gen=""; ip=""; gw=""; mac=""; host=""; machine_id=""; now=""; seed=""; key=""; pub=""
  while read -r line; do
    case "$line" in
      gen=*) gen=${line#gen=} ;;
      ip=*) ip=${line#ip=} ;;
      gw=*) gw=${line#gw=} ;;
      mac=*) mac=${line#mac=} ;;
      host=*) host=${line#host=} ;;
      machine_id=*) machine_id=${line#machine_id=} ;;
      time=*) now=${line#time=} ;;
      seed=*) seed=${line#seed=} ;;
      key=*) key="$key${line#key=}$nl" ;;  # one line of the private key per key= line
      pub=*) pub=${line#pub=} ;;
      end) apply ;;
    esac
  done < "$port"
  # The vsock listener is gone: start again (Restart=on-failure).
  [ -z "$vsock_pid" ] || exit 1
  sleep 1  # the host end went away: wait for it to come back
done
""".replace("@VSOCK_PORT@", str(IDENT_VSOCK_PORT))

GUEST_IDENT_UNIT = """[Unit]
Description=banger identity channel (a restored clone's own identity)
DefaultDependencies=no
After=banger-init.service
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart=/usr/local/sbin/banger-ident
Restart=on-failure

[Install]
WantedBy=multi-user.target
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

# udev's coldplug loads a module for each CPU feature the (emulated) CPU reports: KVM
# (no guest of a sandbox runs VMs under TCG) and the kernel's own crypto and checksum
# drivers (for disk or network encryption the VM does not do; ssh uses OpenSSL's). Each
# modprobe costs a TCG guest most of a second, seconds in all, at the end of every boot.
# The ACPI power button (button, evdev: how a VM is asked to power off) and ext4's
# crc32c stay.
MODPROBE_CONF = """# Written by banger: no autoloading of modules a sandbox VM does not use.
blacklist kvm
blacklist kvm_amd
blacklist kvm_intel
blacklist irqbypass
blacklist aesni_intel
blacklist ghash_clmulni_intel
blacklist sha1_ssse3
blacklist sha256_ssse3
blacklist sha512_ssse3
blacklist crct10dif_pclmul
blacklist crc32_pclmul
"""

# systemd's tmpfiles make /run/nologin at boot and systemd-user-sessions removes it once
# basic.target is reached; sshd answers before that (it waits only for banger-init), and
# pam_nologin would print "System is booting up" into the first commands' stderr. Only
# root logs in (by key).
NO_NOLOGIN = """# Written by banger: no /run/nologin while the boot finishes (sshd answers first).
"""

# The built-in image's logins skip PAM. Only root logs in there, by key; Debian's sshd
# stack would load a dozen modules into every connection's sshd (environment, limits,
# login uid, keyrings, motd: nothing a sandbox's root session needs), which measured a
# third of a second or more per connection under TCG. (Images a user registers keep
# their own PAM: their accounts may rely on it.)
SSHD_BUILTIN = """# Written by banger for its built-in image: root logs in by key, without PAM.
UsePAM no
"""

# Debian's kernel package makes an initramfs (initramfs-tools) whatever banger boots;
# banger boots its own (see initramfs.py), so Debian's is kept as small and quick to
# make as it goes: only the listed drivers. Written before debootstrap, which makes it.
INITRAMFS_CONF = """# Written by banger: banger boots its own initramfs; keep this one small.
MODULES=list
COMPRESS=zstd
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

# The built-in image's early units that sshd does not need, started once sshd has (see
# Recipe.after_ssh): ahead of it they take the two vCPUs banger-init and sshd wait for.
# After it, they must not take them from the first logins either (a readiness probe, the
# user's first command): they get the least CPU weight there is, so they use only what
# sshd and its sessions (weight 1000, see SSH_DROPIN) leave.
AFTER_SSH_DROPIN = """# Written by banger: sshd first; this unit once sshd has started, on
# what CPU the logins leave.
[Unit]
After=ssh.service

[Service]
CPUWeight=1
Nice=19
"""

UNIT_PATH = "etc/systemd/system/banger-init.service"
IDENT_UNIT_PATH = "etc/systemd/system/banger-ident.service"
# (link, unit) for each of banger's units: enabled by a link in multi-user.target.wants.
ENABLED_UNITS = tuple(
    (f"etc/systemd/system/multi-user.target.wants/{Path(unit).name}", unit)
    for unit in (UNIT_PATH, IDENT_UNIT_PATH, AGENT_UNIT_PATH))


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
        GuestFile("usr/local/sbin/banger-ident", GUEST_IDENT, 0o755),
        GuestFile(IDENT_UNIT_PATH, GUEST_IDENT_UNIT),
        GuestFile(AGENT_PATH, agent_script(), 0o755),
        GuestFile(AGENT_UNIT_PATH, GUEST_AGENT_UNIT),
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
        "xz-utils", "initramfs-tools", "zstd", "busybox-static",
    )
    # Units that cost boot time in a throwaway VM and do nothing useful there. The
    # modprobe@ ones preload modules a VM has no hardware for (drm, efi_pstore) or that
    # load on first use of their device node anyway (loop, fuse, dm_mod); hugetlbfs,
    # configfs, binfmt_misc and the debug/tracing mounts serve no dev sandbox by default
    # (mount them by hand). A VM has no virtual terminal for getty@tty1, no clock to sync
    # that the host does not keep, no trim or scrub worth doing on a copy-on-write disk;
    # every user and group is made when the image is built (apt makes a package's own),
    # and a random seed copied into every clone seeds nothing; nobody reads utmp's boot
    # and runlevel records in a sandbox. Each costs a second or more of a TCG guest's
    # CPU while sshd is starting, or while the boot that a boot snapshot waits for ends.
    masked_units: tuple[str, ...] = (
        "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer", "apt-daily.timer",
        "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "man-db.timer",
        "systemd-timesyncd.service", "modprobe@drm.service", "modprobe@efi_pstore.service",
        "modprobe@loop.service", "modprobe@fuse.service", "modprobe@dm_mod.service",
        "modprobe@configfs.service", "sys-kernel-config.mount",
        "dev-hugepages.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
        "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
        "proc-sys-fs-binfmt_misc.mount", "getty@tty1.service", "systemd-sysusers.service",
        "systemd-random-seed.service", "systemd-update-utmp.service",
        "systemd-update-utmp-runlevel.service",
    )
    # Generators systemd runs before it starts any unit, each one more program start under
    # emulation: none has anything to find in this image (no encrypted, verity, integrity
    # or GPT-discovered volumes, no hibernation, no SysV-only scripts, no rc.local, no
    # system update, and banger writes the kernel command line). No getty either: the
    # serial console is a file the host reads (`vm logs`), where nobody can type a
    # login. fstab's stays.
    masked_generators: tuple[str, ...] = (
        "systemd-cryptsetup-generator", "systemd-integritysetup-generator",
        "systemd-veritysetup-generator", "systemd-gpt-auto-generator",
        "systemd-hibernate-resume-generator", "systemd-system-update-generator",
        "systemd-sysv-generator", "systemd-rc-local-generator", "systemd-run-generator",
        "systemd-debug-generator", "systemd-getty-generator",
    )
    # Early units that start beside banger-init and sshd under systemd's defaults, each a
    # program start (udev's coldplug alone takes seconds of a TCG guest's CPU) that sshd
    # does not wait for but shares the vCPUs with: ordered after ssh.service, they run
    # once SSH answers. Nothing sshd or banger-init uses comes from them: the root is
    # mounted read-write by the kernel, the devices sshd opens are devtmpfs's, the NIC
    # and work disk are set up by banger-init itself.
    after_ssh: tuple[str, ...] = (
        "systemd-udevd.service", "systemd-udev-trigger.service",
        "systemd-journal-flush.service", "systemd-modules-load.service",
        "kmod-static-nodes.service", "systemd-tmpfiles-setup-dev.service",
        "systemd-sysctl.service", "systemd-remount-fs.service",
    )
    # Written into the empty target before debootstrap: the kernel package builds the
    # initramfs while debootstrap installs it.
    preseed_files: tuple[GuestFile, ...] = field(default_factory=lambda: (
        GuestFile("etc/initramfs-tools/conf.d/banger.conf", INITRAMFS_CONF),
    ))
    extra_files: tuple[GuestFile, ...] = field(default_factory=lambda: (
        GuestFile("etc/fstab", FSTAB),
        GuestFile("etc/hostname", "banger\n"),
        GuestFile("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"),
        GuestFile("etc/tmpfiles.d/systemd-nologin.conf", NO_NOLOGIN),
        GuestFile("etc/ssh/sshd_config.d/banger-image.conf", SSHD_BUILTIN),
        GuestFile("etc/modprobe.d/banger.conf", MODPROBE_CONF),
    ))

    def all_packages(self) -> list[str]:
        """The packages debootstrap installs: the recipe's list plus the kernel package."""
        return [*self.packages, self.kernel_package]

    def files(self) -> list[GuestFile]:
        """Every file written into the built root after debootstrap: banger's agent files,
        then the recipe's own."""
        return [*guest_agent_files(), *self.extra_files,
                *(GuestFile(f"etc/systemd/system/{unit}.d/banger-after-ssh.conf",
                            AFTER_SSH_DROPIN) for unit in self.after_ssh)]

    def masked(self) -> list[str]:
        """Every path under ``etc/systemd`` the build links to ``/dev/null``: the masked
        units and generators."""
        return [*(f"etc/systemd/system/{unit}" for unit in self.masked_units),
                *(f"etc/systemd/system-generators/{gen}" for gen in self.masked_generators)]

    def digest(self) -> str:
        """A hash of everything that decides the image's content (not the mirror)."""
        doc = {
            "version": RECIPE_VERSION, "name": self.name, "suite": self.suite,
            "variant": self.variant, "packages": self.all_packages(),
            "masked": self.masked(),
            "files": [[f.path, f.content, f.mode] for f in self.files()],
            "preseed": [[f.path, f.content, f.mode] for f in self.preseed_files],
            "initramfs": [initramfs.INIT, list(initramfs.BOOT_MODULES)],
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


def write_files(root: Path, files: list[GuestFile] | tuple[GuestFile, ...]) -> None:
    """Write guest files into a root tree (made as needed), replacing symlinks in the way."""
    for f in files:
        dest = safe_join(root, f.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Replaced, never written through: a symlink, a hard link or a read-only file
        # (a daemon that is not root may not write one it cannot write) left there.
        dest.unlink(missing_ok=True)
        dest.write_text(f.content)
        dest.chmod(f.mode)


def install_files(root: Path, files: list[GuestFile], masked: list[str] | tuple[str, ...] = ()
                  ) -> None:
    """Write guest files into an unpacked root tree, enable banger's units and mask units.

    Args:
        root: the unpacked root tree.
        files: the files to write.
        masked: paths relative to ``root`` (``etc/systemd/system/UNIT``, or a generator
            under ``etc/systemd/system-generators``) to link to ``/dev/null``.
    """
    write_files(root, files)
    for wanted_by, unit in ENABLED_UNITS:
        wants = safe_join(root, wanted_by)
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.unlink(missing_ok=True)
        wants.symlink_to("/" + unit)
    for rel in masked:
        mask = safe_join(root, rel)
        mask.parent.mkdir(parents=True, exist_ok=True)
        mask.unlink(missing_ok=True)
        mask.symlink_to("/dev/null")


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
    if machine_id.exists():  # replaced: it is read-only (0444)
        machine_id.unlink()
        machine_id.write_text("")  # systemd makes a fresh one per VM on first boot
        machine_id.chmod(0o444)
    workseed.mkdir(parents=True, exist_ok=True)
    home = root / "root"
    home.mkdir(mode=0o700, exist_ok=True)
    shutil.copytree(home, workseed, symlinks=True, dirs_exist_ok=True)
    workseed.chmod(0o700)


def find_kernel(root: Path) -> tuple[Path, str]:
    """The newest ``vmlinuz-*`` in ``root/boot`` and its version (its modules' directory
    name under ``lib/modules``)."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise NotFound(f"no kernel (vmlinuz-*) in {root / 'boot'}")
    return kernels[-1], kernels[-1].name.removeprefix("vmlinuz-")


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
    for rel in [*(f.path for f in files), *(link for link, _ in ENABLED_UNITS)]:
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
    for link, unit in ENABLED_UNITS:
        lines += [f"rm /{link}", f"symlink /{link} /{unit}"]
    return "\n".join(lines) + "\n", temps


def _ancestors(path: str) -> list[str]:
    out: list[str] = []
    p = Path(path)
    while str(p) != "/":
        out.append(str(p))
        p = p.parent
    return list(reversed(out))
