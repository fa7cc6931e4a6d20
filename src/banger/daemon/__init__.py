"""bangerd: the banger host daemon.

Only :mod:`banger.cli` imports this package. Its surface is :class:`Bangerd`
(``open``, ``serve``, ``close``) and :func:`doctor`; everything else is reached
through the RPC dispatch table in :mod:`banger.daemon.rpc`. :class:`Daemon` is
the state every daemon module receives (tests build one directly).
"""

from banger.daemon.core import Daemon, Seams
from banger.daemon.doctor import Check, doctor
from banger.daemon.service import Bangerd

__all__ = ["Bangerd", "Check", "Daemon", "Seams", "doctor"]
