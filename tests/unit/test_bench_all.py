"""bench/all's table: each goal judged from the benchmarks' own numbers."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "all"


@pytest.fixture(scope="module")
def bench_all() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_all", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_all", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_all"] = module  # dataclasses look their module up here
    loader.exec_module(module)
    return module


def test_rows_judge_each_goal_from_the_numbers(bench_all: ModuleType) -> None:
    results = {
        "boot_overhead": {"raw_boot_s": 10.0, "vm_run_s": 10.5},
        "suspend_resume": {"cold_s": 20.0, "warm_s": 5.0, "suspend_s": 1.0, "saved_mib": 100},
        "warm_start": {"cold_s": 20.0, "warm_s": 5.0, "snapshot_s": 2.0, "pooled_s": 1.0},
        "exec_latency": {"raw_ssh_s": 1.0, "raw_ssh_master_s": 0.1, "vm_exec_s": 0.3,
                         "vm_ports_s": 0.5, "daemon_status_s": 0.3},
        "workspace": {"files": 20000, "megabytes": 500.0, "raw_s": 50.0, "prepare_s": 55.0,
                      "export_s": 2.0, "small_raw_s": 1.0, "small_prepare_s": 1.4},
    }
    rows = {r.what.split(",")[0].split(" vs ")[0]: r for r in bench_all.rows_of(results)}
    assert rows["cold `vm run --rm -- true`"].met is True  # 1.05x <= 1.10x
    assert rows["warm `vm run --rm -- true` (boot snapshot clone)"].met is False  # 4x, not 5x
    assert rows["`vm start` of a suspended VM + exec"].met is None  # no goal of its own
    assert rows["pooled `vm run --rm -- true` (a ready clone)"].banger == "1.0 s"
    assert rows["`vm exec VM -- true`"].met is False  # 0.3 s > 0.25 s
    prepare = [r for r in bench_all.rows_of(results) if "prepare" in r.what]
    assert [r.met for r in prepare] == [True, True]  # 0.91x throughput; 1.4 s < 1.5 s
    table = bench_all.table(bench_all.rows_of(results))
    assert all(line.count("|") == 7 for line in table.splitlines())  # no stray pipes


def test_benchmarks_not_run_are_left_out(bench_all: ModuleType) -> None:
    assert bench_all.rows_of({}) == []
    only = bench_all.rows_of({"concurrency": {
        "rounds": [{"clients": 1, "creates_per_s": 2.0, "rpc_p50_ms": 1.0, "rpc_p95_ms": 2.0}],
        "rss_vms": 10, "rss_mib": 61.0}})
    assert [r.met for r in only if r.goal] == [False]  # 61 MiB is not under 60


@pytest.mark.parametrize("name", sorted(p.name for p in SCRIPT.parent.iterdir()
                                        if p.is_file() and not p.name.startswith(".")))
def test_every_benchmark_imports(name: str) -> None:
    """Each script's imports still resolve (code moves under them): loaded as a module,
    it defines ``main`` and runs nothing."""
    loader = importlib.machinery.SourceFileLoader(f"bench_{name}", str(SCRIPT.parent / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[loader.name]
    assert callable(getattr(module, "main", None))
