"""``banger --host ssh://...``: a client in one network namespace talks to the bangerd in
another through the real ssh and sshd, and runs commands in a VM booted there.

The "remote" is the ``host`` fixture's namespace (its bangerd, its VMs), plus an sshd
the test starts there; the client is a namespace of its own joined to it by a veth
pair, with its own HOME, key and ssh config (a wrapper on its PATH passes ``-F``: ssh
reads the account's ~/.ssh, not $HOME's). Nothing leaves the two namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from banger.protocol import __version__
from tests.bundlefiles import build_bundle
from tests.e2e.conftest import BIN, IMAGE, CachedImage, Host

SSHD = Path("/usr/sbin/sshd")
REMOTE_IP = "198.18.249.1"  # the veth pair's /30, inside the test's namespaces only
CLIENT_IP = "198.18.249.2"
PLAIN_PORT = 2222  # an sshd whose sessions have no banger on their PATH
CLOSED_PORT = 2299  # nothing listens here

pytestmark = pytest.mark.skipif(not SSHD.exists(),
                                reason=f"needs OpenSSH's server ({SSHD}: openssh-server)")


# The client's view: the remote daemon's state and runtime directories covered, so
# whatever the client gets of them (a patch, above all) comes over SSH, as it must
# between two machines.
HIDE = 'for d in "$@"; do [ "$d" = -- ] && break; mount -t tmpfs none "$d"; shift; done; ' \
       'shift; exec "$@"'


@dataclass
class Client:
    ns: str
    home: Path
    bin_dir: Path
    hidden: tuple[Path, ...]

    def banger(self, *args: str, key: str = "id_ed25519", timeout: float = 600,
               ) -> subprocess.CompletedProcess[str]:
        env = {"HOME": str(self.home), "PATH": f"{self.bin_dir}:{BIN}:/usr/bin:/bin",
               "TEST_SSH_KEY": str(self.home / ".ssh" / key), "LANG": "C.UTF-8"}
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", "--",
                               "unshare", "--mount", "--propagation", "private", "--",
                               "sh", "-c", HIDE, "sh", *map(str, self.hidden), "--",
                               str(BIN / "banger"), *args], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)


def _sshd_config(d: Path, port: int, path: str, config: Path) -> Path:
    cfg = d / f"sshd-{port}.conf"
    cfg.write_text(
        f"ListenAddress {REMOTE_IP}:{port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile none\nAllowStreamLocalForwarding yes\n"
        f"SetEnv PATH={path} BANGER_CONFIG={config} XDG_CACHE_HOME={d / 'cache'}\n")
    return cfg


@pytest.fixture
def remote(host: Host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """sshd in the host's namespace, and a client namespace joined to it."""
    d = tmp_path_factory.mktemp("remote")
    tag = secrets.token_hex(3)
    client_ns = f"banger-cli-{tag}"
    sshds: list[subprocess.Popen[bytes]] = []
    subprocess.run(["ip", "netns", "add", client_ns], check=True)
    try:
        subprocess.run(["ip", "-n", client_ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", f"vc-{tag}", "netns", client_ns, "type", "veth",
                        "peer", "name", f"vr-{tag}", "netns", host.ns], check=True)
        for ns, dev, ip in ((client_ns, f"vc-{tag}", CLIENT_IP), (host.ns, f"vr-{tag}",
                                                                   REMOTE_IP)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        home = d / "home"
        (home / ".ssh").mkdir(parents=True)
        for key in ("id_ed25519", "stranger"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(home / ".ssh" / key)], check=True)
        shutil.copy(home / ".ssh" / "id_ed25519.pub", d / "authorized_keys")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "host_key")], check=True)
        (home / ".ssh" / "config").write_text(
            f"Host *\n  UserKnownHostsFile {home / '.ssh' / 'known_hosts'}\n"
            "  StrictHostKeyChecking accept-new\n  IdentitiesOnly yes\n")
        bin_dir = d / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {home / ".ssh" / "config"} '
                           '-i "$TEST_SSH_KEY" "$@"\n')
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        for port, path in ((22, f"{BIN}:/usr/bin:/bin"), (PLAIN_PORT, "/usr/bin:/bin")):
            cfg = _sshd_config(d, port, path, host.config)
            with (d / f"sshd-{port}.log").open("wb") as log:
                sshds.append(subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{host.ns}", "--", str(SSHD), "-D", "-e",
                     "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while b"Server listening" not in (d / "sshd-22.log").read_bytes() \
                or b"Server listening" not in (d / f"sshd-{PLAIN_PORT}.log").read_bytes():
            assert time.monotonic() < deadline and all(p.poll() is None for p in sshds), \
                (d / "sshd-22.log").read_text()
            time.sleep(0.1)
        yield Client(client_ns, home, bin_dir, (host.root, host.run_dir))
    finally:
        for p in sshds:
            p.terminate()
            p.wait(10)
        subprocess.run(["ip", "netns", "del", client_ns], check=False)


def test_a_remote_daemon_runs_a_vm_for_a_client_over_ssh(host: Host, remote: Client,
                                                         vmm: str) -> None:
    url = f"ssh://root@{REMOTE_IP}"
    # Contexts: stored in the client's config dir, chosen for every command after.
    assert remote.banger("context", "add", "lab", url).returncode == 0
    assert remote.banger("context", "use", "lab").returncode == 0
    created = remote.banger("vm", "create", "--name", "rbox", "--json")
    assert created.returncode == 0, created.stdout + created.stderr
    assert json.loads(created.stdout)["state"] == "running"
    # The VM is the remote daemon's: its own CLI sees it.
    assert [v["name"] for v in host.json("vm", "list")] == ["rbox"]
    ran = remote.banger("vm", "exec", "rbox", "--", "sh", "-c", "uname -n; exit 3")
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert ran.stdout.strip() == "rbox"
    shell = remote.banger("vm", "ssh", "rbox", "--", "echo", "$((40+2))")
    assert (shell.returncode, shell.stdout.strip()) == (0, "42"), shell.stderr
    # Who runs the remote daemon and who logs in (a root daemon copies anyone's repository).
    where = host.json("daemon", "where")
    assert (where["daemon_uid"], where["daemon_user"], where["login_uid"]) == (0, "root", 0)
    # `vm exec --auto-prepare`: the workspace's origin is this client's repository, which
    # is sent again only when it changed.
    repo = remote.home / "ws"
    repo.mkdir()
    (repo / "f.txt").write_text("one\n")
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    prepared = remote.banger("vm", "workspace", "prepare", "rbox", str(repo))
    assert prepared.returncode == 0, prepared.stderr
    same = remote.banger("vm", "exec", "--auto-prepare", "rbox", "--", "cat", "f.txt")
    assert (same.returncode, same.stdout) == (0, "one\n"), same.stderr
    assert "sending" not in same.stderr  # unchanged: nothing sent
    (repo / "f.txt").write_text("two\n")
    fresh = remote.banger("vm", "exec", "--auto-prepare", "rbox", "--", "cat", "f.txt")
    assert (fresh.returncode, fresh.stdout) == (0, "two\n"), fresh.stderr
    assert "sending" in fresh.stderr
    # The --host flag wins over the context; '' is this machine's daemon.
    listed = remote.banger("--host", url, "vm", "list", "--json")
    assert [v["name"] for v in json.loads(listed.stdout)] == ["rbox"], listed.stderr
    assert remote.banger("vm", "delete", "rbox").returncode == 0
    assert host.json("vm", "list") == []
    # One SSH connection per command, gone with it: no ssh left in the client's namespace.
    left = subprocess.run(["ip", "netns", "pids", remote.ns], capture_output=True,
                          text=True, check=False).stdout.split()
    assert left == [], left


def test_a_repository_on_the_client_runs_in_a_remote_vm_and_its_patch_comes_back(
        host: Host, remote: Client) -> None:
    """`vm run ./repo -- cmd`: the repository travels over the command's SSH connection,
    the guest's status comes back, and `--export` writes the patch on the client. The
    repository is a linked worktree (its git data in the main repository's .git): it
    arrives as a plain repository of its own."""
    main = remote.home / "main"
    main.mkdir()
    (main / "README").write_text("main\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C"]
    subprocess.run([*git, str(main), "init", "-q"], check=True)
    subprocess.run([*git, str(main), "add", "README"], check=True)
    subprocess.run([*git, str(main), "commit", "-q", "-m", "one"], check=True)
    repo = remote.home / "my repo"  # a name the remote side must make safe
    subprocess.run([*git, str(main), "worktree", "add", "-q", "-b", "feature", str(repo)],
                   check=True)
    (repo / "README").write_text("host\n")
    subprocess.run([*git, str(repo), "commit", "-q", "-am", "two, on feature"], check=True)
    (repo / "notes.txt").write_text("untracked, not ignored\n")
    patch_file = remote.home / "edits.patch"
    res = remote.banger("--host", f"ssh://root@{REMOTE_IP}", "vm", "run", "--rm", "--name",
                        "rrun", "--export", str(patch_file), str(repo), "--", "sh", "-c",
                        "cat notes.txt >&2; echo guest >> README; cat README; exit 3")
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout == "host\nguest\n", res.stdout + res.stderr
    assert "untracked, not ignored" in res.stderr
    patch = patch_file.read_text()  # written here, on the client
    assert "+guest" in patch and "README" in patch
    # It applies to the worktree it came from, on the client.
    subprocess.run([*git, str(repo), "apply", "--check", str(patch_file)], check=True)
    assert host.json("vm", "list") == []
    received = list((remote.home.parent / "cache" / "banger" / "received").iterdir())
    assert received == []  # the copy on the remote host went once it was in the guest


def test_image_and_kernel_files_travel_over_the_connection(
        host: Host, remote: Client, test_image: CachedImage) -> None:
    """Files a command names are this machine's: `kernel import` and `image pull FILE`
    send them to the remote host (and remove them there after); `image export -o FILE`
    brings the bundle back here."""
    url = f"ssh://root@{REMOTE_IP}"
    kernel = remote.home / "vmlinuz"
    shutil.copy(test_image.kernel, kernel)
    imported = remote.banger("--host", url, "kernel", "import", "--name", "rk", str(kernel))
    assert imported.returncode == 0, imported.stderr
    assert "qemu" in host.json("kernel", "show", "rk")["vmms"]

    bundle = remote.home / "img.tar.zst"
    exported = remote.banger("--host", url, "image", "export", IMAGE, "-o", str(bundle),
                             "--json", timeout=900)
    assert exported.returncode == 0, exported.stderr
    out = json.loads(exported.stdout)
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert (out["path"], out["sha256"], out["size_bytes"]) == (
        str(bundle), digest, bundle.stat().st_size)
    assert "rootfs.ext4" in out["members"] and "kernel" in out  # the remote's whole answer
    assert [p.name for p in remote.home.iterdir() if p.name.endswith(".partial")] == []

    pulled = remote.banger("--host", url, "image", "pull", str(bundle), "--name", "rimg",
                           "--json", timeout=900)
    assert pulled.returncode == 0, pulled.stderr
    shown = host.json("image", "show", "rimg")
    assert shown["name"] == "rimg"
    # its origin is where the client read the file, not the copy sent (gone now)
    assert shown["origin"] == f"{socket.gethostname()}:{bundle}#sha256:{digest}"
    received = remote.home.parent / "cache" / "banger" / "received"
    assert list(received.iterdir()) == []  # what was sent went once the daemon had it

    # So does a kernel bundle's: `kernel pull FILE` records where this machine read it.
    kbundle = build_bundle(remote.home / "k.tar.zst", {"bzImage": kernel.read_bytes()},
                           kind="kernel", manifest={"name": "rkb"})
    kpulled = remote.banger("--host", url, "kernel", "pull", str(kbundle), timeout=600)
    assert kpulled.returncode == 0, kpulled.stderr
    ksha = hashlib.sha256(kbundle.read_bytes()).hexdigest()
    assert host.json("kernel", "show", "rkb")["origin"] == \
        f"{socket.gethostname()}:{kbundle}#sha256:{ksha}"
    assert list(received.iterdir()) == []

    # A sparse root file system goes as its data only and arrives as the same file.
    rootfs = remote.home / "rootfs.ext4"
    subprocess.run(["cp", "--sparse=always", str(test_image.rootfs), str(rootfs)], check=True)
    data_mb = os.stat(rootfs).st_blocks * 512 / 1e6
    registered = remote.banger("--host", url, "image", "register", "--name", "rreg",
                               "--rootfs", str(rootfs), "--kernel-name", "rk", timeout=900)
    assert registered.returncode == 0, registered.stderr
    sent_mb = float(re.search(r"sending rootfs\.ext4 \(([0-9.]+) MB\)",
                              registered.stderr).group(1))  # type: ignore[union-attr]
    assert sent_mb <= data_mb + 1 and sent_mb < rootfs.stat().st_size / 1e6 / 1.5
    assert host.json("image", "show", "rreg")["kernel_name"] == "rk"
    assert list(received.iterdir()) == []

    # A file that is not there is a clear error before anything is sent (the flag takes
    # any path: the daemon's own error names it when local).
    missing = remote.banger("--host", url, "kernel", "build", "--base-config",
                            str(remote.home / "nope"))
    assert missing.returncode == 125, missing.stderr  # banger failed, and said why
    assert "cannot send" in missing.stderr and "internal error" not in missing.stderr


def test_a_wrong_key_an_unreachable_host_and_a_host_without_banger_are_clear(
        host: Host, remote: Client) -> None:
    cases = [
        (remote.banger("--host", f"ssh://root@{REMOTE_IP}", "vm", "list", key="stranger"),
         "Permission denied"),
        (remote.banger("--host", f"ssh://root@{REMOTE_IP}:{CLOSED_PORT}", "vm", "list"),
         "Connection refused"),
        (remote.banger("--host", f"ssh://root@{REMOTE_IP}:{PLAIN_PORT}", "vm", "list"),
         "has no banger"),
    ]
    for res, why in cases:
        assert res.returncode == 125, res.stdout + res.stderr
        lines = res.stderr.splitlines()
        assert lines[0].startswith("error: ") and why in lines[0], res.stderr
        assert lines[1].startswith("hint: "), res.stderr
        assert "Traceback" not in res.stderr
    assert __version__ in cases[2][0].stderr  # "install banger <version> on it"
    assert host.json("vm", "list") == []
    # Each failed command took its SSH connection with it.
    left = subprocess.run(["ip", "netns", "pids", remote.ns], capture_output=True,
                          text=True, check=False).stdout.split()
    assert left == [], left
