"""banger's guest agent: commands into a VM without an SSH login.

A guest under emulation takes most of a second for each SSH login (key exchange,
signatures, sshd's re-exec), and every restored clone's and every boot's first command
pays one. ``banger-agent`` (:mod:`.guest`), started at boot and so already running in
every boot snapshot, listens on a virtio-serial port whose host end is a socket of the
VMM's in the VM's runtime directory; :mod:`.wire` is what both ends speak, and the
host's side of it (standard library only: ``banger vm exec``'s fast path uses it).

The daemon uses it to know that a guest is ready (``W``), and the CLI to run a command
that needs no terminal (``E``); SSH stays for terminals, for hosts whose CLI user
cannot reach the socket, and for guests without the agent (Firecracker's VMs: it has no
virtio-serial; images registered before the agent).
"""
