"""Where repository files live: a flat namespace of write-once named objects.

Names are relative paths with ``/`` separators (``data/ab/abcd...``, ``index/...``).  A backend
only stores bytes; what they mean is the repository's business (see repo.py).
"""

from __future__ import annotations

import errno
import filecmp
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptionError, NotFoundError, RepositoryError

TEMP_PREFIX = ".tmp-"


def check_object_name(name: str) -> str:
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"invalid object name {name!r}")
    return name


class AlreadyExistsError(RepositoryError):
    """An object of that name exists with other content; objects are never overwritten."""


class NewObject(ABC):
    """An object written piece by piece and named when finished (a pack is named by its hash)."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def finish(self, name: str) -> None:
        """Store what was written under ``name``, with save()'s guarantees."""

    @abstractmethod
    def abort(self) -> None:
        """Forget what was written (a no-op after finish)."""


class _BufferedObject(NewObject):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def finish(self, name: str) -> None:
        self.backend.save(name, b"".join(self.parts))
        self.parts = []

    def abort(self) -> None:
        self.parts = []


class Backend(ABC):
    def create(self) -> NewObject:
        """A new object to write in pieces; this default keeps them in memory until finish()."""
        return _BufferedObject(self)

    @abstractmethod
    def save(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` durably and atomically; a no-op if it already has this content.

        Raises AlreadyExistsError when ``name`` exists with different content.
        """

    @abstractmethod
    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes (all if None) from ``offset``; NotFoundError if missing, CorruptionError if short."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Names starting with ``prefix``, in no particular order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove ``name``; removing a missing object is not an error."""

    @abstractmethod
    def stat(self, name: str) -> int:
        """Size of ``name`` in bytes; NotFoundError if missing."""

    def sizes(self, prefix: str) -> dict[str, int]:
        """Names starting with ``prefix`` and their sizes in bytes."""
        sizes = {}
        for name in self.list(prefix):
            try:
                sizes[name] = self.stat(name)
            except NotFoundError:  # deleted meanwhile
                pass
        return sizes

    def remove_temporaries(self) -> int:
        """Remove what killed writers left half-written (only when no writer runs); returns how many."""
        return 0


class LocalBackend(Backend):
    """A directory.  An object is written to a temporary file, fsynced, linked into place (which
    fails rather than overwrite) and its directory fsynced, so a crash leaves either the whole
    object or none of it (plus, at worst, a temporary file that prune removes)."""

    def __init__(self, path: str | os.PathLike[str], create: bool = True) -> None:
        """``create``: make the directory if it is not there (to write a repository); otherwise its absence is a
        NotFoundError, and nothing is made (a remote to read from, a share that is not mounted)."""
        self.root = Path(path)
        if not create and not self.root.is_dir():
            raise NotFoundError(f"There is no directory {self.root}; check the path, or mount the share (nothing was "
                                "created).")
        self.root.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / check_object_name(name)

    def create(self) -> NewObject:
        return _LocalObject(self)

    def save(self, name: str, data: bytes) -> None:
        self._path(name)
        obj = _LocalObject(self)
        try:
            obj.write(data)
            obj.finish(name)
        finally:
            obj.abort()

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                if offset:
                    f.seek(offset)
                data = f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"The repository object {name} is missing; run `session-manager check`.") from None
        except OSError as e:
            raise _os_error(e, f"read {name}") from e
        if length is not None and len(data) != length:
            raise CorruptionError(
                f"The repository object {name} is shorter than its index says; run `session-manager check`."
            )
        return data

    def list(self, prefix: str) -> Iterator[str]:
        base, _, _ = prefix.rpartition("/")
        top = self.root / base if base else self.root
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            dirnames[:] = [d for d in dirnames
                           if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")]
            for fn in filenames:
                if not fn.startswith(TEMP_PREFIX) and (rel + fn).startswith(prefix):
                    yield rel + fn

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(e, f"delete {name}") from e

    def stat(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"The repository object {name} is missing; run `session-manager check`.") from None

    def remove_temporaries(self) -> int:
        count = 0
        for path in self.root.rglob(f"{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            count += 1
        return count


class _LocalObject(NewObject):
    """A temporary file in the repository directory, linked into place by finish()."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.tmp = backend.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self.file: BinaryIO = open(self.tmp, "xb")
        except OSError as e:
            raise _os_error(e, "create a file") from e

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            raise _os_error(e, "write a file") from e

    def finish(self, name: str) -> None:
        path = self.backend._path(name)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.tmp, path)  # unlike rename, never replaces an existing object
            except FileExistsError:
                return self._check_same(path, name)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if path.exists():  # a file system without hard links: check, then rename
                    return self._check_same(path, name)
                os.replace(self.tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            raise _os_error(e, f"write {name}") from e
        finally:
            self.abort()

    def _check_same(self, path: Path, name: str) -> None:
        if not filecmp.cmp(self.tmp, path, shallow=False):
            raise AlreadyExistsError(
                f"The repository object {name} already exists with other content; "
                "run `session-manager check` and report this if it persists."
            )

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: OSError, what: str) -> RepositoryError:
    if e.errno == errno.ENOSPC:
        return RepositoryError(f"The disk holding the repository is full (could not {what}); free space and try again.")
    return RepositoryError(f"Could not {what} in the repository: {e.strerror or e}; "
                           "check the disk and its permissions.")
