"""Settings for producers and workers alike, from the environment (prefix ``SEGQ_``).

Everything a deployment changes lives here; code takes a ``Settings`` argument rather
than reading the environment itself, so tests and benchmarks build their own.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SAM2_REPO = "SharpAI/sam2-hiera-tiny-onnx"
DEFAULT_DETR_REPO = "Xenova/detr-resnet-50-panoptic"


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
    s3_region: str = "us-east-1"
    s3_addressing_style: str = Field("path", description="'path' or 'virtual'.")
    input_bucket: str = Field("segq-input", description="Where `segq dev` uploads samples.")
    allowed_inputs: list[str] = Field(
        default_factory=lambda: ["s3://segq-input/"],
        description="URI prefixes jobs may read from; ['*'] allows any bucket.",
    )
    output_bucket: str = "segq-output"
    output_prefix: str = "jobs/"
    presign_ttl_s: int = 3600
    s3_max_attempts: int = Field(6, description="Tries per S3 call on transient faults.")
    s3_connect_timeout_s: float = 5.0
    s3_read_timeout_s: float = 30.0

    # --- models --------------------------------------------------------------------
    sam2_repo: str = DEFAULT_SAM2_REPO
    sam2_encoder_file: str = "encoder.onnx"
    sam2_decoder_file: str = "decoder.onnx"
    sam2_revision: Optional[str] = None
    sam2_dir: Optional[Path] = Field(
        None, description="Local directory with the SAM 2 files instead of a hub repo."
    )
    detr_repo: str = DEFAULT_DETR_REPO
    detr_model_file: str = "onnx/model.onnx"
    detr_config_file: str = "config.json"
    detr_revision: Optional[str] = None
    detr_dir: Optional[Path] = Field(
        None, description="Local directory with the DETR files instead of a hub repo."
    )
    allowed_repos: list[str] = Field(
        default_factory=lambda: [DEFAULT_SAM2_REPO, DEFAULT_DETR_REPO],
        description="Repos a job may name as an override; ['*'] allows any.",
    )
    hf_cache_dir: Optional[Path] = Field(None, description="huggingface_hub cache dir.")
    offline: bool = Field(False, description="Never contact the hub; cache only.")
    load_models: list[str] = Field(
        default_factory=lambda: ["sam2", "detr"],
        description="Models a worker loads before taking work.",
    )

    # --- inference -----------------------------------------------------------------
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="onnxruntime execution providers, in order of preference.",
    )
    intra_op_threads: int = Field(0, description="0 lets onnxruntime choose.")
    inter_op_threads: int = 0
    fp16: bool = False
    embedding_cache_bytes: int = Field(
        1 << 30, description="Bytes of SAM 2 image embeddings kept per worker process."
    )

    # --- limits --------------------------------------------------------------------
    max_image_bytes: int = 64 << 20
    max_image_pixels: int = 100_000_000
    min_image_side: int = 2
    max_points: int = 64
    max_payload_bytes: int = 64 << 10

    # --- worker runtime ------------------------------------------------------------
    soft_time_limit_s: int = 300
    time_limit_s: int = 360
    visibility_timeout_s: int = 3600
    max_deliveries: int = Field(
        3, description="Deliveries of one job before it ends failed/worker_lost."
    )
    max_retries: int = Field(5, description="Retries of a job on transient faults.")
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    pool: str = Field("threads", description="Celery pool: threads, prefork or solo.")
    concurrency: int = 2
    queue_segment: str = "segq.interactive"
    queue_batch: str = "segq.batch"

    # --- observability and integrations ---------------------------------------------
    metrics_port: int = Field(0, description="Prometheus port on the worker; 0 disables.")
    flower_user: str = "segq"
    flower_password: SecretStr = SecretStr("")
    webhook_secret: SecretStr = SecretStr("")
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 5
    event_rules: list[dict] = Field(
        default_factory=list,
        description="S3 upload rules (api_client.events.EventRule as JSON): which new objects "
        "become which jobs.",
    )

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; tests build their own)."""
    return Settings()
