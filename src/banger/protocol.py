"""What a banger client and daemon must agree on, in a leaf module: the release, the
JSON-RPC protocol version and the frame size.

Here, not in ``banger/__init__.py``, so every layer can import them without importing
the package's face (which hands out the SDK), and so the CLI's fast path
(``banger.cli.quick``) has them without importing pydantic.
"""

__version__ = "0.1.0"
# The JSON-RPC protocol version every request names (banger.api).
PROTOCOL_VERSION = 1
# The most bytes one message takes on the socket, either way, newline included.
MAX_FRAME = 1 << 20
