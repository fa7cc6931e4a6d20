"""The configure step of ``banger kernel build`` on Debian's real kernel source.

Only what Kconfig reads is unpacked (Kconfig and Makefiles, ``scripts/``, the config
fragments): about 40 MB and half a minute, against a 22-minute build. Then
:func:`banger.daemon.imagemgr.kernel.configure_tree` runs the tree's own
``make x86_64_defconfig`` (what ``kernel build`` starts from by default) and
``make olddefconfig`` with banger's fragment on top, and every fragment option must
survive the real dependency resolution. The same for Firecracker's CI config, the
reference base the boot tests use, when the shared specs are there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from banger.daemon.imagemgr import kernel as k
from banger.runner import SubprocessRunner
from tests.slow import kernelcache

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# Everything `make *config` reads in a 6.1 tree.
KCONFIG_MEMBERS = ["*/Kconfig*", "*/Makefile*", "*/Kbuild*", "*/scripts/*",
                   "*/arch/x86/configs/*", "*/kernel/configs/*", "*/arch/x86/tools/*"]


@pytest.fixture(scope="module")
def kconfig_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not kernelcache.SOURCE.is_file():
        pytest.skip(f"no kernel source at {kernelcache.SOURCE} "
                    "(apt-get install linux-source-6.1)")
    missing = [t for t in ("make", "gcc", "flex", "bison", "tar", "xz")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Kconfig needs {', '.join(missing)}")
    dest = tmp_path_factory.mktemp("kconfig")
    SubprocessRunner().run(["tar", "-xf", str(kernelcache.SOURCE), "-C", str(dest),
                            "--wildcards", *KCONFIG_MEMBERS],
                           desc="unpack the Kconfig files", timeout=600)
    return k._source_root(dest)


def _configure(tree: Path, base_text: str | None) -> dict[str, str | None]:
    (tree / ".config").unlink(missing_ok=True)
    final = k.configure_tree(SubprocessRunner(), tree, base_text=base_text,
                             fragment_text=k.load_fragment())
    return k.parse_config(final)


def _no_keyring_no_openssl(cfg: dict[str, str | None]) -> None:
    # With these off no host program links libcrypto (the build needs no libssl-dev).
    for sym in ("CONFIG_SYSTEM_TRUSTED_KEYRING", "CONFIG_MODULE_SIG", "CONFIG_MODULES"):
        assert cfg.get(sym) in (None, "n"), sym


def test_the_source_s_defconfig_plus_the_fragment(kconfig_tree: Path) -> None:
    cfg = _configure(kconfig_tree, None)  # configure_tree fails on any dropped option
    _no_keyring_no_openssl(cfg)
    assert cfg["CONFIG_LOCALVERSION"] == '"-banger"'
    # The defconfig was the base: a PC option the fragment never mentions is there.
    assert cfg.get("CONFIG_E1000") == "y"


def test_firecracker_s_ci_config_plus_the_fragment(kconfig_tree: Path) -> None:
    base = kernelcache.BASE_CONFIG
    if not base.is_file():
        pytest.skip(f"no Firecracker CI kernel config at {base} "
                    "(the shared specs beside the checkout are absent)")
    cfg = _configure(kconfig_tree, base.read_text())
    _no_keyring_no_openssl(cfg)
    assert cfg["CONFIG_LOCALVERSION"] == '"-banger"'
