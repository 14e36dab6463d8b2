"""S3 storage against a real S3 server (SeaweedFS ``weed mini`` on loopback, checking
signatures): round trips, presigned URLs, versions, locations a job may not touch,
size limits, error codes, and what happens while S3 is down and after it returns."""

from __future__ import annotations

import hashlib
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from api_client.dev.localstack import S3Server
from config.contract import S3Ref
from config.errors import (
    AccessDenied,
    BucketNotFound,
    ForbiddenLocation,
    ImageTooLarge,
    InvalidPayload,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)
from config.settings import Settings
from config.storage import Storage, storage_error

# urllib without any proxy from the environment: loopback only
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return Storage(settings)


def _put_input(s3_server: S3Server, key: str, data: bytes, bucket: str = "segq-input") -> dict:
    return s3_server.client().put_object(Bucket=bucket, Key=key, Body=data, ContentType="image/png")


def test_server_checks_signatures(s3_server: S3Server) -> None:
    with pytest.raises(ClientError) as err:
        s3_server.client(secret_key="not-the-secret").list_buckets()
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        _http.open(f"{s3_server.endpoint_url}/segq-input/")
    assert anonymous.value.code == 403


def test_read_returns_bytes_etag_and_type(storage: Storage, s3_server: S3Server) -> None:
    data = b"\x89PNG fake image bytes" * 50
    _put_input(s3_server, "tests/read.png", data)
    obj = storage.read(S3Ref.parse("s3://segq-input/tests/read.png"), max_bytes=10_000)
    assert obj.data == data and obj.size == len(data)
    assert obj.etag == hashlib.md5(data).hexdigest()  # unquoted
    assert obj.version_id is None  # the bucket is not versioned
    assert obj.content_type == "image/png"


def test_read_honours_version_id(s3_server: S3Server, settings: Settings) -> None:
    client = s3_server.client()
    bucket = f"segq-versioned-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=bucket, Key="img.png", Body=b"first")["VersionId"]
    client.put_object(Bucket=bucket, Key="img.png", Body=b"second")
    storage = Storage(settings.model_copy(update={"allowed_inputs": [f"s3://{bucket}/"]}))

    old = storage.read(S3Ref.parse(f"s3://{bucket}/img.png", version_id=first), max_bytes=100)
    assert (old.data, old.version_id) == (b"first", first)
    latest = storage.read(S3Ref.parse(f"s3://{bucket}/img.png"), max_bytes=100)
    assert latest.data == b"second" and latest.version_id not in (None, first)
    with pytest.raises(ObjectNotFound):
        storage.read(
            S3Ref.parse(f"s3://{bucket}/img.png", version_id="no-such-version"), max_bytes=100
        )


