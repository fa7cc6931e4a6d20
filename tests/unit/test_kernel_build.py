"""The guest-kernel recipe: config fragment merging and checking, host checks, the build
driver against a fake runner, and kernel file inspection on real and synthetic kernels."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banger.daemon.imagemgr import kernel as k
from banger.daemon.imagemgr.kernel import (
    BuiltKernel,
    KernelKind,
    Mismatch,
    cache_key,
    check_build_host,
    config_mismatches,
    inspect_kernel_file,
    merge_fragment,
    parse_config,
    verify_config,
)
from banger.errors import BadRequest, Cancelled, HostError
from banger.runner import CancelToken, Result
from tests.fakes import FakeRunner

E2E_CACHE = Path(os.environ.get("BANGER_TEST_CACHE", "/var/cache/banger-test"))

# --- config parsing, merging, verification -----------------------------------------------

BASE = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_A=y
# CONFIG_B is not set
CONFIG_C="base"
CONFIG_D=m
CONFIG_N=64
"""

FRAGMENT = """\
# our choices
CONFIG_B=y
CONFIG_C="ours"
# CONFIG_D is not set
"""


def test_parse_config_reads_values_unset_and_ignores_comments() -> None:
    cfg = parse_config(BASE)
    assert cfg == {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": '"base"',
                   "CONFIG_D": "m", "CONFIG_N": "64"}


def test_a_later_line_overrides_an_earlier_one_as_in_kconfig() -> None:
    merged = parse_config(merge_fragment(BASE, FRAGMENT))
    assert merged["CONFIG_A"] == "y"  # untouched by the fragment
    assert merged["CONFIG_B"] == "y"
    assert merged["CONFIG_C"] == '"ours"'
    assert merged["CONFIG_D"] is None


def test_merge_keeps_the_base_intact_and_appends_the_fragment() -> None:
    merged = merge_fragment(BASE, FRAGMENT)
    assert merged.startswith(BASE)
    assert merged.rstrip().endswith("# CONFIG_D is not set")


def test_verify_passes_when_every_fragment_option_survived() -> None:
    final = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=\"ours\"\n# CONFIG_D is not set\n"
    verify_config(FRAGMENT, final)


@pytest.mark.parametrize("final_d", ["# CONFIG_D is not set", "CONFIG_D=n", ""])
def test_off_means_unset_n_or_absent(final_d: str) -> None:
    # Kconfig drops symbols whose dependencies are off: absent is still "off".
    assert config_mismatches({"CONFIG_D": None}, parse_config(final_d)) == []


def test_verify_names_every_option_that_did_not_survive() -> None:
    # What olddefconfig does when a dependency is missing: B silently reverts, C keeps
    # the base value, D stays a module.
    final = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="base"\nCONFIG_D=m\n'
    with pytest.raises(BadRequest) as err:
        verify_config(FRAGMENT, final)
    msg = str(err.value)
    assert "CONFIG_B: wanted y, got not set" in msg
    assert "CONFIG_C: wanted \"ours\", got \"base\"" in msg
    assert "CONFIG_D: wanted not set, got m" in msg
    assert err.value.details["options"] == ["CONFIG_B", "CONFIG_C", "CONFIG_D"]


def test_mismatches_keep_fragment_order() -> None:
    bad = config_mismatches({"CONFIG_Z": "y", "CONFIG_A": "y"}, {})
    assert bad == [Mismatch("CONFIG_Z", "y", None), Mismatch("CONFIG_A", "y", None)]


