"""Image recipe and injection (on real ext4 images), QEMU command line, output formats."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from banger.cli import output
from banger.daemon.imagemgr import (
    GUEST_INIT,
    Recipe,
    debugfs_script,
    finalize_tree,
    find_kernel,
    guest_agent_files,
    injected_dirs,
    install_files,
    rootfs_size,
    safe_join,
)
from banger.daemon.qemuproc import build_argv
from banger.errors import BadRequest
from banger.layout import VMPaths
from banger.vmm import LaunchPlan

GOLDEN = Path(__file__).parent.parent / "golden"


def test_recipe_digest_is_stable_and_sensitive() -> None:
    r = Recipe()
    assert r.digest() == Recipe().digest()
    assert Recipe(packages=(*r.packages, "vim")).digest() != r.digest()
    argv = r.debootstrap_argv(Path("/t"), "http://m", Path("/c"))
    assert argv[0] == "debootstrap" and "--variant=minbase" in argv
    assert "openssh-server" in argv[2] and r.kernel_package in argv[2]


def test_install_and_finalize_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("host key from the build machine")
    (root / "root").mkdir()
    (root / "root/.bashrc").write_text("# rc")
    (root / "etc/machine-id").write_text("abc\n")
    install_files(root, Recipe().files(), Recipe().masked())
    finalize_tree(root, tmp_path / "seed")
    init = root / "usr/local/sbin/banger-init"
    assert init.read_text() == GUEST_INIT and init.stat().st_mode & 0o777 == 0o755
    wants = root / "etc/systemd/system/multi-user.target.wants/banger-init.service"
    assert wants.is_symlink()
    assert (root / "etc/systemd/system/e2scrub_reap.service").readlink() == Path("/dev/null")
    assert not (root / "etc/ssh/ssh_host_rsa_key").exists()
    assert (root / "etc/machine-id").read_text() == ""
    assert (tmp_path / "seed/.bashrc").read_text() == "# rc"


def test_safe_join_refuses_escapes(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b") == tmp_path / "a/b"
    for bad in ("/etc/passwd", "../x", "a/../../x", "a\0b"):
        with pytest.raises(BadRequest):
            safe_join(tmp_path, bad)


def test_the_newest_kernel_is_picked(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    for v in ("6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64"):
        (boot / f"vmlinuz-{v}").write_text(v)
    kernel, version = find_kernel(tmp_path)
    assert kernel.name == "vmlinuz-6.1.0-10-cloud-amd64"
    assert version == "6.1.0-10-cloud-amd64"


def test_rootfs_size_has_headroom() -> None:
    assert rootfs_size(600 << 20) >= 840 << 20
    assert rootfs_size(1) == 1 << 30
    assert rootfs_size(2 << 30) % (256 << 20) == 0


def test_debugfs_injection_into_real_ext4(tmp_path: Path) -> None:
    """Inject the guest agent into an ext4 image (no mount) and check it with e2fsck."""
    tree = tmp_path / "tree"
    (tree / "etc/systemd/system").mkdir(parents=True)
    (tree / "usr/bin").mkdir(parents=True)
    image = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "32M"], check=True)
    files = guest_agent_files()
    existing = {"/etc", "/etc/systemd", "/etc/systemd/system", "/usr"}
    missing = set(injected_dirs(files)) - existing
    script, _temps = debugfs_script(files, tmp_path, missing)
    assert "mkdir /etc\n" not in script  # existing dirs are never re-made (that corrupts)
    (tmp_path / "s").write_text(script)
    subprocess.run(["debugfs", "-w", "-f", str(tmp_path / "s"), str(image)], check=True,
                   capture_output=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    cat = subprocess.run(["debugfs", "-R", "cat /usr/local/sbin/banger-init", str(image)],
                         capture_output=True, text=True)
    assert cat.stdout == GUEST_INIT
    stat = subprocess.run(["debugfs", "-R", "stat /usr/local/sbin/banger-init", str(image)],
                          capture_output=True, text=True)
    assert "Mode:  0755" in stat.stdout
    link = subprocess.run(
        ["debugfs", "-R", "stat /etc/systemd/system/multi-user.target.wants/banger-init.service",
         str(image)], capture_output=True, text=True)
    assert "Type: symlink" in link.stdout


def test_guest_init_script_is_valid_sh() -> None:
    res = subprocess.run(["sh", "-n"], input=GUEST_INIT, text=True, capture_output=True)
    assert res.returncode == 0, res.stderr


def plan(tmp_path: Path, initrd: bool = True) -> LaunchPlan:
    return LaunchPlan(
        vm_id="0123456789ab", name="web", vcpu=2, memory_mib=512,
        kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img") if initrd else None,
        cmdline="console=ttyS0 root=/dev/vda", rootfs="/s/rootfs.ext4", work_disk="/s/work.ext4",
        tap="bgt00000001", mac="06:00:ac:1d:00:02",
        paths=VMPaths(tmp_path / "s", tmp_path / "r"),
    )


def test_qemu_argv(tmp_path: Path) -> None:
    argv = build_argv("qemu-system-x86_64", plan(tmp_path), "tcg", 2596128)
    joined = " ".join(argv)
    assert argv[argv.index("-M") + 1] == "microvm,pit=on,pic=on,rtc=on"
    assert argv[argv.index("-accel") + 1].startswith("tcg,")
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "banger-0123456789ab" in argv[argv.index("-name") + 1]
    assert "-nographic" not in argv
    assert "fd={fd:tap}" in joined and "mac=06:00:ac:1d:00:02" in joined
    # root disk first: the guest's fstab relies on it being vda
    assert joined.index("file=/proc/self/fd/{fd:rootfs}") < \
        joined.index("file=/proc/self/fd/{fd:work}")
    assert "file:/proc/self/fd/{fd:serial}" in joined
    assert "-initrd" in argv
    # TCG guests get the host TSC rate (PIT calibration under TCG stalls boots)
    assert argv[argv.index("-append") + 1].endswith(" tsc_early_khz=2596128")
    kvm = build_argv("q", plan(tmp_path, initrd=False), "kvm", 2596128)
    assert kvm[kvm.index("-cpu") + 1] == "host" and "-initrd" not in kvm
    assert "tsc_early_khz" not in kvm[kvm.index("-append") + 1]


def test_host_tsc_khz(tmp_path: Path) -> None:
    from banger.daemon.qemuproc import host_tsc_khz

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2596.128\n")
    assert host_tsc_khz(info) == 2596128
    assert host_tsc_khz(tmp_path / "missing") is None


NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
VM = {
    "id": "0123456789ab", "name": "web", "state": "running", "vmm": "qemu", "ip": "172.29.0.2",
    "mac": "06:00:ac:1d:00:02", "created_at": "2026-11-23T11:45:00+00:00",
    "updated_at": "2026-11-23T11:46:00+00:00", "pid": 4242, "tap": "bgt00000001",
    "last_error": None, "stop_reason": None, "workspace": None,
    "spec": {"image": "debian-bookworm", "vcpu": 2, "memory_mib": 1024, "disk_size": 4 << 30,
             "work_disk_size": 2 << 30, "vmm": "auto"},
}


@pytest.mark.parametrize(("name", "render"), [
    ("vm_table.txt", lambda: output.vm_table([VM, {**VM, "name": "db", "state": "stopped",
                                                    "ip": "172.29.0.3"}], NOW)),
    ("vm_detail.txt", lambda: output.vm_detail(VM)),
    ("doctor.txt", lambda: output.doctor_table([
        {"name": "qemu", "status": "OK", "detail": "found", "hint": ""},
        {"name": "kvm", "status": "WARN", "detail": "PVM only", "hint": "use real KVM"}])),
])
def test_golden_output(name: str, render: object) -> None:
    text = render() + "\n"  # type: ignore[operator]
    golden = GOLDEN / name
    if os.environ.get("BANGER_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; write it with BANGER_UPDATE_GOLDEN=1 and review"
    assert text == golden.read_text()


def test_json_output_is_stable() -> None:
    assert json.loads(output.to_json(VM)) == VM


# Debian bookworm's ssh.service, the unit banger's drop-in changes (its shape, for verify).
DEBIAN_SSH_SERVICE = """[Unit]
Description=OpenBSD Secure Shell server
Documentation=man:sshd(8) man:sshd_config(5)
After=network.target auditd.service
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run

