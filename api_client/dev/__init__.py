"""``segq dev``: the whole stack on this machine in one command.

Starts Redis and an S3 server (``weed mini``) on free loopback ports, a worker, Flower
(with basic auth) and the HTTP API with its try-it page (``segq api``, open on loopback),
uploads a sample photo, runs all four job types on it, prints each status and presigned
URLs of the outputs, saves the outputs under ``segq-dev-output/``, prints the page's URL,
and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from api_client.dev.localstack import free_ports
from api_client.dev.processes import WorkerProcess, stop_process
from config.errors import SegqError
from config.settings import Settings, get_settings

OUTPUT_DIR = Path("segq-dev-output")


def _say(text: str) -> None:
    print(text, flush=True)


def sample_image() -> bytes:
    return resources.files("api_client").joinpath("assets/sample.jpg").read_bytes()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so a machine without internet learns it in
    seconds rather than after huggingface_hub's own retries."""
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _model_env(settings: Settings) -> dict[str, str]:
    """``SEGQ_OFFLINE=true`` when the models would come from a hub that cannot be reached:
    the cache may still have them, and then nothing waits on huggingface_hub's retries."""
    needs_hub = not (settings.sam2_dir and settings.detr_dir) and not settings.offline
    return {"SEGQ_OFFLINE": "true"} if needs_hub and not _hub_reachable() else {}


