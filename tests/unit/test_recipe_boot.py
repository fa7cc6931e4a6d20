"""What the built-in image starts at boot: pinned, so a slow unit is not added back unnoticed.

Boot to SSH under TCG is mostly the guest's userspace (issue 12). These tests pin the
recipe's boot trimming; none measures time.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from banger.daemon.imagemgr import (
    GUEST_IDENT,
    GUEST_INIT,
    GUEST_INIT_UNIT,
    SSH_DROPIN,
    Recipe,
    guest_agent_files,
    install_files,
)
from banger.daemon.vmboot import BOOT_ARGS
from banger.vmm import IDENT_VSOCK_PORT

# Units that cost a TCG guest seconds of CPU while sshd starts and that a sandbox does not
# use. Unmasking one is a decision: take it out of this list with the reason.
MUST_BE_MASKED = {
    "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "dpkg-db-backup.timer",
    "systemd-timesyncd.service", "getty@tty1.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "modprobe@configfs.service", "sys-kernel-config.mount",
    "systemd-sysusers.service", "systemd-random-seed.service",
    "systemd-update-utmp.service",
}
MUST_BE_MASKED_GENERATORS = {
    "systemd-gpt-auto-generator", "systemd-sysv-generator", "systemd-cryptsetup-generator",
    "systemd-hibernate-resume-generator",
    # the serial console is a file the host reads: nobody can type a login there
    "systemd-getty-generator",
}
# What banger and a user's Debian box need: never masked.
MUST_RUN = {
    "ssh.service", "banger-init.service", "systemd-journald.service",
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-logind.service",
    "dbus.service",
}
# Targets and units whose only purpose is to wait: nothing banger writes may pull them in.
WAITS = ("network-online.target", "systemd-networkd-wait-online", "time-sync.target",
         "systemd-time-wait-sync", "systemd-udev-settle")


def test_slow_units_and_generators_stay_masked() -> None:
    r = Recipe()
    assert set(r.masked_units) >= MUST_BE_MASKED
    assert set(r.masked_generators) >= MUST_BE_MASKED_GENERATORS
    assert not set(r.masked_units) & MUST_RUN
    assert "systemd-fstab-generator" not in r.masked_generators


def test_nothing_banger_writes_waits_for_the_network_time_or_udev() -> None:
    r = Recipe()
    for f in [*r.files(), *r.preseed_files]:
        for wait in WAITS:
            assert wait not in f.content, f"{f.path} mentions {wait}"
    assert not any(re.search(r"wait-online|chrony|ntp", p) for p in r.packages)


def test_sshd_waits_only_for_banger_init() -> None:
    assert "DefaultDependencies=no" in GUEST_INIT_UNIT
    assert "Before=network.target ssh.service" in GUEST_INIT_UNIT
    assert "DefaultDependencies=no" in SSH_DROPIN
    after = [ln for ln in SSH_DROPIN.splitlines() if ln.startswith("After=")]
    assert after == ["After=banger-init.service"]


def test_the_early_units_sshd_does_not_need_start_after_it_on_the_cpu_left(
        tmp_path: Path) -> None:
    """udev, the journal flush and the rest of sysinit's set-up run once sshd has
    started, with the least CPU weight there is (they must not slow the first logins);
    never banger-init, sshd or journald, and nothing on sshd's own path."""
    r = Recipe()
    assert {"systemd-udevd.service", "systemd-udev-trigger.service",
            "systemd-journal-flush.service"} <= set(r.after_ssh)
    assert not set(r.after_ssh) & {"ssh.service", "banger-init.service",
                                   "systemd-journald.service"}
    assert not set(r.after_ssh) & set(r.masked_units)  # deferred, not gone
    install_files(tmp_path, r.files(), r.masked())
    for unit in r.after_ssh:
        dropin = (tmp_path / f"etc/systemd/system/{unit}.d/banger-after-ssh.conf").read_text()
        lines = dropin.splitlines()
        assert "After=ssh.service" in lines and "CPUWeight=1" in lines and "Nice=19" in lines
    assert Recipe(after_ssh=r.after_ssh[1:]).digest() != r.digest()


def test_debians_own_initramfs_stays_small_to_make() -> None:
    """The kernel package still makes Debian's initramfs at build time (banger boots its
    own): no drivers listed, zstd, nothing of banger's old udev-less boot scripts left."""
    files = {f.path: f.content for f in Recipe().preseed_files}
    assert list(files) == ["etc/initramfs-tools/conf.d/banger.conf"]
    conf = files["etc/initramfs-tools/conf.d/banger.conf"].splitlines()
    assert "MODULES=list" in conf and "COMPRESS=zstd" in conf
    assert "zstd" in Recipe().packages  # else mkinitramfs falls back to gzip


def test_digest_follows_the_boot_trimming() -> None:
    r = Recipe()
    assert Recipe(masked_units=r.masked_units[1:]).digest() != r.digest()
    assert Recipe(masked_generators=r.masked_generators[1:]).digest() != r.digest()
    assert Recipe(preseed_files=()).digest() != r.digest()


def test_install_links_masked_units_and_generators(tmp_path: Path) -> None:
    r = Recipe()
    install_files(tmp_path, r.files(), r.masked())
    for unit in r.masked_units:
        assert (tmp_path / "etc/systemd/system" / unit).readlink() == Path("/dev/null")
    for gen in r.masked_generators:
        assert (tmp_path / "etc/systemd/system-generators" / gen).readlink() == Path("/dev/null")


