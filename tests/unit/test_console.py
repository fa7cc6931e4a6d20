"""Watching a guest's serial console for the line that says it can be reached
(``console.ConsoleWatch``): read from where the last look ended, in bounded pieces,
a line split between two looks still found. The e2e boots use it on every VM."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from banger.api.params import CreateParams
from banger.daemon import console, vmcreate
from banger.daemon.console import SSH_STARTED, ConsoleWatch
from banger.daemon.core import Daemon
from tests.fakes import instant_ssh

# What systemd 252 writes on a serial console (seen in a banger VM's serial.log).
SYSTEMD_LINE = (b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD "
                b"Secure Shell server.\r\r\n")


def test_systemds_line_that_sshd_started_is_recognised() -> None:
    assert SSH_STARTED.search(SYSTEMD_LINE)
    assert SSH_STARTED.search(b"[  OK  ] Started ssh.service - OpenBSD Secure Shell server.")
    for other in (b"         Starting \x1b[0;1;39mssh.service\x1b[0m - OpenBSD...",
                  b"[  OK  ] Started sshd-keygen.service", b"Started ssh-agent.service"):
        assert not SSH_STARTED.search(other), other


def test_the_watch_reads_on_from_its_last_look(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"booting\n" * 100)
    watch = ConsoleWatch(log, SSH_STARTED)
    assert not watch()
    monkeypatch.setattr(console, "READ_MAX", 64)  # a flood is read a piece per look
    with log.open("ab") as fh:
        fh.write(b"x" * 1000 + SYSTEMD_LINE[:30])
    looks = 0
    while not watch():
        looks += 1
        assert looks < 100
        if watch.pos == log.stat().st_size:  # the rest of the line comes later
            with log.open("ab") as fh:
                fh.write(SYSTEMD_LINE[30:])
    assert looks >= 1000 // 64 and watch()  # bounded reads; once seen, always


def test_a_missing_log_is_not_seen(tmp_path: Path) -> None:
    assert not ConsoleWatch(tmp_path / "none.log", re.compile(b"x"))()


def test_a_boot_is_probed_when_its_console_says_sshd_started(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """vm create's wait for SSH gets a watch on the VM's console for systemd's line."""
    waits: list[dict[str, Any]] = []

    def recording(guest: Any, **kwargs: Any) -> float:
        waits.append(kwargs)
        return instant_ssh(guest, **kwargs)

    monkeypatch.setattr(daemon.seams, "wait_for_ssh", recording)
    vm = vmcreate.create_sync(daemon, CreateParams(name="web"))
    (watch,) = [w["announced"] for w in waits]
    assert isinstance(watch, ConsoleWatch) and watch.pattern is SSH_STARTED
    assert watch.path == daemon.layout.vm(str(vm["id"])).serial_log
