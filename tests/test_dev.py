"""`segq dev`, the README's first command, through its real entry point: it starts Redis,
S3, a worker and Flower, runs the sample through all four job types, and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def _servers() -> set[int]:
    """Pids of running redis-server and weed processes (Linux /proc)."""
    found = set()
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("redis-server", "weed"):
                found.add(int(comm.parent.name))
        except OSError:
            continue
    return found


def _run_dev(tmp_path: Path, extra_env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGQ_", "AWS_"))}
    env.update(extra_env, PYTHONUNBUFFERED="1", HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(
        [sys.executable, "-m", "api_client.cli", "dev", "--once"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )


def test_segq_dev_runs_the_sample_through_all_four_jobs(tmp_path, sam2_repo, detr_repo):
    before = _servers()
    done = _run_dev(tmp_path, {
        "SEGQ_SAM2_DIR": str(sam2_repo),
        "SEGQ_DETR_DIR": str(detr_repo),
        "SEGQ_PROVIDERS": '["CPUExecutionProvider"]',
    })
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for kind in ("segment", "panoptic", "cutout", "overlay"):
        assert re.search(rf"^{kind}\s+[0-9a-f]{{32}}\s+succeeded", out, re.M), out
    assert "http://127.0.0.1:" in out and "X-Amz-Signature" in out  # presigned URLs
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+ +\(user segq, password \S+\)", out)
    saved = sorted(p.name for p in (tmp_path / "segq-dev-output").iterdir())
    assert "cutout-cutout.png" in saved and "overlay-overlay.png" in saved
    assert not _servers() - before, "segq dev left a server running"


def test_segq_dev_says_in_one_line_when_the_models_cannot_be_had(tmp_path):
    done = _run_dev(tmp_path, {"SEGQ_OFFLINE": "true", "SEGQ_HF_CACHE_DIR": str(tmp_path / "empty")}, timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    assert "SEGQ_SAM2_DIR" in lines[0] and "segq download-models" in lines[0]

