"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, on a free port.

It runs in a thread of the test process and speaks HTTP, so Ray workers (other processes) reach it
like any S3 endpoint. Credentials are accepted as given; the secret is unique per server so tests
can look for it in what a job wrote.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    key: str
    secret: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options, as a job config carries them."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def fs(self):
        """A fresh s3fs filesystem (no instance or listing cache shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    store = S3(f"http://{host}:{port}", key="AKIATESTKEY" + uuid.uuid4().hex[:8].upper(),
               secret="SECRET-" + uuid.uuid4().hex, bucket="datasets-" + uuid.uuid4().hex[:8])
    # moto keeps its buckets in the process, across servers: each module's server gets a bucket of its own
    store.fs().mkdir(store.bucket)
    try:
        yield store
    finally:
        server.stop()
