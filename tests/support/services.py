"""Real Redis and S3 on loopback as pytest fixtures (the servers are
``api_client.dev.localstack``'s; this module only gives them test lifetimes).

The servers are session-scoped because S3 takes a second or two to start; tests keep
apart by flushing Redis (``redis_url``) and by a unique output prefix (``settings``).
Fault tests may ``stop()`` and ``start()`` a server: it comes back on the same port with
its data.
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from api_client.dev.localstack import RedisServer, S3Server
from config.settings import Settings

INPUT_BUCKET = "segq-input"
OUTPUT_BUCKET = "segq-output"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test (restarted if a test left it down)."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(data_dir=tmp_path_factory.mktemp("s3"), buckets=[INPUT_BUCKET, OUTPUT_BUCKET])
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def settings(redis_url: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for these services, with this test's own output prefix. The S3
    credentials go into the environment, where boto3's normal chain finds them."""
    s3_server.start()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return Settings(
        redis_url=redis_url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
        input_bucket=INPUT_BUCKET,
        output_bucket=OUTPUT_BUCKET,
        output_prefix=f"jobs/{uuid.uuid4().hex[:12]}/",
        allowed_inputs=[f"s3://{INPUT_BUCKET}/"],
        s3_connect_timeout_s=2.0,
        s3_read_timeout_s=10.0,
        s3_max_attempts=3,
    )