def test_write_read_back_and_presign_round_trip(storage: Storage, settings: Settings) -> None:
    key = f"{settings.output_prefix}job1/mask.png"
    data = bytes(range(256)) * 10
    uri = storage.write(key, data, "image/png", metadata={"job": "job1"})
    assert uri == f"s3://segq-output/{key}"
    assert storage.exists(key)
    assert storage.read_output(key) == data

    url = storage.presign(key, ttl=60)
    with _http.open(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.headers["x-amz-meta-job"] == "job1"
        assert resp.read() == data
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as err:
        _http.open(tampered, timeout=10)
    assert err.value.code == 403


def test_write_replaces_whole_object(storage: Storage, settings: Settings) -> None:
    key = f"{settings.output_prefix}job1/manifest.json"
    storage.write(key, b'{"try": 1}', "application/json")
    storage.write(key, b'{"try": 2}', "application/json")
    assert storage.read_output(key) == b'{"try": 2}'


def test_exists_is_false_for_missing_output(storage: Storage, settings: Settings) -> None:
    assert not storage.exists(f"{settings.output_prefix}nothing/here.png")


def test_upload_input_lands_in_the_input_bucket(storage: Storage) -> None:
    uri = storage.upload_input(f"uploads/{uuid.uuid4().hex}.png", b"img", "image/png")
    assert uri.startswith("s3://segq-input/uploads/")
    assert storage.read(S3Ref.parse(uri), max_bytes=10).data == b"img"


def test_missing_key_and_bucket_have_their_codes(storage: Storage, settings: Settings) -> None:
    with pytest.raises(ObjectNotFound) as err:
        storage.read(S3Ref.parse("s3://segq-input/no/such/key.png"), max_bytes=10)
    assert err.value.code == "object_not_found"
    assert err.value.details["location"] == "s3://segq-input/no/such/key.png"
    anywhere = Storage(settings.model_copy(update={"allowed_inputs": ["*"]}))
    with pytest.raises(BucketNotFound) as err:
        anywhere.read(S3Ref.parse("s3://segq-no-such-bucket/key.png"), max_bytes=10)
    assert err.value.code == "bucket_not_found"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://segq-input-evil/cat.jpg",  # prefix trick on the bucket name
        "s3://other-bucket/cat.jpg",
        "s3://SEGQ-INPUT/cat.jpg",
        "s3://segq-input/../segq-output/jobs/x.png",  # path normalisation escapes
        "s3://segq-input/a/../../segq-output/x.png",
        "s3://segq-input/a/..",
        "s3://segq-input/./cat.jpg",
        "s3://segq-input//cat.jpg",
        "s3://segq-input/a//cat.jpg",
        "s3://segq-input/cat\x00.jpg",
        "s3://segq-input/cat\n.jpg",
    ],
)
def test_reads_outside_allowed_inputs_are_forbidden(storage: Storage, uri: str) -> None:
    ref = S3Ref.parse(uri)
    with pytest.raises(ForbiddenLocation) as err:
        storage.check_readable(ref)
    assert err.value.code == "forbidden_location"
    with pytest.raises(ForbiddenLocation):
        storage.read(ref, max_bytes=10)


def test_allowed_prefixes_are_folders_and_star_allows_all(settings: Settings) -> None:
    uploads = Storage(settings.model_copy(update={"allowed_inputs": ["s3://segq-input/uploads"]}))
    uploads.check_readable(S3Ref.parse("s3://segq-input/uploads/a.jpg"))
    for uri in (
        "s3://segq-input/uploads-evil/a.jpg",
        "s3://segq-input/a.jpg",
        "s3://segq-input/uploads",
    ):
        with pytest.raises(ForbiddenLocation):
            uploads.check_readable(S3Ref.parse(uri))
    anywhere = Storage(settings.model_copy(update={"allowed_inputs": ["*"]}))
    anywhere.check_readable(S3Ref.parse("s3://any-bucket/any/key.png"))
    with pytest.raises(ForbiddenLocation):  # even "*" does not allow path tricks
        anywhere.check_readable(S3Ref.parse("s3://any-bucket/../x"))
    nothing = Storage(settings.model_copy(update={"allowed_inputs": []}))
    with pytest.raises(ForbiddenLocation):
        nothing.check_readable(S3Ref.parse("s3://segq-input/a.jpg"))


@pytest.mark.parametrize("suffix", ["../escape.png", "a/../../escape.png", "a//b.png", ""])
def test_output_keys_must_stay_under_the_prefix(
    storage: Storage, settings: Settings, suffix: str
) -> None:
    key = settings.output_prefix + suffix
    for call in (
        lambda: storage.write(key, b"x", "image/png"),
        lambda: storage.presign(key),
        lambda: storage.exists(key),
        lambda: storage.read_output(key),
    ):
        with pytest.raises(ForbiddenLocation):
            call()
    with pytest.raises(ForbiddenLocation):
        storage.write("jobs/someone-else/mask.png", b"x", "image/png")