def _check_models(env: dict[str, str]) -> Optional[str]:
    """Fetch (or find cached) the model files before starting anything, with the worker's
    own `segq download-models`, so an offline machine gets one clear line instead of a
    worker's stack trace. None when they are there, else what is wrong."""
    done = subprocess.run(
        [sys.executable, "-m", "api_client.cli", "download-models"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else f"segq download-models exited with {done.returncode}"
    return re.sub(r"^segq: (\[[a-z_]+\] )?", "", last)


def run_dev(
    *,
    image: Optional[str] = None,
    keep_running: bool = True,
    workdir: Optional[str] = None,
    output_dir: Path = OUTPUT_DIR,
) -> int:
    import boto3

    from api_client.dev.localstack import RedisServer, S3Server

    base = get_settings()
    model_env = _model_env(base)
    problem = _check_models({**os.environ, **model_env})
    if problem:
        _say(f"segq dev: the models are not available: {problem}")
        return 2

    data = Path(image).read_bytes() if image else sample_image()
    name = Path(image).name if image else "sample.jpg"
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="segq-dev-"))
    root.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "segq-dev", secrets.token_hex(16)
    flower_password = secrets.token_urlsafe(12)

    with ExitStack() as stack:
        if not workdir:
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        _say("starting Redis and S3 (weed mini) on loopback ...")
        redis = stack.enter_context(RedisServer(data_dir=root / "redis"))
        s3 = stack.enter_context(
            S3Server(access_key=access_key, secret_key=secret_key, data_dir=root / "s3")
        )
        # What another shell needs to reach this stack: the children get it, and it is
        # printed at the end; this process keeps its own environment.
        stack_env = {
            **s3.env(),
            "SEGQ_REDIS_URL": redis.url,
            "SEGQ_ALLOWED_INPUTS": '["s3://segq-input/"]',
        }
        env = {**os.environ, **stack_env, "PYTHONUNBUFFERED": "1"}
        settings = base.model_copy(
            update={
                "redis_url": redis.url,
                "s3_endpoint_url": s3.endpoint_url,
                "s3_region": s3.region,
                "allowed_inputs": ["s3://segq-input/"],
                "offline": base.offline or bool(model_env),
            }
        )

        from api_client.client import SegmentationClient
        from config.storage import Storage

        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
        client = SegmentationClient(settings, storage=Storage(settings, session=session))
        client.storage.ensure_buckets([settings.input_bucket, settings.output_bucket])

        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        _say("starting a worker (models load before it takes work) ...")
        worker = WorkerProcess(
            settings, logs, pool=settings.pool, concurrency=settings.concurrency, name="segq-dev",
            host="%h", extra_env=stack_env,
        )  # fmt: skip
        worker.start(wait=False)
        stack.callback(worker.terminate, 15)
        flower_port = free_ports(1)[0]
        with open(logs / "flower.log", "wb") as flower_log:
            flower = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery:app", "flower",
                 f"--port={flower_port}", "--address=127.0.0.1",
                 f"--basic-auth=segq:{flower_password}"],
                env=env, stdout=flower_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(stop_process, flower)
        api_port = _api_port()
        with open(logs / "api.log", "wb") as api_log:
            api = subprocess.Popen(
                [sys.executable, "-m", "api_client.cli", "api", "--host", "127.0.0.1",
                 "--port", str(api_port), "--log-level", "warning"],
                env={**env, "SEGQ_API_KEYS": "[]"}, stdout=api_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        stack.callback(stop_process, api)
        api_url = f"http://127.0.0.1:{api_port}"

        if not _wait_ready(worker):
            return 1

        uri = client.upload(data, f"samples/{name}", content_type="image/jpeg")
        _say(f"uploaded {name} to {uri}\n")
        jobs = {
            "segment": client.segment(uri, None, multimask=True),
            "panoptic": client.panoptic(uri),
            "cutout": client.cutout(uri, None),
            "overlay": client.overlay(uri),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        failures = 0
        for kind, job in jobs.items():
            try:
                st = job.wait(timeout=600)
            except SegqError as err:
                failures += 1
                _say(f"{kind:9s} {job.id}  FAILED  {err}")
                continue
            took = st.finished_at - st.created_at if st.finished_at else 0.0
            _say(f"{kind:9s} {job.id}  {st.state.value} in {took:.1f}s  {_summary(st.result or {})}")
            for out_name, url in job.urls().items():
                if out_name != "manifest.json":
                    local = output_dir / f"{kind}-{out_name}"
                    local.write_bytes(job.output(out_name))
                    _say(f"    {out_name}: {local}\n      {url}")
        _say(f"\nFlower: http://127.0.0.1:{flower_port}  (user segq, password {flower_password})")
        if _wait_api(api, api_url):
            _say(f"HTTP API and the try-it page: {api_url}/  (API docs: {api_url}/docs)")
        else:
            failures += 1
            _say(f"segq dev: the HTTP API did not start; see {logs / 'api.log'}")
        exports = " ".join(
            f"{k}={shlex.quote(v)}" for k, v in sorted({**stack_env, "SEGQ_API_URL": api_url}.items())
        )
        _say(f"other shells reach this stack with:\n  export {exports}")
        if keep_running and failures == 0:
            _say("the stack keeps running; Ctrl-C stops everything it started")
            try:
                while worker.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                _say("\nstopping ...")
        return 1 if failures else 0


def _api_port() -> int:
    """8000 when it is free (the URL the README shows), else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
            return 8000
        except OSError:
            return free_ports(1)[0]


def _wait_api(proc: subprocess.Popen, url: str, timeout: float = 60) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            time.sleep(0.2)
    return False


def _wait_ready(worker: WorkerProcess, timeout: float = 300) -> bool:
    try:
        report = worker.wait_ready(timeout)
    except (RuntimeError, TimeoutError) as err:
        _say(f"segq dev: the worker did not start: {err}")
        return False
    _say(f"worker ready: {report.get('providers')}, models loaded in {report.get('load_seconds')}s")
    return True


def _summary(result: dict) -> str:
    if "masks" in result:
        return "masks: " + ", ".join(f"score {m['score']:.2f} area {m['area']}" for m in result["masks"])
    if "segments" in result:
        labels = [s.get("label", f"#{s.get('index')}") for s in result["segments"]]
        return f"{len(labels)} segments: {', '.join(map(str, labels[:8]))}"
    if "cutout" in result:
        return f"cutout {result.get('cutout_size')}"
    return ""
