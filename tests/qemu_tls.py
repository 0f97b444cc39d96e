"""Moved to helpers/qemu.py; this name stays for benchmarks/migration.py, which imports it from here."""

from helpers.qemu import self_signed, tls_dir

__all__ = ["self_signed", "tls_dir"]