def test_max_bytes_refuses_large_objects(storage: Storage, s3_server: S3Server) -> None:
    _put_input(s3_server, "tests/big.png", b"x" * 1000)
    ref = S3Ref.parse("s3://segq-input/tests/big.png")
    assert len(storage.read(ref, max_bytes=1000).data) == 1000
    with pytest.raises(ImageTooLarge) as err:
        storage.read(ref, max_bytes=999)
    assert err.value.code == "image_too_large"
    assert (err.value.details["size"], err.value.details["limit"]) == (1000, 999)


def test_wrong_credentials_are_access_denied(
    settings: Settings, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _put_input(s3_server, "tests/creds.png", b"img")
    wrong_secret = "definitely-not-the-secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage = Storage(settings)
    with pytest.raises(AccessDenied) as err:
        storage.read(S3Ref.parse("s3://segq-input/tests/creds.png"), max_bytes=10)
    assert err.value.code == "access_denied" and not err.value.retryable
    assert wrong_secret not in str(err.value) and wrong_secret not in repr(err.value.details)
    with pytest.raises(AccessDenied):
        storage.write(f"{settings.output_prefix}x.png", b"x", "image/png")


def test_one_client_shared_by_threads(storage: Storage) -> None:
    barrier = threading.Barrier(8)
    seen = []

    def grab() -> None:
        barrier.wait()
        seen.append(storage.client)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and len({id(c) for c in seen}) == 1


def test_ensure_buckets_creates_missing_and_is_idempotent(
    storage: Storage, s3_server: S3Server
) -> None:
    name = f"segq-made-{uuid.uuid4().hex[:8]}"
    storage.ensure_buckets([name, "segq-output"])
    storage.ensure_buckets([name])
    s3_server.client().head_bucket(Bucket=name)


@pytest.mark.timeout(60)
def test_s3_down_is_unavailable_and_recovers(
    storage: Storage, settings: Settings, s3_server: S3Server
) -> None:
    key = f"{settings.output_prefix}fault/mask.png"
    storage.write(key, b"before", "image/png")
    fast = Storage(settings.model_copy(update={"s3_max_attempts": 2, "s3_connect_timeout_s": 1.0}))
    s3_server.stop()
    try:
        with pytest.raises(StorageUnavailable) as err:
            fast.read_output(key)
        assert err.value.retryable and err.value.code == "storage_unavailable"
        assert err.value.details["operation"] == "read"
        with pytest.raises(StorageUnavailable):
            fast.write(key, b"during", "image/png")
    finally:
        s3_server.start()
    # the same Storage objects, whose pooled connections died with the server, work again
    assert storage.read_output(key) == b"before"
    fast.write(key, b"after", "image/png")
    assert storage.read_output(key) == b"after"


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    "exc, expected",
    [
        (_client_error("NoSuchKey", 404), ObjectNotFound),
        (_client_error("404", 404), ObjectNotFound),  # HEAD: no body, no code
        (_client_error("NoSuchBucket", 404), BucketNotFound),
        (_client_error("AccessDenied", 403), AccessDenied),
        (_client_error("403", 403), AccessDenied),
        (_client_error("SignatureDoesNotMatch", 403), AccessDenied),
        (_client_error("InvalidAccessKeyId", 403), AccessDenied),
        (_client_error("SlowDown", 503), StorageUnavailable),
        (_client_error("Throttling", 400), StorageUnavailable),
        (_client_error("InternalError", 500), StorageUnavailable),
        (_client_error("BadGateway", 502), StorageUnavailable),
        (_client_error("InvalidRequest", 400), StorageError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StorageUnavailable),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), StorageUnavailable),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), StorageUnavailable),
        (NoCredentialsError(), AccessDenied),
        (ParamValidationError(report="Invalid bucket name"), InvalidPayload),
    ],
)
def test_error_mapping(exc: Exception, expected: type) -> None:
    err = storage_error(exc, "read", "s3://b/k")
    assert type(err) is expected
    assert err.retryable == (expected is StorageUnavailable)
    assert err.details["operation"] == "read" and err.details["location"] == "s3://b/k"
