"""The producer side of segq: submit jobs, follow them, fetch their outputs.

    from api_client import SegmentationClient

    client = SegmentationClient()                       # settings from SEGQ_* env
    job = client.cutout("s3://segq-input/photo.jpg", {"point": [320, 240]})
    job.wait(timeout=60)

Importing this package never imports onnxruntime or the worker.
"""

from api_client.client import AsyncJob, AsyncSegmentationClient, Job, SegmentationClient
from config.contract import JobState, JobStatus
from config.errors import (
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    QueueUnavailable,
    SegqError,
)
from config.settings import Settings

__all__ = [
    "AsyncJob",
    "AsyncSegmentationClient",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobState",
    "JobStatus",
    "JobTimeout",
    "QueueUnavailable",
    "SegmentationClient",
    "SegqError",
    "Settings",
]
