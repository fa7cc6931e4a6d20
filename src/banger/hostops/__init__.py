"""Everything banger does that needs root, behind one interface.

The daemon asks :class:`~banger.hostops.client.HostOps` for the bridge, a TAP, a
change to the guests' nftables policy or IPv4 forwarding. Each request is a typed
model (:mod:`.ops`), checked against the install's :mod:`.policy` and done by the
:mod:`.executor`: in the daemon's own process when it runs as root (development,
CI), or in the root helper (``banger-helper``, :mod:`.server`) when the daemon runs
as its owner user. The rules' text is :mod:`.nft`'s, links and forwarding
:mod:`.netlink`'s. Nothing here imports the daemon.
"""
