"""The benchmark's own machinery on the tiny test models: it runs every job type beside the
raw calls it compares them with, makes camera-like photos, and hands a worker subprocess
exactly the settings it was given. (The real figures need the full-size models: see
bench/README.md.)"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import onnxruntime as ort
from PIL import Image

from bench.pipeline import JOBS, bench_pipelines, photo_jpeg
from bench.run import format_pipelines, gpu_status, main
from config import Settings


def test_pipelines_run_beside_their_raw_calls(sam2_repo, detr_repo) -> None:
    settings = Settings(sam2_dir=sam2_repo, detr_dir=detr_repo, providers=["CPUExecutionProvider"])
    report = bench_pipelines(settings, rounds=1, sizes={"small": (320, 240)})
    size = report["sizes"]["small"]
    assert set(size["jobs"]) == set(JOBS)
    assert {"encoder", "decoder", "sam2", "detr"} <= set(size["raw_ms"])
    for job in size["jobs"].values():
        assert job["ratio_to_raw"] > 0 and job["total_ms"] > 0
        assert job["stages_ms"]["decode"] >= 0
    assert size["image"]["detr_input"] == [1066, 800]
    assert size["reprompt"]["cached_ms"] > 0
    assert "small" in format_pipelines(report)


def test_photos_are_camera_like() -> None:
    data = photo_jpeg(640, 480)
    assert Image.open(io.BytesIO(data)).size == (640, 480)
    # sensor grain: a flat or smooth picture compresses to a fraction of this at quality 90
    assert len(data) / (640 * 480) > 0.15


def test_a_worker_gets_exactly_the_settings_made_here(tmp_path) -> None:
    settings = Settings(
        sam2_dir=tmp_path,
        providers=["CPUExecutionProvider"],
        intra_op_threads=3,
        concurrency=2,
        allowed_inputs=["s3://a/", "s3://b/"],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGQ_")}
    code = "from config import Settings; print(Settings().model_dump_json())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **settings.to_env()},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Settings.model_validate_json(out) == settings


def test_no_models_is_a_clear_exit(tmp_path, capsys) -> None:
    assert main(["--models", str(tmp_path), "--quick"]) == 2
    assert "bench.export_models" in capsys.readouterr().err


def test_a_gpu_run_where_there_is_none_says_so() -> None:
    status = gpu_status(["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert status["available"] is True
    else:
        assert status["available"] is False and status["note"].startswith("no GPU here")


def test_the_queue_benchmark_runs_a_real_worker(
    sam2_repo, detr_repo, redis_server, redis_url, s3_server, settings, tmp_path
) -> None:
    """Parts 3 and 4b (end to end, memory) through a ``segq worker`` subprocess on the tiny
    models: every job succeeds and the report carries its figures."""
    from bench.queue import bench_memory, bench_queue

    models = tmp_path / "models"
    models.mkdir()
    (models / "sam2").symlink_to(sam2_repo)
    (models / "detr").symlink_to(detr_repo)
    photo = photo_jpeg(320, 240)
    queue = bench_queue(models, redis_server, s3_server, photo, sequential=2, burst=2,
                        job_types=("segment", "panoptic", "cutout", "overlay"))  # fmt: skip
    assert queue["burst"]["jobs_per_s"] > 0 and queue["rss_mb"] > 0
    assert queue["latency_ms"]["p50"] >= queue["pipeline_ms"] > 0
    assert set(queue["by_job"]) == {"segment", "panoptic", "cutout", "overlay"}
    for job in queue["by_job"].values():
        assert job["latency_ms"]["p50"] >= job["pipeline_ms"] > 0 and job["ratio_to_pipeline"] > 1
    memory = bench_memory(models, redis_server, s3_server, photo, rounds=1)
    assert set(memory["jobs"]) == {"segment", "panoptic", "cutout", "overlay"}
    assert memory["peak_mb"] >= memory["steady_mb"] > 0


def test_the_affinity_benchmark_runs_click_sessions_on_and_off(
    redis_server, s3_server, sam2_repo, tmp_path, monkeypatch
) -> None:
    """bench.affinity on the tiny models: with affinity every later click hits its image's
    embedding and no image is encoded twice."""
    import shutil

    from bench.affinity import bench_affinity

    shutil.copytree(sam2_repo, tmp_path / "sam2")
    s3_server.start()
    for name, value in s3_server.env().items():  # as bench.queue.local_services does
        monkeypatch.setenv(name, value)
    report = bench_affinity(tmp_path, redis_server, s3_server, workers=2, images=3, clicks=3,
                            size=(96, 64), kill=True, heartbeat_ttl_s=2.0, think_s=1.0)  # fmt: skip
    on, off, killed = report["runs"]["on"], report["runs"]["off"], report["runs"]["on, holder killed"]
    assert on["cache_hit_rate_later_clicks"] == 1.0 and on["duplicate_encodes"] == 0
    assert on["clicks"] == off["clicks"] == killed["clicks"] == 9 and off["encodes"] >= 3
    # every click of the killed run succeeded; each image the victim held was encoded once more
    assert killed["kill"]["clicks_lost"] == 0
    assert killed["kill"]["re_encodes"] == killed["kill"]["images_held"] >= 1
