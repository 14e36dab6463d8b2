"""`segq dev`, the README's first command, through its real entry point: it starts Redis,
S3, a worker, Flower and the HTTP API with its page, runs the sample through all four job types, tells other shells how
to reach the stack, and on Ctrl-C stops everything it started.

Each run gets a session of its own (``start_new_session``), so "nothing left running" means
no process of that session survives: the servers `segq dev` started, not whatever else
runs on the machine.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.support.hub import FakeHub, public_repos, serving

SEGQ = Path(sys.executable).parent / "segq"
JOB_LINE = r"^{kind}\s+([0-9a-f]{{32}})\s+succeeded"


def session_processes(session_id: int) -> set[int]:
    """Pids of the live processes whose session is ``session_id`` (Linux /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without any SEGQ_/AWS_/HF_ setting of the machine's, as a newcomer has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGQ_", "AWS_", "HF_"))}
    env.update(PYTHONUNBUFFERED="1", HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1")
    env.update(extra)
    return env


def run_once(tmp_path: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(SEGQ), "dev", "--once"], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout, start_new_session=True,
    )  # fmt: skip
    return done


def assert_all_four_jobs_ran(out: str, tmp_path: Path) -> dict[str, str]:
    ids = {}
    for kind in ("segment", "panoptic", "cutout", "overlay"):
        found = re.search(JOB_LINE.format(kind=kind), out, re.M)
        assert found, out
        ids[kind] = found.group(1)
    assert "http://127.0.0.1:" in out and "X-Amz-Signature" in out  # presigned URLs
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+ +\(user segq, password \S+\)", out)
    saved = sorted(p.name for p in (tmp_path / "segq-dev-output").iterdir())
    assert "cutout-cutout.png" in saved and "overlay-overlay.png" in saved
    return ids


def test_segq_dev_with_the_public_models_runs_until_ctrl_c_and_other_shells_can_use_it(
    tmp_path, sam2_repo, detr_repo
):
    """The models come from the hub (a loopback stand-in under the public repo names); the
    stack keeps running, the printed line lets another shell wait for a job, and Ctrl-C
    stops every process `segq dev` started."""
    with serving(FakeHub(repos=public_repos(sam2_repo, detr_repo))) as hub:
        env = clean_env(tmp_path, HF_ENDPOINT=hub.url, SEGQ_HF_CACHE_DIR=str(tmp_path / "cache"),
                        SEGQ_PROVIDERS='["CPUExecutionProvider"]')  # fmt: skip
        dev = subprocess.Popen(
            [str(SEGQ), "dev"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in dev.stdout], daemon=True).start()
        out = ""
        try:
            deadline = time.monotonic() + 240
            while "keeps running" not in out:
                assert time.monotonic() < deadline and dev.poll() is None, out
                try:
                    out += lines.get(timeout=1)
                except queue.Empty:
                    pass
            ids = assert_all_four_jobs_ran(out, tmp_path)
            assert hub.gets("/encoder.onnx") == 1 and hub.gets("/onnx/model.onnx") == 1

            export = re.search(r"^\s*(export .*)$", out, re.M).group(1)
            assert "AWS_SECRET_ACCESS_KEY=" in export and "SEGQ_REDIS_URL=" in export
            # the HTTP API and its page, on loopback, at the printed URL
            api = re.search(r"^HTTP API and the try-it page: (http://127\.0\.0\.1:\d+)/", out, re.M).group(1)
            assert f"SEGQ_API_URL={api}" in export
            with urllib.request.urlopen(f"{api}/v1/jobs/{ids['cutout']}", timeout=10) as answer:
                assert json.load(answer)["state"] == "succeeded"
            with urllib.request.urlopen(f"{api}/", timeout=10) as answer:
                assert b"/static/app.js" in answer.read()
            other = subprocess.run(
                ["bash", "-c", f"{export}; segq wait {ids['cutout']} --urls"],
                env={**clean_env(tmp_path), "PATH": f"{SEGQ.parent}:{os.environ['PATH']}"},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert other.returncode == 0, other.stderr
            assert re.search(r"^cutout\.png: http://127\.0\.0\.1:\d+/\S+X-Amz-Signature", other.stdout, re.M)
        finally:
            os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
            dev.wait(timeout=60)
        assert dev.returncode == 0
        assert not session_processes(dev.pid), "segq dev left a process running"


def test_segq_dev_with_local_model_directories(tmp_path, sam2_repo, detr_repo):
    """The README's fallback: SEGQ_SAM2_DIR / SEGQ_DETR_DIR, no hub at all."""
    done = run_once(tmp_path, clean_env(
        tmp_path, SEGQ_SAM2_DIR=str(sam2_repo), SEGQ_DETR_DIR=str(detr_repo),
        SEGQ_PROVIDERS='["CPUExecutionProvider"]', HF_ENDPOINT="http://127.0.0.1:9",
    ))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_all_four_jobs_ran(done.stdout, tmp_path)


def test_segq_dev_offline_from_a_filled_cache(tmp_path, sam2_repo, detr_repo):
    """The other fallback: a cache filled by `segq download-models` where the hub was
    reachable, then SEGQ_OFFLINE=true where it is not."""
    cache = str(tmp_path / "cache")
    with serving(FakeHub(repos=public_repos(sam2_repo, detr_repo))) as hub:
        filled = subprocess.run(
            [str(SEGQ), "download-models"], env=clean_env(tmp_path, HF_ENDPOINT=hub.url, SEGQ_HF_CACHE_DIR=cache),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert filled.returncode == 0, filled.stderr
    done = run_once(tmp_path, clean_env(
        tmp_path, SEGQ_HF_CACHE_DIR=cache, SEGQ_OFFLINE="true",
        SEGQ_PROVIDERS='["CPUExecutionProvider"]', HF_ENDPOINT="http://127.0.0.1:9",
    ))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert_all_four_jobs_ran(done.stdout, tmp_path)


def test_segq_dev_says_in_one_line_when_the_models_cannot_be_had(tmp_path):
    done = run_once(
        tmp_path, clean_env(tmp_path, SEGQ_OFFLINE="true", SEGQ_HF_CACHE_DIR=str(tmp_path / "empty")),
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    assert "SEGQ_SAM2_DIR" in lines[0] and "segq download-models" in lines[0]
