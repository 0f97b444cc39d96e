"""Credentials for QEMU's tls-creds-x509 between two test QEMUs: each side a self-signed certificate, each trusting
the other's (the migration tests and benchmarks/migration.py; the product lays them out with
identity.write_qemu_tls_dir from an installation's identity)."""

from __future__ import annotations

from pathlib import Path

from session_manager.net.identity import certificate


def self_signed(cn: str) -> tuple[bytes, bytes]:
    return certificate(cn, ["localhost", "127.0.0.1"], 1)


def tls_dir(path: Path, own: tuple[bytes, bytes], peer_cert: bytes) -> Path:
    """QEMU's tls-creds-x509 dir= layout: the peer's certificate as the CA, our own for both roles."""
    path.mkdir(mode=0o700)
    (path / "ca-cert.pem").write_bytes(peer_cert)
    for role in ("server", "client"):
        (path / f"{role}-cert.pem").write_bytes(own[0])
        (path / f"{role}-key.pem").write_bytes(own[1])
    return path
