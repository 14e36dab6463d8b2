"""The HTTP API (``segq api``): segq for web apps in any language, and a page to try it.

    POST   /v1/uploads                 presigned S3 POST into an allowed input prefix
    POST   /v1/jobs                    the job contract as JSON; Idempotency-Key -> 201 / 200
    GET    /v1/jobs/{id}               the job's status
    DELETE /v1/jobs/{id}               cancel a queued job (409 once it runs or has ended)
    GET    /v1/jobs/{id}/outputs       presigned GET URLs of the outputs
    GET    /v1/jobs/{id}/outputs/NAME  one output's bytes (for pages on this origin)
    GET    /v1/jobs/{id}/events        Server-Sent Events of each status change until final
    POST   /v1/events/s3               S3/MinIO upload events -> jobs (SEGQ_EVENT_RULES)
    GET    /healthz, /readyz           alive; Redis and the broker reachable
    GET    /openapi.json, /docs        the OpenAPI document (from config.contract) and its UI
    GET    /                           the try-it page (static/)

Errors are ``{"error": {"code", "message"}}`` with segq's stable codes. Every Redis and
broker call has a short budget (``SEGQ_API_REDIS_TIMEOUT_S``): when they are down the
answer is 503 within seconds, and a job whose message could not be queued leaves nothing
behind (``SegmentationClient.submit`` discards its record).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import uuid
from functools import cached_property
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from kombu.exceptions import OperationalError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_client.client import SegmentationClient
from api_client.events import UploadedObject, handle_event, s3_records
from api_client.http.auth import Authenticator, Principal
from config.contract import (
    JobRequest,
    JobState,
    JobStatus,
    S3Ref,
    check_idempotency_key,
    check_job_id,
    events_channel,
    folder,
    parse_request,
    status_key,
)
from config.errors import (
    AccessDenied,
    ForbiddenLocation,
    IdempotencyConflict,
    InvalidPayload,
    InvalidPrompt,
    InvalidTransition,
    InvalidURL,
    JobNotFound,
    ObjectNotFound,
    PayloadTooLarge,
    QueueUnavailable,
    RateLimited,
    SegqError,
    StorageUnavailable,
    Unauthorized,
)
from config.settings import Settings
from config.status import StatusStore, redis_client

log = logging.getLogger("segq.api")

# One S3 event is a few KB (MinIO sends one per request); the old endpoint took 1 MiB.
EVENTS_MAX_BODY_BYTES = 1 << 20
KEEPALIVE_S = 15.0
# All request headers together; uvicorn (h11) also refuses an unfinished head past this.
MAX_HEADER_BYTES = 16 << 10

# The HTTP status of each error family, most specific first.
STATUSES: list[tuple[type[SegqError], int]] = [
    (Unauthorized, 401),
    (ForbiddenLocation, 403),
    (AccessDenied, 403),
    (JobNotFound, 404),
    (ObjectNotFound, 404),
    (InvalidTransition, 409),
    (IdempotencyConflict, 409),
    (PayloadTooLarge, 413),
    (InvalidPayload, 422),
    (InvalidPrompt, 422),
    (InvalidURL, 422),
    (RateLimited, 429),
    (QueueUnavailable, 503),
    (StorageUnavailable, 503),
]


class ApiError(Exception):
    """A ``SegqError`` answered with an explicit HTTP status (e.g. 400 for a body that is
    not JSON, where the code alone would say 422)."""

    def __init__(self, status: int, error: SegqError) -> None:
        self.status = status
        self.error = error


def error_response(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None,
                   details: Optional[dict[str, Any]] = None) -> JSONResponse:  # fmt: skip
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def segq_error_response(err: SegqError, status: Optional[int] = None) -> JSONResponse:
    if status is None:
        status = next((s for cls, s in STATUSES if isinstance(err, cls)), 500)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="segq"'
    if status == 429:
        headers["Retry-After"] = str(err.details.get("retry_after", 1))
    if status == 503:
        headers["Retry-After"] = "5"
    details = {k: v for k, v in err.details.items() if k in ("job_id", "state", "location", "retry_after")}
    return error_response(status, err.code, err.message, headers, details)


# --- request and response bodies (the job itself is config.contract.JobRequest) -------------


class UploadRequest(BaseModel):
    filename: str = Field("image", max_length=200, description="The file's name; kept in the key.")
    content_type: Optional[str] = Field(None, max_length=100, description="Sent as Content-Type.")
    prefix: Optional[str] = Field(
        None, description="s3://bucket/prefix among the key's allowed prefixes (default: its first)."
    )


class UploadForm(BaseModel):
    url: str = Field(description="POST the form here (multipart/form-data), the file last.")
    fields: dict[str, str] = Field(description="Form fields to send before the file.")
    image: str = Field(description="The s3:// URI to name in a job once uploaded.")
    max_bytes: int
    expires_in: int


class Outputs(BaseModel):
    job_id: str
    outputs: dict[str, str] = Field(description="Output name -> presigned GET URL.")
    expires_in: int


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Optional[dict[str, Any]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 422, 429, 503)}


# --- the service behind the routes -----------------------------------------------------------


class ApiClient(SegmentationClient):
    """``SegmentationClient`` on the API's short budget: Redis and the broker get
    ``api_redis_timeout_s`` per call instead of the producer's ~17 s of reconnects, so a
    request answers 503 while its caller still waits."""

    @cached_property
    def _status(self) -> StatusStore:
        t = self.settings.api_redis_timeout_s
        client = redis_client(self.settings.redis_url, reconnect_budget_s=t, socket_timeout_s=t)
        return StatusStore(client, ttl_s=self.settings.status_ttl_s)

    @cached_property
    def celery(self):  # type: ignore[no-untyped-def]
        app = super().celery
        t = self.settings.api_redis_timeout_s
        transport = dict(app.conf.broker_transport_options or {})
        transport.update(socket_timeout=t, socket_connect_timeout=t, retry_on_timeout=False)
        app.conf.update(
            broker_transport_options=transport,
            broker_connection_timeout=t,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            task_publish_retry_policy={"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3},
        )  # fmt: skip
        return app


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = ApiClient(settings)
        t = settings.api_redis_timeout_s
        self.redis = redis_client(settings.redis_url, reconnect_budget_s=t, socket_timeout_s=t)
        self.auth = Authenticator(settings, self.redis)
        self._aredis: Optional[aioredis.Redis] = None

    @property
    def aredis(self) -> aioredis.Redis:
        if self._aredis is None:  # made in the event loop that uses it
            self._aredis = aioredis.Redis.from_url(
                self.settings.redis_url, socket_connect_timeout=self.settings.api_redis_timeout_s
            )
        return self._aredis

    def check_image(self, principal: Principal, ref: S3Ref) -> None:
        principal.check(ref)
        self.client.storage.check_readable(ref)

    def ready(self) -> dict[str, str]:
        checks = {}
        try:
            self.redis.ping()
            checks["redis"] = "ok"
        except (redis.RedisError, OSError) as err:
            checks["redis"] = f"unreachable: {err}"
        if self.settings.broker == self.settings.redis_url:
            checks["broker"] = checks["redis"]
        else:
            try:
                with self.client.celery.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=self.settings.api_redis_timeout_s)
                checks["broker"] = "ok"
            except Exception as err:  # noqa: BLE001  any failure means not ready
                checks["broker"] = f"unreachable: {err}"
        return checks


async def _call(action: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn`` in the thread pool, with Redis and broker faults as ``QueueUnavailable``."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError) as exc:
        raise QueueUnavailable(f"cannot {action}: Redis or the broker is unreachable ({exc})") from exc


async def _json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as err:
        raise ApiError(400, InvalidPayload(f"the body is not JSON: {err}")) from None


def _sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


# --- the app -------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The HTTP API for ``settings`` (no environment is read here)."""
    service = Service(settings)
    app = FastAPI(
        title="segq",
        version="1",
        summary="Image segmentation jobs (SAM 2, DETR panoptic) over HTTP.",
        description="Bearer API keys (SEGQ_API_KEYS); errors are "
        '`{"error": {"code": ..., "message": ...}}` with segq\'s stable codes.',
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service

    # --- errors --------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return segq_error_response(exc.error, exc.status)

    @app.exception_handler(SegqError)
    async def _segq_error(request: Request, exc: SegqError) -> JSONResponse:
        return segq_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(422, InvalidPayload.code, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    # --- auth ---------------------------------------------------------------------------
    async def principal(request: Request) -> Principal:
        host = request.client.host if request.client else None
        header = request.headers.get("authorization")
        return await _call("check the API key's rate limit", service.auth.authenticate, header, host)

    async def job_of(job_id: str, who: Principal) -> JobStatus:
        try:
            check_job_id(job_id)
        except InvalidPayload:
            raise JobNotFound(f"no job {job_id[:80]!r}") from None
        st = await _call(f"read job {job_id}", service.client.status, job_id)
        if st.image:
            who.check(S3Ref.parse(st.image))  # a key sees the jobs on its own prefixes only
        return st

    # --- routes -------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        checks = await run_in_threadpool(service.ready)
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", **checks})
        return error_response(503, QueueUnavailable.code, "not ready: " + "; ".join(
            f"{k} {v}" for k, v in checks.items() if v != "ok"), headers={"Retry-After": "5"})  # fmt: skip

    @app.post("/v1/uploads", response_model=UploadForm, status_code=201, tags=["jobs"], responses=ERRORS)
    async def upload(body: UploadRequest, who: Principal = Depends(principal)) -> UploadForm:
        """A presigned S3 POST for one image: the browser sends it straight to S3, at most
        ``SEGQ_MAX_IMAGE_BYTES``; then name ``image`` in a job."""
        prefixes = list(who.prefixes) if who.prefixes is not None else [
            p for p in settings.allowed_inputs if p != "*"] or [f"s3://{settings.input_bucket}/"]  # fmt: skip
        prefix = body.prefix or prefixes[0]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", body.filename).strip("._") or "image"
        bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
        if not bucket:
            raise ApiError(400, InvalidPayload(f"prefix must be s3://bucket/prefix, got {prefix!r}"))
        key = f"{folder(key_prefix)}{folder(settings.api_upload_prefix)}{uuid.uuid4().hex}/{name}"
        ref = S3Ref(bucket=bucket, key=key)
        service.check_image(who, ref)
        form = await run_in_threadpool(
            service.client.storage.presign_upload, ref, max_bytes=settings.max_image_bytes,
            content_type=body.content_type,
        )  # fmt: skip
        return UploadForm(url=form["url"], fields=form["fields"], image=ref.uri,
                          max_bytes=settings.max_image_bytes, expires_in=settings.presign_ttl_s)  # fmt: skip

    @app.post(
        "/v1/jobs", tags=["jobs"], status_code=201,
        responses={201: {"model": JobStatus, "description": "a new job"},
                   200: {"model": JobStatus, "description": "the job this Idempotency-Key made before"},
                   **ERRORS},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}}}},
    )  # fmt: skip
    async def submit(
        request: Request,
        who: Principal = Depends(principal),
        idempotency_key: Optional[str] = Header(None, max_length=256),
    ) -> JSONResponse:
        """Submit a job (``config.contract.JobRequest``, the contract the worker validates
        with). With an ``Idempotency-Key`` header the same key again answers 200 with the
        first job; the same key with another body is 409."""
        raw = await _json_body(request)
        if isinstance(raw, dict):
            raw.pop("submitted_at", None)
        req = parse_request(raw, max_bytes=settings.max_payload_bytes, max_points=settings.max_points)
        service.check_image(who, req.ref)
        key = None
        if idempotency_key is not None:
            try:
                check_idempotency_key(idempotency_key)
            except InvalidPayload as err:
                raise ApiError(400, err) from None
            # per API key: two users' keys never meet
            key = f"api-{who.id}-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]}"
        job = await _call(
            f"submit a {req.task} job", service.client.submit, req.task, req.image,
            req.prompt.model_dump(exclude_none=True) if req.prompt else None,
            version_id=req.version_id, idempotency_key=key, callback_url=req.callback_url,
            prompts=[p.model_dump(exclude_none=True) for p in req.prompts] if req.prompts else None,
            image_id=req.image_id, **req.options,
        )  # fmt: skip
        st = await _call(f"read job {job.id}", service.client.status, job.id)
        return JSONResponse(
            st.model_dump(mode="json", exclude_none=True),
            status_code=201 if job.created else 200,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True,
             tags=["jobs"], responses=ERRORS)  # fmt: skip
    async def status(job_id: str, who: Principal = Depends(principal)) -> JobStatus:
        return await job_of(job_id, who)

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True,
                tags=["jobs"], responses=ERRORS)  # fmt: skip
    async def cancel(job_id: str, who: Principal = Depends(principal)) -> JobStatus:
        """Cancel a queued job; 409 once it runs or has ended."""
        await job_of(job_id, who)
        return await _call(f"cancel job {job_id}", service.client.cancel, job_id)

    @app.get("/v1/jobs/{job_id}/outputs", response_model=Outputs, tags=["jobs"], responses=ERRORS)
    async def outputs(job_id: str, who: Principal = Depends(principal)) -> Outputs:
        """Presigned GET URLs of a succeeded job's outputs (409 before it succeeded)."""
        st = await job_of(job_id, who)
        if st.state is not JobState.succeeded:
            raise InvalidTransition(
                f"job {job_id} is {st.state.value}: outputs exist once it has succeeded",
                job_id=job_id, state=st.state.value,
            )  # fmt: skip
        urls = await run_in_threadpool(service.client.presigned_urls, job_id)
        return Outputs(job_id=job_id, outputs=urls, expires_in=settings.presign_ttl_s)

    @app.get("/v1/jobs/{job_id}/outputs/{name}", tags=["jobs"], responses=ERRORS,
             response_class=Response)  # fmt: skip
    async def output(job_id: str, name: str, who: Principal = Depends(principal)) -> Response:
        """One output's bytes, for pages served by this API (no S3 CORS needed)."""
        st = await job_of(job_id, who)
        result = st.result or {}
        keys = dict(result.get("outputs", {}))
        if "manifest" in result:
            keys["manifest.json"] = result["manifest"]
        if name not in keys:
            raise JobNotFound(f"job {job_id} has no output {name!r}; it has {sorted(keys)}", job_id=job_id)
        data = await run_in_threadpool(service.client.storage.read_output, keys[name])
        media = {"png": "image/png", "jpg": "image/jpeg", "json": "application/json"}
        return Response(data, media_type=media.get(name.rsplit(".", 1)[-1], "application/octet-stream"),
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses=ERRORS,
             response_class=StreamingResponse)  # fmt: skip
    async def events(job_id: str, who: Principal = Depends(principal)) -> StreamingResponse:
        """Server-Sent Events (``event: status``, data: the job's status JSON): the current
        state first, then each change as the status store publishes it, until a final
        state. Comments keep idle connections open."""
        await job_of(job_id, who)
        pubsub = service.aredis.pubsub()
        t = settings.api_redis_timeout_s
        try:
            await asyncio.wait_for(pubsub.subscribe(events_channel(job_id)), t)
            raw = await asyncio.wait_for(service.aredis.get(status_key(job_id)), t)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            await pubsub.aclose()
            raise QueueUnavailable(f"cannot follow job {job_id}: Redis is unreachable ({exc})") from exc
        if raw is None:
            await pubsub.aclose()
            raise JobNotFound(f"no job {job_id!r}", job_id=job_id)
        return StreamingResponse(
            _stream(pubsub, JobStatus.model_validate_json(raw), service, job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/events/s3", tags=["events"], responses=ERRORS)
    async def s3_events(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        """S3 event notifications (AWS, SNS/SQS envelopes, MinIO's webhook) become jobs by
        ``SEGQ_EVENT_RULES``; every object must be on the key's prefixes. Answers 503 when
        the jobs cannot be submitted now, so the sender delivers again (idempotency makes
        that a duplicate)."""
        event = await _json_body(request)
        try:
            objects = [UploadedObject.from_record(r) for r in s3_records(event)]
        except InvalidPayload as err:
            raise ApiError(400, err) from None
        for obj in objects:
            who.check(S3Ref(bucket=obj.bucket, key=obj.key))
        done = await _call("submit the event's jobs", handle_event, event, service.client,
                           list(settings.event_rules))  # fmt: skip
        return {"outcomes": [o.to_dict() for o in done]}

    # --- docs and the page ------------------------------------------------------------------
    _install_openapi(app)
    _install_docs(app)
    static = resources.files("api_client.http").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text(), headers={"Cache-Control": "no-store"})

    # --- middleware (the last added runs first) -------------------------------------------
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api_cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes,
                       limits={"/v1/events/s3": max(EVENTS_MAX_BODY_BYTES, settings.api_max_body_bytes)})  # fmt: skip
    return app


async def _stream(pubsub: Any, current: JobStatus, service: Service, job_id: str) -> AsyncIterator[bytes]:
    try:
        yield _sse("status", current.model_dump_json(exclude_none=True))
        last = current.updated_at
        if current.is_final:
            return
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=KEEPALIVE_S)
            except (redis.RedisError, OSError) as exc:
                body = {"code": QueueUnavailable.code, "message": f"lost Redis: {exc}"}
                yield _sse("error", json.dumps(body))
                return
            if message is None:
                yield b": keepalive\n\n"
                continue
            st = JobStatus.model_validate_json(message["data"])
            if st.updated_at < last:
                continue  # an older change that arrived after the state we sent first
            last = st.updated_at
            yield _sse("status", st.model_dump_json(exclude_none=True))
            if st.is_final:
                return
    finally:
        try:
            await pubsub.aclose()
        except Exception:  # noqa: BLE001  a connection Redis already dropped
            pass


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Bounds requests: headers to ``MAX_HEADER_BYTES`` (431), bodies (413
    ``payload_too_large``) by Content-Length up front and by counting what arrives for
    chunked ones."""

    def __init__(self, app: Any, limit: int, limits: Optional[dict[str, int]] = None) -> None:
        self.app = app
        self.limit = limit
        self.limits = limits or {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope.get("path", ""), self.limit)
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or [])
        if header_bytes > MAX_HEADER_BYTES:
            response = error_response(431, "headers_too_large",
                                      f"the request headers are over {MAX_HEADER_BYTES} bytes",
                                      headers={"Connection": "close"})  # fmt: skip
            return await response(scope, _no_receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(limit, send)
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(limit, send)

    async def _too_large(self, limit: int, send: Callable) -> None:
        response = error_response(413, PayloadTooLarge.code, f"the request body is over {limit} bytes",
                                  headers={"Connection": "close"})  # fmt: skip
        await response({"type": "http"}, _no_receive, send)  # type: ignore[arg-type]


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document, with ``JobRequest`` (and the prompt it contains) from
    ``config.contract``: one definition for the worker, the clients and this document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                          description=app.description, routes=app.routes)  # fmt: skip
        schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(schema.pop("$defs", {}))
        schema["properties"].pop("submitted_at", None)
        schema["description"] = (
            (schema.get("description") or "") + " `options` are the task's "
            "(config.contract: SegmentOptions, PanopticOptions, CutoutOptions, OverlayOptions)."
        )
        schemas["JobRequest"] = schema
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "an API key (SEGQ_API_KEYS)"}  # fmt: skip
        doc["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package, served from here, so
    it renders without internet; without that package, a plain list of the operations."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs/openapi-3.0.json", include_in_schema=False)
    def openapi_30() -> JSONResponse:
        # The bundled Swagger UI (4.x) renders OpenAPI 3.0 documents only; FastAPI's is
        # 3.1, whose differences (nullable as anyOf null, examples lists) it shows as is.
        return JSONResponse({**app.openapi(), "openapi": "3.0.3"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_path:
            from fastapi.openapi.docs import get_swagger_ui_html

            return get_swagger_ui_html(
                openapi_url="/docs/openapi-3.0.json", title="segq API",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon-32x32.png",
            )  # fmt: skip
        rows = "".join(
            f"<li><code>{m.upper()} {path}</code> {op.get('summary', '')}</li>"
            for path, item in app.openapi()["paths"].items() for m, op in item.items()
        )  # fmt: skip
        return HTMLResponse(f"<!doctype html><title>segq API</title><h1>segq API</h1><ul>{rows}</ul>"
                            '<p><a href="/openapi.json">openapi.json</a></p>')  # fmt: skip
