"""banger: one-command development sandboxes on microVMs.

``from banger import Client`` is the Python SDK (:mod:`banger.sdk`).
"""

from typing import Any

__version__ = "0.1.0"
# The JSON-RPC protocol version every request names (banger.api); here so the CLI's
# fast path (banger.cli.quick) has it without importing pydantic.
PROTOCOL_VERSION = 1
# The most bytes one message takes on the socket, either way, newline included.
MAX_FRAME = 1 << 20


def __getattr__(name: str) -> Any:
    """``banger.Client``, imported on first use: the CLI's fast path imports this package
    for the constants above and must not pay for pydantic (PEP 562)."""
    if name == "Client":
        from banger.sdk import Client

        return Client
    raise AttributeError(f"module 'banger' has no attribute {name!r}")
