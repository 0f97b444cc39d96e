"""session-manager: a desktop inside QEMU with live, deduplicated checkpoints."""
__version__ = "0.1.0"
