"""Secrets (repository keys, S3 credentials) in the desktop's keyring through ``keyring``.

The keyring is GNOME Keyring or KWallet (Secret Service), macOS Keychain or Windows Credential
Locker; every secret is stored under the service "session-manager" with ``name`` as the user
name.  A headless machine usually has no usable keyring: get_secret then finds nothing and
set_secret raises KeyringUnavailable, so the caller can fall back or ask for the secret.
"""

from __future__ import annotations

import logging

import keyring
from keyring.errors import KeyringError, NoKeyringError, PasswordDeleteError

from .errors import SessionManagerError

SERVICE = "session-manager"

log = logging.getLogger(__name__)


class KeyringUnavailable(SessionManagerError):
    """No usable keyring backend exists, or it refused (locked, dismissed)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reason(e: KeyringError) -> str:
    if isinstance(e, NoKeyringError):
        return "no Secret Service (GNOME Keyring, KWallet) or other keyring is running"
    return str(e).rstrip(".") or type(e).__name__


def get_secret(name: str) -> str | None:
    """The secret stored as ``name``; None when there is none or no keyring is usable (logged)."""
    try:
        return keyring.get_password(SERVICE, name)
    except KeyringError as e:
        log.info("Could not look up %s in the keyring: %s", name, _reason(e))
        return None


def set_secret(name: str, value: str) -> None:
    try:
        keyring.set_password(SERVICE, name, value)
    except KeyringError as e:
        reason = _reason(e)
        raise KeyringUnavailable(f"The keyring cannot store {name} ({reason}); "
                                 "start the desktop's keyring and try again.", reason) from None


def delete_secret(name: str) -> None:
    """Remove ``name`` from the keyring; a secret that is not there (or no keyring at all) is not an error."""
    try:
        keyring.delete_password(SERVICE, name)
    except (PasswordDeleteError, NoKeyringError):
        pass
    except KeyringError as e:
        reason = _reason(e)
        raise KeyringUnavailable(f"The keyring cannot remove {name} ({reason}); "
                                 "start the desktop's keyring and try again.", reason) from None
