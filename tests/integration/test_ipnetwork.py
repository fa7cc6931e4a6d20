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
from banger.hostops.netlink import IPNetwork, bridge_mac, link_exists

net = IPNetwork()
def ip(*args):
    subprocess.run(["ip", *args], check=True)
def show(name):
    return json.loads(subprocess.run(["ip", "-j", "addr", "show", "dev", name],
                                     capture_output=True, text=True, check=True).stdout)[0]

net.ensure_bridge("br-t", "172.31.7.1/24")
net.ensure_bridge("br-t", "172.31.7.1/24")  # again: nothing added twice
say(step="bridge", link=show("br-t"))
net.create_tap("bgttest01", "br-t")
say(step="tap", link=show("bgttest01"), links=net.links())
# A port with a lower MAC than the bridge's would become its MAC, were it not pinned.
ip("link", "set", "dev", "bgttest01", "address", "02:00:00:00:00:01")
say(step="low port", bridge=show("br-t")["address"], want=bridge_mac("br-t"))
# A bridge made before banger pinned MACs keeps the one it has now.
ip("link", "add", "name", "br-old", "type", "bridge")
net.create_tap("bgttest03", "br-old")
ip("link", "set", "dev", "bgttest03", "address", "02:00:00:00:00:05")
before = show("br-old")["address"]
net.ensure_bridge("br-old", "172.31.8.1/24")
net.create_tap("bgttest04", "br-old")
ip("link", "set", "dev", "bgttest04", "address", "02:00:00:00:00:02")
net.delete_link("bgttest03")
say(step="old bridge", before=before, after=show("br-old")["address"])
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

    assert bridge["address"] == steps["low port"]["want"]
    assert steps["low port"]["bridge"] == bridge["address"]  # a lower-MAC port changes nothing
    old = steps["old bridge"]
    assert old["before"] == "02:00:00:00:00:05"  # the unpinned bridge took its port's MAC
    assert old["after"] == old["before"]  # and kept it through a lower port and a deletion

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
