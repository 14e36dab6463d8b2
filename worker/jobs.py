"""One job's life on a worker: status running, read the image, run the pipeline, write
outputs and manifest, status final. Plain Python: the Celery tasks are shells around
``execute``, and tests drive ``execute`` in-process with a ``Runtime`` of their own.

Ordering guarantees: every output object is written (each a single PUT, so never half
visible) before the manifest, and the manifest before the status says ``succeeded``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import redis
from celery.exceptions import SoftTimeLimitExceeded

from config.contract import (
    TASK_CUTOUT,
    TASK_OVERLAY,
    TASK_PANOPTIC,
    TASK_SEGMENT,
    TASKS,
    JobRequest,
    JobStatus,
    S3Ref,
    check_job_id,
    output_key,
    parse_request,
)
from config.affinity import worker_queue
from config.errors import InvalidTransition, JobTimeout, SegqError, WorkerLost
from config.retry import full_jitter
from worker import metrics
from worker.affinity import Reroute
from worker.imaging.masks import mask_from_png
from worker.pipelines import JobOutput
from worker.runtime import Runtime
from worker.webhooks import deliver_for_job

log = logging.getLogger("segq.worker")


class RetryLater(Exception):
    """A transient fault: the caller should deliver the job again after ``countdown``."""

    def __init__(self, error: SegqError, countdown: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.countdown = countdown


class MoveTo(Exception):
    """The job belongs on ``queue`` (the own queue of the worker holding, or making, its
    image's embedding): the caller should send it there and acknowledge this delivery."""

    def __init__(self, queue: str, reason: str) -> None:
        super().__init__(reason)
        self.queue = queue


class LeaveQueued(Exception):
    """Neither success nor failure can be recorded (Redis is away): the caller should put
    the message back on its queue instead of acknowledging it."""


@dataclass
class Delivery:
    """What the queue knows about this delivery of a job."""

    job_id: str
    worker: str = "in-process"
    retries: int = 0
    # False once the job was sent to this worker's own queue: it runs here, never moves on
    may_reroute: bool = True


def execute(runtime: Runtime, payload: Any, delivery: Delivery) -> Optional[dict[str, Any]]:
    """Run one delivery of a job and record its outcome. Never raises for a job's own
    faults (a bad job must not take the worker down); raises ``RetryLater`` for
    transient ones while retries remain."""
    settings = runtime.settings
    status = runtime.status
    job_id = delivery.job_id
    try:
        request = parse_request(
            payload, max_bytes=settings.max_payload_bytes, max_points=settings.max_points
        )
    except SegqError as err:
        _ensure_record(runtime, job_id, payload)
        _fail(runtime, job_id, _task_of(payload), err)
        log.warning("job %s rejected: %s", job_id, err)
        return None

    _ensure_record(runtime, job_id, payload)
    record = status.start(job_id, delivery.worker)
    if record is None:
        log.info("job %s skipped: cancelled or already final", job_id)
        return None
    deliveries = record.attempts - delivery.retries
    if deliveries > settings.max_deliveries:
        err = WorkerLost(
            f"the job was delivered {deliveries} times and its worker died each time; "
            f"giving up after {settings.max_deliveries} deliveries"
        )
        _fail(runtime, job_id, request.task, err, request.callback_url)
        log.error("job %s: %s", job_id, err)
        return None

    try:
        deadline = time.monotonic() + settings.soft_time_limit_s

        def on_stage(name: str) -> None:
            # Celery enforces time limits only in the prefork pool; under threads a job
            # still stops at its next stage once over its limit.
            if time.monotonic() > deadline:
                raise JobTimeout(f"the job ran past its {settings.soft_time_limit_s}s time limit")
            status.stage(job_id, name)

        guard = None
        if runtime.affinity is not None and request.uses_sam:
            guard = runtime.affinity.guard(request.affinity_id, may_reroute=delivery.may_reroute)
        result, timings = run_job(runtime, request, job_id, on_stage=on_stage, guard=guard)
    except Reroute as move:
        queue = worker_queue(move.hostname)
        reason = f"moved to {move.hostname}, which holds the image's embedding"
        if not _still_ours(lambda: status.handover(job_id, reason), job_id):
            return None
        metrics.REROUTES.inc()
        log.info("job %s: %s", job_id, reason)
        raise MoveTo(queue, reason) from None
    except SegqError as err:
        if err.retryable:
            retrying_for = time.time() - (record.retrying_since or time.time())
            if retrying_for < settings.retry_budget_s:
                countdown = full_jitter(
                    delivery.retries, settings.retry_backoff_s, settings.retry_backoff_max_s
                )
                reason = f"{err.code}: {err.message}"
                if not _still_ours(lambda: status.requeue(job_id, reason), job_id):
                    return None
                metrics.RETRIES.labels(request.task, err.code).inc()
                log.warning("job %s: %s; retry %d in %.1fs (retrying for %.0fs)",
                            job_id, err, delivery.retries + 1, countdown, retrying_for)  # fmt: skip
                raise RetryLater(err, countdown) from err
            err = type(err)(
                f"{err.message}; gave up after retrying for {retrying_for:.0f} s "
                f"(SEGQ_RETRY_BUDGET_S={settings.retry_budget_s:g})",
                **err.details,
            )
        _fail(runtime, job_id, request.task, err, request.callback_url)
        log.info("job %s failed: %s", job_id, err)
        return None
    except SoftTimeLimitExceeded:
        limit = settings.soft_time_limit_s
        err = JobTimeout(f"the job ran past its {limit}s time limit")
        _fail(runtime, job_id, request.task, err, request.callback_url)
        return None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed away past the retry budget: not the job's fault, and no status can
        # be written now. Leave the message for the queue rather than record a failure.
        log.error("job %s: Redis unreachable (%s); the job goes back to the queue", job_id, exc)
        raise LeaveQueued(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001  the worker must survive any single job
        log.exception("job %s crashed", job_id)
        err = SegqError(f"{type(exc).__name__}: {exc}")
        _fail(runtime, job_id, request.task, err, request.callback_url)
        return None

    final = _still_ours(lambda: status.succeed(job_id, result, timings), job_id)
    if final is None:
        return None
    metrics.record_job(request.task, "succeeded", timings=timings, cache=result.get("embedding_cache"))
    _notify(runtime, final, request.callback_url)
    return result


def _still_ours(transition: Callable[[], JobStatus], job_id: str) -> Optional[JobStatus]:
    """Apply a transition that needs the job ``running``. A second delivery of the same
    job (a redelivery that raced a slow first run) may have ended it already: then the
    first ending stands and this run's outputs, written under the same keys, are the same."""
    try:
        return transition()
    except InvalidTransition as err:
        log.warning("job %s: another delivery already ended it (%s); keeping that outcome", job_id, err)
        return None


def refuse_message(runtime: Runtime, job_id: object, task: str, err: SegqError) -> None:
    """Record a message the worker cannot run at all (an unknown task name, a body that is
    not JSON or not ``[args, kwargs, options]``) as a failed job. Celery only logs and drops
    such a message, which would leave a client's record ``queued`` for ever. An id no status
    should be kept under (empty, over-long, not plain) gets no new record; one made for it
    by hand is failed."""
    try:
        job_id = check_job_id(job_id)
    except SegqError as bad_id:
        log.warning("message refused: %s; %s", err, bad_id)
        if isinstance(job_id, str) and runtime.status.get(job_id) is not None:
            _fail(runtime, job_id, "unknown", bad_id)
        return
    runtime.status.create(job_id, task, None)
    _fail(runtime, job_id, task if task in TASKS else "unknown", err)
    log.warning("message %s refused: %s", job_id, err)


def _fail(runtime: Runtime, job_id: str, task: str, err: SegqError, callback_url: Optional[str] = None) -> None:
    final = runtime.status.fail(job_id, err.code, err.message, err.details or None)
    metrics.record_job(task, "failed", err.code)
    _notify(runtime, final, callback_url)


def _notify(runtime: Runtime, final: Optional[JobStatus], callback_url: Optional[str]) -> None:
    """Webhooks go out on the runtime's own threads: a slow receiver must not hold a
    worker slot, and the job's status is already final whatever the receiver does."""
    if final is None or not callback_url:
        return

    def deliver() -> None:
        outcome = deliver_for_job(runtime.settings, final, callback_url)
        if outcome is not None:
            runtime.status.record_webhook(final.job_id, outcome.to_dict())

    runtime.webhooks.submit(deliver)


def _task_of(payload: Any) -> str:
    task = payload.get("task") if isinstance(payload, dict) else None
    return task if isinstance(task, str) else "unknown"


def run_job(
    runtime: Runtime,
    request: JobRequest,
    job_id: str,
    *,
    on_stage: Callable[[str], None] = lambda stage: None,
    guard: Any = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Read, run, write. Returns the status result and stage timings (seconds). ``guard``:
    the encode lease around a cold SAM 2 encode (``worker.affinity``)."""
    settings = runtime.settings
    storage = runtime.storage
    ref = request.ref
    timings: dict[str, float] = {}

    on_stage("download")
    t0 = time.perf_counter()
    obj = storage.read(ref, max_bytes=settings.max_image_bytes)
    timings["download"] = time.perf_counter() - t0

    on_stage("inference")
    output = _run_pipeline(
        runtime, request, image_id=f"{ref.uri}#{obj.version_id or obj.etag}", data=obj.data,
        job_id=job_id, guard=guard,
    )  # fmt: skip
    timings.update(output.timings)

    on_stage("upload")
    t0 = time.perf_counter()
    outputs = {}
    for name, (data, content_type) in output.files.items():
        key = output_key(settings.output_prefix, job_id, name)
        storage.write(key, data, content_type)
        outputs[name] = key
    timings["upload"] = time.perf_counter() - t0
    manifest_key = output_key(settings.output_prefix, job_id, "manifest.json")
    result = {
        **output.result,
        "bucket": settings.output_bucket,
        "outputs": outputs,
        "manifest": manifest_key,
    }
    manifest = {
        "job_id": job_id,
        "task": request.task,
        "image": ref.uri,
        "image_version": obj.version_id or obj.etag,
        "prompt": request.prompt.model_dump(exclude_none=True) if request.prompt else None,
        **(
            {"prompts": [p.model_dump(exclude_none=True) for p in request.prompts]}
            if request.prompts is not None
            else {}
        ),
        "options": request.options,
        "result": result,
        "timings": timings,
        "created_at": time.time(),
    }
    storage.write(manifest_key, json.dumps(manifest).encode(), "application/json")
    return result, timings


def _run_pipeline(
    runtime: Runtime,
    request: JobRequest,
    *,
    image_id: str,
    data: bytes,
    job_id: Optional[str] = None,
    guard: Any = None,
) -> JobOutput:
    pipes = runtime.pipelines
    options = request.typed_options()
    sam = dict(image_id=image_id, job_id=job_id, guard=guard)
    if request.task == TASK_SEGMENT:
        return pipes.segment(data, request.prompt, options=options, prompts=request.prompts, **sam)
    if request.task == TASK_CUTOUT:
        return pipes.cutout(data, request.prompt, options=options, **sam)
    if request.task == TASK_PANOPTIC:
        return pipes.panoptic(data, options=options)
    if request.task == TASK_OVERLAY:
        masks = None
        if options.masks:
            masks = [_read_mask(runtime, uri) for uri in options.masks]
        return pipes.overlay(
            data, request.prompt, options=options, masks=masks, prompts=request.prompts, **sam
        )
    raise AssertionError(request.task)  # parse_request already refused other names


def _read_mask(runtime: Runtime, uri: str) -> np.ndarray:
    ref = S3Ref.parse(uri)
    data = runtime.storage.read(ref, max_bytes=runtime.settings.max_image_bytes).data
    return mask_from_png(data, max_pixels=runtime.settings.max_image_pixels)


def _ensure_record(runtime: Runtime, job_id: str, payload: Any) -> JobStatus:
    """Jobs sent without the client (raw ``send_task``, event adapters) still get a record."""
    existing = runtime.status.get(job_id)
    if existing is not None:
        return existing
    image = payload.get("image") if isinstance(payload, dict) else None
    return runtime.status.create(job_id, _task_of(payload), image if isinstance(image, str) else None)
