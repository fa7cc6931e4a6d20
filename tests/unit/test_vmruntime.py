"""The VM row's runtime record: one typed model, changed only through ``merged``."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from banger.api import VMState
from banger.daemon.vmruntime import VMRuntime


def test_merged_sets_fields_and_none_clears_them() -> None:
    rt = VMRuntime().merged(last_error="boom", booted_at=12.5, pool=True,
                            suspend_from=VMState.PAUSED)
    assert (rt.last_error, rt.booted_at, rt.pool, rt.suspend_from) == (
        "boom", 12.5, True, VMState.PAUSED)
    cleared = rt.merged(last_error=None, pool=None)
    assert cleared.last_error is None and cleared.pool is False
    assert cleared.booted_at == 12.5  # untouched fields stay
    assert rt.last_error == "boom"  # records are values: merged makes a new one


def test_a_misspelt_or_mistyped_field_is_an_error_not_a_stray_key() -> None:
    with pytest.raises(ValidationError):
        VMRuntime().merged(last_eror="boom")
    with pytest.raises(ValidationError):
        VMRuntime().merged(last_eror=None)  # clearing a field that does not exist
    with pytest.raises(ValidationError):
        VMRuntime().merged(booted_at="yesterday")


def test_the_row_keeps_only_what_differs_from_the_defaults() -> None:
    rt = VMRuntime(from_snapshot="s", forwards=[{"host_port": 80}])
    assert json.loads(rt.to_json()) == {"from_snapshot": "s", "forwards": [{"host_port": 80}]}
    assert VMRuntime.from_row(rt.to_json()) == rt
    assert VMRuntime().to_json() == "{}"


def test_a_row_from_another_version_loses_only_what_this_one_cannot_read() -> None:
    row = json.dumps({"last_error": "kept", "retired_field": 1, "booted_at": "not a time",
                      "suspend_from": "paused"})
    rt = VMRuntime.from_row(row)
    assert rt.last_error == "kept" and rt.booted_at is None
    assert rt.suspend_from == VMState.PAUSED
    assert VMRuntime.from_row("") == VMRuntime() == VMRuntime.from_row("[1]")
