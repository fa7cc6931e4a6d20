"""``vm ports`` parsing: ``ss`` output from an untrusted guest.

The real guest answers in tests/e2e/test_lifecycle.py (test_state_errors_logs_list_and_ports).
"""

from __future__ import annotations

import pytest

from banger.api.params import CreateParams
from banger.daemon import ports, vmcreate
from banger.daemon.core import Daemon
from banger.daemon.ports import Listener, endpoint, parse_ss
from banger.errors import NotFound, NotRunning

SS = "\n".join([
    'udp   UNCONN 0  0   127.0.0.53%lo:53   0.0.0.0:*  users:(("systemd-resolve",pid=301,fd=13))',
    'tcp   LISTEN 0  128       0.0.0.0:22   0.0.0.0:*  users:(("sshd",pid=312,fd=3))',
    'tcp   LISTEN 0  5         0.0.0.0:8080 0.0.0.0:*  '
    'users:(("python3",pid=900,fd=3),("python3",pid=901,fd=3))',
    'tcp   LISTEN 0  128          [::]:22      [::]:*  users:(("sshd",pid=312,fd=4))',
    'tcp   LISTEN 0  4096            *:9000       *:*',
])


def test_parse_ss_reads_what_ss_prints() -> None:
    got = parse_ss(SS)
    assert got == [
        Listener("tcp", "0.0.0.0", 22, "sshd", 312),
        Listener("tcp", "::", 22, "sshd", 312),
        Listener("udp", "127.0.0.53", 53, "systemd-resolve", 301),
        Listener("tcp", "0.0.0.0", 8080, "python3", 900),
        Listener("tcp", "*", 9000, None, None),
    ]
    assert endpoint("web", got[0]) == "web.vm:22"
    assert endpoint("web", got[2]) is None  # bound to the guest's loopback
    assert endpoint("web", Listener("tcp", "::1", 1, None, None)) is None


@pytest.mark.parametrize("line", [
    "tcp LISTEN 0 5 0.0.0.0:0 0.0.0.0:*",  # port 0
    "tcp LISTEN 0 5 0.0.0.0:70000 0.0.0.0:*",  # out of range
    "tcp LISTEN 0 5 evil;rm:80 0.0.0.0:*",  # not an address
    "sctp LISTEN 0 5 0.0.0.0:80 0.0.0.0:*",  # not asked for
    "tcp LISTEN",  # short
    "garbage",
    "tcp LISTEN 0 5 " + "1" * 100 + ":80 0.0.0.0:*",  # absurdly long address
])
def test_lines_that_do_not_parse_are_skipped(line: str) -> None:
    assert parse_ss(line) == []


def test_hostile_process_names_and_floods_are_bounded() -> None:
    name = "x\x1b[31m" + "y" * 200
    got = parse_ss(f'tcp LISTEN 0 5 0.0.0.0:80 0.0.0.0:* users:(("{name}",pid=7,fd=3))')
    assert got[0].process is not None
    assert got[0].process.isprintable() and len(got[0].process) == ports.MAX_PROCESS_NAME
    flood = "\n".join(f"tcp LISTEN 0 5 0.0.0.0:{p} 0.0.0.0:*" for p in range(1, 5000))
    assert len(parse_ss(flood)) == ports.MAX_SOCKETS
    dupes = "\n".join(["tcp LISTEN 0 5 0.0.0.0:80 0.0.0.0:*"] * 10)
    assert len(parse_ss(dupes)) == 1


def test_named_vms_must_exist_and_run(daemon: Daemon) -> None:
    assert ports.ports(daemon, []) == []  # nothing running: nothing asked
    vmcreate.create_sync(daemon, CreateParams(name="cold", start=False))
    with pytest.raises(NotRunning) as exc:
        ports.ports(daemon, ["cold"])
    assert "banger vm start cold" in (exc.value.hint or "")
    with pytest.raises(NotFound):
        ports.ports(daemon, ["ghost"])
