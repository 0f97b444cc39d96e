"""This installation's identity: an EC P-256 key and a self-signed certificate, created on first use.

The certificate is its own CA and also the TLS server and client certificate (basicConstraints CA:TRUE,
keyUsage digitalSignature + keyCertSign, extendedKeyUsage serverAuth + clientAuth), so a peer trusts exactly
it: the host agent pins its SHA-256 fingerprint, and QEMU's TLS migration takes it as the peer's CA
(:func:`write_qemu_tls_dir`).  They live in ``<config>/identity/`` (key.pem 0600, cert.pem).

The identity shown to people is :func:`short_id`: the fingerprint's first 140 bits in base32, four groups of
seven like ``MFZWI3D-BONSGYC-4ZDFMRQ-KZ3TQYA`` (Syncthing's device IDs carry all 256 bits and check digits in
eight groups).  Matching a given short id means finding a key whose certificate hashes to the same 140 bits,
about 2^140 tries; peers.toml keeps, and connections compare, the full fingerprint.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import UsageError
from ..files import atomic_write
from ..paths import Home, make_private_dir

VALID_DAYS = 100 * 365
# Every certificate also names this host, so a TLS client (QEMU's tls-hostname) can check any peer's certificate
# against one name; what identifies a peer is the pinned certificate, never its name.
TLS_HOSTNAME = "session-manager"
_ID_GROUPS, _ID_GROUP = 4, 7
_HEX_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Identity:
    key_file: Path
    cert_file: Path
    cert_pem: bytes
    fingerprint: str  # hex SHA-256 of the certificate's DER

    @property
    def short_id(self) -> str:
        return short_id(self.fingerprint)


def installation_name() -> str:
    """How this installation introduces itself: the host name."""
    return socket.gethostname() or "localhost"


def load_identity(home: Home) -> Identity:
    """This installation's identity, created on first use."""
    folder = home.config / "identity"
    if not folder.exists():
        _create(folder)
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    pem = cert_file.read_bytes()
    return Identity(key_file, cert_file, pem, fingerprint(pem))


def _create(folder: Path) -> None:
    """Make the key and certificate in a new directory, then rename it to ``folder``: of processes doing this at
    once, one wins and the others' rename fails."""
    name = installation_name()
    dns = [n for n in dict.fromkeys([name, TLS_HOSTNAME]) if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", n)]
    cert, key = certificate(f"session-manager on {name}"[:64], dns, VALID_DAYS)
    new = make_private_dir(folder.with_name(f".{folder.name}.{os.getpid()}"))
    atomic_write(new / "key.pem", key)
    atomic_write(new / "cert.pem", cert)
    try:
        os.rename(new, folder)
    except OSError:  # another process made it first
        shutil.rmtree(new)


def certificate(common_name: str, names: Sequence[str], days: int) -> tuple[bytes, bytes]:
    """A new P-256 key and a self-signed certificate for ``names`` (DNS names or IP addresses), its own CA and a
    TLS server and client certificate at once: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def fingerprint(cert: bytes | x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's DER (given as the certificate, PEM or DER)."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----") else \
            x509.load_der_x509_certificate(cert)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def short_id(fingerprint: str) -> str:
    """The readable form of a fingerprint: four dash-separated groups of seven base32 characters."""
    text = base64.b32encode(bytes.fromhex(fingerprint)).decode()[:_ID_GROUPS * _ID_GROUP]
    return "-".join(text[i:i + _ID_GROUP] for i in range(0, len(text), _ID_GROUP))


def matches(fingerprint: str, given: str) -> bool:
    """Whether ``given`` (a short id in any case, with or without dashes and spaces, or a full hex
    fingerprint) names ``fingerprint``."""
    text = re.sub(r"[\s-]", "", given).lower()
    if _HEX_RE.fullmatch(text):
        return text == fingerprint
    return text.upper() == short_id(fingerprint).replace("-", "")


def check_id(given: str) -> str:
    """``given`` if it has the form of an id or a fingerprint; else a UsageError."""
    text = re.sub(r"[\s-]", "", given)
    if _HEX_RE.fullmatch(text.lower()) or re.fullmatch(f"[A-Z2-7]{{{_ID_GROUPS * _ID_GROUP}}}", text.upper()):
        return given
    raise UsageError(f"{given!r} is not an installation id; copy it as `session-manager id` prints it there, "
                     "like MFZWI3D-BONSGYC-4ZDFMRQ-KZ3TQYA.")


def write_qemu_tls_dir(folder: Path, identity: Identity, peer_cert_pem: bytes,
                       endpoint: Literal["server", "client"]) -> Path:
    """Lay out a 0700 directory for QEMU's ``tls-creds-x509`` object (``dir=FOLDER,endpoint=ENDPOINT``) that
    trusts exactly the peer: ca-cert.pem is the peer's certificate, and server-cert.pem/server-key.pem (server)
    or client-cert.pem/client-key.pem (client) are ours.

    QEMU 7.2's load-time sanity check (crypto/tlscredsx509.c) insists that our own certificate is not a CA and
    chains to ca-cert.pem, which a self-signed identity cannot satisfy; create the object with
    ``sanity-check=off`` (verification of the peer during the handshake, ``verify-peer=on``, is unaffected), and
    on the client set the migration parameter ``tls-hostname`` to :data:`TLS_HOSTNAME`.
    """
    make_private_dir(folder)
    atomic_write(folder / "ca-cert.pem", peer_cert_pem)
    atomic_write(folder / f"{endpoint}-cert.pem", identity.cert_pem)
    atomic_write(folder / f"{endpoint}-key.pem", identity.key_file.read_bytes())
    return folder
