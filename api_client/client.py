"""``SegmentationClient``: submit jobs, follow their status, fetch their outputs.

    from api_client import SegmentationClient

    client = SegmentationClient()                       # settings from SEGQ_* env
    job = client.cutout("s3://segq-input/photo.jpg", {"point": [320, 240]})
    status = job.wait(timeout=60)                       # raises JobFailed with the job's code
    png = job.output("cutout.png")                      # bytes; job.image("cutout.png") -> PIL
    url = job.urls()["cutout.png"]                      # presigned GET URL

Producers need Redis (status), the broker and S3 (outputs); never onnxruntime. Every
request is validated here with the same contract the worker uses, so a malformed prompt
fails at submit time rather than in a worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Optional

from celery import Celery

from config.affinity import Router
from config.celeryconfig import celery_config, task_queues
from config.contract import (
    JobState,
    JobStatus,
    check_idempotency_key,
    check_job_id,
    parse_request,
    task_name,
)
from config.errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from config.settings import Settings, get_settings
from config.status import StatusStore, redis_reachable
from config.storage import Storage
from config.urlguard import check_url

if TYPE_CHECKING:
    from PIL import Image

PromptLike = Optional[dict[str, Any]]
class Job:
    """A handle on one submitted job."""

    def __init__(
        self, client: "SegmentationClient", job_id: str, task: str, created: bool = True,
        queue: Optional[str] = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.id = job_id
        self.task = task
        self.created = created
        self.queue = queue  # where it was sent: a shared queue, or the own queue of a worker

    def status(self) -> JobStatus:
        return self.client.status(self.id)

    def wait(self, timeout: Optional[float] = None, **kwargs: Any) -> JobStatus:
        return self.client.wait(self.id, timeout, **kwargs)

    def cancel(self) -> JobStatus:
        return self.client.cancel(self.id)

    def output(self, name: str) -> bytes:
        return self.client.output(self.id, name)

    def image(self, name: str) -> "Image.Image":
        return self.client.output_image(self.id, name)

    def urls(self, ttl: Optional[int] = None) -> dict[str, str]:
        return self.client.presigned_urls(self.id, ttl=ttl)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, task={self.task!r})"


class SegmentationClient:
    """Producer side of segq. Thread-safe; create one per process and reuse it."""

    def __init__(
        self, settings: Optional[Settings] = None, *, storage: Optional[Storage] = None, **overrides: Any
    ) -> None:
        """``settings`` (default: from the SEGQ_* environment), with ``overrides`` applied;
        ``storage`` to use S3 with credentials of its own instead of boto3's usual chain."""
        base = settings or get_settings()
        self.settings = base.model_copy(update=overrides) if overrides else base
        if storage is not None:
            self.storage = storage

    @cached_property
    def celery(self) -> Celery:
        """The Celery app jobs are sent with; its ``control`` reaches the workers."""
        return Celery("segq-client", config_source=celery_config(self.settings), set_as_current=False)

    @cached_property
    def _status(self) -> StatusStore:
        return StatusStore(self.settings.redis_url, ttl_s=self.settings.status_ttl_s)

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.settings)

    @cached_property
    def _router(self) -> Router:
        """Where jobs go: SAM jobs on an image whose embedding a live worker holds go to
        that worker's own queue (``SEGQ_AFFINITY``; ``config.affinity``)."""
        return Router(self._status.redis)

    # --- submitting -----------------------------------------------------------------

    def submit(
        self,
        task: str,
        image: str,
        prompt: PromptLike = None,
        *,
        version_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        callback_url: Optional[str] = None,
        job_id: Optional[str] = None,
        prompts: Optional[list[dict[str, Any]]] = None,
        image_id: Optional[str] = None,
        **options: Any,
    ) -> Job:
        """Validate and enqueue one job. With ``idempotency_key``, the same key twice
        (within the status TTL) returns the first job instead of making a second (its
        ``created`` is False); the same key with a different request raises
        ``IdempotencyConflict``. ``prompts``: several prompts in one job (segment,
        overlay), one mask set each; ``image_id``: your own name for the image's content,
        which routes the prompts on it to the worker holding its embedding (default: the
        URI and ``version_id``)."""
        name = task_name(task)
        payload: dict[str, Any] = {"task": name, "image": image, "prompt": prompt, "options": options}
        if version_id:
            payload["version_id"] = version_id
        if prompts is not None:
            payload["prompts"] = prompts
        if image_id is not None:
            payload["image_id"] = image_id
        if callback_url:
            check_url(callback_url, allow_private=self.settings.webhook_allow_private)
            payload["callback_url"] = callback_url
        request = parse_request(
            payload, max_bytes=self.settings.max_payload_bytes, max_points=self.settings.max_points
        )
        body = request.model_dump(mode="json", exclude_none=True)
        # what the request asks for (not when): the same idempotency key with another
        # request is a conflict, never a silent answer with the first one's job
        fingerprint = hashlib.sha256(
            json.dumps({k: v for k, v in body.items() if k != "submitted_at"}, sort_keys=True).encode()
        ).hexdigest()
        job_id = uuid.uuid4().hex if job_id is None else job_id
        check_job_id(job_id)
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)

        with redis_reachable(f"submit a {name} job"):
            if idempotency_key is not None:
                job_id, created = self._status.idempotent_create(
                    idempotency_key, job_id, name, image, fingerprint=fingerprint
                )
                if not created:
                    return Job(self, job_id, name, created=False)
            else:
                self._status.create(job_id, name, image)
            queue = task_queues(self.settings)[name]
            if self.settings.affinity:
                queue = self._router.route(request, queue)
            try:
                self.celery.send_task(
                    name, args=[body], task_id=job_id, queue=queue,
                    # Celery's default repr cuts nesting at depth 3, so Flower showed the
                    # prompt as [...]; the JSON is small (payload size is capped) and whole.
                    argsrepr=json.dumps([body]),
                )
            except Exception:
                # Nothing was queued: leave no "queued" record that would never move.
                self._status.discard(job_id, idempotency_key)
                raise
        return Job(self, job_id, name, queue=queue)

    def segment(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> Job:
        return self.submit("segment", image, prompt, **kwargs)

    def panoptic(self, image: str, **kwargs: Any) -> Job:
        return self.submit("panoptic", image, None, **kwargs)

    def cutout(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> Job:
        return self.submit("cutout", image, prompt, **kwargs)

    def overlay(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> Job:
        return self.submit("overlay", image, prompt, **kwargs)

    def upload(self, data: bytes, key: str, *, content_type: str = "application/octet-stream") -> str:
        """Put an image into the input bucket and return its ``s3://`` URI."""
        return self.storage.upload_input(key, data, content_type)

    # --- following -----------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        """The job's current record; ``JobNotFound`` if no such job (or it expired)."""
        with redis_reachable(f"read the status of job {job_id}"):
            found = self._status.get(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or its status expired)")
        return found

    def wait(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        *,
        poll: float = 0.1,
        on_update: Optional[Callable[[JobStatus], None]] = None,
    ) -> JobStatus:
        """Block until the job is final. Returns the ``succeeded`` status; raises
        ``JobFailed`` (with the job's error code), ``JobCancelled`` or ``JobTimeout``."""
        waiter = _Waiter(job_id, timeout, poll, on_update)
        while (delay := waiter.observe(self.status(job_id))) is not None:
            time.sleep(delay)
        return waiter.final

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job: it ends ``cancelled`` and never runs."""
        with redis_reachable(f"cancel job {job_id}"):
            st = self._status.cancel(job_id)
            self.celery.control.revoke(job_id)
        return st

    # --- outputs -------------------------------------------------------------------

    def _output_key(self, job_id: str, name: str) -> str:
        st = self.status(job_id)
        outputs = (st.result or {}).get("outputs", {})
        if name == "manifest.json" and st.result:
            return st.result["manifest"]
        if name not in outputs:
            raise KeyError(f"job {job_id} has no output {name!r}; it has {sorted(outputs)}")
        return outputs[name]

    def output(self, job_id: str, name: str) -> bytes:
        return self.storage.read_output(self._output_key(job_id, name))

    def output_image(self, job_id: str, name: str) -> "Image.Image":
        from PIL import Image

        img = Image.open(io.BytesIO(self.output(job_id, name)))
        img.load()
        return img

    def presigned_urls(self, job_id: str, *, ttl: Optional[int] = None) -> dict[str, str]:
        st = self.status(job_id)
        result = st.result or {}
        keys = dict(result.get("outputs", {}))
        if "manifest" in result:
            keys["manifest.json"] = result["manifest"]
        return {name: self.storage.presign(key, ttl=ttl) for name, key in keys.items()}


class _Waiter:
    """The wait loop shared by the sync and async clients: each status read goes to
    ``observe``, which says how long to sleep before the next (None: final, see
    ``final``), calls ``on_update`` on each change, and raises on timeout."""

    def __init__(
        self,
        job_id: str,
        timeout: Optional[float],
        poll: float,
        on_update: Optional[Callable[[JobStatus], None]],
    ) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.delay = poll
        self.on_update = on_update
        self.last: Optional[tuple] = None
        self.final: JobStatus

    def observe(self, st: JobStatus) -> Optional[float]:
        seen = (st.state, st.stage, st.attempts)
        if self.on_update is not None and seen != self.last:
            self.on_update(st)
        self.last = seen
        if st.is_final:
            self.final = _final(st)
            return None
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise JobTimeout(
                f"job {self.job_id} still {st.state.value} after {self.timeout}s",
                state=st.state.value,
            )
        delay = self.delay if self.deadline is None else max(0.0, min(self.delay, self.deadline - now))
        self.delay = min(self.delay * 1.5, 1.0)
        return delay


def _final(st: JobStatus) -> JobStatus:
    if st.state is JobState.succeeded:
        return st
    if st.state is JobState.cancelled:
        raise JobCancelled(f"job {st.job_id} was cancelled")
    err = st.error
    raise JobFailed(st.job_id, err.code if err else "unknown", err.message if err else "failed")


class AsyncJob:
    """A handle on one submitted job, for ``AsyncSegmentationClient``: ``Job``'s methods,
    awaitable."""

    def __init__(
        self, client: "AsyncSegmentationClient", job_id: str, task: str, created: bool = True,
        queue: Optional[str] = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.id = job_id
        self.task = task
        self.created = created
        self.queue = queue

    async def status(self) -> JobStatus:
        return await self.client.status(self.id)

    async def wait(self, timeout: Optional[float] = None, **kwargs: Any) -> JobStatus:
        return await self.client.wait(self.id, timeout, **kwargs)

    async def cancel(self) -> JobStatus:
        return await self.client.cancel(self.id)

    async def output(self, name: str) -> bytes:
        return await self.client.output(self.id, name)

    async def image(self, name: str) -> "Image.Image":
        return await self.client.output_image(self.id, name)

    async def urls(self, ttl: Optional[int] = None) -> dict[str, str]:
        return await self.client.presigned_urls(self.id, ttl=ttl)

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, task={self.task!r})"


class AsyncSegmentationClient:
    """The asyncio twin: the same methods, awaitable. Blocking I/O runs in threads; waiting
    sleeps on the event loop, so thousands of waits cost no threads."""

    def __init__(self, settings: Optional[Settings] = None, **overrides: Any) -> None:
        self.sync = SegmentationClient(settings, **overrides)

    @property
    def settings(self) -> Settings:
        return self.sync.settings

    async def submit(self, task: str, image: str, prompt: PromptLike = None, **kwargs: Any) -> AsyncJob:
        job = await asyncio.to_thread(self.sync.submit, task, image, prompt, **kwargs)
        return AsyncJob(self, job.id, job.task, job.created, job.queue)

    async def segment(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> AsyncJob:
        return await self.submit("segment", image, prompt, **kwargs)

    async def panoptic(self, image: str, **kwargs: Any) -> AsyncJob:
        return await self.submit("panoptic", image, None, **kwargs)

    async def cutout(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> AsyncJob:
        return await self.submit("cutout", image, prompt, **kwargs)

    async def overlay(self, image: str, prompt: PromptLike = None, **kwargs: Any) -> AsyncJob:
        return await self.submit("overlay", image, prompt, **kwargs)

    async def upload(self, data: bytes, key: str, *, content_type: str = "application/octet-stream") -> str:
        return await asyncio.to_thread(self.sync.upload, data, key, content_type=content_type)

    async def status(self, job_id: str) -> JobStatus:
        return await asyncio.to_thread(self.sync.status, job_id)

    async def wait(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        *,
        poll: float = 0.1,
        on_update: Optional[Callable[[JobStatus], None]] = None,
    ) -> JobStatus:
        waiter = _Waiter(job_id, timeout, poll, on_update)
        while (delay := waiter.observe(await self.status(job_id))) is not None:
            await asyncio.sleep(delay)
        return waiter.final

    async def cancel(self, job_id: str) -> JobStatus:
        return await asyncio.to_thread(self.sync.cancel, job_id)

    async def output(self, job_id: str, name: str) -> bytes:
        return await asyncio.to_thread(self.sync.output, job_id, name)

    async def output_image(self, job_id: str, name: str) -> "Image.Image":
        return await asyncio.to_thread(self.sync.output_image, job_id, name)

    async def presigned_urls(self, job_id: str, *, ttl: Optional[int] = None) -> dict[str, str]:
        return await asyncio.to_thread(self.sync.presigned_urls, job_id, ttl=ttl)
