"""Conformance suite every repository backend must pass: a directory and S3 (a real server on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.s3server import S3Server
from session_manager.errors import CorruptionError, NotFoundError, RepositoryError, UsageError
from session_manager.store.backend import AlreadyExistsError, Backend, LocalBackend


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        return request.getfixturevalue("s3_server").backend(prefix=tmp_path.name)  # a fresh prefix per test
    return LocalBackend(tmp_path / "repo")


def test_save_and_load(backend: Backend) -> None:
    backend.save("index/abc", b"hello")
    assert backend.load("index/abc") == b"hello"
    assert backend.stat("index/abc") == 5


def test_write_once(backend: Backend) -> None:
    backend.save("data/ab/abcd", b"content")
    backend.save("data/ab/abcd", b"content")  # the same again is fine: a retry
    with pytest.raises(AlreadyExistsError, match="already exists"):
        backend.save("data/ab/abcd", b"other")
    with pytest.raises(AlreadyExistsError):
        backend.save("data/ab/abcd", b"content!")
    assert backend.load("data/ab/abcd") == b"content"


def test_ranged_load(backend: Backend) -> None:
    backend.save("x", bytes(range(100)))
    assert backend.load("x", 10, 5) == bytes(range(10, 15))
    assert backend.load("x", 95) == bytes(range(95, 100))
    assert backend.load("x", 0, 0) == b""
    with pytest.raises(CorruptionError, match="shorter"):
        backend.load("x", 90, 20)


def test_missing(backend: Backend) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        backend.load("index/nope")
    with pytest.raises(NotFoundError):
        backend.stat("index/nope")
    backend.delete("index/nope")  # deleting what is gone is fine


def test_list(backend: Backend) -> None:
    names = ["data/00/0011", "data/ab/ab12", "data/ab/ab34", "index/i1", "checkpoints/c1", "annotations/c1-1"]
    for n in names:
        backend.save(n, n.encode())
    assert sorted(backend.list("data/")) == names[:3]
    assert sorted(backend.list("data/ab/")) == names[1:3]
    assert sorted(backend.list("index/")) == ["index/i1"]
    assert sorted(backend.list("annotations/c1-")) == ["annotations/c1-1"]
    assert sorted(backend.list("checkpoints/c")) == ["checkpoints/c1"]
    assert sorted(backend.list("checkpoints/x")) == []
    assert sorted(backend.list("locks/")) == []


def test_delete(backend: Backend) -> None:
    backend.save("locks/l1", b"1")
    backend.delete("locks/l1")
    assert list(backend.list("locks/")) == []
    with pytest.raises(NotFoundError):
        backend.load("locks/l1")
    backend.save("locks/l1", b"2")  # a deleted name can be written again
    assert backend.load("locks/l1") == b"2"


def test_streamed_object(backend: Backend) -> None:
    obj = backend.create()
    obj.write(b"abc")
    obj.write(b"def")
    obj.finish("data/12/1234")
    assert backend.load("data/12/1234") == b"abcdef"
    dropped = backend.create()
    dropped.write(b"nothing")
    dropped.abort()
    assert sorted(backend.list("")) == ["data/12/1234"]
    clash = backend.create()
    clash.write(b"abcdeX")
    with pytest.raises(AlreadyExistsError):
        clash.finish("data/12/1234")


def test_half_written_objects_are_invisible(backend: Backend) -> None:
    obj = backend.create()
    obj.write(b"partial")  # the writer is killed here: never finished
    backend.save("index/i", b"i")
    assert sorted(backend.list("")) == ["index/i"]
    backend.remove_temporaries()
    obj.abort()
    assert sorted(backend.list("")) == ["index/i"]


def test_invalid_names(backend: Backend) -> None:
    for bad in ("", "/etc/passwd", "data/../../x"):
        with pytest.raises(ValueError):
            backend.save(bad, b"x")


def test_sizes(backend: Backend) -> None:
    backend.save("data/ab/ab12", b"12345")
    backend.save("index/i1", b"1")
    assert backend.sizes("data/") == {"data/ab/ab12": 5}
    assert backend.sizes("") == {"data/ab/ab12": 5, "index/i1": 1}


# -- S3 only ----------------------------------------------------------------------------------------

def test_s3_server_unreachable() -> None:
    from session_manager.store.s3 import S3Backend

    port = free_port()  # a port nobody listens on
    b = S3Backend("bucket", "repo", endpoint=f"http://127.0.0.1:{port}", region=None, access_key="a", secret_key="b")
    for attempt in (lambda: b.save("config", b"x"), lambda: b.load("config"), lambda: list(b.list("index/"))):
        with pytest.raises(RepositoryError) as e:
            attempt()
        assert str(e.value) == (f"Cannot reach the server at http://127.0.0.1:{port}: Connection refused; "
                                "check the address or try later.")


def test_s3_wrong_credentials(s3_server: S3Server, tmp_path: Path) -> None:
    good = s3_server.backend(tmp_path.name)
    good.save("index/i", b"i")
    bad = s3_server.backend(tmp_path.name, secret_key="wrong")
    for attempt in (lambda: bad.save("config", b"x"), lambda: bad.load("index/i"), lambda: list(bad.list("index/"))):
        with pytest.raises(RepositoryError, match=r"^The server at http://127\.0\.0\.1:\d+ refused the credentials "
                                                  r"for s3://sm-test/test_s3_wrong_credentials0; check the access key"):
            attempt()


def test_s3_plain_http_only_on_loopback() -> None:
    from session_manager.store.s3 import S3Backend

    with pytest.raises(UsageError, match="plain http"):
        S3Backend("b", "", endpoint="http://nas.example:9000", region=None, access_key="a", secret_key="b")
