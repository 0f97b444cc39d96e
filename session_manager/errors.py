"""The one root exception and its families.

Every error a user can meet is a :class:`SessionManagerError` whose message is
one sentence saying what happened and what to do.  The CLI prints it and exits
non-zero; nothing else is caught broadly.
"""


class SessionManagerError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 1


class UsageError(SessionManagerError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class NotFoundError(SessionManagerError):
    """A session, checkpoint, image or file named by the user does not exist."""


class QemuError(SessionManagerError):
    """QEMU is missing, too old, refused a command or died."""


class PeerError(SessionManagerError):
    """Another installation cannot be reached or paired with, refused us, or is not the one we paired with."""


class StreamFormatError(SessionManagerError):
    """A migration stream is truncated, malformed or from an unsupported QEMU."""


class RepositoryError(SessionManagerError):
    """The checkpoint repository cannot do what was asked (locked, full, ...)."""


class CorruptionError(RepositoryError):
    """Data in the repository is missing or does not match its hash."""


class DamagedError(SessionManagerError):
    """One of our own files (a session's config or state) cannot be read; only what it belongs to is affected."""
