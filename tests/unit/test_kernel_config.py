"""Configuring a kernel tree without anything outside banger: the tree's own defconfig
plus banger's fragment, run through a real ``make`` on a stand-in tree; a base config the
user names must exist; and no code under ``src/`` reaches for ``../shared``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from banger.daemon import Daemon, kernels
from banger.daemon.imagemgr import kernel as k
from banger.daemon.kernels import given_base_config
from banger.errors import BadRequest
from banger.runner import SubprocessRunner

SRC = Path(__file__).resolve().parents[2] / "src"

# A stand-in for Kconfig's olddefconfig with its two behaviours that matter here: a
# later line for a symbol wins, and a symbol whose dependency is off is dropped.
RESOLVE = r'''
import re, sys
vals = {}
for line in open(".config"):
    m = re.match(r"(CONFIG_\w+)=(.*)", line.strip()) or re.match(
        r"# (CONFIG_\w+) is not set", line.strip())
    if m:
        vals[m.group(1)] = m.group(2) if m.lastindex == 2 else None
if vals.get("CONFIG_VIRTIO") != "y":
    vals.pop("CONFIG_VIRTIO_MMIO", None)
with open(".config", "w") as out:
    for sym, val in vals.items():
        out.write(f"{sym}={val}\n" if val is not None else f"# {sym} is not set\n")
with open("make.log", "a") as log:
    log.write("olddefconfig\n")
'''

MAKEFILE = """\
x86_64_defconfig:
\tprintf 'CONFIG_FROM_DEFCONFIG=y\\n# CONFIG_VIRTIO is not set\\nCONFIG_MODULES=y\\n' > .config
\techo x86_64_defconfig >> make.log
olddefconfig:
\t{python} resolve.py
"""


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "linux"
    src.mkdir()
    (src / "Makefile").write_text(MAKEFILE.format(python=sys.executable))
    (src / "resolve.py").write_text(RESOLVE)
    return src


def _targets(src: Path) -> list[str]:
    return (src / "make.log").read_text().split()


def test_the_tree_s_defconfig_is_the_base_and_the_fragment_wins(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    fragment = "CONFIG_VIRTIO=y\nCONFIG_VIRTIO_MMIO=y\n# CONFIG_MODULES is not set\n"
    lines: list[str] = []
    final = k.configure_tree(SubprocessRunner(), src, base_text=None, fragment_text=fragment,
                             on_line=lines.append)
    assert _targets(src) == ["x86_64_defconfig", "olddefconfig"]
    cfg = k.parse_config(final)
    assert cfg == {"CONFIG_FROM_DEFCONFIG": "y", "CONFIG_VIRTIO": "y",
                   "CONFIG_VIRTIO_MMIO": "y", "CONFIG_MODULES": None}
    assert (src / ".config").read_text() == final
    assert any("x86_64_defconfig" in line for line in lines)  # make's output is logged


def test_an_option_the_resolver_drops_fails_the_configure(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    # VIRTIO_MMIO needs VIRTIO, which the defconfig leaves off and the fragment forgot.
    with pytest.raises(BadRequest, match="CONFIG_VIRTIO_MMIO: wanted y, got not set"):
        k.configure_tree(SubprocessRunner(), src, base_text=None,
                         fragment_text="CONFIG_VIRTIO_MMIO=y\n")


def test_a_given_base_config_replaces_the_defconfig(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    final = k.configure_tree(SubprocessRunner(), src, base_text="CONFIG_MINE=y\nCONFIG_VIRTIO=y\n",
                             fragment_text="CONFIG_VIRTIO_MMIO=y\n")
    assert _targets(src) == ["olddefconfig"]  # no defconfig written
    assert k.parse_config(final) == {"CONFIG_MINE": "y", "CONFIG_VIRTIO": "y",
                                     "CONFIG_VIRTIO_MMIO": "y"}


def test_the_shipped_fragment_on_a_defconfig_shaped_base() -> None:
    # Real config text: a defconfig's lines for symbols the fragment changes. Appending
    # the fragment must flip every one (Kconfig reads the later line).
    base = ("CONFIG_MODULES=y\nCONFIG_CFG80211=y\nCONFIG_WIRELESS=y\nCONFIG_DRM=y\n"
            "CONFIG_SOUND=y\nCONFIG_SYSTEM_TRUSTED_KEYRING=y\n# CONFIG_X86_MPPARSE is not set\n"
            "# CONFIG_SERIO is not set\nCONFIG_LOCALVERSION=\"\"\n")
    fragment = k.load_fragment()
    merged = k.parse_config(k.merge_fragment(base, fragment))
    assert k.config_mismatches(k.parse_config(fragment), merged) == []
    assert merged["CONFIG_CFG80211"] == "y"  # not in the fragment: olddefconfig drops it
    assert merged["CONFIG_LOCALVERSION"] == '"-banger"'


def test_config_assembly_works_from_the_installed_package_alone(tmp_path: Path) -> None:
    """Like an installed wheel: the package copied elsewhere, no checkout, no ../shared."""
    site = tmp_path / "site-packages"
    shutil.copytree(SRC / "banger", site / "banger",
                    ignore=shutil.ignore_patterns("__pycache__"))
    src = _tree(tmp_path)
    script = (
        "import banger, sys\n"
        "from pathlib import Path\n"
        "from banger.daemon.imagemgr import kernel as k\n"
        "from banger.daemon.kernels import given_base_config\n"
        "from banger.runner import SubprocessRunner\n"
        "assert given_base_config(None) is None\n"
        "final = k.configure_tree(SubprocessRunner(), Path(sys.argv[1]), base_text=None,\n"
        "                         fragment_text=k.load_fragment())\n"
        "print(banger.__file__)\n")
    env = {k_: v for k_, v in os.environ.items() if k_ != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, "
                          f"{str(site)!r}); exec({script!r})", str(src)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    # The stand-in resolver keeps every line, so the shipped fragment survives whole;
    # what matters is that it was found and applied from the copied package.
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(site / "banger" / "__init__.py")
    cfg = k.parse_config((src / ".config").read_text())
    assert cfg["CONFIG_FROM_DEFCONFIG"] == "y" and cfg["CONFIG_LOCALVERSION"] == '"-banger"'


# --- the base config a user names --------------------------------------------------------


def test_no_base_config_means_the_defconfig() -> None:
    assert given_base_config(None) is None


def test_a_named_base_config_must_exist(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as err:
        given_base_config(str(tmp_path / "nope.config"))
    assert str(tmp_path / "nope.config") in err.value.message
    assert "--base-config" in err.value.hint and "BANGER_KERNEL_BASE_CONFIG" in err.value.hint
    with pytest.raises(BadRequest):
        given_base_config(str(tmp_path))  # a directory is no config either
    cfg = tmp_path / "mine.config"
    cfg.write_text("CONFIG_A=y\n")
    assert given_base_config(str(cfg)) == cfg


def test_a_build_naming_a_missing_base_config_is_refused_before_it_starts(
        daemon: Daemon, tmp_path: Path) -> None:
    missing = tmp_path / "firecracker.config"
    with pytest.raises(BadRequest, match=re.escape(f"no base kernel config at {missing}")):
        kernels.begin_build(daemon, "k61", str(missing), None, None)
    assert daemon.kernel_ops.all() == []  # nothing started, nothing fell back


# --- nothing under src/ reads ../shared ---------------------------------------------------

_SHARED = re.compile(r"shared/specs|\.\./shared|[\"']shared[\"']\s*[/,)]")


def test_no_product_code_reads_the_shared_checkout() -> None:
    """An installed wheel has no ``../shared``: nothing under src/ may name it."""
    offenders = []
    for path in sorted(SRC.rglob("*")):
        if not path.is_file() or path.suffix in (".pyc",):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
                      for n, line in enumerate(text.splitlines(), 1) if _SHARED.search(line)]
    assert offenders == []


@pytest.mark.parametrize("line", [
    'BASE = REPO.parent / "shared" / "specs" / NAME',
    "default: ../shared/specs next to banger",
    "os.path.join(root, 'shared', 'specs')",
])
def test_the_shared_pattern_catches_the_ways_code_names_it(line: str) -> None:
    assert _SHARED.search(line)
