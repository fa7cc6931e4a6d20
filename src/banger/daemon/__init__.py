"""bangerd: the banger host daemon.

Only :mod:`banger.cli` imports this package. Its surface is :class:`Bangerd`
(``open``, ``serve``, ``close``) and :func:`doctor`; everything else is reached
through the RPC dispatch table in :mod:`banger.daemon.rpc`. :class:`Daemon` is
the state every daemon module receives (tests build one directly).
"""

import sys

# httpx's package imports its own command-line tool whenever click, rich and pygments
# are installed (banger's CLI uses the first two): about 15 MiB of the daemon's memory
# for a tool it never runs. Marked absent before anything imports httpx, httpx falls
# back to a stub `main` (its own ImportError branch).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from banger.daemon.core import Daemon, Seams  # noqa: E402
from banger.daemon.doctor import Check, doctor  # noqa: E402
from banger.daemon.service import Bangerd  # noqa: E402

__all__ = ["Bangerd", "Check", "Daemon", "Seams", "doctor"]
