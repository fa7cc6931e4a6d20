"""banger: one-command development sandboxes on microVMs."""

__version__ = "0.1.0"
# The JSON-RPC protocol version every request names (banger.api); here so the CLI's
# fast path (banger.cli.quick) has it without importing pydantic.
PROTOCOL_VERSION = 1
# The most bytes one message takes on the socket, either way, newline included.
MAX_FRAME = 1 << 20
