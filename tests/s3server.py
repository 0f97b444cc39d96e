"""Moved to helpers/s3server.py; this name stays for benchmarks/backup.py, which imports it from here."""

from helpers.s3server import S3Server, s3_server

__all__ = ["S3Server", "s3_server"]
