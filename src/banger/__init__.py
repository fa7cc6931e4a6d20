"""banger: one-command development sandboxes on microVMs."""

__version__ = "0.1.0"
