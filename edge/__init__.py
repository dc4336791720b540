"""edge: a teachable camera box for the Raspberry Pi."""

__version__ = "0.1.0"
