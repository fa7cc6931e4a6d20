"""Without ``../shared/specs`` every contract test skips, naming the path it looked at.

The contract tests are copied somewhere with no ``shared/`` beside them, together with
two extra modules: one that never asks for the spec and one that reads it at import.
Nothing may fail or error there, and every skip must say where the spec was expected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

NO_SPEC_FIXTURE = '''
def test_needs_nothing_but_is_a_contract_test() -> None:
    pass
'''

MODULE_LEVEL_READ = '''
from tests.contract.fcspec import FirecrackerSpec

SPEC = FirecrackerSpec.load()  # at import: must skip the module, not break collection


def test_uses_the_module_level_spec() -> None:
    assert SPEC.operations()
'''


def test_every_contract_test_skips_naming_the_spec_path(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "__init__.py").write_text("")
    shutil.copytree(TESTS / "contract", root / "tests" / "contract",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests" / "contract" / "test_zz_plain.py").write_text(NO_SPEC_FIXTURE)
    (root / "tests" / "contract" / "test_zz_import.py").write_text(MODULE_LEVEL_READ)
    expected = root.parent / "shared" / "specs" / "firecracker-api.yaml"
    assert not expected.exists()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-v", "-rs", "tests/contract"],
        cwd=root, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ skipped in [\d.]+s ?=*", summary), summary
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(str(expected) in line for line in skips), skips
    assert any("test_zz_plain.py" in line for line in skips)
    # The module that reads the spec at import is skipped whole at collection (pytest
    # reports that skip where it was raised) and none of its tests ever runs.
    assert any(line.startswith("SKIPPED [1] tests/contract/fcspec.py") for line in skips)
    assert "test_uses_the_module_level_spec" not in out
    assert "PASSED" not in out and "FAILED" not in out and "ERROR" not in out
