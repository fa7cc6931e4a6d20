"""Shell completion through click's own protocol (``_BANGER_COMPLETE=bash_complete``,
``COMP_WORDS``, ``COMP_CWORD``, as the script ``banger completion bash`` installs sends
them), against a socket that answers as bangerd does, and against none. The e2e suite
completes a real daemon's VM names (tests/e2e/test_cli_behaviour.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from banger.cli.commands import main
from tests.fakes import RPCSocket

LISTS: dict[str, list[dict[str, Any]]] = {
    "vm.list": [{"name": "web"}, {"name": "worker"}, {"name": "db"}],
    "image.list": [{"name": "debian-bookworm"}, {"name": "dev"}],
    "kernel.list": [{"name": "fc"}],
    "snapshot.list": [{"name": "base", "kind": "user"}, {"name": "boot-1a2b", "kind": "boot"}],
    "vm.session.list": [{"ref": "web/server"}, {"ref": "web/tests"}, {"ref": "db/psql"}],
}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'runtime_dir = "{run}"\nstate_dir = "{tmp_path / "state"}"\n')
    monkeypatch.setenv("BANGER_CONFIG", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))
    return run


def complete(words: str, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What bash would be offered after ``words`` (the last word is being completed)."""
    monkeypatch.setenv("_BANGER_COMPLETE", "bash_complete")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split(" ")) - 1))
    with pytest.raises(SystemExit) as done:
        main(None)
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == ""
    return [line.split(",", 1)[1] for line in out.splitlines() if line]


def test_names_come_from_the_running_daemon(env: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = RPCSocket(env / "bangerd.sock", lambda method, _params: LISTS[method])
    assert complete("banger vm show w", capsys, monkeypatch) == ["web", "worker"]
    assert complete("banger vm stop ", capsys, monkeypatch) == ["web", "worker", "db"]
    assert complete("banger vm create --image d", capsys, monkeypatch) == [
        "debian-bookworm", "dev"]
    assert complete("banger vm run --from-snapshot ", capsys, monkeypatch) == ["base"]
    assert complete("banger image set-kernel dev ", capsys, monkeypatch) == ["fc"]
    assert complete("banger vm session attach web/", capsys, monkeypatch) == [
        "web/server", "web/tests"]
    assert ("vm.session.list", {"fresh": False}) in daemon.asked  # no guest is read
    assert "vm" in complete("banger v", capsys, monkeypatch)  # commands, as ever


def test_no_daemon_completes_no_names_quietly_and_starts_none(
        env: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    assert complete("banger vm show ", capsys, monkeypatch) == []
    assert complete("banger vm session logs w", capsys, monkeypatch) == []
    assert time.monotonic() - started < 5
    assert list(env.iterdir()) == []  # no bangerd socket: nothing was started


def test_the_completion_command_prints_each_shells_script(
        capsys: pytest.CaptureFixture[str]) -> None:
    for shell, marker in (("bash", "complete -o nosort -F _banger_completion banger"),
                          ("zsh", "#compdef banger"),
                          ("fish", "complete --no-files --command banger")):
        with pytest.raises(SystemExit) as done:
            main(["completion", shell])
        assert done.value.code == 0
        assert marker in capsys.readouterr().out
