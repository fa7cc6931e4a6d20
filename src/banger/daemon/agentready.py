"""A guest found ready through its agent (:mod:`banger.agent`) instead of an SSH login.

``wait_for_ssh`` asks :class:`AgentProbe` first whenever it would probe SSH: the agent
answers once the guest's sshd listens (and, for a clone, once its identity is applied
whole), which spares the guest the login a probe costs it (most of a second under
emulation). A booting guest is asked only once its console said the agent listens (an
image without the agent never is); a clone only when its snapshot's agent answered. A
probe that fails once is not asked again: SSH decides, as before the agent.
"""

from __future__ import annotations

import logging
import re

from banger.agent import wire
from banger.daemon.console import ConsoleWatch
from banger.layout import VMPaths

log = logging.getLogger("banger.vms")

READY_TIMEOUT_S = 10.0  # a guest whose console said it is ready answers in tenths
AGENT_LISTENING = re.compile(re.escape(wire.CONSOLE_LISTENING))


class AgentProbe:
    """Callable: whether the guest's agent says it is ready (True at most once)."""

    def __init__(self, paths: VMPaths, generation: str, *, booting: bool) -> None:
        self.paths = paths
        self.generation = generation
        self.console = ConsoleWatch(paths.serial_log, AGENT_LISTENING) if booting else None
        self.failed = False
        self.answered = False

    def __call__(self) -> bool:
        """Ask the agent (once its console line came, for a boot); True if it is ready."""
        if self.failed or (self.console is not None and not self.console()):
            return False
        try:
            conn = wire.connect(str(self.paths.run))
            if conn is None:
                raise wire.AgentError("its port is in use")
            with conn:
                conn.ready(self.generation, READY_TIMEOUT_S)
        except wire.AgentError as exc:
            log.info("%s: the guest agent did not say it is ready (%s); asking SSH",
                     self.paths.run.name, exc)
            self.failed = True
            return False
        self.answered = True
        return True
