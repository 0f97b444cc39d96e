"""A repository on S3-compatible object storage (AWS, MinIO, SeaweedFS, Garage, R2...) through obstore.

Objects are named as in any backend, below the remote's prefix.  save() is a conditional
create (If-None-Match: *), so two writers can never overwrite each other's object and an S3
PUT is atomic: an object is either whole or absent.  Packs go up in one PUT (16 MiB).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError as _Exists
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from ..errors import CorruptionError, NotFoundError, RepositoryError, UsageError
from .backend import AlreadyExistsError, Backend, check_object_name

if TYPE_CHECKING:
    from obstore import GetOptions

T = TypeVar("T")

CONNECT_TIMEOUT = "10s"
REQUEST_TIMEOUT = "10min"  # a 16 MiB pack over a slow uplink
RETRIES = 3
_CONNECT_RE = re.compile(r"error sending request|kind: (?:Connect|Timeout)|timed out|dns error")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str | None, region: str | None) -> str:
    """The server's address (AWS's for ``region`` if None); plain http only for this computer's own server."""
    endpoint = endpoint or f"https://s3.{region or 'us-east-1'}.amazonaws.com"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{endpoint!r} is not a server address; write it like https://s3.example.com:9000.")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise UsageError(f"The endpoint {endpoint} is plain http, which only this computer's own server "
                         "(localhost) may use; use its https address.")
    return endpoint


class S3Backend(Backend):
    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None, region: str | None,
                 access_key: str, secret_key: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = check_endpoint(endpoint, region)
        self._store = S3Store(
            bucket, prefix=self.prefix or None, endpoint=endpoint, region=region or "us-east-1",
            access_key_id=access_key, secret_access_key=secret_key,
            client_options={"allow_http": self.endpoint.startswith("http:"), "connect_timeout": CONNECT_TIMEOUT,
                            "timeout": REQUEST_TIMEOUT},
            retry_config={"max_retries": RETRIES, "retry_timeout": timedelta(minutes=2)})

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __str__(self) -> str:
        return self.url

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one obstore call; its errors become one sentence (FileNotFoundError passes through)."""
        try:
            return fn()
        except _Exists:
            raise
        except BaseError as e:
            text = str(e)
            refused = isinstance(e, (PermissionDeniedError, UnauthenticatedError))
            if refused or re.search(r"status code: 40[13]\b", text):
                raise RepositoryError(f"The server at {self.endpoint} refused the credentials for {self.url}; "
                                      "check the access key and secret (`session-manager remote add` "
                                      "stores new ones).") from None
            if _CONNECT_RE.search(text):
                reasons = re.findall(r'(?:message|error): "([^"]+)"', text)
                raise RepositoryError(f"Cannot reach the server at {self.endpoint}: "
                                      f"{reasons[-1] if reasons else 'no connection'}; "
                                      "check the address or try later.") from None
            if "NoSuchBucket" in text:
                raise RepositoryError(f"The bucket {self.bucket} does not exist at {self.endpoint}; "
                                      "create it first.") from None
            status = re.search(r"status code: (\d+ [^:]*)", text)
            raise RepositoryError(f"The server at {self.endpoint} could not {what} "
                                  f"({status[1] if status else text.splitlines()[0]}); try again later.") from None

    def _missing(self, name: str) -> NotFoundError:
        return NotFoundError(f"The repository object {name} is missing from {self.url}; "
                             "run `session-manager check` on it.")

    def save(self, name: str, data: bytes) -> None:
        check_object_name(name)
        try:
            self._call(f"write {name}", lambda: obstore.put(self._store, name, data, mode="create"))
        except _Exists:
            if self.stat(name) != len(data) or self.load(name) != data:
                raise AlreadyExistsError(f"The repository object {name} already exists in {self.url} with "
                                         "other content; run `session-manager check` and report this if it "
                                         "persists.") from None

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_object_name(name)
        try:
            if length == 0:
                self.stat(name)
                return b""
            data = self._call(f"read {name}", lambda: self._get(name, offset, length))
        except FileNotFoundError:
            raise self._missing(name) from None
        if length is not None and len(data) != length:
            raise CorruptionError(f"The repository object {name} in {self.url} is shorter than its index says; "
                                  "run `session-manager check` on it.")
        return data

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        try:
            if length is not None:
                return bytes(obstore.get_range(self._store, name, start=offset, length=length))
            options: GetOptions = {"range": {"offset": offset}} if offset else {}
            return bytes(obstore.get(self._store, name, options=options).bytes())
        except BaseError as e:
            if "416 Range Not Satisfiable" in str(e):  # the range starts after the end
                return b""
            raise

    def list(self, prefix: str) -> Iterator[str]:
        return iter(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        top = prefix.rpartition("/")[0] or None  # obstore lists whole "directories"
        chunks = self._call("list objects", lambda: list(obstore.list(self._store, top)))
        return {m["path"]: m["size"] for chunk in chunks for m in chunk if m["path"].startswith(prefix)}

    def delete(self, name: str) -> None:
        check_object_name(name)
        self._call(f"delete {name}", lambda: obstore.delete(self._store, name))

    def stat(self, name: str) -> int:
        check_object_name(name)
        try:
            return self._call(f"read {name}", lambda: obstore.head(self._store, name))["size"]
        except FileNotFoundError:
            raise self._missing(name) from None