def test_the_shipped_fragment_is_well_formed() -> None:
    text = k.load_fragment()
    opts = parse_config(text)
    # Everything both VMMs need from the guest, whatever the base config says.
    for sym in ("CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_VIRTIO_BLK",
                "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_EXT4_FS",
                "CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_DEVTMPFS",
                "CONFIG_DEVTMPFS_MOUNT", "CONFIG_PVH", "CONFIG_CGROUPS", "CONFIG_AUTOFS_FS",
                "CONFIG_FHANDLE", "CONFIG_SECCOMP",
                # Firecracker: kvm-clock (its only wall clock), Ctrl-Alt-Del through the
                # i8042 (`vm stop`), SMP from the MP table when there is no ACPI.
                "CONFIG_KVM_GUEST", "CONFIG_PARAVIRT", "CONFIG_SERIO_I8042",
                "CONFIG_KEYBOARD_ATKBD", "CONFIG_X86_MPPARSE",
                # QEMU microvm under TCG: the CMOS RTC sets the clock.
                "CONFIG_RTC_DRV_CMOS", "CONFIG_RTC_HCTOSYS"):
        assert opts.get(sym) == "y", sym
    # Off whatever the base: modules, and (from a generic PC defconfig) the wireless
    # stack whose signed regulatory database would need the keyring and OpenSSL.
    for sym in ("CONFIG_MODULES", "CONFIG_SYSTEM_TRUSTED_KEYRING", "CONFIG_WIRELESS",
                "CONFIG_DRM", "CONFIG_SOUND"):
        assert sym in opts and opts[sym] is None, sym
    for line in text.splitlines():
        # A typo such as "#CONFIG_X is not set" would silently turn into a comment.
        if "CONFIG_" in line and line.startswith("#"):
            assert k._UNSET.match(line.strip()), f"malformed fragment line: {line!r}"
        elif line.strip() and not line.startswith("#"):
            assert k._SET.match(line.strip()), f"malformed fragment line: {line!r}"


def test_the_fragment_is_package_data_beside_the_module() -> None:
    assert k.FRAGMENT_PATH.parent == Path(k.__file__).parent
    assert k.FRAGMENT_PATH.is_file()


def test_cache_key_follows_every_input(tmp_path: Path) -> None:
    base, frag, src = tmp_path / "base", tmp_path / "frag", tmp_path / "src.tar.xz"
    base.write_text("CONFIG_A=y\n")
    frag.write_text("CONFIG_B=y\n")
    src.write_bytes(b"source")
    first = cache_key(base, src, frag)
    assert cache_key(base, src, frag) == first
    frag.write_text("CONFIG_B=n\n")
    assert cache_key(base, src, frag) != first
    frag.write_text("CONFIG_B=y\n")
    src.write_bytes(b"other source")
    assert cache_key(base, src, frag) != first


def test_cache_key_without_a_base_config_stands_for_the_defconfig(tmp_path: Path) -> None:
    base, frag, src = tmp_path / "base", tmp_path / "frag", tmp_path / "src.tar.xz"
    base.write_text("CONFIG_A=y\n")
    frag.write_text("CONFIG_B=y\n")
    src.write_bytes(b"source")
    key = cache_key(None, src, frag)
    assert key == cache_key(None, src, frag)
    assert key != cache_key(base, src, frag)
    src.write_bytes(b"other source")  # the defconfig comes from the source: it counts
    assert cache_key(None, src, frag) != key


def test_cache_key_names_a_missing_input(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.write_text("CONFIG_A=y\n")
    with pytest.raises(HostError, match=r"linux\.tar\.xz"):
        cache_key(base, tmp_path / "linux.tar.xz")


# --- host checks -------------------------------------------------------------------------


def _headers(tmp_path: Path) -> Path:
    inc = tmp_path / "include"
    inc.mkdir()
    for h in ("libelf.h", "gelf.h"):
        (inc / h).write_text("")
    return inc


def test_host_check_passes_with_everything_present(tmp_path: Path) -> None:
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"x")
    check_build_host(tarball, which=lambda t: f"/usr/bin/{t}", include_dir=_headers(tmp_path))


def test_host_check_names_missing_tools_and_the_apt_line(tmp_path: Path) -> None:
    tarball = tmp_path / "linux.tar.xz"
    tarball.write_bytes(b"x")

    def which(tool: str) -> str | None:
        return None if tool in ("bison", "flex", "xz") else f"/usr/bin/{tool}"

    with pytest.raises(HostError) as err:
        check_build_host(tarball, which=which, include_dir=tmp_path)
    assert "bison" in str(err.value) and "flex" in str(err.value)
    assert err.value.hint == ("apt-get install -y --no-install-recommends "
                              "bison flex xz-utils libelf-dev")


