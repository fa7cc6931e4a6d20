"""The host's links through the real ``ip`` (:class:`banger.hostops.netlink.IPNetwork`),
inside a network namespace this test makes: the bridge, TAPs, refusals, deletion."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import steps_in

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists(),
    reason="needs root, iproute2 and /dev/net/tun (a network namespace of its own)")


# Runs inside the namespace; prints one JSON line per step.
SCRIPT = """
from banger.hostops.netlink import IPNetwork, link_exists

net = IPNetwork()
def show(name):
    return json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", name],
                                     capture_output=True, text=True, check=True).stdout)[0]

net.ensure_bridge("br-t", "172.31.7.1/24")
net.ensure_bridge("br-t", "172.31.7.1/24")  # again: nothing added twice
say(step="bridge", link=show("br-t"))
net.create_tap("bgttest01", "br-t")
say(step="tap", link=show("bgttest01"), links=net.links())
subprocess.run(["ip", "link", "add", "name", "someone", "type", "bridge"], check=True)
say(step="refusals", taken=refused(net.create_tap, "someone", "br-t"),
    still_there=link_exists("someone"),
    no_bridge=refused(net.create_tap, "bgttest02", "br-nope"),
    made_anyway=link_exists("bgttest02"))
net.delete_link("bgttest01")
net.delete_link("bgttest01")  # gone already: not an error
say(step="deleted", links=net.links())
"""


def test_bridge_and_taps_through_ip(netns: str) -> None:
    steps = steps_in(netns, SCRIPT)

    bridge = steps["bridge"]["link"]
    assert "UP" in bridge["flags"]
    assert [(a["local"], a["prefixlen"]) for a in bridge["addr_info"]
            if a["family"] == "inet"] == [("172.31.7.1", 24)]

    tap = steps["tap"]["link"]
    assert tap["master"] == "br-t" and "UP" in tap["flags"]
    assert {"lo", "br-t", "bgttest01"} <= set(steps["tap"]["links"])

    refusals = steps["refusals"]
    assert "a link of that name exists" in refusals["taken"]
    assert refusals["still_there"] is True  # someone else's link is never touched
    assert refusals["no_bridge"] == "bridge br-nope is missing"
    assert refusals["made_anyway"] is False

    assert "bgttest01" not in steps["deleted"]["links"]
    assert "br-t" in steps["deleted"]["links"]
