"""``Daemon.driver``: a VMM driver is built once, outside the leaf lock that guards the cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from banger.config import Config
from banger.daemon.core import Daemon
from banger.vmm import VMMDriver
from tests.conftest import FakeWorld
from tests.fakes import FakeVMM

WAIT_S = 10  # bounds every wait below; the happy path takes milliseconds


class SlowFactory:
    """Builds a FakeVMM per call; a build of ``slow`` waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.building = threading.Event()
        self.calls: list[str] = []
        self._mu = threading.Lock()

    def __call__(self, name: str) -> VMMDriver:
        with self._mu:
            self.calls.append(name)
        if name == "slow":
            self.building.set()
            assert self.release.wait(WAIT_S)
        return FakeVMM()


@pytest.fixture
def factory() -> Iterator[SlowFactory]:
    f = SlowFactory()
    yield f
    f.release.set()  # never leave a builder thread waiting


def daemon_with(cfg: Config, world: FakeWorld, factory: SlowFactory) -> Daemon:
    seams = world.seams()
    seams.vmm_factory = factory
    return Daemon(cfg, seams)


def in_thread(d: Daemon, name: str, out: list[VMMDriver]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(d.driver(name)), daemon=True)
    t.start()
    return t


def test_a_slow_build_does_not_hold_up_a_built_driver(
        cfg: Config, world: FakeWorld, factory: SlowFactory) -> None:
    d = daemon_with(cfg, world, factory)
    fast = d.driver("fast")
    slow: list[VMMDriver] = []
    builder = in_thread(d, "slow", slow)
    assert factory.building.wait(WAIT_S)  # the slow build is under way...
    got: list[VMMDriver] = []
    looker = in_thread(d, "fast", got)
    looker.join(WAIT_S)  # ...and the built driver is still handed out at once
    assert not looker.is_alive() and got == [fast]
    assert builder.is_alive()
    factory.release.set()
    builder.join(WAIT_S)
    assert not builder.is_alive() and len(slow) == 1


def test_racing_builders_build_one_driver(
        cfg: Config, world: FakeWorld, factory: SlowFactory) -> None:
    d = daemon_with(cfg, world, factory)
    got: list[VMMDriver] = []
    first = in_thread(d, "slow", got)
    assert factory.building.wait(WAIT_S)
    second = in_thread(d, "slow", got)  # finds it missing too, while the first builds
    # Time for the second caller to reach the build; were it late, it would find the
    # driver built and the test would still pass, proving less.
    time.sleep(0.2)
    factory.release.set()
    for t in (first, second):
        t.join(WAIT_S)
        assert not t.is_alive()
    assert factory.calls == ["slow"]  # built once (a QEMU build may run useradd)
    assert len(got) == 2 and got[0] is got[1] is d.driver("slow")


def test_a_failed_build_is_not_cached(cfg: Config, world: FakeWorld) -> None:
    calls: list[str] = []

    def flaky(name: str) -> VMMDriver:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("binary missing")
        return FakeVMM()

    seams = world.seams()
    seams.vmm_factory = flaky
    d = Daemon(cfg, seams)
    with pytest.raises(RuntimeError):
        d.driver("qemu")
    assert d.driver("qemu") is d.driver("qemu") and calls == ["qemu", "qemu"]