def test_host_check_asks_for_the_source_package(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "linux-source-6.1.tar.xz"
    monkeypatch.setattr(k, "DEFAULT_SOURCE_TARBALL", missing)
    with pytest.raises(HostError) as err:
        check_build_host(missing, which=lambda t: f"/usr/bin/{t}",
                         include_dir=_headers(tmp_path))
    assert str(missing) in str(err.value)
    assert err.value.hint.endswith("linux-source-6.1")


def test_required_tools_and_packages() -> None:
    tools = k.required_build_tools()
    assert {"make", "gcc", "bc", "bison", "flex"} <= set(tools)
    assert "libelf-dev" in k.build_packages() and "linux-source-6.1" in k.build_packages()
    assert "libssl-dev" not in k.build_packages()  # no keyrings, no signing


# --- the build driver, against a fake runner ----------------------------------------------

RELEASE = "6.1.192-banger"


DEFCONFIG = "CONFIG_DEFCONFIG_ONLY=y\nCONFIG_MODULES=y\n# CONFIG_VIRTIO_MMIO is not set\n"


class FakeKernelTree:
    """Plays tar and make: unpacks a fake tree, 'configures' and 'compiles' it."""

    def __init__(self, tmp_path: Path, drop: tuple[str, ...] = ()) -> None:
        self.drop = drop  # fragment options olddefconfig "loses"
        self.fragment = tmp_path / "fragment.config"
        self.fragment.write_text("CONFIG_VIRTIO_MMIO=y\n# CONFIG_MODULES is not set\n")
        self.base: Path | None = tmp_path / "base.config"
        self.base.write_text("CONFIG_VIRTIO_MMIO=n\nCONFIG_MODULES=y\nCONFIG_X=y\n")
        self.tarball = tmp_path / "linux.tar.xz"
        self.tarball.write_bytes(b"not really a tarball")
        self.runner = FakeRunner()
        self.runner.on(["tar"], self.tar)
        self.runner.on(["make"], self.make)
        self.src: Path | None = None

    def tar(self, argv: list[str]) -> Result:
        self.src = Path(argv[argv.index("-C") + 1]) / "linux-source-6.1"
        self.src.mkdir(parents=True)
        (self.src / "Makefile").write_text("VERSION = 6\n")
        return Result(argv, 0, b"", b"")

    def make(self, argv: list[str]) -> Result:
        assert self.src is not None and argv[1:3] == ["-C", str(self.src)]
        if "x86_64_defconfig" in argv:
            (self.src / ".config").write_text(DEFCONFIG)
            return Result(argv, 0, b"", b"")
        if "olddefconfig" in argv:
            cfg = parse_config((self.src / ".config").read_text())
            lines = [f"{s}={v}" if v is not None else f"# {s} is not set"
                     for s, v in cfg.items() if s not in self.drop]
            (self.src / ".config").write_text("\n".join(lines) + "\n")
            return Result(argv, 0, b"", b"")
        (self.src / "include/config").mkdir(parents=True)
        (self.src / "include/config/kernel.release").write_text(RELEASE + "\n")
        (self.src / "vmlinux").write_bytes(make_vmlinux(version=RELEASE))
        (self.src / "arch/x86/boot").mkdir(parents=True)
        (self.src / "arch/x86/boot/bzImage").write_bytes(make_bzimage(version=RELEASE))
        out = "  CC      init/main.o\n  CC      kernel/fork.o\n  LD      vmlinux\nKernel: ok\n"
        return Result(argv, 0, out.encode(), b"")

    def build(self, workdir: Path, cancel: CancelToken | None = None,
              progress: list[tuple[str, str]] | None = None) -> BuiltKernel:
        sink = progress if progress is not None else []
        return k.build_kernel(self.runner, workdir=workdir, source_tarball=self.tarball,
                              base_config=self.base, jobs=3, cancel=cancel,
                              on_progress=lambda s, line: sink.append((s, line)),
                              fragment=self.fragment)


@pytest.fixture
def no_host_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake runner needs no compiler; the host check has its own tests above.
    monkeypatch.setattr(k, "check_build_host", lambda *a, **kw: None)


@pytest.mark.usefixtures("no_host_check")
def test_build_runs_the_stages_and_leaves_only_the_outputs(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    progress: list[tuple[str, str]] = []
    work = tmp_path / "work"
    built = tree.build(work, progress=progress)
    assert built.version == RELEASE
    assert sorted(p.name for p in work.iterdir()) == ["build.log", "bzImage", "config",
                                                       "vmlinux"]
    assert parse_config(built.config.read_text())["CONFIG_VIRTIO_MMIO"] == "y"
    assert list(dict.fromkeys(stage for stage, _ in progress)) == list(k.STAGES)
    assert ("compile", "2 steps: CC      kernel/fork.o") in progress
    makes = tree.runner.ran("make")
    assert [m[3:] for m in makes] == [["olddefconfig"], ["-j3", "vmlinux", "bzImage"]]
    assert "CC      init/main.o" in built.log.read_text()


@pytest.mark.usefixtures("no_host_check")
def test_without_a_base_config_the_tree_s_defconfig_is_the_base(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    tree.base = None
    built = tree.build(tmp_path / "work")
    makes = tree.runner.ran("make")
    assert [m[3:] for m in makes] == [["x86_64_defconfig"], ["olddefconfig"],
                                      ["-j3", "vmlinux", "bzImage"]]
    final = parse_config(built.config.read_text())
    assert final["CONFIG_DEFCONFIG_ONLY"] == "y"  # the defconfig is the base...
    assert final["CONFIG_VIRTIO_MMIO"] == "y"  # ...and the fragment overrides it
    assert final["CONFIG_MODULES"] is None
    assert "CONFIG_X" not in final  # nothing of any other base config


@pytest.mark.usefixtures("no_host_check")
def test_a_defconfig_that_is_no_config_is_refused(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    tree.base = None
    tree.runner.handlers.insert(0, (("make", "-C"), lambda argv: _write_defconfig(
        tree, argv, "garbage\n")))
    work = tmp_path / "work"
    with pytest.raises(BadRequest, match="is not a kernel config"):
        tree.build(work)
    assert not work.exists()


def _write_defconfig(tree: FakeKernelTree, argv: list[str], text: str) -> Result:
    if argv[-1] == "x86_64_defconfig":
        assert tree.src is not None
        (tree.src / ".config").write_text(text)
        return Result(argv, 0, b"", b"")
    return tree.make(argv)


@pytest.mark.usefixtures("no_host_check")
def test_a_dropped_fragment_option_fails_the_build_and_cleans_up(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path, drop=("CONFIG_VIRTIO_MMIO",))
    work = tmp_path / "work"
    with pytest.raises(BadRequest, match="CONFIG_VIRTIO_MMIO: wanted y, got not set"):
        tree.build(work)
    assert not work.exists()
    assert not tree.runner.ran("make", "-C", str(tree.src), "-j3")  # never compiled


@pytest.mark.usefixtures("no_host_check")
def test_cancel_stops_the_build_and_cleans_up(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    token = CancelToken()
    work = tmp_path / "work"

    def cancel_on_configure(stage: str, line: str) -> None:
        if stage == "configure":
            token.cancel("user pressed ^C")

    with pytest.raises(Cancelled):
        k.build_kernel(tree.runner, workdir=work, source_tarball=tree.tarball,
                       base_config=tree.base, cancel=token, on_progress=cancel_on_configure,
                       fragment=tree.fragment)
    assert not work.exists()


@pytest.mark.usefixtures("no_host_check")
def test_a_failed_make_cleans_up(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    tree.runner.handlers.insert(0, (("make",), lambda argv: Result(argv, 2, b"", b"boom")))
    work = tmp_path / "work"
    with pytest.raises(HostError):
        tree.build(work)
    assert not work.exists()


@pytest.mark.usefixtures("no_host_check")
def test_build_refuses_a_non_empty_workdir_and_a_non_config(tmp_path: Path) -> None:
    tree = FakeKernelTree(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep-me").write_text("")
    with pytest.raises(BadRequest, match="not empty"):
        tree.build(work)
    assert (work / "keep-me").exists()
    tree.base.write_text("hello\n")
    with pytest.raises(BadRequest, match="not a kernel config"):
        tree.build(tmp_path / "work2")


# --- inspection: synthetic kernels ------------------------------------------------------


def make_bzimage(version: str = "6.1.0-test", *, protocol: int = 0x20F, xlf: int = 1,
                 setup_sects: int = 4, payload: int = 4096) -> bytes:
    """A minimal image with a valid x86 boot header (Documentation/x86/boot.rst)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, payload // 16)
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    banner = f"{version} (builder@host) #1 SMP\0".encode()
    setup[0x600:0x600 + len(banner)] = banner
    struct.pack_into("<H", setup, 0x20E, 0x600 - 0x200)
    struct.pack_into("<H", setup, 0x236, xlf)
    return bytes(setup) + b"\0" * payload


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_vmlinux(version: str = "6.1.99-x", *, pvh: bool = True, machine: int = 62,
                 etype: int = 2, elfclass: int = 2) -> bytes:
    """A minimal x86_64 ELF executable with a banner and, optionally, the PVH note."""
    payload = (b"\0" * 100 + f"Linux version {version} (a@b) (gcc 12) #1 SMP\n".encode()
               + b"\0" * 100)
    notes = _note(b"GNU\0", 3, b"\x01" * 20)
    if pvh:
        notes += _note(b"Xen\0", 18, struct.pack("<I", 0x1000000))
    phoff, phnum = 64, 2
    load_off = 0x1000
    note_off = load_off + len(payload)
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4], header[5], header[6] = elfclass, 1, 1
    struct.pack_into("<HHI", header, 16, etype, machine, 1)
    struct.pack_into("<QQQ", header, 24, 0x1000000, phoff, 0)
    struct.pack_into("<IHHHHHH", header, 48, 0, 64, 56, phnum, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, load_off, 0xFFFFFFFF81000000, 0x1000000,
                     len(payload), len(payload), 0x1000)
    ph += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    body = bytes(header) + ph
    body += b"\0" * (load_off - len(body))
    return body + payload + notes


def _write(tmp_path: Path, data: bytes, name: str = "kernel") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_synthetic_bzimage(tmp_path: Path) -> None:
    info = inspect_kernel_file(_write(tmp_path, make_bzimage("6.1.0-37-cloud-amd64")))
    assert info.kind is KernelKind.BZIMAGE
    assert info.vmms == ("qemu",)
    assert info.version == "6.1.0-37-cloud-amd64"
    assert info.suits("qemu") and not info.suits("firecracker")


def test_synthetic_vmlinux_with_pvh_suits_both(tmp_path: Path) -> None:
    info = inspect_kernel_file(_write(tmp_path, make_vmlinux("6.1.192-banger")))
    assert info.kind is KernelKind.VMLINUX
    assert info.pvh
    assert info.vmms == ("firecracker", "qemu")
    assert info.version == "6.1.192-banger"


def test_synthetic_vmlinux_without_pvh_is_firecracker_only(tmp_path: Path) -> None:
    info = inspect_kernel_file(_write(tmp_path, make_vmlinux(pvh=False)))
    assert not info.pvh
    assert info.vmms == ("firecracker",)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "not a Linux kernel"),
    (b"\x1f\x8b\x08\x00" + b"\0" * 2000, "not a Linux kernel"),  # a gzip stream
    (b"#!/bin/sh\necho hi\n", "not a Linux kernel"),
    (make_vmlinux(machine=183), "not an x86_64 kernel"),  # EM_AARCH64
    (make_vmlinux(elfclass=1), "not an x86_64 kernel"),  # 32-bit ELF
    (make_vmlinux(etype=1), "not an executable"),  # a relocatable object
    (make_vmlinux()[:40], "truncated"),
    (make_vmlinux()[:0x1010], "truncated"),  # loadable segment cut off
    (make_bzimage(xlf=0), "not an x86_64 kernel"),  # 32-bit only
    (make_bzimage(protocol=0x20A), "not an x86_64 kernel"),  # pre-2.12 boot protocol
    (make_bzimage()[:3000], "truncated"),
    (make_bzimage()[:0x220], "truncated"),
])
def test_garbage_is_a_bad_request(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        inspect_kernel_file(_write(tmp_path, data))


def test_a_bzimage_without_version_pointer_has_no_version(tmp_path: Path) -> None:
    data = bytearray(make_bzimage())
    struct.pack_into("<H", data, 0x20E, 0)
    assert inspect_kernel_file(_write(tmp_path, bytes(data))).version is None


def test_non_files_are_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="No such file"):
        inspect_kernel_file(tmp_path / "nope")
    with pytest.raises(BadRequest, match="not a regular file"):
        inspect_kernel_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadRequest, match="not a regular file"):
        inspect_kernel_file(fifo)  # and must not hang waiting for a writer


def test_an_oversized_file_is_refused_without_reading_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(k, "MAX_KERNEL_BYTES", 1000)
    with pytest.raises(BadRequest, match="larger than any kernel"):
        inspect_kernel_file(_write(tmp_path, make_bzimage()))


# --- inspection: property tests -----------------------------------------------------------

_VALID = [make_bzimage(), make_vmlinux(), make_vmlinux(pvh=False)]


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_bad_request(
        tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _inspect_or_bad_request(tmp_path_factory, data)


@given(base=st.sampled_from(_VALID),
       edits=st.lists(st.tuples(st.integers(0, 0x2000), st.integers(0, 255)), max_size=12),
       cut=st.none() | st.integers(0, 0x2000))
def test_mutated_kernels_raise_only_bad_request(
        tmp_path_factory: pytest.TempPathFactory, base: bytes,
        edits: list[tuple[int, int]], cut: int | None) -> None:
    # Random bytes rarely get past the magic numbers; mutating real-shaped headers
    # reaches the program-header, note and banner parsing.
    _inspect_or_bad_request(tmp_path_factory, _mutate(base, edits, cut))


def _inspect_or_bad_request(factory: pytest.TempPathFactory, data: bytes) -> None:
    path = factory.getbasetemp() / "fuzz-kernel"
    path.write_bytes(data)
    try:
        info = inspect_kernel_file(path)
    except BadRequest:
        return
    assert info.kind in (KernelKind.VMLINUX, KernelKind.BZIMAGE)
    assert info.vmms and set(info.vmms) <= {"qemu", "firecracker"}
    assert info.version is None or k._VERSION.match(info.version)


# --- inspection: real kernels -----------------------------------------------------------


def _debian_kernels() -> list[Path]:
    return sorted((E2E_CACHE / "images").glob("*/vmlinuz"))


def test_the_debian_cloud_kernel_is_a_qemu_bzimage() -> None:
    kernels = _debian_kernels()
    if not kernels:
        pytest.skip(f"no cached Debian test image under {E2E_CACHE}/images "
                    "(the e2e suite builds it)")
    info = inspect_kernel_file(kernels[0])
    assert info.kind is KernelKind.BZIMAGE
    assert info.vmms == ("qemu",)
    assert info.version is not None and info.version.startswith("6.1.")
    assert info.version.endswith("-cloud-amd64")


def _built() -> BuiltKernel:
    from tests.slow import kernelcache

    if not kernelcache.BASE_CONFIG.is_file() or not kernelcache.SOURCE.is_file():
        pytest.skip("no kernel source or base config here: banger's kernel was not built")
    built = kernelcache.cached()
    if built is None:
        pytest.skip(f"banger's kernel is not in {kernelcache.CACHE} yet "
                    "(python -m tests.slow.kernelcache builds it)")
    return built


def test_the_built_vmlinux_carries_the_pvh_note() -> None:
    built = _built()
    info = inspect_kernel_file(built.vmlinux)
    assert info.kind is KernelKind.VMLINUX
    assert info.pvh and info.vmms == ("firecracker", "qemu")
    assert info.version == built.version
    assert built.version.endswith("-banger")


def test_the_built_bzimage_names_its_version() -> None:
    built = _built()
    info = inspect_kernel_file(built.bzimage)
    assert info.kind is KernelKind.BZIMAGE
    assert info.version == built.version
    # The fragment survived into the config the kernel was built with.
    verify_config(k.load_fragment(), built.config.read_text())
