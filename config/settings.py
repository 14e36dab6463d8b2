"""Settings for producers and workers alike, from the environment (prefix ``SEGQ_``).

Everything a deployment changes lives here; code takes a ``Settings`` argument rather
than reading the environment itself, so tests and benchmarks build their own. Only the
entry points (the CLI, ``worker.celery``, the Lambda handler) call ``get_settings()``.

Settings that change what a loaded model computes are tagged ``MODEL`` (``model_settings``):
a worker's model registry is built for one value of them, so a setting that affects models
and is not tagged would let a model outlive the settings it was loaded with (a test checks
that every setting the model layer reads is tagged).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from config.contract import EventRule
from config.errors import InvalidConfig

DEFAULT_SAM2_REPO = "SharpAI/sam2-hiera-tiny-onnx"
DEFAULT_DETR_REPO = "Xenova/detr-resnet-50-panoptic"

MODEL = {"affects": "models"}  # json_schema_extra of the settings a loaded model depends on


class ApiKey(BaseModel):
    """One key of the HTTP API (``SEGQ_API_KEYS``, a JSON list of these): only the SHA-256
    of the key is stored; ``prefixes`` are the ``s3://bucket/prefix`` locations its jobs
    and uploads may use (within ``SEGQ_ALLOWED_INPUTS``), ``rate_per_minute`` its request
    budget. ``segq api-key create`` makes one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prefixes: list[str] = Field(min_length=1)
    rate_per_minute: int = Field(60, ge=1)

    @field_validator("prefixes")
    @classmethod
    def _s3_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("s3://") or not prefix[len("s3://") :].split("/", 1)[0]:
                raise ValueError(f"an API key's prefixes are s3://bucket/prefix, got {prefix!r}")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEGQ_", env_file=None, extra="ignore", validate_default=True
    )

    # --- Redis and the broker ------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Job status store; also the broker unless broker_url is set. "
        "redis://:password@host/0 and rediss:// (TLS) work.",
    )
    broker_url: Optional[str] = Field(
        None, description="Celery broker (e.g. amqp://...); defaults to redis_url."
    )
    status_ttl_s: int = Field(7 * 24 * 3600, description="How long job statuses are kept.")

    # --- S3 ------------------------------------------------------------------------
    s3_endpoint_url: Optional[str] = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS); None for AWS."
    )
    s3_region: str = Field("us-east-1", description="S3 region for signing.")
    s3_addressing_style: str = Field("path", description="'path' or 'virtual'.")
    input_bucket: str = Field("segq-input", description="Where `segq dev` uploads samples.")
    allowed_inputs: list[str] = Field(
        default_factory=lambda: ["s3://segq-input/"],
        description="URI prefixes jobs may read from; ['*'] allows any bucket.",
    )
    output_bucket: str = Field("segq-output", description="Bucket jobs write their outputs to.")
    output_prefix: str = Field(
        "jobs/", description="Key prefix of outputs; each job writes under PREFIX/JOB_ID/."
    )
    presign_ttl_s: int = Field(3600, description="Lifetime of presigned output URLs, seconds.")
    s3_max_attempts: int = Field(6, description="Tries per S3 call on transient faults.")
    s3_connect_timeout_s: float = Field(5.0, description="S3 connect timeout, seconds.")
    s3_read_timeout_s: float = Field(30.0, description="S3 read timeout, seconds.")

    # --- models --------------------------------------------------------------------
    sam2_repo: str = Field(
        DEFAULT_SAM2_REPO, description="Hub repo of the SAM 2 ONNX export.", json_schema_extra=MODEL
    )
    sam2_encoder_file: str = Field(
        "encoder.onnx", description="Encoder file in the SAM 2 repo.", json_schema_extra=MODEL
    )
    sam2_decoder_file: str = Field(
        "decoder.onnx", description="Decoder file in the SAM 2 repo.", json_schema_extra=MODEL
    )
    sam2_revision: Optional[str] = Field(
        None,
        description="Pin the SAM 2 repo to a revision (commit, tag, branch).",
        json_schema_extra=MODEL,
    )
    sam2_dir: Optional[Path] = Field(
        None,
        description="Local directory with the SAM 2 files instead of a hub repo.",
        json_schema_extra=MODEL,
    )
    detr_repo: str = Field(
        DEFAULT_DETR_REPO,
        description="Hub repo of the DETR-panoptic ONNX export.",
        json_schema_extra=MODEL,
    )
    detr_model_file: str = Field(
        "onnx/model.onnx", description="Model file in the DETR repo.", json_schema_extra=MODEL
    )
    detr_config_file: str = Field(
        "config.json",
        description="config.json (id2label) in the DETR repo.",
        json_schema_extra=MODEL,
    )
    detr_revision: Optional[str] = Field(
        None, description="Pin the DETR repo to a revision.", json_schema_extra=MODEL
    )
    detr_dir: Optional[Path] = Field(
        None,
        description="Local directory with the DETR files instead of a hub repo.",
        json_schema_extra=MODEL,
    )
    allowed_repos: list[str] = Field(
        default_factory=lambda: [DEFAULT_SAM2_REPO, DEFAULT_DETR_REPO],
        description="Repos a job may name as an override; ['*'] allows any.",
        json_schema_extra=MODEL,
    )
    hf_cache_dir: Optional[Path] = Field(
        None, description="huggingface_hub cache dir.", json_schema_extra=MODEL
    )
    offline: bool = Field(
        False, description="Never contact the hub; cache only.", json_schema_extra=MODEL
    )
    load_models: list[str] = Field(
        default_factory=lambda: ["sam2", "detr"],
        description="Models a worker loads before taking work.",
    )

    # --- inference -----------------------------------------------------------------
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference.",
        json_schema_extra=MODEL,
    )
    intra_op_threads: int = Field(
        0,
        description="onnxruntime intra-op threads per model call; 0 lets onnxruntime choose "
        "(all cores). With SEGQ_CONCURRENCY above 1 on a CPU, cores / concurrency keeps "
        "concurrent jobs from oversubscribing it.",
        json_schema_extra=MODEL,
    )
    inter_op_threads: int = Field(
        0, description="onnxruntime inter-op threads; 0 lets it choose.", json_schema_extra=MODEL
    )
    detr_mask_chunk: int = Field(
        10,
        ge=0,
        description="Queries per run of DETR's mask head: the file is cut at load time and "
        "its mask head run this many queries at a time, with the whole file's outputs bit "
        "for bit (checked on a probe at load; a file that cannot be cut runs whole). Keeps "
        "DETR's memory at 0.8 GB instead of 3.1 GB at the same speed; 0 runs the file whole.",
        json_schema_extra=MODEL,
    )
    fp16: bool = Field(
        False,
        description="Run the models in float16 (CUDA provider only; converted at load).",
        json_schema_extra=MODEL,
    )
    fast_jpeg_decode: bool = Field(
        False,
        description="Decode JPEGs for segment and panoptic at libjpeg's 1/2, 1/4 or 1/8 scale "
        "when that still covers the model input: faster on large photos, model input within "
        "1 level of 255 at p99 of a full decode. Cutouts and overlays always decode in full.",
    )
    embedding_cache_bytes: int = Field(
        1 << 30, description="Bytes of SAM 2 image embeddings kept per worker process."
    )

    # --- limits --------------------------------------------------------------------
    max_image_bytes: int = Field(64 << 20, description="Largest input object read, bytes.")
    max_image_pixels: int = Field(
        100_000_000,
        description="Largest image (width x height) decoded; bigger is image_too_large. "
        "Pillow itself opens at most 2 x PIL.Image.MAX_IMAGE_PIXELS (about 179 MP).",
    )
    min_image_side: int = Field(2, description="Smallest accepted side, pixels.")
    max_points: int = Field(64, description="Most prompt points per job.")
    max_payload_bytes: int = Field(64 << 10, description="Largest job message, bytes.")

    # --- worker runtime ------------------------------------------------------------
    soft_time_limit_s: int = Field(300, description="A job running longer fails with code timeout.")
    time_limit_s: int = Field(360, description="Hard limit: the job's worker process is replaced.")
    visibility_timeout_s: int = Field(
        3600,
        description="Redis broker: an unacknowledged job is redelivered after this; must exceed time_limit_s.",
    )
    max_deliveries: int = Field(
        3, description="Deliveries of one job before it ends failed/worker_lost."
    )
    retry_budget_s: float = Field(
        900.0,
        description="How long a job keeps being retried through transient faults (S3, "
        "Redis, the broker) before it fails; outages shorter than this lose nothing.",
    )
    retry_backoff_s: float = Field(
        1.0, description="First retry delay for transient faults (exponential, full jitter)."
    )
    retry_backoff_max_s: float = Field(30.0, description="Cap on one retry delay.")
    worker_heartbeat_ttl_s: float = Field(
        15.0,
        description="A worker whose heartbeat is older than this is taken for dead: jobs "
        "stop being routed to it and its unfinished jobs go back to the queues.",
    )
    pool: str = Field("threads", description="Celery pool: threads, prefork or solo.")
    concurrency: int = Field(
        1,
        description="Jobs run at once per worker process (see Performance: on a CPU one job "
        "on all cores matches two on one core each in throughput, at 40% less latency).",
    )
    queue_interactive: str = Field(
        "segq.interactive", description="Queue of interactive jobs (segment, cutout)."
    )
    queue_batch: str = Field("segq.batch", description="Queue of batch jobs (panoptic, overlay).")
    affinity: bool = Field(
        True,
        description="Embedding affinity: each worker also consumes a queue of its own and "
        "says which images' embeddings it holds; producers send SAM jobs on a held image to "
        "its holder, and concurrent cold jobs on one image encode it once (an encode lease). "
        "Off: any worker takes any job.",
    )
    encode_lease_s: float = Field(
        30.0,
        description="How long a worker's claim to encode an image lasts (it ends at once when "
        "the encode does); others wait for that embedding at most this long, and a claim "
        "whose worker died is void as soon as its heartbeat expires.",
    )

    # --- observability and integrations ---------------------------------------------
    metrics_port: int = Field(0, description="Prometheus port on the worker; 0 disables.")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="HMAC-SHA256 key signing webhook bodies (X-Segq-Signature)."
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow callbacks to loopback/private addresses (tests, trusted networks).",
    )
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST, seconds.")
    webhook_max_attempts: int = Field(
        5, description="Tries per webhook delivery (backoff between them)."
    )
    event_rules: list[EventRule] = Field(
        default_factory=list,
        description="S3 upload rules (config.contract.EventRule as JSON): which new objects "
        "become which jobs.",
    )

    # --- the HTTP API (segq api) -----------------------------------------------------------
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="HTTP API keys as JSON (sha256, prefixes, rate_per_minute; `segq api-key "
        "create` prints one). Empty: the API is open, and `segq api` serves loopback only.",
    )
    api_cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose pages may call the HTTP API (CORS); ['*'] allows any.",
    )
    api_max_body_bytes: int = Field(
        64 << 10, description="Largest HTTP API request body, bytes (larger is 413)."
    )
    api_redis_timeout_s: float = Field(
        1.5,
        description="How long an HTTP API request waits for Redis or the broker before it "
        "answers 503 (the Python client waits ~17 s instead).",
    )
    api_upload_prefix: str = Field(
        "uploads/",
        description="Key prefix, under a key's allowed prefix, of uploads made through "
        "POST /v1/uploads.",
    )

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def queues(self) -> list[str]:
        """Every queue segq routes jobs to."""
        return [self.queue_interactive, self.queue_batch]

    def model_settings(self) -> dict[str, Any]:
        """The settings a loaded model depends on (tagged ``MODEL``), as one comparable value."""
        return {
            name: getattr(self, name)
            for name, field in type(self).model_fields.items()
            if field.json_schema_extra == MODEL
        }

    def to_env(self) -> dict[str, str]:
        """The ``SEGQ_*`` environment that gives another process these settings (secrets
        included in clear: it is for that process's environment, never for a log)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, (list, dict, bool)):
                env[f"SEGQ_{name.upper()}"] = json.dumps(value, default=_plain)
            else:
                env[f"SEGQ_{name.upper()}"] = str(value)
        return env


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process's environment, for entry points (cached). A malformed
    value is ``InvalidConfig`` naming the variable, not a pydantic traceback."""
    try:
        return Settings()
    except (ValidationError, SettingsError) as err:
        raise InvalidConfig(f"the SEGQ_* settings are invalid: {_describe(err)}") from None


def _describe(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(
            f"SEGQ_{str(e['loc'][0]).upper()}"
            + (f"[{']['.join(map(str, e['loc'][1:]))}]" if len(e["loc"]) > 1 else "")
            + f": {e['msg']}"
            for e in err.errors()[:5]
        )
    return f"{err}: {err.__cause__}" if err.__cause__ else str(err)
