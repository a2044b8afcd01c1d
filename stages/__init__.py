"""lorelay stages: one module per training stage plus the shared blocks they are built from."""

__version__ = "0.1.0"
