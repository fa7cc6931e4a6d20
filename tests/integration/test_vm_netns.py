"""A VM's own network namespace through the real ``ip``
(:meth:`banger.hostops.netlink.IPNetwork.create_vm_netns`), inside a namespace this test
makes: the port on the bridge, the TAP inside owned by the VMM user, real frames from
that TAP to the bridge's address and back, refusals, and deletion.

This is the path a jailed Firecracker's guest takes with ``jailer_netns``: Firecracker
opens the TAP by name in the namespace the jailer joined, as the VMM user. Here a small
program does what Firecracker does with the TAP (attach by name, write and read
Ethernet frames), as that user, in that namespace.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import steps_in

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None
    or not Path("/dev/net/tun").exists(),
    reason="needs root, iproute2, nsenter and /dev/net/tun (network namespaces of its own)")

VMM_UID = 65534  # the account the TAP is given to (nobody)
OTHER_UID = 65533  # any other unprivileged user

# Attach to TAP argv[1] as Firecracker does, as uid argv[5], ask (ARP) who has argv[2]
# from argv[3] with MAC argv[4], and print the answer's sender as JSON (or the attach's
# errno). /dev/net/tun is opened first, as root: the jailer makes the jail's own node
# the VMM user's, where the host's may be root's alone (0600).
GUEST = r"""
import fcntl, json, os, select, socket, struct, sys, time
TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
tap, target, me, mac = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
fd = os.open("/dev/net/tun", os.O_RDWR)
uid = int(sys.argv[5])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
try:
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
except OSError as exc:
    print(json.dumps({"attach_errno": exc.errno}))
    sys.exit(0)
request = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
           + mac + socket.inet_aton(me) + b"\x00" * 6 + socket.inet_aton(target))
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    os.write(fd, request)  # again each round: the port may still be coming up
    end = time.monotonic() + 0.5
    while (left := end - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        frame = os.read(fd, 2048)
        if (frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
                and frame[28:32] == socket.inet_aton(target)):
            print(json.dumps({"answer_from": frame[22:28].hex(), "to": frame[0:6].hex()}))
            sys.exit(0)
print(json.dumps({"answer_from": None}))
"""

# Runs in the outer namespace (the "host"); prints one JSON line per step.
HOST = """
from banger.hostops.netlink import IPNetwork, link_exists

ns, guest, vmm_uid, other_uid = sys.argv[2:6]
net = IPNetwork()
def ip_json(*args):
    return json.loads(subprocess.run(["ip", "-j", "-d", *args], capture_output=True,
                                     text=True, check=True).stdout)
def as_user(uid):
    res = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-I",
                          "-S", "-c", guest, "tap0", "172.31.7.1", "172.31.7.2",
                          "0600ac1f0702", uid],
                         capture_output=True, text=True, timeout=60)
    return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr}

net.ensure_bridge("br-t", "172.31.7.1/24")
net.create_vm_netns(ns, "bgttest01", "br-t", (int(vmm_uid), int(vmm_uid)))
say(step="made", port=ip_json("link", "show", "dev", "bgttest01")[0],
    inside=ip_json("-n", ns, "link", "show"), names=net.netns_names())
say(step="frames", vmm=as_user(vmm_uid), other=as_user(other_uid),
    bridge_mac=ip_json("link", "show", "dev", "br-t")[0]["address"])
subprocess.run(["ip", "link", "add", "name", "someone", "type", "bridge"], check=True)
say(step="refusals", port_taken=refused(net.create_vm_netns, ns + "x", "someone", "br-t",
                                        (1, 1)),
    ns_taken=refused(net.create_vm_netns, ns, "bgttest02", "br-t", (1, 1)),
    no_bridge=refused(net.create_vm_netns, ns + "y", "bgttest03", "br-nope", (1, 1)),
    left=[n for n in net.netns_names() if n.startswith(ns)],
    someone=link_exists("someone"), half_made=link_exists("bgttest02"))
net.delete_netns(ns)
net.delete_netns(ns)  # gone already: not an error
say(step="deleted", links=net.links(), names=net.netns_names())
"""


def test_a_vms_own_namespace_carries_its_frames_to_the_bridge(netns: str) -> None:
    ns = f"bgt-vm-{secrets.token_hex(3)}"
    try:
        steps = steps_in(netns, HOST, ns, GUEST, str(VMM_UID), str(OTHER_UID), timeout=180)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    # The VM's port: a veth on banger's bridge, its peer in the VM's namespace.
    port = steps["made"]["port"]
    assert port["master"] == "br-t" and "UP" in port["flags"]
    assert port["linkinfo"]["info_kind"] == "veth"
    assert ns in steps["made"]["names"]
    inside = {link["ifname"]: link for link in steps["made"]["inside"]}
    assert set(inside) == {"lo", "br0", "uplink0", "tap0"}
    assert inside["uplink0"]["master"] == "br0" and inside["tap0"]["master"] == "br0"
    tun = inside["tap0"]["linkinfo"]["info_data"]
    # ip names the owner when the account has a name (gid 65534 is nogroup or nobody)
    assert (tun["type"], tun["user"], tun["group"]) == (
        "tap", pwd.getpwuid(VMM_UID).pw_name, grp.getgrgid(VMM_UID).gr_name)

    # The VMM user's frames reach the bridge's address and the answer comes back;
    # another user cannot even open the TAP.
    frames = steps["frames"]
    assert frames["vmm"] == {"answer_from": frames["bridge_mac"].replace(":", ""),
                             "to": "0600ac1f0702"}
    assert frames["other"] == {"attach_errno": 1}  # EPERM

    refusals = steps["refusals"]
    assert "a link of that name exists" in refusals["port_taken"]
    assert refusals["ns_taken"] == f"network namespace {ns} exists"
    assert refusals["no_bridge"] == "bridge br-nope is missing"
    assert refusals["left"] == [ns]  # the refused ones made nothing
    assert refusals["someone"] is True and refusals["half_made"] is False

    # Deleting the namespace takes the port with it at once.
    assert "bgttest01" not in steps["deleted"]["links"]
    assert ns not in steps["deleted"]["names"]
