"""Doing a host operation: the root side of :mod:`banger.hostops`.

:meth:`Executor.handle` checks a parsed request against the install's
:class:`~banger.hostops.policy.Policy` and only then acts: netlink for links, ``nft``
(scripts built here from the request's typed values, never taken from it) for the
guests' policy, the ``ip_forward`` file. The daemon reaches it in process
(:meth:`banger.hostops.client.HostOps.local`) or through the helper's socket
(:mod:`banger.hostops.server`); both call this one method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from banger.hostops import nft, ops
from banger.hostops.netlink import IP_FORWARD, HostNetwork, NetlinkNetwork, ip_forward
from banger.hostops.policy import Policy
from banger.runner import Runner

log = logging.getLogger("banger.hostops")

NFT_TIMEOUT_S = 30.0  # one short transaction


class Executor:
    """Runs requests that pass ``policy`` on this host (or in this network namespace)."""

    def __init__(self, policy: Policy, runner: Runner, net: HostNetwork | None = None,
                 ip_forward_path: Path = IP_FORWARD) -> None:
        self.policy = policy
        self.runner = runner
        self.net: HostNetwork = net if net is not None else NetlinkNetwork()
        self.ip_forward_path = ip_forward_path

    def handle(self, req: ops.Request) -> Any:
        """Check ``req`` and do it; returns the request's result (see :mod:`.ops`).

        Raises:
            Refused: the request is out of policy (nothing was done).
            HostError: the host refused (netlink, nft, the forwarding file).
        """
        self.policy.check(req)
        s = self.policy.firewall
        match req:
            case ops.EnsureBridge(name=name, cidr=cidr):
                self.net.ensure_bridge(name, cidr)
            case ops.CreateTap(name=name, bridge=bridge):
                self.net.create_tap(name, bridge)
            case ops.DeleteLink(name=name):
                self.net.delete_link(name)
            case ops.ListLinks():
                return self.net.links()
            case ops.NftLoad(drop_legacy=drop_legacy):
                legacy = nft.nft_delete_tables(nft.LEGACY_NFT_TABLE) if drop_legacy else ""
                self._nft(legacy + nft.ruleset(s), "load banger's guest network rules")
            case ops.NftAdmit(rule=rule, previous=previous):
                g = self.policy.rule(req.op, rule)
                stale = [(self.policy.rule(req.op, p.rule), p.pins) for p in previous]
                self._nft(nft.admit_script(s, g, stale), f"admit {g.tap} to the guest network")
            case ops.NftForget(rule=rule, pins=pins):
                g = self.policy.rule(req.op, rule)
                self._nft(nft.forget_script(s, g, pins), f"remove {g.tap} from the guest network")
            case ops.NftPin(guest_ip=guest_ip, pins=pins):
                self._nft(nft.pin_script(s, guest_ip, dict(pins)),
                          f"pin DNS answers for {guest_ip}")
            case ops.NftDelete(table=table):
                self._nft(nft.nft_delete_tables(table), f"delete the nftables tables {table}")
            case ops.IPForward(set=value):
                return ip_forward(value, self.ip_forward_path)
        return None

    def _nft(self, script: str, desc: str) -> None:
        self.runner.run(["nft", "-f", "-"], input=script.encode(), desc=desc,
                        timeout=NFT_TIMEOUT_S)
