"""S3 in and out, through boto3.

Jobs read their image from an input location this deployment allows and write outputs
under ``settings.output_bucket``/``settings.output_prefix``. Every failure comes out as
one of the ``StorageError`` family (see ``storage_error``): bad locations and missing
objects fail a job at once, while ``StorageUnavailable`` (connection refused, timeouts,
5xx, throttling) is ``retryable`` and says which operation on which object failed.
botocore's own retry mode covers the short faults inside one call; the worker retries
the whole job with backoff for longer ones.

Credentials come only from boto3's usual chain (environment, profile, instance role)
and are never logged.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import boto3
from botocore import exceptions as boto
from botocore.config import Config

from config.contract import S3Ref, folder
from config.errors import (
    AccessDenied,
    BucketNotFound,
    ForbiddenLocation,
    ImageTooLarge,
    InvalidPayload,
    ObjectNotFound,
    SegqError,
    StorageError,
    StorageUnavailable,
)
from config.settings import Settings

_NOT_FOUND = {"NoSuchKey", "NotFound", "NoSuchVersion", "404"}
_DENIED = {
    "AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId",
    "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AccountProblem",
}  # fmt: skip
_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestTimeout",
    "ServiceUnavailable", "InternalError", "503", "500", "502", "504",
}  # fmt: skip
_CONNECTION_FAULTS = (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError)


def storage_error(exc: Exception, operation: str, location: str) -> SegqError:
    """The ``SegqError`` for a boto3 failure of ``operation`` on ``location``.

    The one place that decides what an S3 fault means for a job: its details carry the
    operation, the location and S3's own error code, enough for a retry policy and a
    log line, and never a credential."""
    where = f"{operation} {location}"
    details: dict[str, Any] = {"operation": operation, "location": location}
    if isinstance(exc, boto.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        details.update(s3_code=code, http_status=status)
        text = exc.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        if code == "NoSuchBucket":
            return BucketNotFound(f"{where}: no such bucket", **details)
        if code in _NOT_FOUND or status == 404:
            return ObjectNotFound(f"{where}: no such object", **details)
        if code in _DENIED or status == 403:
            return AccessDenied(f"{where}: access denied ({code or status})", **details)
        if code in _TRANSIENT or status >= 500 or status == 429:
            return StorageUnavailable(f"{where}: S3 is unavailable ({text})", **details)
        return StorageError(f"{where}: {text}", **details)
    details["cause"] = type(exc).__name__
    if isinstance(exc, boto.ParamValidationError):
        return InvalidPayload(f"{where}: not a valid S3 location ({exc})", **details)
    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return AccessDenied(f"{where}: no S3 credentials ({exc})", **details)
    if isinstance(exc, boto.SSLError):  # a certificate problem does not heal by retrying
        return StorageError(f"{where}: TLS failed ({exc})", **details)
    if isinstance(exc, _CONNECTION_FAULTS):
        return StorageUnavailable(f"{where}: S3 is unavailable ({exc})", **details)
    return StorageError(f"{where}: {exc}", **details)


@contextmanager
def _s3_errors(operation: str, location: str) -> Iterator[None]:
    try:
        yield
    except (boto.BotoCoreError, boto.ClientError) as exc:
        raise storage_error(exc, operation, location) from exc


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str
    version_id: Optional[str]
    content_type: Optional[str]
    size: int


def check_key(key: str) -> None:
    """Refuse keys that a client or server could resolve to somewhere else: ``.`` and
    ``..`` segments (HTTP path normalisation turns ``a/../b`` into ``b``), empty
    segments (``a//b``, a leading ``/``) and control characters."""
    if not key:
        raise ForbiddenLocation("empty S3 key")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ForbiddenLocation(f"S3 key {key!r} contains control characters")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ForbiddenLocation(f"S3 key {key!r} has an empty, '.' or '..' path segment")


class Storage:
    """S3 access for one deployment's settings. Thread-safe: one boto3 client, made on
    first use and shared (boto3 clients are thread-safe; sessions are not)."""

    def __init__(self, settings: Settings, *, session: Optional[boto3.session.Session] = None) -> None:
        """``session``: a boto3 session with credentials of its own (default: a new one,
        credentials from boto3's usual chain)."""
        self.settings = settings
        self._session = session
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        s = self.settings
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": s.s3_addressing_style},
            retries={"mode": "standard", "max_attempts": s.s3_max_attempts},
            connect_timeout=s.s3_connect_timeout_s,
            read_timeout=s.s3_read_timeout_s,
        )
        return (self._session or boto3.session.Session()).client(
            "s3", endpoint_url=s.s3_endpoint_url, region_name=s.s3_region, config=config
        )

    # --- locations -----------------------------------------------------------------

    def check_readable(self, ref: S3Ref) -> None:
        """Raise ``ForbiddenLocation`` unless ``settings.allowed_inputs`` covers ``ref``.
        Prefixes compare bucket names exactly (``s3://segq-input/`` does not allow
        ``s3://segq-input-evil/``)."""
        check_key(ref.key)
        for allowed in self.settings.allowed_inputs:
            if allowed == "*":
                return
            bucket, _, key_prefix = allowed.removeprefix("s3://").partition("/")
            if bucket == ref.bucket and ref.key.startswith(folder(key_prefix)):
                return
        raise ForbiddenLocation(
            f"{ref.uri} is outside the locations this deployment reads "
            f"({', '.join(self.settings.allowed_inputs) or 'none'})",
            location=ref.uri,
        )

    def output_ref(self, key: str) -> S3Ref:
        """``key`` in the output bucket; ``ForbiddenLocation`` outside the output prefix."""
        check_key(key)
        prefix = folder(self.settings.output_prefix)
        if not key.startswith(prefix):
            raise ForbiddenLocation(f"output key {key!r} is outside the output prefix {prefix!r}")
        return S3Ref(bucket=self.settings.output_bucket, key=key)

    # --- reading -------------------------------------------------------------------

    def read(self, ref: S3Ref, *, max_bytes: int) -> StoredObject:
        """Fetch an input object (``ref.version_id`` if given) with one GET, refusing it
        with ``ImageTooLarge`` past ``max_bytes`` without downloading the rest."""
        self.check_readable(ref)
        return self._get(ref, max_bytes)

    def read_output(self, key: str, *, max_bytes: Optional[int] = None) -> bytes:
        return self._get(self.output_ref(key), max_bytes).data

    def exists(self, key: str) -> bool:
        ref = self.output_ref(key)
        try:
            with _s3_errors("head", ref.uri):
                self.client.head_object(Bucket=ref.bucket, Key=ref.key)
        except ObjectNotFound:
            return False
        return True

    def _get(self, ref: S3Ref, max_bytes: Optional[int]) -> StoredObject:
        params = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            params["VersionId"] = ref.version_id
        with _s3_errors("read", ref.uri):
            resp = self.client.get_object(**params)
            body = resp["Body"]
            try:
                size = int(resp.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:
                    raise _too_large(ref, size, max_bytes)
                # never trust the header alone: read one byte past the limit at most
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:
                    raise _too_large(ref, len(data), max_bytes)
            finally:
                body.close()
        return StoredObject(
            data=data,
            etag=str(resp.get("ETag", "")).strip('"'),
            version_id=resp.get("VersionId"),
            content_type=resp.get("ContentType"),
            size=len(data),
        )

    # --- writing -------------------------------------------------------------------

    def write(
        self, key: str, data: bytes, content_type: str, *, metadata: Optional[dict[str, str]] = None
    ) -> str:
        """Store ``data`` at ``key`` (under the output prefix) with one PUT, so readers see
        the old object or the whole new one, never part of it. Returns its ``s3://`` URI."""
        return self._put(self.output_ref(key), data, content_type, metadata)

    def upload_input(self, key: str, data: bytes, content_type: str) -> str:
        """Put an image into ``settings.input_bucket`` (for `segq dev`, tests, demos)."""
        return self.upload(S3Ref(bucket=self.settings.input_bucket, key=key), data, content_type)

    def upload(self, ref: S3Ref, data: bytes, content_type: str) -> str:
        """Put an object at ``ref`` with the caller's credentials (`segq upload`)."""
        check_key(ref.key)
        return self._put(ref, data, content_type, None)

    def _put(
        self, ref: S3Ref, data: bytes, content_type: str, metadata: Optional[dict[str, str]]
    ) -> str:
        with _s3_errors("write", ref.uri):
            self.client.put_object(
                Bucket=ref.bucket,
                Key=ref.key,
                Body=data,
                ContentType=content_type,
                Metadata=metadata or {},
            )
        return ref.uri

    def presign(self, key: str, ttl: Optional[int] = None) -> str:
        """A GET URL for an output that works without credentials for ``ttl`` seconds
        (default ``settings.presign_ttl_s``)."""
        ref = self.output_ref(key)
        with _s3_errors("presign", ref.uri):
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": ref.bucket, "Key": ref.key},
                ExpiresIn=ttl or self.settings.presign_ttl_s,
            )

    def presign_upload(
        self, ref: S3Ref, *, max_bytes: int, content_type: Optional[str] = None,
        ttl: Optional[int] = None,
    ) -> dict[str, Any]:
        """A presigned POST policy (``{"url", "fields"}``) a browser can upload one object
        to ``ref`` with, of 1 to ``max_bytes`` bytes (S3 refuses anything else), without
        credentials, for ``ttl`` seconds."""
        check_key(ref.key)
        fields: dict[str, Any] = {}
        conditions: list[Any] = [["content-length-range", 1, max_bytes]]
        if content_type:
            fields["Content-Type"] = content_type
            conditions.append({"Content-Type": content_type})
        with _s3_errors("presign upload", ref.uri):
            return self.client.generate_presigned_post(
                ref.bucket, ref.key, Fields=fields, Conditions=conditions,
                ExpiresIn=ttl or self.settings.presign_ttl_s,
            )  # fmt: skip

    def ensure_buckets(self, names: list[str] | tuple[str, ...]) -> None:
        """Create the buckets that do not exist yet (needs no create permission when they do)."""
        for name in names:
            try:
                with _s3_errors("head bucket", f"s3://{name}"):
                    self.client.head_bucket(Bucket=name)
                continue
            except (BucketNotFound, ObjectNotFound):  # HEAD has no body: a bare 404
                pass
            params: dict[str, Any] = {"Bucket": name}
            if self.settings.s3_region != "us-east-1":
                params["CreateBucketConfiguration"] = {
                    "LocationConstraint": self.settings.s3_region
                }
            try:
                with _s3_errors("create bucket", f"s3://{name}"):
                    self.client.create_bucket(**params)
            except StorageError as err:
                if (
                    err.details.get("s3_code") != "BucketAlreadyOwnedByYou"
                ):  # lost a race to ourselves
                    raise


def _too_large(ref: S3Ref, size: int, limit: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"{ref.uri} is {size} bytes, over the limit of {limit}",
        location=ref.uri,
        size=size,
        limit=limit,
    )