def test_banger_init_runs_few_programs() -> None:
    """banger-init is on sshd's path: host name and command line come from built-ins, and
    the network is set up by one `ip`."""
    code = [ln.strip() for ln in GUEST_INIT.splitlines() if not ln.strip().startswith("#")]
    assert "read -r cmdline < /proc/cmdline" in code
    assert not any(ln.startswith("hostname ") for ln in code)
    assert sum("| ip -force -batch -" in ln for ln in code) == 1
    assert GUEST_INIT in {f.content for f in guest_agent_files()}


def test_boot_args_are_safe_for_both_vmms() -> None:
    """The command line every VM gets: nothing QEMU- or Firecracker-only, ext4 root."""
    assert BOOT_ARGS[:5] == ("console=ttyS0", "root=/dev/vda", "rw", "loglevel=4", "panic=1")
    assert "rootfstype=ext4" in BOOT_ARGS  # every image's root is ext4 (build, register, pull)
    assert not any(a.startswith(("pci=", "reboot=", "i8042.", "acpi=")) for a in BOOT_ARGS)


def test_no_nologin_while_the_boot_finishes() -> None:
    """sshd answers before systemd-user-sessions runs: /run/nologin must not be made, or
    pam_nologin writes "System is booting up" into the first commands' stderr."""
    files = {f.path: f.content for f in Recipe().files()}
    conf = files["etc/tmpfiles.d/systemd-nologin.conf"]
    assert all(ln.startswith("#") for ln in conf.splitlines())


def test_built_in_image_logins_skip_pam_and_registered_images_keep_theirs() -> None:
    """Every connection's sshd would load Debian's PAM stack (motd scripts included): the
    built-in image's root logs in by key without it. The guest agent files, which every
    registered image gets too, leave PAM as the image has it."""
    files = {f.path: f.content for f in Recipe().files()}
    conf = [ln for ln in files["etc/ssh/sshd_config.d/banger-image.conf"].splitlines()
            if not ln.startswith("#")]
    assert conf == ["UsePAM no"]
    assert "etc/pam.d/sshd" not in files
    agent = "".join(f.content for f in guest_agent_files())
    assert "UsePAM" not in agent


def test_banger_ident_keeps_its_helpers_ready_before_any_snapshot() -> None:
    """perl and ip are started (blocked on their FIFOs) before banger-ident says it listens;
    a clone feeds them, and without them it starts them on demand."""
    code = GUEST_IDENT
    assert code.index("\narm\n") < code.index("echo listening > /run/banger-ident.listening")
    assert 'perl -e "$RESEED" "$RNG_FIFO" &' in code
    assert 'ip -force -batch "$NET_FIFO"' in code
    assert 'perl -e "$RESEED" - "${now:--}" "$seed"' in code  # on demand
    assert subprocess.run(["sh", "-n"], input=code, text=True).returncode == 0


def test_banger_init_installs_the_host_key_banger_made(tmp_path: Path) -> None:
    """The work disk brings the VM's host key: copied byte for byte with built-ins (no
    ssh-keygen, no sync); a disk without one gets a key made in the guest; a key already
    installed stays."""
    block = GUEST_INIT[GUEST_INIT.index("k=/etc/ssh/"):GUEST_INIT.index("exit 0")]
    etc, work = tmp_path / "etc", tmp_path / "root" / ".ssh"
    etc.mkdir()
    work.mkdir(parents=True)
    script = (block.replace("/etc/ssh/", f"{etc}/").replace("/root/.ssh/", f"{work}/")
              .replace('sync "$k"', ': "$k"'))
    given = work / "banger_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(given)],
                   check=True)
    subprocess.run(["sh", "-c", script], check=True)
    installed = etc / "ssh_host_ed25519_key"
    assert installed.read_bytes() == given.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o600
    assert (etc / "ssh_host_ed25519_key.pub").read_text().split() == \
        given.with_suffix(".pub").read_text().split()
    given.write_text("replaced\n")
    subprocess.run(["sh", "-c", script], check=True)  # already installed: kept
    assert installed.read_bytes() != given.read_bytes()
    installed.unlink()
    given.unlink()
    subprocess.run(["sh", "-c", script], check=True)  # none given: made here
    assert installed.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_coldplug_skips_unused_modules() -> None:
    files = {f.path: f.content for f in Recipe().files()}
    blacklisted = {ln.split()[1] for ln in files["etc/modprobe.d/banger.conf"].splitlines()
                   if ln.startswith("blacklist ")}
    assert {"kvm", "kvm_amd", "kvm_intel", "aesni_intel"} <= blacklisted
    # how a VM is asked to power off (ACPI button, through logind's evdev watch), and
    # ext4's metadata checksums
    assert not {"button", "evdev", "crc32c_intel"} & blacklisted


def test_banger_ident_listens_on_vsock_where_there_is_no_virtio_serial(tmp_path: Path) -> None:
    """Under Firecracker banger-ident's perl listener binds the guest vsock port (a real
    AF_VSOCK socket: its address packing is checked by the kernel), says so, and waits
    in accept with the FIFO open. Messages from the host arrive only in a Firecracker
    guest (the e2e clone test, where Firecracker runs)."""
    code = re.search(r"VSOCK_LISTEN='(.*?)'\n", GUEST_IDENT, re.S)
    assert code is not None
    assert "has_virtio 19" in GUEST_IDENT and f" {IDENT_VSOCK_PORT} " in GUEST_IDENT
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        pytest.skip(f"this host has no AF_VSOCK sockets: {exc.strerror}")
    fifo, ready = tmp_path / "ident", tmp_path / "ident.ready"
    os.mkfifo(fifo)
    port = str(random.randrange(40000, 60000))
    listener = subprocess.Popen(["perl", "-e", code.group(1), port, str(fifo), str(ready)])
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert listener.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            while Path(f"/proc/{listener.pid}/wchan").read_text() != "vsock_accept":
                assert listener.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            os.close(reader)
    finally:
        listener.kill()
        listener.wait()
