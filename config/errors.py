"""One exception family for the whole service, each error with a stable code.

The code is what travels in a job's status (``error.code``) and what a client raises
again on its side, so producers can branch on ``err.code`` without parsing messages.
``retryable`` says whether trying the same job again later can succeed (a transient
storage fault) or never can (a corrupt image): workers retry the first kind with
backoff and fail the second at once.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SegqError(Exception):
    """Base of every error segq raises on purpose."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# --- input: the request itself is wrong; never retried -------------------------------


class InvalidPayload(SegqError):
    code = "invalid_payload"


class PayloadTooLarge(InvalidPayload):
    code = "payload_too_large"


class UnknownOption(InvalidPayload):
    code = "unknown_option"


class UnknownTask(InvalidPayload):
    code = "unknown_task"


class InvalidPrompt(SegqError):
    code = "invalid_prompt"


class PromptOutOfBounds(InvalidPrompt):
    code = "prompt_out_of_bounds"


class RefineUnavailable(InvalidPrompt):
    """A prompt refines an earlier job whose mask this worker no longer holds (evicted,
    expired, or made on another worker): send the clicks again without ``refine``."""

    code = "refine_unavailable"


class InvalidImage(SegqError):
    """The bytes are not an image we can decode (empty, truncated, not an image)."""

    code = "invalid_image"


class UnsupportedImage(InvalidImage):
    """A real image in a form segq does not segment (animated, multi-page)."""

    code = "unsupported_image"


class ImageTooLarge(InvalidImage):
    """Over the pixel or byte limit; also what a decompression bomb ends as."""

    code = "image_too_large"


class ImageTooSmall(InvalidImage):
    code = "image_too_small"


class InvalidMask(SegqError):
    code = "invalid_mask"


class InvalidURL(SegqError):
    code = "invalid_url"


# --- storage ---------------------------------------------------------------------------


class StorageError(SegqError):
    code = "storage_error"


class ObjectNotFound(StorageError):
    code = "object_not_found"


class BucketNotFound(StorageError):
    code = "bucket_not_found"


class AccessDenied(StorageError):
    code = "access_denied"


class ForbiddenLocation(StorageError):
    """The job names a bucket or key outside the prefixes this deployment allows."""

    code = "forbidden_location"


class StorageUnavailable(StorageError):
    """Connection refused, timeouts, 5xx, throttling: worth another try."""

    code = "storage_unavailable"
    retryable = True


class InvalidConfig(SegqError):
    """A deployment setting is malformed, e.g. an entry of ``SEGQ_EVENT_RULES``."""

    code = "invalid_config"


class DependencyMissing(SegqError):
    """An optional part of segq is used without the extra that installs it."""

    code = "dependency_missing"


class LocalServiceError(SegqError):
    """A local Redis or S3 server for `segq dev` or the tests would not start."""

    code = "local_service_failed"


# --- models ----------------------------------------------------------------------------


class ModelError(SegqError):
    code = "model_error"


class ModelNotFound(ModelError):
    code = "model_not_found"


class ModelNotAllowed(ModelError):
    code = "model_not_allowed"


class ModelIncompatible(ModelError):
    code = "model_incompatible"


class ModelUnavailable(ModelError):
    """The hub cannot be reached (or offline mode is on) and the files are not cached."""

    code = "model_unavailable"


# --- job lifecycle ---------------------------------------------------------------------


class JobNotFound(SegqError):
    code = "job_not_found"


class JobFailed(SegqError):
    """Raised by clients when a job they wait on ended ``failed``; carries the job's code."""

    code = "job_failed"

    def __init__(self, job_id: str, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.job_id = job_id
        self.job_code = code

    def __str__(self) -> str:
        return f"job {self.job_id} failed [{self.job_code}]: {self.message}"


class JobCancelled(SegqError):
    code = "cancelled"


class InvalidTransition(SegqError):
    """A status change the job's state does not allow, e.g. cancelling a running job."""

    code = "invalid_transition"


class QueueUnavailable(SegqError):
    """Redis (the broker or the job status store) cannot be reached, even after the
    client's reconnect attempts: nothing was submitted or read; try again later."""

    code = "queue_unavailable"
    retryable = True


class IdempotencyConflict(SegqError):
    """An idempotency key used again with a different request: the first request stands,
    and the second is refused rather than silently answered with the first one's job."""

    code = "idempotency_conflict"


class Unauthorized(SegqError):
    """A missing, malformed or unknown API key (HTTP 401)."""

    code = "unauthorized"


class RateLimited(SegqError):
    """An API key over its requests-per-minute limit (HTTP 429 with Retry-After)."""

    code = "rate_limited"
    retryable = True


class JobTimeout(SegqError):
    code = "timeout"


class WorkerLost(SegqError):
    code = "worker_lost"