[Service]
EnvironmentFile=-/etc/default/ssh
ExecStartPre=/usr/sbin/sshd -t
ExecStart=/usr/sbin/sshd -D $SSHD_OPTS
ExecReload=/usr/sbin/sshd -t
ExecReload=/bin/kill -HUP $MAINPID
KillMode=process
Restart=on-failure
RestartPreventExitStatus=255
Type=notify
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
Alias=sshd.service
"""


def verify_units(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}",
         *(str(root / "etc/systemd/system" / u) for u in units)],
        capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(),
                    reason="needs systemd-analyze (apt-get install systemd)")
def test_guest_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install_files(root, guest_agent_files())
    for exe in ("usr/sbin/sshd", "bin/kill"):
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)
    (root / "etc/systemd/system/ssh.service").write_text(DEBIAN_SSH_SERVICE)
    res = verify_units(root, "banger-init.service", "banger-ident.service",
                       "banger-agent.service", "ssh.service")
    assert res.returncode == 0, res.stderr
    assert "banger" not in res.stderr, res.stderr
    # verify does read the drop-in: a bad key in it is reported
    dropin = root / "etc/systemd/system/ssh.service.d/banger.conf"
    dropin.write_text(dropin.read_text() + "NoSuchKey=1\n")
    assert "NoSuchKey" in verify_units(root, "ssh.service").stderr


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(),
                    reason="needs systemd-analyze (apt-get install systemd)")
def test_the_after_ssh_dropins_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Each of the built-in image's after-sshd drop-ins, over a stand-in for the Debian
    unit it changes (verify reads the drop-in: a bad key in it is reported)."""
    root = tmp_path / "root"
    recipe = Recipe()
    install_files(root, recipe.files())
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "bin/true").write_text("#!/bin/sh\n")
    (root / "bin/true").chmod(0o755)
    (root / "etc/systemd/system/ssh.service").write_text(
        "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    for unit in recipe.after_ssh:
        (root / "etc/systemd/system" / unit).write_text(
            "[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\nExecStart=/bin/true\n")
    res = verify_units(root, *recipe.after_ssh)
    assert res.returncode == 0, res.stderr
    assert "banger" not in res.stderr, res.stderr
    unit = recipe.after_ssh[0]
    dropin = root / f"etc/systemd/system/{unit}.d/banger-after-ssh.conf"
    dropin.write_text(dropin.read_text() + "NoSuchKey=1\n")
    assert "NoSuchKey" in verify_units(root, unit).stderr
