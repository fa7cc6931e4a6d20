"""oci.rootfs: a pulled tree is read and changed as the guest sees it, never the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from banger.daemon.imagepull import default_name
from banger.daemon.oci import rootfs
from banger.daemon.oci.reference import parse
from banger.errors import BadRequest


def exe(root: Path, rel: str, body: str = "#!/bin/sh\n") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body)
    p.chmod(0o755)


def debian_tree(root: Path) -> Path:
    """A merged-/usr tree with what banger needs, laid out like Debian's."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        (root / link).symlink_to(target)
    exe(root, "usr/lib/systemd/systemd")
    (root / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    for tool in ("usr/sbin/sshd", "usr/bin/ip", "usr/bin/ssh-keygen", "usr/bin/mount",
                 "usr/sbin/blkid"):
        exe(root, tool)
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_CODENAME="bookworm"\n')
    return root


def test_resolve_stays_inside_the_tree(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "abs").symlink_to("/etc")  # the host's /etc, if anything followed it
    (root / "up").symlink_to("../../../../etc")
    assert rootfs.resolve(root, "sbin/init") == root / "usr/lib/systemd/systemd"
    assert rootfs.resolve(root, "abs/ssh") == root / "etc/ssh"
    assert rootfs.resolve(root, "up/os-release") == root / "etc/os-release"
    assert rootfs.resolve(root, "abs/passwd") is None  # the host has one; the tree has not
    assert rootfs.resolve(root, "abs", follow_last=False) == root / "abs"
    (root / "loop").symlink_to("loop")
    with pytest.raises(rootfs.EscapeError):
        rootfs.resolve(root, "loop/x")
    with pytest.raises(rootfs.EscapeError):
        rootfs.resolve(root, "etc/os-release/x")


def test_inspect_a_debian_tree(tmp_path: Path) -> None:
    info = rootfs.inspect(debian_tree(tmp_path / "t"))
    assert info.missing() == []
    assert info.debian_like and info.os_id == "debian" and info.version_codename == "bookworm"
    assert info.init_is_systemd


def test_inspect_names_what_is_missing(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "usr/sbin/sshd").unlink()
    (root / "usr/bin/ip").unlink()
    (root / "usr/sbin/init").unlink()
    (root / "usr/sbin/init").symlink_to("/bin/busybox")
    missing = rootfs.inspect(root).missing()
    assert missing == ["/sbin/init as systemd (install systemd-sysv)",
                       "sshd (openssh-server)", "ip"]
    empty = tmp_path / "e"
    empty.mkdir()
    info = rootfs.inspect(empty)
    assert info.missing()[:2] == ["systemd", "sshd (openssh-server)"]
    assert not info.debian_like


def test_a_link_to_a_host_binary_does_not_count(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "usr/sbin/sshd").unlink()
    (root / "usr/sbin/sshd").symlink_to("/usr/sbin/sshd")  # the host has it: irrelevant
    assert "sshd (openssh-server)" in rootfs.inspect(root).missing()


def test_os_release_is_bounded_and_parsed(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "etc/os-release").write_text("ID=ubuntu\nID_LIKE=debian\n" + "X" * (1 << 20))
    info = rootfs.inspect(root)
    assert info.os_id == "ubuntu" and info.debian_like
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("/etc/os-release")  # the host's: not read
    (root / "usr/lib/os-release").write_text("ID=fedora\n")
    assert rootfs.inspect(root).os_id == "fedora"


def test_prepare_writes_only_inside(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file\n")
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("shared secret")
    (root / "etc/ssh/ssh_host_rsa_key.pub").symlink_to(outside / "keep")
    (root / "etc/machine-id").symlink_to(outside / "keep")
    modules = tmp_path / "m" / "6.1.0-test"
    (modules / "kernel").mkdir(parents=True)
    (modules / "kernel/virtio_net.ko").write_bytes(b"\x7fELF")
    (modules / "build").symlink_to("/usr/src/linux")
    rootfs.prepare(root, modules=modules)
    assert (outside / "keep").read_text() == "host file\n"  # links removed, not followed
    assert list((root / "etc/ssh").iterdir()) == []
    assert (root / "etc/machine-id").read_text() == ""
    copied = root / "usr/lib/modules/6.1.0-test"
    assert (copied / "kernel/virtio_net.ko").read_bytes() == b"\x7fELF"
    assert os.readlink(copied / "build") == "/usr/src/linux"


def test_prepare_refuses_a_modules_dir_that_is_a_file(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "usr/lib/modules").write_text("not a dir")
    modules = tmp_path / "m" / "v"
    modules.mkdir(parents=True)
    with pytest.raises(BadRequest, match="is not a directory"):
        rootfs.prepare(root, modules=modules)


def test_make_dirs_through_an_absolute_link(tmp_path: Path) -> None:
    root = debian_tree(tmp_path / "t")
    (root / "var/tmp").mkdir(parents=True)
    (root / "opt").symlink_to("/var/tmp")  # means the tree's /var/tmp, not the host's
    made = rootfs.make_dirs(root, "opt/x/y")
    assert made == root / "var/tmp/x/y" and made.is_dir()
    (root / "dangling").symlink_to("/nowhere/at/all")
    with pytest.raises(BadRequest, match="dangling"):
        rootfs.make_dirs(root, "dangling/sub")


@pytest.mark.parametrize(("ref", "name"), [
    ("127.0.0.1:5000/team/dev:1.2", "dev-1-2"),
    ("debian:bookworm", "debian-bookworm"),
    ("ubuntu", "ubuntu"),
    ("ghcr.io/org/tool_x:latest", "tool-x"),
    ("reg.example/app@sha256:" + "ab" * 32, "app-abababababab"),
    ("reg.example/" + "a" * 80 + ":v", "a" * 63),
])
def test_default_name(ref: str, name: str) -> None:
    assert default_name(parse(ref)) == name
