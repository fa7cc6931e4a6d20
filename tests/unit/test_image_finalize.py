"""Finalize with apt (``banger.daemon.imagefinalize``): planning, mirrors, the helper's script.

The install itself runs in a real helper VM in ``tests/e2e/test_image_pull.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from banger.config import Config
from banger.daemon import imagefinalize
from banger.daemon.imagefinalize import AptJob, Mirror, guest_script, mirror_for, plan
from banger.daemon.oci import rootfs
from banger.daemon.oci.rootfs import RootInfo
from banger.daemon.opstate import Operation
from banger.errors import BadRequest
from banger.names import check_name


def info(os_id: str = "debian", like: tuple[str, ...] = (), codename: str = "bookworm"
         ) -> RootInfo:
    return RootInfo(os_id=os_id, os_like=like, version_codename=codename, systemd=None,
                    init_is_systemd=False, sshd=None, tools={"ip": None})


@pytest.mark.parametrize(("url", "want"), [
    ("http://deb.debian.org/debian", Mirror("http://deb.debian.org/debian",
                                            "deb.debian.org", 80, by_name=True)),
    ("https://mirror.example.org:8443/debian/", Mirror("https://mirror.example.org:8443/debian/",
                                                       "mirror.example.org", 8443, by_name=True)),
    # An address is reached at the guest's own 127.0.0.1, on the same port.
    ("http://10.1.2.3:3142/debian", Mirror("http://127.0.0.1:3142/debian", "10.1.2.3", 3142,
                                           by_name=False)),
    ("http://127.0.0.1:8080/debian", Mirror("http://127.0.0.1:8080/debian", "127.0.0.1", 8080,
                                            by_name=False)),
])
def test_mirror_for(url: str, want: Mirror) -> None:
    got = mirror_for(url, "debian_mirror")
    assert got == want
    assert got.forward == f"127.0.0.1:{want.port}:{want.host}:{want.port}"


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://deb.debian.org/debian", "not an http(s) URL"),
    ("http://user:pw@deb.debian.org/debian", "user name"),
    ("http://deb.debian.org:22/debian", "port 22"),
    ("http://[::1]:8080/debian", "IPv6"),
    ("http://bad_host!/debian", "not a host name"),
    ("http://deb.debian.org:99999/debian", "bad port"),
    ("http://-x.org/debian", "not a host name"),
])
def test_bad_mirrors_are_refused(url: str, says: str) -> None:
    with pytest.raises(BadRequest) as err:
        mirror_for(url, "debian_mirror")
    assert says in err.value.message and "debian_mirror" in err.value.message + (
        err.value.hint or "")


def test_plan_picks_the_mirror_by_distribution() -> None:
    cfg = Config(debian_mirror="http://127.0.0.1:9/debian",
                 ubuntu_mirror="http://archive.ubuntu.com/ubuntu")
    deb = plan(cfg, info(), True, "r")
    assert deb is not None and (deb.os_id, deb.codename) == ("debian", "bookworm")
    assert deb.mirror.url == "http://127.0.0.1:9/debian"
    assert deb.packages == rootfs.APT_PACKAGES
    ubu = plan(cfg, info("ubuntu", ("debian",), "noble"), True, "r")
    assert ubu is not None and ubu.os_id == "ubuntu" and ubu.mirror.host == "archive.ubuntu.com"
    mint = plan(cfg, info("linuxmint", ("ubuntu", "debian"), "wilma"), True, "r")
    assert mint is not None and mint.os_id == "ubuntu"
    # No apt, or not Debian-like: the caller refuses with what is missing.
    assert plan(cfg, info(), False, "r") is None
    assert plan(cfg, info("alpine"), True, "r") is None
    with pytest.raises(BadRequest, match="no release codename"):
        plan(cfg, info(codename=""), True, "r")
    with pytest.raises(BadRequest, match="no release codename"):
        plan(cfg, info(codename="x; rm -rf /"), True, "r")


def test_has_apt_does_not_follow_links_out(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/apt-get").symlink_to("/usr/bin/apt-get")  # the host's, if any
    assert not rootfs.has_apt(tmp_path)
    (tmp_path / "usr/bin/apt-get").unlink()
    (tmp_path / "usr/bin/apt-get").write_text("#!/bin/sh\n")
    (tmp_path / "usr/bin/apt-get").chmod(0o755)
    assert rootfs.has_apt(tmp_path)


def script_for(url: str) -> str:
    return guest_script(AptJob("debian", "bookworm", mirror_for(url, "debian_mirror")))


def test_guest_script_is_valid_sh_and_puts_everything_back() -> None:
    script = script_for("http://deb.debian.org/debian")
    subprocess.run(["sh", "-n", "-c", script], check=True)
    assert "mount -t ext4 /dev/vdc" in script
    assert "trap restore EXIT" in script
    # The image's own sources, lists and archives are not touched: scratch ones are used.
    assert "Dir::Etc::SourceParts=/nonexistent" in script
    assert "deb http://deb.debian.org/debian bookworm main" in script
    assert "127.0.0.1 deb.debian.org" in script  # by name: the chroot's /etc/hosts
    assert "install " + " ".join(rootfs.APT_PACKAGES) in script
    assert "rm -f $t/etc/ssh/ssh_host_*" in script
    by_address = script_for("http://127.0.0.1:8080/debian")
    subprocess.run(["sh", "-n", "-c", by_address], check=True)
    assert "127.0.0.1 127.0.0.1" not in by_address


def test_restore_runs_on_failure(tmp_path: Path) -> None:
    """The script's clean-up, run by sh against a fake target: a saved /etc/hosts is put
    back, an added policy-rc.d and the scratch directory are removed."""
    script = script_for("http://deb.debian.org/debian")
    restore = script[script.index("restore() {"):script.index("trap restore EXIT")]
    t = tmp_path / "t"
    (t / "etc").mkdir(parents=True)
    (t / "usr/sbin").mkdir(parents=True)
    (t / "tmp/banger-apt").mkdir(parents=True)
    (t / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.0.1 deb.debian.org\n")
    (t / "usr/sbin/policy-rc.d").write_text("exit 101\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "banger-hosts.saved").write_text("127.0.0.1 localhost\n")
    (run / "banger-policy.ours").write_text("")
    body = (restore.replace("/run/", f"{run}/")
            + "mountpoint() { return 1; }\numount() { :; }\nsync() { :; }\n"
            + f"t={t}\nrestore\n")
    subprocess.run(["sh", "-c", body], check=True)
    assert (t / "etc/hosts").read_text() == "127.0.0.1 localhost\n"
    assert not (t / "usr/sbin/policy-rc.d").exists()
    assert not (t / "tmp/banger-apt").exists()


def test_helper_names_are_vm_names() -> None:
    """The helper is named after the pull's operation id (12 hex digits)."""
    assert check_name(imagefinalize.HELPER_PREFIX + Operation("k", "t", []).id)
