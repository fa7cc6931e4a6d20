"""``vm forward`` and ``-p`` end to end: a guest HTTP server reached from the test's
namespace through the daemon, across a daemon kill -9, and freed by ``vm stop``."""

from __future__ import annotations

import subprocess
import time

from tests.e2e.conftest import Host

SERVE = ("for p in 8080 8081; do nohup python3 -m http.server $p "
         "</dev/null >/dev/null 2>&1 & done")


def http_code(host: Host, port: int) -> str:
    res = host.sh("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                  f"http://127.0.0.1:{port}/", check=False)
    return res.stdout


def wait_code(host: Host, port: int, want: str = "200") -> str:
    for _ in range(60):
        code = http_code(host, port)
        if code == want:
            break
        time.sleep(0.5)
    return code


def port_free(host: Host, port: int) -> bool:
    res = host.sh("python3", "-c", "import socket; s = socket.socket(); "
                  "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                  f"s.bind(('127.0.0.1', {port}))", check=False)
    return res.returncode == 0


def test_forward_reaches_the_guest_survives_a_daemon_kill_and_ends_with_the_vm(
        host: Host) -> None:
    host.ok("vm", "run", "-d", "--name", "web", "-p", "18081:8081")
    host.ok("vm", "exec", "web", "--", "sh", "-c", SERVE)
    assert wait_code(host, 18081) == "200"  # the -p forward, opened at start

    added = host.json("vm", "forward", "web", "18080:8080")
    assert (added["host_addr"], added["host_port"], added["open"]) == ("127.0.0.1", 18080, True)
    assert wait_code(host, 18080) == "200"
    listed = {(f["host_port"], f["from_create"], f["open"])
              for f in host.json("vm", "forward", "list", "web")}
    assert listed == {(18080, False, True), (18081, True, True)}
    assert sorted(host.json("vm", "show", "web")["forwards"]) == [
        "127.0.0.1:18080:8080", "127.0.0.1:18081:8081"]

    # Bad input: clear errors, nothing opened.
    taken = host.cli("vm", "forward", "web", "18080:22")
    assert taken.returncode != 0 and "already forwarded" in taken.stderr
    assert "pick another host port" in taken.stderr
    for bad, says in (("0:80", "out of range"), ("80", "HOST_PORT:GUEST_PORT"),
                      ("1.2.3:8:9", "not an IP address")):
        res = host.cli("vm", "forward", "web", bad)
        assert res.returncode != 0 and says in res.stderr, (bad, res.stderr)
    ghost = host.cli("vm", "forward", "ghost", "18082:80")
    assert ghost.returncode != 0 and "no VM named 'ghost'" in ghost.stderr
    assert port_free(host, 18082)

    # The daemon dies and comes back: the forwards are opened again.
    host.kill_daemon(9)
    assert http_code(host, 18080) != "200"
    host.start_daemon()
    assert wait_code(host, 18080) == "200" and wait_code(host, 18081) == "200"

    # Another program on the host holds a port: a clear error.
    holder = subprocess.Popen(host.netns("python3", "-m", "http.server", "--bind", "127.0.0.1",
                                         "18083"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if not port_free(host, 18083):
                break
            time.sleep(0.1)
        busy = host.cli("vm", "forward", "web", "18083:8080")
        assert busy.returncode != 0 and "already in use" in busy.stderr
    finally:
        holder.kill()
        holder.wait()

    removed = host.json("vm", "forward", "--rm", "web", "18080:8080")
    assert removed["removed"] == "127.0.0.1:18080:8080" and port_free(host, 18080)
    host.json("vm", "forward", "web", "18080:8080")

    # Stop frees every host port; the forward added at run time is forgotten, the -p
    # one opens again at the next start.
    host.ok("vm", "stop", "web")
    assert port_free(host, 18080) and port_free(host, 18081)
    stopped = host.cli("vm", "forward", "web", "18084:80")
    assert stopped.returncode != 0 and "banger vm start web" in stopped.stderr
    host.ok("vm", "start", "web")
    assert [(f["host_port"], f["open"]) for f in host.json("vm", "forward", "list")] == [
        (18081, True)]
    host.ok("vm", "delete", "web")
    assert port_free(host, 18081)
