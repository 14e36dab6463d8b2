"""The core that producers (``api_client``) and workers (``worker``) both build on, and
that imports neither: settings, the job contract, the error family, Celery's settings,
the job status store (Redis), storage (S3), the URL guard, retry backoff and the queue
gauges. Imports point one way: ``api_client -> config <- worker``."""

from config.errors import SegqError
from config.settings import Settings, get_settings

__all__ = ["SegqError", "Settings", "get_settings"]
