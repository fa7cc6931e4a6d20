"""bangerd: the banger host daemon.

Only :mod:`banger.cli` imports this package. Its surface is :class:`Daemon`
(``open``, ``serve``, ``close``) and :func:`doctor`; everything else is reached
through the RPC dispatch table in :mod:`banger.daemon.rpc`.
"""

from banger.daemon.core import Daemon, Seams
from banger.daemon.doctor import Check, doctor

__all__ = ["Check", "Daemon", "Seams", "doctor"]
