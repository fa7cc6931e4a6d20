"""``banger doctor``: host checks that need no daemon.

Each check says OK, WARN or FAIL with what it saw and, when not OK, how to
fix it. Checks only read the host, except the network check, which creates
and deletes a scratch network namespace with a bridge in it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from banger.config import Config
from banger.daemon.dmsnap import dm_snapshot_supported, reflink_supported
from banger.daemon.fcproc import check_version, jailer_status
from banger.daemon.hostinfo import kvm_status, which
from banger.daemon.vmmselect import (
    firecracker_binary,
    firecracker_blockers,
    resolve_accel,
    resolve_vmm,
)
from banger.errors import BangerError, Refused
from banger.hostops.cgroups import detect as detect_cgroups
from banger.hostops.client import HostOps
from banger.hostops.confine import SANDBOX
from banger.hostops.nft import ruleset
from banger.hostops.policy import Policy
from banger.runner import Runner, SubprocessRunner
from banger.vmmuser import lookup_user

FREE_WARN = 10 << 30  # an image plus a few VMs
FREE_FAIL = 2 << 30  # not even one image build fits


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        """The check as a dict of strings; ``banger doctor`` prints these (table or ``--json``)."""
        return {"name": self.name, "status": self.status.value, "detail": self.detail,
                "hint": self.hint}


TOOLS: dict[str, str] = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "losetup": "mount",
    "ip": "iproute2",
    "git": "git",
    "tar": "tar",
    "nft": "nftables",
}


def doctor(cfg: Config, runner: Runner | None = None) -> list[Check]:
    """Run every check; never raises."""
    runner = runner or SubprocessRunner()
    checks: list[Callable[[], Check | list[Check]]] = [
        lambda: _qemu(cfg, runner),
        lambda: _firecracker(cfg, runner),
        lambda: _jailer(cfg),
        _kvm,
        lambda: _selected(cfg),
        lambda: _confinement(cfg),
        _tun,
        lambda: _netns(runner),
        lambda: _nftables(cfg, runner),
        _dm,
        lambda: _reflink(cfg),
        _tools,
        lambda: _disk(cfg),
        lambda: _helper(cfg),
    ]
    out: list[Check] = []
    for check in checks:
        try:
            res = check()
        except Exception as exc:
            res = Check(getattr(check, "__name__", "check"), Status.FAIL, f"check crashed: {exc}")
        out.extend(res if isinstance(res, list) else [res])
    return out


def _helper(cfg: Config) -> Check:
    """The root helper, when the config names one: it answers, and its policy is this
    config's (a link list is the harmless request; a TAP of another install's prefix
    must be refused)."""
    if cfg.helper_socket is None:
        return Check("root helper", Status.OK, "none: bangerd does what needs root itself")
    host = HostOps.connect(cfg.helper_socket)
    try:
        host.links()
    except BangerError as exc:
        return Check("root helper", Status.FAIL, exc.message, exc.hint)
    try:
        host.delete_link("banger-doctor")  # never a name of this install's
    except Refused:
        return Check("root helper", Status.OK,
                     f"{cfg.helper_socket} answers and refuses what is out of policy")
    except BangerError as exc:
        return Check("root helper", Status.FAIL, exc.message, exc.hint)
    return Check("root helper", Status.FAIL,
                 f"{cfg.helper_socket} accepted a request out of this install's policy",
                 "the helper runs another banger or config: `banger system restart`")


def _qemu(cfg: Config, runner: Runner) -> Check:
    path = which(cfg.qemu_bin)
    if path is None:
        return Check("qemu", Status.FAIL, f"{cfg.qemu_bin} not found",
                     "apt-get install qemu-system-x86")
    res = runner.run([path, "--version"], desc="qemu version", timeout=10, check=False)
    version = res.out.splitlines()[0] if res.out else "unknown version"
    return Check("qemu", Status.OK, f"{path}: {version}")


def _firecracker(cfg: Config, runner: Runner) -> Check:
    path = firecracker_binary(cfg)
    if path is None:
        return Check("firecracker", Status.WARN,
                     f"{cfg.firecracker_bin or 'firecracker'} not found: QEMU will be used",
                     "install a Firecracker release binary and set firecracker_bin")
    ok, detail = check_version(runner, path)
    return Check("firecracker", Status.OK if ok else Status.WARN, detail,
                 "" if ok else "upgrade Firecracker")


def _jailer(cfg: Config) -> Check:
    if firecracker_binary(cfg) is None:
        return Check("jailer", Status.OK, "not needed: Firecracker is not installed")
    st = jailer_status(cfg)
    if st.jailed:
        return Check("jailer", Status.OK, st.detail)
    if st.blocks_vms:
        return Check("jailer", Status.FAIL, st.detail, st.hint)
    return Check("jailer", Status.WARN, st.detail,
                 "install Firecracker's jailer next to it (jailer_bin) to run VMs chrooted")


def _kvm() -> Check:
    st = kvm_status()
    if st.usable:
        return Check("kvm", Status.OK, st.reason)
    return Check("kvm", Status.WARN, st.reason + "; guests run under QEMU TCG (slower)",
                 "use a host with hardware virtualisation (kvm_intel/kvm_amd) for speed")


def _selected(cfg: Config) -> Check:
    try:
        vmm = resolve_vmm(cfg, "auto")
        detail = f"vmm={cfg.vmm.value} resolves to {vmm}"
        if vmm == "qemu":
            detail += f" with accel={resolve_accel(cfg)}"
            blockers = firecracker_blockers(cfg)
            if blockers:
                detail += "; Firecracker is unusable here: " + "; ".join(blockers)
        else:
            detail += " (Firecracker binary present and KVM usable)"
        return Check("vmm selection", Status.OK, detail)
    except BangerError as exc:
        return Check("vmm selection", Status.FAIL, exc.message, exc.hint)


def _confinement(cfg: Config, status: Path = Path("/proc/self/status")) -> list[Check]:
    """How QEMU VMMs are confined here: the VMM user, seccomp, the cgroup hierarchy."""
    user = lookup_user(cfg.vmm_user)
    if user is None:
        who = Check("vmm user", Status.WARN, f"{cfg.vmm_user} does not exist yet",
                    "bangerd creates it at the first QEMU or jailed Firecracker VM "
                    "(or run scripts/install-deps)")
    elif user.uid == 0 or user.gid == 0:
        who = Check("vmm user", Status.FAIL,
                    f"{cfg.vmm_user} is root ({user.uid}:{user.gid}): VMMs would be unconfined",
                    "set vmm_user to an unprivileged account")
    else:
        who = Check("vmm user", Status.OK,
                    f"QEMU runs as {user.name} (uid {user.uid}), no capabilities, "
                    "in an empty network namespace of its own (the TAP only)")
    try:
        has_seccomp = any(line.startswith("Seccomp:") for line in status.read_text().splitlines())
    except OSError:
        has_seccomp = False
    seccomp = (Check("seccomp", Status.OK, f"QEMU runs with -sandbox {SANDBOX}") if has_seccomp
               else Check("seccomp", Status.FAIL, "this kernel has no seccomp (CONFIG_SECCOMP)",
                          "QEMU's -sandbox needs a kernel with seccomp filters"))
    try:
        host = detect_cgroups()
    except BangerError as exc:
        cgroup = Check("cgroups", Status.FAIL, exc.message, exc.hint)
    else:
        where = ", ".join(sorted({str(p) for p in host.roots.values()}))
        cgroup = Check("cgroups", Status.OK,
                       f"cgroup {host.version.value} at {where}: a cgroup per VM "
                       "(memory, pids, cpu weight)")
    return [who, seccomp, cgroup]


def _tun() -> Check:
    dev = Path("/dev/net/tun")
    try:
        fd = os.open(dev, os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return Check("tun", Status.FAIL, f"{dev}: {exc.strerror}",
                     "modprobe tun, and run banger as root")
    return Check("tun", Status.OK, f"{dev} opens read-write")


def _netns(runner: Runner) -> Check:
    if os.geteuid() != 0:
        return Check("network", Status.FAIL, "not running as root",
                     "bangerd needs root (CAP_NET_ADMIN) for bridges and TAPs")
    ns = f"banger-doctor-{secrets.token_hex(3)}"
    try:
        runner.run(["ip", "netns", "add", ns], desc="create a scratch netns", timeout=10)
        try:
            runner.run(["ip", "-n", ns, "link", "add", "bgdoctor0", "type", "bridge"],
                       desc="create a bridge", timeout=10)
        finally:
            runner.run(["ip", "netns", "del", ns], desc="delete the scratch netns", timeout=10,
                       check=False)
    except BangerError as exc:
        return Check("network", Status.FAIL,
                     f"cannot create a network namespace and a bridge: {exc.message}",
                     "check CAP_NET_ADMIN, CAP_SYS_ADMIN (every QEMU runs in a network "
                     "namespace of its own) and the bridge module")
    return Check("network", Status.OK, "can create network namespaces (QEMU runs in one of "
                                       "its own) and bridges")


def _nftables(cfg: Config, runner: Runner) -> Check:
    """Load the real guest policy into a scratch namespace: nft, the bridge family,
    concatenated interval sets and timeouts all have to work for a guest to run."""
    if os.geteuid() != 0 or which("nft") is None:
        return Check("nftables", Status.FAIL, "nft is missing or bangerd is not root",
                     "install nftables (apt-get install nftables); run banger as root")
    settings = Policy.from_config(cfg).firewall
    ns = f"banger-doctor-{secrets.token_hex(3)}"
    try:
        runner.run(["ip", "netns", "add", ns], desc="create a scratch netns", timeout=10)
        try:
            runner.run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
                       input=ruleset(settings).encode(), desc="load the guest policy",
                       timeout=30)
        finally:
            runner.run(["ip", "netns", "del", ns], desc="delete the scratch netns", timeout=10,
                       check=False)
    except BangerError as exc:
        return Check("nftables", Status.FAIL, f"the guest policy does not load: {exc.message}",
                     "banger needs nftables with the bridge family, concatenated interval "
                     "sets and set timeouts (Linux 5.6 or later)")
    return Check("nftables", Status.OK,
                 f"guest policy loads (tables bridge/inet {settings.table}, vm_to_vm "
                 f"{'on' if cfg.vm_to_vm else 'off'}, NAT by default "
                 f"{'on' if cfg.nat else 'off'}, DNS on udp+tcp {cfg.dns_port})")


def _dm() -> Check:
    if dm_snapshot_supported():
        return Check("device-mapper", Status.OK, "dm-snapshot available (cow_strategy = dmsnap)")
    return Check("device-mapper", Status.WARN,
                 "no device-mapper in this kernel: dmsnap COW is unavailable",
                 "not needed: reflink or sparse copy is used instead")


def _reflink(cfg: Config) -> Check:
    target = cfg.state_dir
    probe = target if target.exists() else _existing_parent(target)
    try:
        ok = reflink_supported(probe)
    except OSError as exc:
        return Check("reflink", Status.WARN, f"cannot probe {probe}: {exc.strerror}")
    if ok:
        return Check("reflink", Status.OK, f"{probe} supports reflinks: VM disks are instant")
    return Check("reflink", Status.WARN,
                 f"{probe} has no reflink support: each VM disk is a sparse copy",
                 "put state_dir on XFS or btrfs for instant VM disks")


def _tools() -> list[Check]:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if which(tool) is None})
    if missing:
        return [Check("tools", Status.FAIL,
                      "missing: " + ", ".join(t for t, p in TOOLS.items() if p in missing),
                      "apt-get install " + " ".join(missing))]
    return [Check("tools", Status.OK, "found " + ", ".join(TOOLS))]


def _disk(cfg: Config) -> Check:
    probe = _existing_parent(cfg.state_dir)
    free = shutil.disk_usage(probe).free
    detail = f"{free / (1 << 30):.1f} GiB free at {probe}"
    if free < FREE_FAIL:
        return Check("disk", Status.FAIL, detail, "free space or move state_dir")
    if free < FREE_WARN:
        return Check("disk", Status.WARN, detail, "an image needs ~1.5 GiB, each VM a few more")
    return Check("disk", Status.OK, detail)


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p
