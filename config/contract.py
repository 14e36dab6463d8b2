"""The job contract producers and workers share: task and queue names, payload and
status schemas, Redis key and S3 key layout. Defined once, imported by both sides.

A message on the queue is one JSON object (``JobRequest``), never image bytes: the image
is an ``s3://`` reference. Every field is validated strictly: a string where a number
belongs, a NaN coordinate or an option the task does not know is an ``invalid_*`` error
with a message that names the field, not a crash deep inside the worker.
"""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.errors import (
    InvalidPayload,
    InvalidPrompt,
    PayloadTooLarge,
    PromptOutOfBounds,
    SegqError,
    UnknownOption,
    UnknownTask,
)

# --- names -----------------------------------------------------------------------------

TASK_SEGMENT = "segq.segment"
TASK_PANOPTIC = "segq.panoptic"
TASK_CUTOUT = "segq.cutout"
TASK_OVERLAY = "segq.overlay"
TASKS = (TASK_SEGMENT, TASK_PANOPTIC, TASK_CUTOUT, TASK_OVERLAY)
SHORT_NAMES = {t.split(".", 1)[1]: t for t in TASKS}

STATUS_KEY = "segq:job:{job_id}"
IDEMPOTENCY_KEY = "segq:idem:{key}"
# sha256 of the request an idempotency key was first used with (beside IDEMPOTENCY_KEY,
# written in the same transaction), so the same key with another request is a conflict
IDEMPOTENCY_FINGERPRINT_KEY = "segq:idemfp:{key}"
# every status change of a job is published here (StatusStore._transition), for the HTTP
# API's Server-Sent Events
EVENTS_CHANNEL = "segq:events:{job_id}"
CANCELLED_SET = "segq:cancelled"


# Job ids become Redis key suffixes and S3 key segments, idempotency keys Redis key
# suffixes: both plain, printable and bounded.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces


def check_job_id(job_id: object) -> str:
    """``job_id`` if it is 1-128 letters, digits, '-' or '_'; ``InvalidPayload`` otherwise."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidPayload(f"job ids are 1-128 letters, digits, '-' or '_'; got {job_id!r:.80}")
    return job_id


def check_idempotency_key(key: object) -> str:
    """``key`` if it is 1-256 printable ASCII characters without spaces."""
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidPayload(
            f"idempotency keys are 1-256 printable ASCII characters without spaces; got {key!r:.80}"
        )
    return key


# ``refine`` names an earlier job, and for a job of several prompts which one: "<job id>"
# or "<job id>:<prompt index>".
_REFINE = re.compile(r"([A-Za-z0-9_-]{1,128})(?::(\d{1,4}))?")

# SAM jobs: the tasks whose prompts run on an image embedding (overlay only with a prompt).
SAM_TASKS = (TASK_SEGMENT, TASK_CUTOUT, TASK_OVERLAY)
MAX_PROMPTS = 32  # prompts in one job (one batched decoder call)


def task_name(name: str) -> str:
    """``"segment"`` or ``"segq.segment"`` -> ``"segq.segment"``; anything else is an error."""
    full = SHORT_NAMES.get(name, name)
    if full not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; expected one of {', '.join(SHORT_NAMES)}")
    return full


def status_key(job_id: str) -> str:
    return STATUS_KEY.format(job_id=job_id)


def events_channel(job_id: str) -> str:
    return EVENTS_CHANNEL.format(job_id=job_id)


def folder(prefix: str) -> str:
    """A key prefix as a folder: ``uploads`` covers ``uploads/x``, never ``uploads-evil/x``."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def output_key(prefix: str, job_id: str, name: str) -> str:
    """Where a job's output ``name`` lives: one folder per job id, so a retried job
    overwrites its own outputs and nothing else."""
    return f"{folder(prefix)}{job_id}/{name}"


# --- S3 references ---------------------------------------------------------------------


class S3Ref(BaseModel):
    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    version_id: Optional[str] = None

    @classmethod
    def parse(cls, uri: str, version_id: Optional[str] = None) -> "S3Ref":
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise InvalidPayload(f"image must be an s3://bucket/key URI, got {uri!r}")
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise InvalidPayload(f"image URI {uri!r} needs both a bucket and a key")
        if "?versionId=" in key:
            key, _, version_id = key.partition("?versionId=")
        return cls(bucket=bucket, key=key, version_id=version_id)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.uri


