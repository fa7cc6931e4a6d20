"""banger: one-command development sandboxes on microVMs.

``from banger import Client`` is the Python SDK (:mod:`banger.sdk`).
"""

from typing import Any

from banger.protocol import __version__

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    """``banger.Client``, imported on first use: the CLI's fast path imports modules of
    this package and must not pay for pydantic (PEP 562)."""
    if name == "Client":
        from banger.sdk import Client

        return Client
    raise AttributeError(f"module 'banger' has no attribute {name!r}")