# --- prompts ---------------------------------------------------------------------------

Coord = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Point = tuple[Coord, Coord]


class Prompt(BaseModel):
    """A SAM prompt in the pixels of the displayed image (EXIF orientation applied).

    JSON forms: ``null`` (centre), ``{"point": [x, y]}``, ``{"points": [[x, y], ...],
    "labels": [1, 0, ...]}``, ``{"box": [x, y, w, h]}``, or a box plus points.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    point: Optional[Point] = None
    points: Optional[list[Point]] = None
    labels: Optional[list[Literal[0, 1]]] = None
    box: Optional[tuple[Coord, Coord, Coord, Coord]] = None
    refine: Optional[str] = Field(
        None,
        description="An earlier job on the same image (\"<job id>\", or \"<job id>:<i>\" for "
        "the i-th prompt of a job of several) whose best low-resolution mask logits go to "
        "SAM's decoder as its mask input, as SAM's predictor does for iterative clicks.",
    )

    @model_validator(mode="after")
    def _check(self) -> "Prompt":
        if self.refine is not None:
            if not isinstance(self.refine, str) or not _REFINE.fullmatch(self.refine):
                raise ValueError(
                    f"'refine' names a job: \"<job id>\" or \"<job id>:<prompt index>\"; "
                    f"got {self.refine!r:.80}"
                )
            if self.point is None and not self.points and self.box is None:
                raise ValueError("'refine' needs the new click: a point, points or a box")
        if self.point is not None and self.points is not None:
            raise ValueError("give either 'point' or 'points', not both")
        if self.labels is not None:
            n = 1 if self.point is not None else len(self.points or [])
            if len(self.labels) != n:
                raise ValueError(f"'labels' has {len(self.labels)} entries for {n} points")
        if self.points is not None and len(self.points) == 0 and self.box is None:
            raise ValueError("'points' is empty; give at least one point or a box")
        if self.box is not None and (self.box[2] <= 0 or self.box[3] <= 0):
            raise ValueError(f"box width and height must be positive, got {list(self.box)}")
        return self

    @property
    def all_points(self) -> list[tuple[float, float]]:
        if self.point is not None:
            return [tuple(self.point)]
        return [tuple(p) for p in self.points or []]

    @property
    def all_labels(self) -> list[int]:
        pts = self.all_points
        return list(self.labels) if self.labels is not None else [1] * len(pts)

    @property
    def is_empty(self) -> bool:
        return not self.all_points and self.box is None

    @property
    def refine_key(self) -> Optional[tuple[str, int]]:
        """``(job id, prompt index)`` of the mask this prompt refines, or None."""
        if self.refine is None:
            return None
        m = _REFINE.fullmatch(self.refine)
        assert m is not None  # checked at validation
        return m.group(1), int(m.group(2) or 0)

    def check_bounds(self, width: int, height: int) -> None:
        """Reject prompts that fall outside a ``width`` x ``height`` image."""
        for x, y in self.all_points:
            if not (0 <= x <= width and 0 <= y <= height):
                raise PromptOutOfBounds(
                    f"point ({x:g}, {y:g}) is outside the {width}x{height} image",
                    width=width,
                    height=height,
                )
        if self.box is not None:
            x, y, w, h = self.box
            if x < 0 or y < 0 or x + w > width or y + h > height:
                raise PromptOutOfBounds(
                    f"box [{x:g}, {y:g}, {w:g}, {h:g}] (x, y, width, height) goes outside "
                    f"the {width}x{height} image",
                    width=width,
                    height=height,
                )


# --- options ---------------------------------------------------------------------------

Score = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]
Flag = Annotated[bool, Field(strict=True)]
MaskFormat = Literal["png", "rle"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    revision: Optional[str] = None


class SegmentOptions(_Options):
    multimask: Flag = False
    min_score: Optional[Score] = None
    mask_formats: list[MaskFormat] = Field(default_factory=lambda: ["png", "rle"])
    repo: Optional[str] = None
    encoder_file: Optional[str] = None
    decoder_file: Optional[str] = None


class PanopticOptions(_Options):
    min_score: Optional[Score] = None
    threshold: Score = 0.5
    mask_threshold: Score = 0.5
    overlap_threshold: Score = 0.8
    mask_formats: list[MaskFormat] = Field(default_factory=lambda: ["png", "rle"])
    repo: Optional[str] = None
    model_file: Optional[str] = None


class CutoutOptions(SegmentOptions):
    crop: Flag = False


class OverlayOptions(PanopticOptions):
    alpha: Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)] = 0.5
    outline: Flag = False
    format: Literal["png", "jpeg"] = "png"
    masks: Optional[list[str]] = Field(
        None, description="s3:// URIs of mask PNGs to draw instead of running a model."
    )
    # overlay of a SAM prompt's masks instead of panoptic segments
    multimask: Flag = False
    encoder_file: Optional[str] = None
    decoder_file: Optional[str] = None


OPTIONS_BY_TASK: dict[str, type[_Options]] = {
    TASK_SEGMENT: SegmentOptions,
    TASK_PANOPTIC: PanopticOptions,
    TASK_CUTOUT: CutoutOptions,
    TASK_OVERLAY: OverlayOptions,
}

AnyOptions = Union[SegmentOptions, PanopticOptions, CutoutOptions, OverlayOptions]


class JobRequest(BaseModel):
    """One job as it travels on the queue (the single positional argument of a task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    image: str
    version_id: Optional[str] = None
    image_id: Optional[str] = Field(
        None,
        max_length=256,
        description="The caller's own name for the image's content (a database id, a "
        "content hash): routes prompts on it to the worker holding its embedding.",
    )
    prompt: Optional[Prompt] = None
    prompts: Optional[list[Prompt]] = None
    options: dict[str, Any] = Field(default_factory=dict)
    callback_url: Optional[str] = None
    submitted_at: float = Field(default_factory=time.time)

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return task_name(v)

    @model_validator(mode="after")
    def _one_kind_of_prompt(self) -> "JobRequest":
        if self.prompts is not None:
            if self.prompt is not None:
                raise ValueError("give either 'prompt' or 'prompts', not both")
            if self.task not in (TASK_SEGMENT, TASK_OVERLAY):
                raise ValueError(f"'prompts' (several prompts in one job) is for segment and overlay, not {self.task}")
            if not 1 <= len(self.prompts) <= MAX_PROMPTS:
                raise ValueError(f"'prompts' holds 1 to {MAX_PROMPTS} prompts, got {len(self.prompts)}")
        return self

    @property
    def ref(self) -> S3Ref:
        return S3Ref.parse(self.image, self.version_id)

    @property
    def uses_sam(self) -> bool:
        """Whether the job runs SAM 2 on the image's embedding (overlay: only with prompts)."""
        if self.task == TASK_OVERLAY:
            return (self.prompt is not None or self.prompts is not None) and not self.options.get("masks")
        return self.task in SAM_TASKS

    @property
    def affinity_id(self) -> str:
        """The image's identity for embedding affinity: the caller's ``image_id`` when it
        gave one, else the S3 URI with its version id (the same object, the same pixels)."""
        if self.image_id:
            return f"id:{self.image_id}"
        ref = self.ref
        return f"{ref.uri}?versionId={ref.version_id}" if ref.version_id else ref.uri

    def typed_options(self) -> AnyOptions:
        return parse_options(self.task, self.options)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        # a validator's own ValueError already reads as a sentence; pydantic prefixes "Value error, "
        msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_options(task: str, options: dict[str, Any] | None) -> AnyOptions:
    model = OPTIONS_BY_TASK[task_name(task)]
    try:
        return model.model_validate(options or {})
    except ValidationError as e:
        extra = [".".join(map(str, x["loc"])) for x in e.errors() if x["type"] == "extra_forbidden"]
        if extra:
            known = ", ".join(sorted(model.model_fields))
            raise UnknownOption(
                f"unknown option(s) {', '.join(extra)} for {task}; known: {known}"
            ) from None
        raise InvalidPayload(f"bad options for {task}: {_describe(e)}") from None


def parse_prompt(raw: Any, *, max_points: int) -> Optional[Prompt]:
    """A ``Prompt`` from its JSON form (or as it is), with at most ``max_points`` points;
    ``InvalidPrompt`` saying what is wrong otherwise. The one place the point limit is
    checked, for queued jobs and in-process calls alike."""
    if raw is None:
        return None
    if not isinstance(raw, Prompt):
        try:
            raw = Prompt.model_validate(raw)
        except ValidationError as e:
            raise InvalidPrompt(f"malformed prompt: {_describe(e)}") from None
    if len(raw.all_points) > max_points:
        raise InvalidPrompt(f"{len(raw.all_points)} points is over the limit of {max_points}")
    return raw


def parse_request(raw: Any, *, max_bytes: int, max_points: int) -> JobRequest:
    """Validate a message body (dict or JSON text) into a ``JobRequest``, or raise a
    ``SegqError`` whose code says what is wrong."""
    if isinstance(raw, (str, bytes)):
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"payload is {len(raw)} bytes, over the {max_bytes} limit")
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise InvalidPayload(f"payload is not JSON: {e}") from None
    elif isinstance(raw, dict):
        size = len(json.dumps(raw, default=str))
        if size > max_bytes:
            raise PayloadTooLarge(f"payload is {size} bytes, over the {max_bytes} limit")
    if not isinstance(raw, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    prompt = parse_prompt(raw.pop("prompt", None), max_points=max_points)
    fields: dict[str, Any] = {**raw, "prompt": prompt}
    if "prompts" in raw and raw["prompts"] is not None:
        many = raw["prompts"]
        if not isinstance(many, list) or not all(isinstance(p, (dict, Prompt)) for p in many):
            raise InvalidPrompt("'prompts' must be a list of prompt objects")
        fields["prompts"] = [parse_prompt(p, max_points=max_points) for p in many]
    try:
        req = JobRequest.model_validate(fields)
    except ValidationError as e:
        extra = [".".join(map(str, x["loc"])) for x in e.errors() if x["type"] == "extra_forbidden"]
        if extra:
            raise UnknownOption(f"unknown field(s) in payload: {', '.join(extra)}") from None
        for x in e.errors():
            if x["loc"] and x["loc"][0] == "task":
                raise UnknownTask(str(x.get("ctx", {}).get("error", x["msg"]))) from None
            if x["type"] == "value_error" and "'prompts'" in str(x.get("ctx", {}).get("error", "")):
                raise InvalidPrompt(str(x["ctx"]["error"])) from None
        raise InvalidPayload(f"bad payload: {_describe(e)}") from None
    req.ref  # noqa: B018  validates the URI
    req.typed_options()
    return req


# --- upload-event rules ------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".avif")


class EventRule(BaseModel):
    """New objects in ``bucket`` under ``prefix`` with one of ``suffixes`` (compared
    case-insensitively) become ``task`` jobs with this prompt and these options
    (``SEGQ_EVENT_RULES``, a JSON list of these)."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=1)
    prefix: str = ""
    suffixes: list[str] = Field(default_factory=lambda: list(IMAGE_SUFFIXES))
    task: str
    prompt: Optional[dict[str, Any]] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _a_valid_job(self) -> "EventRule":
        # The job contract is the judge: a rule that could only make invalid jobs is
        # refused when the settings load, not once per upload.
        try:
            sample = parse_request(
                {"task": self.task, "image": f"s3://{self.bucket}/{self.prefix}example.jpg",
                 "prompt": self.prompt, "options": self.options},
                max_bytes=1 << 20, max_points=1 << 10,
            )  # fmt: skip
        except SegqError as err:
            raise ValueError(str(err)) from None
        self.task = sample.task
        self.suffixes = [s.lower() for s in self.suffixes]
        return self

    def matches_location(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix)

    def matches_suffix(self, key: str) -> bool:
        return key.lower().endswith(tuple(self.suffixes))


# --- status ----------------------------------------------------------------------------


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    def __str__(self) -> str:  # print(status.state) says "succeeded", not "JobState.succeeded"
        return self.value

    @property
    def is_final(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobErrorInfo(BaseModel):
    code: str
    message: str
    details: Optional[dict[str, Any]] = None


class JobStatus(BaseModel):
    """One job's record in Redis (JSON under ``segq:job:{id}``, with a TTL)."""

    job_id: str
    task: str
    state: JobState
    image: Optional[str] = None
    created_at: float
    updated_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    attempts: int = 0  # runs started: deliveries, retries and handovers together
    handovers: int = 0  # runs that passed the job to the worker holding its image's embedding
    retrying_since: Optional[float] = None  # first transient fault of the current run of retries
    worker: Optional[str] = None
    stage: Optional[str] = None
    result: Optional[dict[str, Any]] = None
    error: Optional[JobErrorInfo] = None
    timings: dict[str, float] = Field(default_factory=dict)
    webhook: Optional[dict[str, Any]] = None

    @property
    def is_final(self) -> bool:
        return self.state.is_final

